"""What a call returns belongs to the caller (issue 25, item 1): outputs kept
without a copy keep their values, editing one never changes a later step, and
the ``out=`` buffers are checked. Streams (dense and 90% CSR), pools and the
batcher; device streams in tests/test_device.py."""

import numpy as np
import pytest

import numlstm
from numlstm.serve import Batcher

I, H, T = 4, 16, 12


def _model(kind):
    m = numlstm.LSTM(I, H, num_layers=2, dtype=np.float64, seed=3)
    if kind == "csr90":
        numlstm.prune.magnitude(m, 0.9)
    return m


@pytest.fixture(params=["dense", "csr90"])
def model(request):
    return _model(request.param)


def _xs(seed=0, B=1):
    return np.random.default_rng(seed).standard_normal((T, B, I))


def _reference(model, xs):
    """Every step's output of a fresh stream, each copied at once."""
    s = model.stream(xs.shape[1])
    return np.stack([np.array(s.step(x), copy=True) for x in xs])


def test_stream_outputs_kept_without_a_copy_stay_right(model):
    xs = _xs()
    s = model.stream(1)
    kept = [s.step(x) for x in xs]  # no .copy()
    np.testing.assert_array_equal(np.stack(kept), _reference(model, xs))
    assert len({id(k) for k in kept}) == T and not any(
        np.shares_memory(a, b) for a, b in zip(kept, kept[1:], strict=False))


def test_editing_a_stream_output_changes_no_later_step(model):
    xs = _xs(1)
    ref = _reference(model, xs)
    s = model.stream(1)
    for t, x in enumerate(xs):
        h = s.step(x)
        np.testing.assert_array_equal(h, ref[t])
        h += 1  # the caller's array: neither the state nor the next step moves
        h[...] = np.nan


def test_the_stream_state_is_never_handed_out_writeable(model):
    s = model.stream(1)
    s.step(_xs()[0])
    h, c = s.state
    before = [a.copy() for a in (h, c)]
    h += 1
    c[...] = 0
    np.testing.assert_array_equal(s.state[0], before[0])
    np.testing.assert_array_equal(s.state[1], before[1])


def test_stream_out_is_written_and_checked(model):
    xs = _xs(2, B=2)
    ref = _reference(model, xs)
    s = model.stream(2)
    buf = np.full((2, H), np.nan)
    for t, x in enumerate(xs):
        assert s.step(x, out=buf) is buf
        np.testing.assert_array_equal(buf, ref[t])
    state = s.state
    read_only = np.zeros((2, H))
    read_only.flags.writeable = False
    bad = [
        (TypeError, "out must be a NumPy array of shape \\(2, 16\\)", [[0.0] * H] * 2),
        (ValueError, r"out must have shape \(2, 16\), got \(1, 16\)", np.zeros((1, H))),
        (TypeError, "out must have dtype float64 like the model, got float32",
         np.zeros((2, H), np.float32)),
        (ValueError, "out must be C-contiguous", np.zeros((H, 2)).T),
        (ValueError, "out must be writeable", read_only),
        (ValueError, "out overlaps the stream's own buffers", s._h[-1]),
    ]
    for error, message, out in bad:
        with pytest.raises(error, match=message):
            s.step(xs[0], out=out)
    for got, want in zip(s.state, state, strict=True):  # a refused out: no step
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["dense", "csr90"])
def test_pool_outputs_kept_without_a_copy_stay_right(kind):
    m = _model(kind)
    pool = m.stream_pool(3)
    sids = np.array([pool.open() for _ in range(3)])
    xs = _xs(3, B=3)
    kept = [pool.step(sids, x) for x in xs]
    np.testing.assert_allclose(np.stack(kept), _reference(m, xs), rtol=1e-12, atol=1e-13)
    again = m.stream_pool(3)
    ids = np.array([again.open() for _ in range(3)])
    for t, x in enumerate(xs):
        h = again.step(ids, x)
        np.testing.assert_array_equal(h, kept[t])
        h += 1  # the caller's: the next step does not see it
        h[...] = np.nan


def test_pool_out_is_written_and_checked():
    m = _model("dense")
    pool = m.stream_pool(3)
    sids = np.array([pool.open(), pool.open()])
    x = _xs(4, B=2)[0]
    buf = np.empty((2, H))
    assert pool.step(sids, x, out=buf) is buf
    expected = m.stream(2).step(x)
    np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-13)
    state = pool.state(int(sids[0]))
    read_only = np.zeros((2, H))
    read_only.flags.writeable = False
    for error, message, out in [
        (TypeError, "out must be a NumPy array", "buf"),
        (ValueError, r"out must have shape \(2, 16\), got \(3, 16\)", np.zeros((3, H))),
        (TypeError, "out must have dtype float64", np.zeros((2, H), np.float32)),
        (ValueError, "out must be C-contiguous", np.zeros((H, 2)).T),
        (ValueError, "out must be writeable", read_only),
        (ValueError, "out overlaps the pool's own buffers", pool._h[0, :2]),
    ]:
        with pytest.raises(error, match=message):
            pool.step(sids, x, out=out)
    np.testing.assert_array_equal(pool.state(int(sids[0]))[0], state[0])  # nothing moved


def test_batcher_results_kept_without_a_copy_stay_right(model):
    pool = model.stream_pool(2)
    a, b = pool.open(), pool.open()
    xs = _xs(5, B=2)
    ref = _reference(model, xs)
    with Batcher(pool, max_batch=2, max_delay=0.5) as batcher:
        kept = []
        for x in xs:
            fa, fb = batcher.submit(a, x[0]), batcher.submit(b, x[1])
            ha, hb = fa.result(10), fb.result(10)
            kept.append((ha, hb))
            assert not np.shares_memory(ha, hb)
            np.testing.assert_allclose(ha, ref[len(kept) - 1, 0], rtol=1e-12, atol=1e-13)
            ha += 1  # the caller's: b's result and the next steps do not move
            hb[...] = np.nan
            np.testing.assert_allclose(ha - 1, ref[len(kept) - 1, 0], rtol=1e-12, atol=1e-13)
    for t, (ha, hb) in enumerate(kept):
        np.testing.assert_allclose(ha - 1, ref[t, 0], rtol=1e-12, atol=1e-13)
        assert np.isnan(hb).all()

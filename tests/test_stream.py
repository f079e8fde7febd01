"""Streaming inference: equals forward, carries state, allocates nothing."""

import tracemalloc

import numpy as np
import pytest
from helpers import TOL, build, nrt_allocations
from hypothesis import given
from strategies import configs

import numlstm


@given(configs(max_T=8))
def test_stream_over_T_steps_equals_forward(cfg):
    cfg.D, cfg.lengths = 1, None
    m, x, h0, c0, _ = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0))
    s = m.stream(cfg.B, state=(h0, c0))
    steps = np.stack([s.step(x[t]).copy() for t in range(cfg.T)])
    tol = TOL[cfg.dtype]
    np.testing.assert_allclose(steps, y, **tol)
    h, c = s.state
    np.testing.assert_allclose(h, h_n, **tol)
    np.testing.assert_allclose(c, c_n, **tol)


def test_step_returns_a_new_array_and_reset_clears_the_state():
    m = numlstm.LSTM(3, 5, num_layers=2, seed=0)
    s = m.stream(2)
    x = np.ones((2, 3), np.float32)
    first = s.step(x)
    out = s.step(x)
    assert out.shape == (2, 5) and out.flags.owndata and out.flags.writeable
    assert not np.allclose(out, first)  # the state moved on; first kept its values
    s.reset()
    assert not np.any(s.state[0]) and not np.any(s.state[1])
    np.testing.assert_array_equal(s.step(x), first)


def test_stream_converts_other_float_precisions():
    m = numlstm.LSTM(3, 4, seed=0)
    a, b = m.stream(), m.stream()
    x = np.linspace(-1, 1, 3)[None, :]
    np.testing.assert_array_equal(a.step(x), b.step(x.astype(np.float32)))


def test_stream_sees_in_place_updates_and_rebinds_after_load_state_dict():
    m = numlstm.LSTM(3, 4, dtype=np.float64, seed=0)
    s = m.stream()
    x = np.ones((1, 3))
    m.parameters()["bias_ih_l0"][:] += 1.0  # in place: seen by the stream
    expected, _ = m(x[None])
    np.testing.assert_allclose(s.step(x), expected[0], atol=1e-14)
    state = m.state_dict()
    state["weight_hh_l0"] *= 0.5
    m.load_state_dict(state)  # new arrays: the stream rebinds
    s.reset()
    expected, _ = m(x[None])
    np.testing.assert_allclose(s.step(x), expected[0], atol=1e-14)


def test_bidirectional_model_cannot_stream():
    with pytest.raises(ValueError, match="bidirectional"):
        numlstm.LSTM(3, 4, bidirectional=True).stream()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_stream_batch_size_is_checked(bad):
    with pytest.raises(ValueError, match="batch_size"):
        numlstm.LSTM(3, 4).stream(bad)


def _model(kind, L, P):
    """A small model whose weights are stored as ``kind``."""
    m = numlstm.LSTM(16, 32, num_layers=L, proj_size=P, seed=0)
    if kind == "bsr":
        numlstm.prune.blocks(m, 0.75, block=(8, 1))
    elif kind != "dense":
        numlstm.prune.magnitude(m, 0.8)
        if kind != "csr":
            numlstm.quantize.quantize(m, kind.removeprefix("csr-"))
    return m


@pytest.mark.parametrize("kind", ["dense", "csr", "csr-float16", "csr-int8", "bsr"])
@pytest.mark.parametrize("L,P,B", [(1, 0, 1), (2, 8, 1), (3, 0, 64)])
def test_step_allocates_nothing(kind, L, P, B):
    """No heap allocation per Python-level step into ``out``: numba's NRT
    statistics (one kernel call that unboxes no array) and tracemalloc
    (Python and NumPy)."""
    s = _model(kind, L, P).stream(B)
    x = np.ones((B, 16), np.float32)
    h = np.empty((B, s.model.output_size), np.float32)
    assert s.step(x, out=h) is h
    assert nrt_allocations(lambda: s.step(x, out=h)) == 0

    # The whole Python step: no retained memory and no transient array (with
    # B = 64, one (B, O) float32 array is >= 2 KiB: far above the bound).
    tracemalloc.start()
    try:
        for _ in range(1000):  # numba's dispatcher fills its caches once when traced
            s.step(x, out=h)
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5000):
            s.step(x, out=h)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One 32-byte object comes and goes with the interpreter's free lists; a
    # leak of even one byte a step would show here as >= 5000.
    assert end - start < 64, end - start
    assert peak - start < 1024, peak - start


@pytest.mark.parametrize("kind,L,P,B", [("dense", 1, 0, 1), ("csr", 2, 8, 1),
                                        ("bsr", 3, 0, 64)])
def test_a_default_step_allocates_its_output_and_nothing_else(kind, L, P, B):
    """Without ``out``: no NRT allocation either, and per step exactly one
    NumPy array of (B, O), which lives as long as the caller keeps it."""
    s = _model(kind, L, P).stream(B)
    x = np.ones((B, 16), np.float32)
    s.step(x)
    assert nrt_allocations(lambda: s.step(x)) == 0
    nbytes = B * s.model.output_size * 4
    kept = []
    tracemalloc.start()
    try:
        for _ in range(1000):
            s.step(x)
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            kept.append(s.step(x))
        held, _ = tracemalloc.get_traced_memory()
        del kept[:]
        tracemalloc.reset_peak()
        for _ in range(2000):
            s.step(x)  # each dropped at once
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_step = (held - start) / 2000 - 8  # less the list's slot for it
    # The data and the array object (~112 bytes, with its shape and strides);
    # NumPy puts data under 1 KiB in its small-block cache.
    assert nbytes <= per_step <= nbytes + 256, (per_step, nbytes)
    assert end - start < 16 * 1024, end - start  # none kept: the list's own memory at most
    assert peak - end < nbytes + 1024, (peak - end, nbytes)


def test_streams_of_one_model_run_concurrently_in_threads():
    """Streams own their buffers and kernels release the GIL: four threads,
    each stepping its own stream of one shared model, match a lone stream."""
    from concurrent.futures import ThreadPoolExecutor

    m = numlstm.LSTM(8, 16, num_layers=2, seed=0)
    xs = np.random.default_rng(0).standard_normal((4, 200, 2, 8)).astype(np.float32)

    def run(k):
        s = m.stream(2)
        return np.stack([s.step(xs[k, t]) for t in range(xs.shape[1])])

    alone = [run(k) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, range(4)))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)

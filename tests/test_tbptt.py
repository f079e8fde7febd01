"""Truncated BPTT: chunked training equals hand-run chunks, forward values equal
the untruncated forward, memory is bounded by the chunk, bad arguments raise."""

import inspect
import tracemalloc

import numpy as np
import pytest
from helpers import build
from hypothesis import given
from hypothesis import strategies as st
from strategies import configs

import numlstm

TIGHT = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _sq_loss(y, start, stop):
    """0.5 * sum(y**2) and its gradient y (a copy: loss_grad owns y anyway)."""
    return 0.5 * float(np.sum(y.astype(np.float64) ** 2)), y.copy()


class _Recorder:
    """An ``update`` that keeps each chunk's gradients, then steps SGD."""

    def __init__(self, lr=0.0):
        self.lr, self.grads = lr, []

    def __call__(self, model):
        g = model.grad_arrays()
        self.grads.append({n: a.copy() for n, a in g.items()})
        for n, p in model.parameters().items():
            p -= self.lr * g[n]


def _sgd(model, lr):
    for n, p in model.parameters().items():
        p -= lr * model.grad_arrays()[n]


def _unidirectional(cfg):
    cfg.D = 1
    return cfg


@given(configs(max_T=8).map(_unidirectional), st.data())
def test_one_chunk_equals_plain_forward_backward(cfg, data):
    chunk = data.draw(st.integers(cfg.T, cfg.T + 3))
    m, x, h0, c0, _ = build(cfg)
    rec = _Recorder()
    ys = []

    def loss_grad(y, start, stop):
        ys.append(y)
        return _sq_loss(y, start, stop)

    losses, (h, c) = numlstm.truncated_bptt(m, x, loss_grad, rec, chunk=chunk,
                                            state=(h0, c0), lengths=cfg.lengths)
    ref, _, _, _, _ = build(cfg)
    y, (h_n, c_n) = ref(x, (h0, c0), lengths=cfg.lengths, training=True)
    ref.backward(y)
    assert losses.shape == (1,) and losses.dtype == np.float64
    assert losses[0] == pytest.approx(_sq_loss(y, 0, cfg.T)[0], rel=1e-6)
    np.testing.assert_array_equal(ys[0], y)
    np.testing.assert_array_equal(h, h_n)
    np.testing.assert_array_equal(c, c_n)
    for n, g in ref.grad_arrays().items():
        np.testing.assert_array_equal(rec.grads[0][n], g, err_msg=n)


@given(configs(max_T=12, dtypes=(np.float64,)).map(_unidirectional), st.data())
def test_k_chunks_equal_hand_run_chunks_and_the_untruncated_forward(cfg, data):
    cfg.lengths = None  # lengths: test_lengths_... below
    chunk = data.draw(st.integers(1, cfg.T))
    lr = 0.05
    m, x, h0, c0, _ = build(cfg)
    rec = _Recorder(lr)
    ys = []

    def loss_grad(y, start, stop):
        assert y.shape == (stop - start, cfg.B, cfg.O)
        ys.append(y)
        return _sq_loss(y, start, stop)

    losses, (h, c) = numlstm.truncated_bptt(m, x, loss_grad, rec, chunk=chunk, state=(h0, c0))
    starts = list(range(0, cfg.T, chunk))
    assert len(losses) == len(rec.grads) == len(ys) == len(starts)

    # By hand: forward from the previous chunk's state, backward, SGD.
    hand, _, _, _, _ = build(cfg)
    state = (h0, c0)
    for j, start in enumerate(starts):
        stop = min(start + chunk, cfg.T)
        hand.zero_grad()
        y, new_state = hand(x[start:stop], state, training=True)
        hand.backward(y)
        np.testing.assert_allclose(ys[j], y, **TIGHT[cfg.dtype])
        assert losses[j] == pytest.approx(_sq_loss(y, start, stop)[0], rel=1e-12)
        for n, g in hand.grad_arrays().items():
            np.testing.assert_allclose(rec.grads[j][n], g, err_msg=f"{n}, chunk {j}",
                                       **TIGHT[cfg.dtype])
        _sgd(hand, lr)
        state = new_state
    np.testing.assert_allclose(h, state[0], **TIGHT[cfg.dtype])
    np.testing.assert_allclose(c, state[1], **TIGHT[cfg.dtype])
    for n, p in hand.parameters().items():
        np.testing.assert_allclose(m.parameters()[n], p, err_msg=n, **TIGHT[cfg.dtype])


@given(configs(max_T=12).map(_unidirectional), st.data())
def test_forward_values_and_carried_state_equal_one_untruncated_forward(cfg, data):
    """With no parameter update, the chunks' outputs and final state are those of
    one forward over the whole series (lengths included): only gradients are cut."""
    chunk = data.draw(st.integers(1, cfg.T))
    m, x, h0, c0, _ = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths)
    ys = []

    def loss_grad(y, start, stop):
        ys.append(y)
        return _sq_loss(y, start, stop)

    _, (h, c) = numlstm.truncated_bptt(m, x, loss_grad, lambda model: None, chunk=chunk,
                                       state=(h0, c0), lengths=cfg.lengths)
    tol = TIGHT[cfg.dtype]
    np.testing.assert_allclose(np.concatenate(ys), y, **tol)
    np.testing.assert_allclose(h, h_n, **tol)
    np.testing.assert_allclose(c, c_n, **tol)


def test_float64_forward_values_are_identical_to_the_untruncated_forward():
    m = numlstm.LSTM(3, 5, num_layers=2, proj_size=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((23, 4, 3))
    lengths = np.array([23, 5, 10, 17])
    y, (h_n, c_n) = m(x, lengths=lengths)
    ys = []
    _, (h, c) = numlstm.truncated_bptt(m, x, lambda y, a, b: (ys.append(y) or 0.0, y),
                                       lambda model: None, chunk=5, lengths=lengths)
    np.testing.assert_array_equal(np.concatenate(ys), y)
    np.testing.assert_array_equal(h, h_n)
    np.testing.assert_array_equal(c, c_n)


def test_lengths_ended_sequences_add_no_gradient():
    """Chunk j's gradient equals a hand-run chunk over only the sequences still
    running, each from its carried state, with the chunk's remaining lengths."""
    m = numlstm.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=1)
    rng = np.random.default_rng(1)
    T, B, chunk = 14, 4, 4
    x = rng.standard_normal((T, B, 3))
    lengths = np.array([14, 3, 8, 9])
    rec = _Recorder()
    numlstm.truncated_bptt(m, x, _sq_loss, rec, chunk=chunk, lengths=lengths)
    h = np.zeros((2, B, 4))
    c = np.zeros((2, B, 4))
    for j, start in enumerate(range(0, T, chunk)):
        stop = min(start + chunk, T)
        left = np.clip(lengths - start, 0, stop - start)
        alive = left > 0
        m.zero_grad()
        y, (hn, cn) = m(x[start:stop][:, alive], (h[:, alive], c[:, alive]),
                        lengths=left[alive], training=True)
        m.backward(y)
        for n, g in m.grad_arrays().items():
            np.testing.assert_allclose(rec.grads[j][n], g, rtol=1e-12, atol=1e-13,
                                       err_msg=f"{n}, chunk {j}")
        h[:, alive], c[:, alive] = hn, cn


@pytest.mark.parametrize("layout", ["batch_first", "batch_first+lengths", "unbatched"])
def test_batch_first_and_unbatched_series(layout):
    kw = dict(batch_first=True) if layout.startswith("batch_first") else {}
    lengths = np.array([11, 3]) if layout.endswith("lengths") else None
    m = numlstm.LSTM(2, 3, dtype=np.float64, seed=0, **kw)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 2) if kw else (11, 2))
    y, (h_n, c_n) = m(x, lengths=lengths)
    ys = []

    def loss_grad(y, start, stop):
        ys.append(y)
        return _sq_loss(y, start, stop)

    losses, (h, c) = numlstm.truncated_bptt(m, x, loss_grad, lambda model: None, chunk=4,
                                            lengths=lengths)
    assert len(losses) == 3
    axis = 1 if kw else 0
    assert [a.shape[axis] for a in ys] == [4, 4, 3]
    np.testing.assert_allclose(np.concatenate(ys, axis=axis), y, rtol=1e-12, atol=1e-13)
    assert h.shape == h_n.shape and c.shape == c_n.shape
    np.testing.assert_allclose(h, h_n, rtol=1e-12, atol=1e-13)


def test_memory_is_bounded_by_the_chunk_not_the_series():
    """tracemalloc's peak while training over a 10x longer series stays the same."""
    m = numlstm.LSTM(2, 8, seed=0)
    rng = np.random.default_rng(0)
    chunk, long_T = 1000, 10**6
    x = rng.standard_normal((long_T, 1, 2), dtype=np.float32)  # 8 MB, made before tracing

    def loss_grad(y, start, stop):
        return float(np.mean(y * y)), y * np.float32(2 / y.size)

    update = _sgd_update(0.01)
    numlstm.truncated_bptt(m, x[:2 * chunk], loss_grad, update, chunk=chunk)  # warm up
    peaks = {}
    for T in (long_T // 10, long_T):
        tracemalloc.start()
        losses, _ = numlstm.truncated_bptt(m, x[:T], loss_grad, update, chunk=chunk)
        peaks[T] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert losses.shape == (T // chunk,) and np.all(np.isfinite(losses))
    losses_bytes = 8 * long_T // chunk  # the returned (T / chunk,) float64 losses
    assert peaks[long_T] <= peaks[long_T // 10] + losses_bytes + 16 * 1024, peaks
    assert peaks[long_T] < 1 << 20, peaks  # a few chunk-sized temporaries, not the 8 MB x


def _sgd_update(lr):
    return lambda model: _sgd(model, lr)


def _ok_loss(y, start, stop):
    return 0.0, np.zeros_like(y)


def _noop(model):
    pass


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(chunk=0), ValueError, r"chunk must be >= 1, got 0"),
    (dict(chunk=2.0), TypeError, r"chunk must be an int, got float"),
    (dict(chunk=True), TypeError, r"chunk must be an int, got bool"),
    (dict(chunk=2, loss_grad=None), TypeError,
     r"loss_grad must be a callable \(y, start, stop\) -> \(loss, dy\), got NoneType"),
    (dict(chunk=2, update=3), TypeError,
     r"update must be a callable \(model\) -> None, got int"),
    (dict(chunk=2, x=np.zeros((5, 2, 4))), ValueError,
     r"x must have shape \(T, B, 3\) for input_size=3, got \(5, 2, 4\)"),
    (dict(chunk=2, x=np.zeros((5, 2, 3), np.int64)), TypeError,
     r"x must be a floating-point array, got dtype int64"),
    (dict(chunk=2, lengths=np.array([5, 6])), ValueError,
     r"lengths must lie in \[1, 5\] for T=5, got values in \[5, 6\]"),
    (dict(chunk=2, lengths=np.array([5])), ValueError,
     r"lengths must have shape \(2,\) for batch size 2, got \(1,\)"),
    (dict(chunk=2, state=np.zeros((1, 2, 4))), TypeError,
     r"state must be a tuple \(h, c\), got ndarray"),
    (dict(chunk=2, state=(np.zeros((1, 2, 5)), np.zeros((1, 2, 4)))), ValueError,
     r"state\[0\] \(h\) must have shape \(1, 2, 4\).*got \(1, 2, 5\)"),
    (dict(chunk=2, loss_grad=lambda y, a, b: np.zeros_like(y)), TypeError,
     r"loss_grad must return a pair \(loss, dy\), got an array of shape \(2, 2, 4\).* "
     r"for the chunk \[0, 2\)"),
    (dict(chunk=2, loss_grad=lambda y, a, b: ("1.0", y)), TypeError,
     r"loss_grad must return a real number as loss, got str '1.0' for the chunk \[0, 2\)"),
    (dict(chunk=2, loss_grad=lambda y, a, b: (0.0, y[:1])), ValueError,
     r"dy must have shape \(2, 2, 4\).*got \(1, 2, 4\)"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    m = numlstm.LSTM(3, 4, seed=0)
    args = dict(x=np.zeros((5, 2, 3), np.float32), loss_grad=_ok_loss, update=_noop)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        numlstm.truncated_bptt(m, args.pop("x"), args.pop("loss_grad"), args.pop("update"),
                               **args)


def test_bad_model_and_bidirectional_model_raise():
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(TypeError, match=r"model must be a numlstm.LSTM, got dict"):
        numlstm.truncated_bptt({}, x, _ok_loss, _noop, chunk=2)
    m = numlstm.LSTM(3, 4, bidirectional=True, seed=0)
    with pytest.raises(ValueError, match=r"needs a unidirectional model.*whole series; "
                                         r"got bidirectional=True"):
        numlstm.truncated_bptt(m, x, _ok_loss, _noop, chunk=2)


def test_unknown_forward_options_raise_before_training():
    m = numlstm.LSTM(3, 4, seed=0)
    x = np.zeros((5, 2, 3), np.float32)
    calls = []
    with pytest.raises(TypeError, match=r"bogus needs LSTM.forward\(..., bogus=...\)"):
        numlstm.tbptt._forward_kwargs(m, bogus=1)
    numlstm.truncated_bptt(m, x, _ok_loss, calls.append, chunk=2)  # no options: fine
    assert len(calls) == 3


@pytest.mark.skipif("checkpoint" not in inspect.signature(numlstm.LSTM.forward).parameters,
                    reason="LSTM.forward does not accept checkpoint= yet")
@pytest.mark.parametrize("checkpoint", [2, "auto"])
def test_checkpointed_chunks_give_the_full_tape_gradients(checkpoint):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((17, 3, 3))
    runs = []
    for ckpt in (None, checkpoint):
        m = numlstm.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=2)
        rec = _Recorder(lr=0.1)
        losses, state = numlstm.truncated_bptt(m, x, _sq_loss, rec, chunk=6, checkpoint=ckpt)
        runs.append((losses, state, rec.grads))
    (l0, s0, g0), (l1, s1, g1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    np.testing.assert_allclose(s1[0], s0[0], rtol=1e-12, atol=1e-13)
    for a, b in zip(g1, g0, strict=True):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-12, atol=1e-13, err_msg=n)

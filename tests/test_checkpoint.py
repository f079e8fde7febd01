"""Checkpointed BPTT equals the full tape, in far less memory; memory_budget picks plans."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import build
from hypothesis import given
from hypothesis import strategies as st
from strategies import configs

import numlstm

# float64 sums in another order (per segment) agree to ~1e-15; float32 to a few ulps
# of the values involved, which grow through the layers of a tiny random model.
CLOSE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def _twin(m, cfg, **kwargs):
    """A second model with m's parameters and dropout generator (same masks)."""
    twin = numlstm.LSTM(cfg.I, cfg.H, **{**cfg.model_kwargs(), **kwargs})
    twin.load_state_dict(m.state_dict())
    twin._rng.bit_generator.state = m._rng.bit_generator.state
    return twin


def _step(m, x, h0, c0, cfg, dy, dh_n, dc_n, **kwargs):
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True, **kwargs)
    dx, (dh0, dc0) = m.backward(dy, (dh_n, dc_n))
    grads = {k: g.copy() for k, g in m.grad_arrays().items()}
    return [y, h_n, c_n, dx, dh0, dc0], grads


@given(configs(), st.data(), st.sampled_from([0.0, 0.5]))
def test_checkpointed_equals_full_tape(cfg, data, dropout):
    segment = data.draw(st.one_of(st.integers(1, cfg.T + 1), st.just("auto")), label="segment")
    m, x, h0, c0, rng = build(cfg)
    full = _twin(m, cfg, dropout=dropout if cfg.L > 1 else 0.0)
    ckpt = _twin(full, cfg, dropout=full.dropout)
    DO = cfg.D * cfg.O
    dy = rng.standard_normal((cfg.T, cfg.B, DO)).astype(cfg.dtype)
    dh_n = rng.standard_normal(h0.shape).astype(cfg.dtype)
    dc_n = rng.standard_normal(c0.shape).astype(cfg.dtype)
    a, ga = _step(full, x, h0, c0, cfg, dy, dh_n, dc_n)
    b, gb = _step(ckpt, x, h0, c0, cfg, dy, dh_n, dc_n, checkpoint=segment)
    tol = CLOSE[cfg.dtype]
    for name, u, w in zip(("y", "h_n", "c_n", "dx", "dh0", "dc0"), a, b, strict=True):
        assert u.dtype == w.dtype == cfg.dtype and u.shape == w.shape, name
        np.testing.assert_allclose(w, u, err_msg=name, **tol)
    assert set(ga) == set(gb)
    for name in ga:
        np.testing.assert_allclose(gb[name], ga[name], err_msg=name, **tol)
    for name, g in ckpt.grad.items():  # sparse gradients keep their pattern
        if sp.issparse(g):
            np.testing.assert_array_equal(g.indices, full.grad[name].indices)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("D", [1, 2])
def test_checkpoint_with_batch_first_dropout_and_unbatched(batch_first, D):
    kw = dict(num_layers=3, dropout=0.3, bidirectional=D == 2, proj_size=2,
              batch_first=batch_first, dtype=np.float64)
    full, ckpt = (numlstm.LSTM(3, 5, seed=4, **kw) for _ in range(2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9, 3) if batch_first else (9, 4, 3))
    lengths = np.array([9, 2, 5, 7])
    y, _ = full(x, lengths=lengths, training=True)
    yc, _ = ckpt(x, lengths=lengths, training=True, checkpoint=4)
    np.testing.assert_allclose(yc, y, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, _ = full.backward(dy)
    dxc, _ = ckpt.backward(dy)
    np.testing.assert_allclose(dxc, dx, atol=1e-12)
    for name in full.grad:
        np.testing.assert_allclose(ckpt.grad[name], full.grad[name], atol=1e-12)
    y1, (h1, _) = full(x[0] if batch_first else x[:, 0], training=True)  # unbatched (T, I)
    y1c, (h1c, _) = ckpt(x[0] if batch_first else x[:, 0], training=True, checkpoint="auto")
    np.testing.assert_allclose(y1c, y1, atol=1e-12)
    np.testing.assert_allclose(h1c, h1, atol=1e-12)
    d1 = full.backward(np.ones_like(y1))[0]
    d1c = ckpt.backward(np.ones_like(y1))[0]
    np.testing.assert_allclose(d1c, d1, atol=1e-12)


def test_checkpoint_float32_long_sequence_csr():
    """Many segments, float32, CSR recurrent weights: agreement to float32 rounding."""
    m = numlstm.LSTM(8, 16, num_layers=2, seed=0)
    state = m.state_dict()
    for name in ("weight_hh_l0", "weight_ih_l1"):
        w = state[name]
        w[np.abs(w) < np.quantile(np.abs(w), 0.8)] = 0
        state[name] = sp.csr_array(w)
    m.load_state_dict(state)
    x = np.random.default_rng(1).standard_normal((300, 3, 8)).astype(np.float32)
    y, _ = m(x, training=True)
    dx, _ = m.backward(np.ones_like(y))
    full = {k: g.copy() for k, g in m.grad_arrays().items()}
    m.zero_grad()
    yc, _ = m(x, training=True, checkpoint="auto")
    assert m.engine.tape.segment == 18
    dxc, _ = m.backward(np.ones_like(y))
    np.testing.assert_allclose(yc, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dxc, dx, rtol=1e-4, atol=1e-5)
    for name, g in m.grad_arrays().items():
        np.testing.assert_allclose(g, full[name], rtol=1e-4, atol=1e-4 * np.abs(g).max())


def test_checkpointed_workspace_is_much_smaller():
    m = numlstm.LSTM(4, 32, num_layers=2, seed=0)
    T, B = 2000, 2
    full = m.memory_plan(T, B, training=True)
    auto = m.memory_plan(T, B, training=True, checkpoint="auto")
    assert full["segment"] is None and auto["segment"] == math.isqrt(T - 1) + 1 == 45
    # The full tape keeps gates and states: ~ (4H + O + H) per step, layer and direction.
    assert full["activations"] > 2 * T * B * (6 * 32) * 4
    # Checkpointed: states at sqrt(T) steps, plus the layer inputs every mode keeps.
    assert auto["activations"] < full["activations"] / 5
    assert auto["workspace"] + auto["activations"] < (full["workspace"] + full["activations"]) / 5
    x = np.zeros((T, B, 4), np.float32)
    for checkpoint, plan in ((None, full), ("auto", auto)):
        m.engine.train_ws.release()
        y, _ = m(x, training=True, checkpoint=checkpoint)
        assert m.engine.train_ws.nbytes == plan["activations"] + plan["workspace"]
        m.backward(np.zeros_like(y))
    # Nothing of size (T, B, G) or (T, B, H) per layer in checkpoint mode.
    spec = dict(m.engine.plan(T, B, True, auto["segment"])[0])
    big = {name for name, shape in spec.items() if int(np.prod(shape)) >= T * B * 32}
    assert big == {"x1", "dxa"}, big  # the layer-1 input and its dx: (T, B, O) each


@given(configs(max_T=8), st.integers(1, 9))
def test_memory_plan_is_what_the_workspace_allocates(cfg, segment):
    m, x, h0, c0, _ = build(cfg)
    for training, checkpoint in ((False, None), (True, None), (True, segment)):
        plan = m.memory_plan(cfg.T, cfg.B, training=training, checkpoint=checkpoint)
        ws = m.engine.train_ws if training else m.engine.infer_ws
        ws.release()
        m(x, (h0, c0), lengths=cfg.lengths, training=training, checkpoint=checkpoint)
        assert ws.nbytes == plan["activations"] + plan["workspace"]
        assert plan["segment"] == (None if checkpoint is None else min(segment, cfg.T))
        if not training:
            assert plan["activations"] == 0 and plan["transposed"] == 0


def test_transposed_patterns_are_counted():
    m = numlstm.LSTM(6, 8, seed=0, dtype=np.float64)
    state = m.state_dict()
    w = state["weight_hh_l0"]
    w[np.abs(w) < np.quantile(np.abs(w), 0.7)] = 0
    state["weight_hh_l0"] = sp.csr_array(w)
    m.load_state_dict(state)
    nnz = state["weight_hh_l0"].nnz
    predicted = m.memory_plan(5, 2, training=True)["transposed"]
    assert predicted == nnz * (8 + 4 + 8) + (8 + 1) * 4
    y, _ = m(np.ones((5, 2, 6)), training=True)
    m.backward(y)
    assert m.memory_plan(5, 2, training=True)["transposed"] == predicted  # now built
    assert m.memory_plan(5, 2, training=False)["transposed"] == 0


def _nbytes(m, T, B, segment):
    return m.engine.plan_nbytes(T, B, True, segment)


def test_memory_budget_picks_the_full_tape_when_it_fits():
    m = numlstm.LSTM(4, 8, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((50, 3, 4)).astype(np.float32)
    full = _nbytes(m, 50, 3, None)
    y, _ = m(x, training=True, memory_budget=full)
    assert m.engine.tape.segment is None
    y_ref, _ = numlstm.LSTM(4, 8, num_layers=2, seed=0)(x, training=True)
    np.testing.assert_array_equal(y, y_ref)


def test_memory_budget_picks_a_checkpoint_plan_that_fits():
    m = numlstm.LSTM(4, 8, num_layers=2, seed=0, dtype=np.float64)
    T, B = 100, 3
    x = np.random.default_rng(0).standard_normal((T, B, 4))
    full = _nbytes(m, T, B, None)
    sizes = {k: _nbytes(m, T, B, k) for k in range(1, T + 1)}
    m(x, training=True)  # a full-tape block, released by the budgeted calls
    for budget in (full - 1, full // 2, min(sizes.values())):
        y, _ = m(x, training=True, memory_budget=budget)
        k = m.engine.tape.segment
        assert k is not None and sizes[k] <= budget
        assert m.engine.train_ws.nbytes <= budget
        # Fewest segments that fit: no plan with fewer segments fits.
        fits = [j for j, size in sizes.items() if size <= budget]
        assert math.ceil(T / k) == min(math.ceil(T / j) for j in fits)
        dx, _ = m.backward(np.ones_like(y))
    ref = numlstm.LSTM(4, 8, num_layers=2, seed=0, dtype=np.float64)
    y_ref, _ = ref(x, training=True)
    np.testing.assert_allclose(dx, ref.backward(np.ones_like(y_ref))[0], atol=1e-12)


def test_memory_budget_too_small_says_what_is_needed():
    m = numlstm.LSTM(4, 8, seed=0)
    smallest = min(_nbytes(m, 30, 2, k) for k in range(1, 31))
    with pytest.raises(ValueError, match=rf"memory_budget={smallest - 1} bytes .* "
                                         rf"T=30, B=2: the smallest plan needs {smallest} bytes"):
        m(np.zeros((30, 2, 4), np.float32), training=True, memory_budget=smallest - 1)
    m(np.zeros((30, 2, 4), np.float32), training=True, memory_budget=smallest)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(training=True, checkpoint=0), ValueError,
     r'checkpoint must be None, "auto" or an int >= 1, got 0'),
    (dict(training=True, checkpoint=-3), ValueError, r"an int >= 1, got -3"),
    (dict(training=True, checkpoint="sqrt"), ValueError, r"got 'sqrt'"),
    (dict(training=True, checkpoint=2.0), TypeError, r"an int >= 1, got 2.0"),
    (dict(training=True, checkpoint=True), TypeError, r"an int >= 1, got True"),
    (dict(checkpoint=4), ValueError, r"checkpoint=4 needs training=True"),
    (dict(checkpoint="auto"), ValueError, r"checkpoint='auto' needs training=True"),
    (dict(memory_budget=10**6), ValueError, r"memory_budget=1000000 needs training=True"),
    (dict(training=True, memory_budget=10**6, checkpoint=3), ValueError,
     r"pass checkpoint or memory_budget, not both: got checkpoint=3, memory_budget=1000000"),
    (dict(training=True, memory_budget=0), ValueError, r"memory_budget must be >= 1, got 0"),
    (dict(training=True, memory_budget=1.5e6), TypeError,
     r"memory_budget must be an int, got float"),
])
def test_bad_checkpoint_arguments(kwargs, exc, match):
    m = numlstm.LSTM(4, 5, seed=0)
    with pytest.raises(exc, match=match):
        m(np.zeros((6, 2, 4), np.float32), **kwargs)
    if "memory_budget" not in kwargs:  # _memory_plan checks checkpoint the same way
        with pytest.raises(exc, match=match):
            m.memory_plan(6, 2, training=kwargs.get("training", False),
                           checkpoint=kwargs["checkpoint"])


def test_backward_after_checkpoint_runs_once():
    m = numlstm.LSTM(4, 5, seed=0)
    y, _ = m(np.ones((6, 2, 4), np.float32), training=True, checkpoint=2)
    m.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="already called"):
        m.backward(np.ones_like(y))

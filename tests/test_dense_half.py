"""The float16 dense storage kind (``quantize(model, "float16")`` on dense
weights): half the bytes, the same results as the model dtype holding the
float16-rounded values, on every path that runs it; inference only."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm
from numlstm import config, weights
from numlstm.quantize import quantize

CELLS = [{}, {"peepholes": True}, {"activations": ("hard_sigmoid", "tanh", "tanh")}]


def _pair(L, H, P, D, cell, dtype, seed, sparse=False):
    """(half, full): a model with float16 dense weights, and one of the model
    dtype holding exactly the same (float16-rounded) values."""
    half = numlstm.LSTM(5, H, num_layers=L, proj_size=P, bidirectional=D == 2, seed=seed,
                        dtype=dtype, **cell)
    if sparse:  # a mixed model: W_hh sparse, the rest dense
        numlstm.prune.magnitude(half, 0.7, weights=("hh",))
    quantize(half, "float16")
    full = numlstm.LSTM(5, H, num_layers=L, proj_size=P, bidirectional=D == 2, seed=seed,
                        dtype=dtype, **cell)
    full.load_state_dict(half.state_dict())  # dequantized into the model dtype
    return half, full


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 2), H=st.sampled_from([4, 8, 32]), P=st.sampled_from([0, 3]),
       D=st.integers(1, 2), cell=st.sampled_from(range(len(CELLS))),
       dtype=st.sampled_from([np.float32, np.float64]), B=st.sampled_from([1, 2, 9, 16]),
       T=st.integers(1, 6), sparse=st.booleans(), seed=st.integers(0, 1000))
def test_half_dense_computes_what_its_values_give(L, H, P, D, cell, dtype, B, T, sparse, seed):
    half, full = _pair(L, H, P, D, CELLS[cell], dtype, seed, sparse)
    for w in half.weights().values():
        assert w.format != "dense" or w.values.dtype == np.float16
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, 5)).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    y, (h, c) = half(x)
    y_ref, (h_ref, c_ref) = full(x)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        np.testing.assert_allclose(a, b, **tol)
    if D == 1:  # streams and pools step one direction
        s, s_ref = half.stream(B), full.stream(B)
        pool, ids = half.stream_pool(B), None
        ids = np.array([pool.open() for _ in range(B)])
        for t in range(T):
            out = s.step(x[t])
            np.testing.assert_allclose(out, s_ref.step(x[t]), **tol)
            np.testing.assert_allclose(pool.step(ids, x[t]), out, **tol)


def test_half_dense_uses_half_the_bytes_and_says_so():
    m = numlstm.LSTM(16, 64, num_layers=2, dtype=np.float32, seed=0)
    before = m.weight_bytes()
    quantize(m, "float16")
    w = m.weights()["weight_hh_l0"]
    assert weights.describe(w) == "dense float16" and not w.trainable
    biases = sum(4 * 64 * 4 * 2 for _ in range(2))
    assert m.weight_bytes() - biases == (before - biases) // 2
    assert "weights=dense float16" in repr(m)
    state = m.state_dict()  # dequantized, as for quantized CSR
    assert state["weight_hh_l0"].dtype == np.float32
    np.testing.assert_array_equal(state["weight_hh_l0"], w.values.astype(np.float32))


def test_half_dense_is_for_inference_and_to_dense_brings_training_back():
    m = numlstm.LSTM(4, 8, dtype=np.float32, seed=0)
    quantize(m, "float16")
    x = np.ones((3, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"weight_ih_l0 is stored as dense float16"):
        m(x, training=True)
    rounded = m.weights()["weight_hh_l0"].to_array()
    m.to_dense()
    w = m.weights()["weight_hh_l0"]
    assert w.trainable and w.values.dtype == np.float32
    np.testing.assert_array_equal(w.values, rounded)
    m(x, training=True)
    m.backward(np.ones((3, 2, 8), np.float32))


def test_quantize_to_half_refuses_what_float16_cannot_hold():
    m = numlstm.LSTM(4, 8, dtype=np.float32, seed=0)
    state = m.state_dict()
    state["weight_hh_l0"] = state["weight_hh_l0"] * 1e6
    m.load_state_dict(state)
    with pytest.raises(ValueError, match=r"weight_hh_l0 has values beyond float16's range"):
        quantize(m, "float16")
    assert all(w.values.dtype == np.float32 for w in m.weights().values())  # unchanged


def test_quantize_tells_what_each_value_type_takes():
    m = numlstm.LSTM(4, 8, dtype=np.float32, seed=0)
    with pytest.raises(ValueError, match=r"int8.*prune them to CSR first.*values='float16'"):
        quantize(m, "int8")
    numlstm.prune.blocks(m, 0.5, block=(4, 1), weights=("hh",))
    with pytest.raises(ValueError, match=r"weight_hh_l0 is block-sparse"):
        quantize(m, "float16")
    quantize(m, "float16", skip_dense=True)  # the dense ones, leaving the BSR one
    kinds = {n: weights.describe(w) for n, w in m.weights().items()}
    assert kinds == {"weight_ih_l0": "dense float16", "weight_hh_l0": "bsr 4x1 float32"}


def test_half_dense_saves_and_loads_exactly(tmp_path):
    m = numlstm.LSTM(6, 16, num_layers=2, dtype=np.float32, seed=3)
    quantize(m, "float16")
    path = tmp_path / "half.npz"
    numlstm.save(m, path)
    back = numlstm.load(path)
    for name, w in m.weights().items():
        got = back.weights()[name]
        assert got.values.dtype == np.float16 and not got.trainable
        np.testing.assert_array_equal(got.values, w.values)
    x = np.random.default_rng(0).standard_normal((4, 2, 6)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], m(x)[0])


def test_half_dense_shares_its_steps_between_threads(monkeypatch):
    """Batch parts and two-thread sequences read float16 dense weights too."""
    from numlstm import ops
    monkeypatch.setattr(ops, "batch_parts", lambda B, work, blas_above: np.array([0, 8, B]))
    monkeypatch.setattr(config, "STEP_THREADS", "2")
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_NS", 0)
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 0)
    half, full = _pair(1, 32, 0, 1, {}, np.float32, 0)
    rng = np.random.default_rng(1)
    for B in (1, 16):
        x = rng.standard_normal((20, B, 5)).astype(np.float32)
        np.testing.assert_allclose(half(x)[0], full(x)[0], rtol=1e-5, atol=1e-6)

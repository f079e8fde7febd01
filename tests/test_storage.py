"""Storage kinds inside the model: block-sparse (BSR), compact indices,
float16 and int8 values; sparsity() and to_dense()."""

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import TOL, build, ref_kwargs
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import lstm_backward, lstm_forward
from strategies import configs, dense64

import numlstm
from numlstm.quantize import quantize


def _divisor(n, choices):
    return next(b for b in choices if n % b == 0)


def _to_bsr(m, rng):
    """Re-store every weight as BSR with a block that divides its shape,
    dropping about half of the blocks."""
    state = m.state_dict()
    for name, w in state.items():
        if name.startswith("weight"):
            dense = np.array(w.toarray() if sp.issparse(w) else w)
            R, C = dense.shape
            br, bc = _divisor(R, (8, 4, 2, 1)), _divisor(C, (4, 3, 2, 1))
            blocks = dense.reshape(R // br, br, C // bc, bc)
            blocks *= (rng.random((R // br, 1, C // bc, 1)) < 0.5)
            state[name] = sp.bsr_array(dense, blocksize=(br, bc))
    m.load_state_dict(state)


@given(configs(), st.booleans())
def test_block_sparse_forward_and_gradients_match_reference(cfg, training):
    m, x, h0, c0, rng = build(cfg)
    _to_bsr(m, rng)
    assert all(w.format == "bsr" for w in m.weights().values())
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    ry, rh, rc, cache = lstm_forward(dense64(m.state_dict()), x, h0=h0, c0=c0,
                                     **ref_kwargs(cfg))
    tol = TOL[cfg.dtype]
    np.testing.assert_allclose(y, ry, **tol)
    np.testing.assert_allclose(c_n, rc, **tol)
    dy = rng.standard_normal(y.shape).astype(cfg.dtype)
    dx, (dh0, dc0) = m.backward(dy)
    rdx, rdh0, rdc0, rgrads = lstm_backward(cache, dy, np.zeros_like(rh), np.zeros_like(rc))
    np.testing.assert_allclose(dx, rdx, **tol)
    np.testing.assert_allclose(dh0, rdh0, **tol)
    state = m.state_dict()
    for name, g in m.grad.items():
        if name.startswith("weight"):
            w = state[name]
            assert g.format == "bsr" and g.data.shape == w.data.shape, name
            pattern = sp.bsr_array((np.ones_like(w.data), w.indices, w.indptr),
                                   shape=w.shape).toarray()  # whole stored blocks train
            np.testing.assert_allclose(g.toarray(), rgrads[name] * pattern, err_msg=name, **tol)
        else:
            np.testing.assert_allclose(g, rgrads[name], err_msg=name, **tol)


@given(configs(dtypes=(np.float64,)))
def test_compact_indices_change_nothing_and_still_train(cfg):
    m, x, h0, c0, rng = build(cfg)
    assume(any(w.format == "csr" for w in m.weights().values()))
    y, _ = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    dy = rng.standard_normal(y.shape)
    dx, _ = m.backward(dy)
    grads = {k: np.array(v.toarray() if sp.issparse(v) else v) for k, v in m.grad.items()}
    quantize(m, values=None, indices="uint16", skip_dense=True)
    assert {w.index_type for w in m.weights().values() if w.format == "csr"} == {"uint16"}
    y2, _ = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    dx2, _ = m.backward(dy)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    for k, v in m.grad.items():
        np.testing.assert_array_equal(v.toarray() if sp.issparse(v) else v, grads[k])


def _pruned_model(L=2, P=0, seed=0):
    m = numlstm.LSTM(6, 16, num_layers=L, proj_size=P, seed=seed)
    numlstm.prune.magnitude(m, 0.8)
    return m


@pytest.mark.parametrize("values", ["float16", "int8"])
@pytest.mark.parametrize("P", [0, 5])
def test_quantized_model_runs_its_own_values_and_streams(values, P):
    m = _pruned_model(P=P)
    x = np.random.default_rng(0).standard_normal((12, 3, 6)).astype(np.float32)
    y_float, _ = m(x)
    quantize(m, values)
    assert {w.value_type for w in m.weights().values()} == {values}
    y, (h_n, c_n) = m(x)
    # Exactly the model whose weights are the dequantized values ...
    ref = numlstm.LSTM(6, 16, num_layers=2, proj_size=P)
    ref.load_state_dict(m.state_dict())
    np.testing.assert_allclose(y, ref(x)[0], rtol=1e-5, atol=1e-6)
    # ... and close to the float model.
    assert np.max(np.abs(y - y_float)) < (2e-3 if values == "float16" else 3e-2)
    s = m.stream(3)
    for t in range(12):
        out = s.step(x[t])
    np.testing.assert_allclose(out, y[-1], rtol=1e-5, atol=1e-6)


def test_quantized_weights_are_much_smaller():
    m = numlstm.LSTM(64, 256, seed=0)
    dense_bytes = sum(w.nbytes for w in m.weights().values())
    numlstm.prune.magnitude(m, 0.9)
    sizes = {}
    for values in ("float16", "int8"):
        quantize(m, values)
        sizes[values] = sum(w.nbytes for w in m.weights().values())
    # 10x and 13.3x counting values and indices only; the SELL layout that stores quantized
    # values adds its padding (1-2% here) and a slice table (4.6 KiB a weight).
    assert dense_bytes / sizes["float16"] >= 8.5
    assert dense_bytes / sizes["int8"] >= 11


def test_training_a_quantized_model_is_a_clear_error():
    m = _pruned_model()
    quantize(m, "int8")
    x = np.zeros((2, 1, 6), np.float32)
    with pytest.raises(TypeError, match=r"weight_ih_l0 is stored as csr int8/uint16"):
        m(x, training=True)
    m(x)  # inference is fine
    m.to_dense()
    m(x, training=True)


def test_quantize_rejects_bad_arguments_and_dense_weights():
    m = numlstm.LSTM(4, 8)
    with pytest.raises(ValueError, match="prune them to CSR first"):
        quantize(m, "int8")
    with pytest.raises(ValueError, match="values must be one of"):
        quantize(m, "int4")
    with pytest.raises(ValueError, match="indices must be one of"):
        quantize(m, "int8", indices="uint8")
    numlstm.prune.magnitude(m, 0.5)
    state = m.state_dict()
    state["weight_hh_l0"] = state["weight_hh_l0"] * 1e6
    m.load_state_dict(state)
    with pytest.raises(ValueError, match="beyond float16's range"):
        quantize(m, "float16")
    wide = numlstm.LSTM(70_000, 2)
    numlstm.prune.magnitude(wide, 0.99)
    with pytest.raises(ValueError, match="70000 columns"):
        quantize(wide, None, indices="uint16")
    quantize(wide, None)  # "auto" keeps int32 where uint16 cannot hold the columns
    assert wide.weights()["weight_ih_l0"].index_type == "int32"
    assert wide.weights()["weight_hh_l0"].index_type == "uint16"


def test_sparsity_and_to_dense():
    m = numlstm.LSTM(8, 8, seed=1)
    assert m.sparsity()["overall"] == 0.0
    numlstm.prune.magnitude(m, 0.75)
    s = m.sparsity()
    assert set(s) == {"weight_ih_l0", "weight_hh_l0", "overall"}
    assert s["weight_ih_l0"] == pytest.approx(0.75) and s["overall"] == pytest.approx(0.75)
    state = m.state_dict()
    quantize(m, "float16")
    m.to_dense()
    assert {w.format for w in m.weights().values()} == {"dense"}
    assert m.sparsity()["overall"] == pytest.approx(0.75)
    np.testing.assert_allclose(m.state_dict()["weight_hh_l0"],
                               state["weight_hh_l0"].toarray(), rtol=2**-11)
    assert "dense float32" in repr(m)


@pytest.mark.parametrize("kind", ["csr", "csr-float16", "bsr"])
def test_a_copied_or_unpickled_sparse_model_runs_its_sparse_kernels(kind):
    """A sparse weight tells the kernels it is sparse by a read-only empty w0
    (weights._no_dense); a copy or an unpickled model must keep it so."""
    import copy
    import pickle

    m = numlstm.LSTM(6, 16, seed=0)
    if kind == "bsr":
        numlstm.prune.blocks(m, 0.75, block=(8, 1))
    else:
        numlstm.prune.magnitude(m, 0.8)
        if kind == "csr-float16":
            numlstm.quantize.quantize(m, "float16")
    x = np.random.default_rng(0).standard_normal((5, 2, 6)).astype(np.float32)
    want = m(x)[0]
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        for w in other.weights().values():
            w0 = w.kernel_args()[0]
            assert w0.dtype == np.uint16 or not w0.flags.writeable
        np.testing.assert_array_equal(other(x)[0], want)
        s, t = other.stream(1), m.stream(1)
        for k in range(5):
            np.testing.assert_array_equal(s.step(x[k, :1]), t.step(x[k, :1]))

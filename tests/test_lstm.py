"""The LSTM against the float64 reference: forward, backward, every kind."""

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import TOL, assert_grads_match, build, ref_kwargs
from hypothesis import given
from hypothesis import strategies as st
from reference import lstm_backward, lstm_forward
from strategies import Config, configs, dense64

import numlstm


@given(configs())
def test_forward_matches_reference(cfg):
    m, x, h0, c0, _ = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths)
    ry, rh, rc, _ = lstm_forward(dense64(m.state_dict()), x, h0=h0, c0=c0, **ref_kwargs(cfg))
    tol = TOL[cfg.dtype]
    assert y.dtype == cfg.dtype and y.shape == (cfg.T, cfg.B, cfg.D * cfg.O)
    np.testing.assert_allclose(y, ry, **tol)
    np.testing.assert_allclose(h_n, rh, **tol)
    np.testing.assert_allclose(c_n, rc, **tol)


@given(configs())
def test_backward_matches_reference(cfg):
    m, x, h0, c0, rng = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    dy = rng.standard_normal(y.shape).astype(cfg.dtype)
    dh_n = rng.standard_normal(h_n.shape).astype(cfg.dtype)
    dc_n = rng.standard_normal(c_n.shape).astype(cfg.dtype)
    dx, (dh0, dc0) = m.backward(dy, (dh_n, dc_n))
    *_, cache = lstm_forward(dense64(m.state_dict()), x, h0=h0, c0=c0, **ref_kwargs(cfg))
    rdx, rdh0, rdc0, rgrads = lstm_backward(cache, dy, dh_n, dc_n)
    tol = TOL[cfg.dtype]
    np.testing.assert_allclose(dx, rdx, **tol)
    np.testing.assert_allclose(dh0, rdh0, **tol)
    np.testing.assert_allclose(dc0, rdc0, **tol)
    assert_grads_match(m, rgrads, tol)


def _loss(m, x, state, lengths, R):
    y, (h_n, c_n) = m(x, state, lengths=lengths)
    return np.sum(y * R[0]) + np.sum(h_n * R[1]) + np.sum(c_n * R[2])


@pytest.mark.parametrize("L,D,P,bias,sparse", [
    (1, 1, 0, True, False), (2, 2, 2, True, True), (2, 1, 0, False, True),
    (1, 2, 3, True, False)])
def test_gradients_match_finite_differences(L, D, P, bias, sparse):
    """Central differences in float64 on the model itself, through in-place
    parameter updates (which also checks that CSR's transposed copy refreshes)."""
    cfg = Config(T=5, B=3, I=3, H=4, P=P, L=L, D=D, bias=bias, sparsity=0.5 if sparse else 0.0,
                 sparse_kinds=(sparse, sparse, sparse), lengths=np.array([5, 2, 4]),
                 dtype=np.float64, seed=3)
    m, x, h0, c0, rng = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    R = (rng.standard_normal(y.shape), rng.standard_normal(h_n.shape),
         rng.standard_normal(c_n.shape))
    dx, (dh0, dc0) = m.backward(R[0], (R[1], R[2]))
    eps = 1e-6
    analytic, numeric = [], []
    targets = [(x, dx), (h0, dh0), (c0, dc0)]
    targets += [(p, m.grad_arrays()[name]) for name, p in m.parameters().items()]
    for arr, grad in targets:
        flat, gflat = arr.reshape(-1), grad.reshape(-1)
        for k in range(flat.size):
            old = flat[k]
            flat[k] = old + eps
            up = _loss(m, x, (h0, c0), cfg.lengths, R)
            flat[k] = old - eps
            down = _loss(m, x, (h0, c0), cfg.lengths, R)
            flat[k] = old
            numeric.append((up - down) / (2 * eps))
            analytic.append(gflat[k])
    err = np.abs(np.array(analytic) - np.array(numeric))
    assert err.max() < 1e-7, err.max()
    assert err.mean() < 1e-8, err.mean()


@given(configs(dtypes=(np.float64,)), st.sampled_from([0.0, 0.5, 0.9]))
def test_csr_equals_dense_with_same_zeros(cfg, sparsity):
    cfg.sparsity, cfg.sparse_kinds = sparsity, (True, True, True)
    m_csr, x, h0, c0, rng = build(cfg)
    m_dense = numlstm.LSTM(cfg.I, cfg.H, **cfg.model_kwargs())
    m_dense.load_state_dict(dense64(m_csr.state_dict()))
    outs = []
    for m in (m_csr, m_dense):
        y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True)
        dy = np.random.default_rng(0).standard_normal(y.shape)
        dx, (dh0, dc0) = m.backward(dy)
        outs.append((y, h_n, c_n, dx, dh0, dc0))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    for name, g in m_csr.grad.items():
        if sp.issparse(g):  # the dense model's gradient, read on the CSR pattern
            mask = m_csr.state_dict()[name].toarray() != 0
            np.testing.assert_allclose(g.toarray(), m_dense.grad[name] * mask, atol=1e-13)
        else:
            np.testing.assert_allclose(g, m_dense.grad[name], atol=1e-13)


@pytest.mark.parametrize("D", [1, 2])
def test_dropout_uses_its_mask_in_forward_and_backward(D):
    m = numlstm.LSTM(3, 5, num_layers=3, dropout=0.4, bidirectional=D == 2, dtype=np.float64,
                     seed=7)
    rng = np.random.default_rng(1)
    x, lengths = rng.standard_normal((6, 4, 3)), np.array([6, 3, 5, 1])
    y, (h_n, c_n) = m(x, lengths=lengths, training=True)
    masks = [m.engine.tape.views[f"mask{l}"].copy() for l in range(2)]
    kept = np.concatenate([mk.ravel() for mk in masks])
    assert set(np.unique(kept)) <= {0.0, 1 / 0.6} and 0 < np.mean(kept == 0) < 1
    ry, rh, rc, cache = lstm_forward(dense64(m.state_dict()), x, hidden_size=5, num_layers=3,
                                     bidirectional=D == 2, lengths=lengths,
                                     dropout_masks=masks)
    np.testing.assert_allclose(y, ry, atol=1e-12)
    np.testing.assert_allclose(h_n, rh, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, (dh0, dc0) = m.backward(dy)
    rdx, rdh0, rdc0, rgrads = lstm_backward(cache, dy)
    np.testing.assert_allclose(dx, rdx, atol=1e-12)
    np.testing.assert_allclose(dh0, rdh0, atol=1e-12)
    assert_grads_match(m, rgrads, dict(rtol=1e-10, atol=1e-12))
    # Outside training, dropout is off: the output is the mask-free reference.
    y_eval, _ = m(x, lengths=lengths)
    ry_eval, *_ = lstm_forward(dense64(m.state_dict()), x, hidden_size=5, num_layers=3,
                               bidirectional=D == 2, lengths=lengths)
    np.testing.assert_allclose(y_eval, ry_eval, atol=1e-12)


def test_dropout_masks_are_seeded():
    x = np.ones((4, 2, 3))
    ys = [numlstm.LSTM(3, 4, num_layers=2, dropout=0.5, seed=11)(x, training=True)[0]
          for _ in range(2)]
    np.testing.assert_array_equal(ys[0], ys[1])


def test_backward_adds_into_grad_and_zero_grad_clears():
    m = numlstm.LSTM(3, 4, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 3))
    singles = []
    for x in (xa, xb):
        m.zero_grad()
        y, _ = m(x, training=True)
        m.backward(np.ones_like(y))
        singles.append({k: v.copy() for k, v in m.grad.items()})
    m.zero_grad()
    for x in (xa, xb):
        y, _ = m(x, training=True)
        m.backward(np.ones_like(y))
    for k in m.grad:
        np.testing.assert_allclose(m.grad[k], singles[0][k] + singles[1][k], atol=1e-14)
    m.zero_grad()
    assert all(not np.any(g) for g in m.grad.values())


def test_inference_forward_keeps_the_training_tape():
    m = numlstm.LSTM(3, 4, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3))
    y, _ = m(x, training=True)
    dx_alone, _ = m.backward(np.ones_like(y))
    m.zero_grad()
    m(x, training=True)
    m(rng.standard_normal((7, 3, 3)))  # an evaluation pass in between
    dx_between, _ = m.backward(np.ones_like(y))
    np.testing.assert_array_equal(dx_alone, dx_between)


def test_batch_first_and_unbatched_inputs_are_views_of_time_major():
    m = numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    mb = numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                      dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, (h, c) = m(x, training=True)
    yb, (hb, cb) = mb(x.transpose(1, 0, 2), training=True)
    np.testing.assert_allclose(yb, y.transpose(1, 0, 2), atol=1e-14)
    np.testing.assert_allclose(hb, h, atol=1e-14)
    dy = np.ones_like(y)
    dx, _ = m.backward(dy)
    dxb, _ = mb.backward(dy.transpose(1, 0, 2))
    np.testing.assert_allclose(dxb, dx.transpose(1, 0, 2), atol=1e-14)
    y1, (h1, c1) = m(x[:, 0], training=True)  # unbatched (T, I)
    np.testing.assert_allclose(y1, y[:, 0], atol=1e-14)
    assert h1.shape == (4, 4) and c1.shape == (4, 4)
    dx1, (dh1, dc1) = m.backward(dy[:, 0])
    assert dx1.shape == (5, 3) and dh1.shape == (4, 4)


def test_init_follows_pytorch_and_the_seed():
    m = numlstm.LSTM(8, 16, num_layers=2, proj_size=4, bidirectional=True, seed=5)
    again = numlstm.LSTM(8, 16, num_layers=2, proj_size=4, bidirectional=True, seed=5)
    bound = 1 / np.sqrt(16)
    names = []
    for name, w in m.state_dict().items():
        names.append(name)
        assert w.dtype == np.float32
        assert np.abs(w).max() <= bound
        np.testing.assert_array_equal(w, again.state_dict()[name])
    assert names[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                         "weight_hr_l0"]
    assert m.state_dict()["weight_ih_l1"].shape == (64, 8)
    assert m.state_dict()["weight_hr_l1_reverse"].shape == (4, 16)


def test_state_dict_round_trips_every_mix_of_kinds():
    m = numlstm.LSTM(4, 6, num_layers=2, proj_size=3, seed=0)
    state = m.state_dict()
    state["weight_hh_l0"] = sp.csr_array(np.where(np.abs(state["weight_hh_l0"]) > 0.2,
                                                  state["weight_hh_l0"], 0))
    state["weight_ih_l1"] = sp.csr_matrix(state["weight_ih_l1"])
    state["weight_hr_l1"] = sp.coo_array(state["weight_hr_l1"])  # converted to CSR
    m.load_state_dict(state)
    back = m.state_dict()
    for name, value in state.items():
        if sp.issparse(value):
            assert isinstance(back[name], sp.csr_array), name
            np.testing.assert_array_equal(back[name].toarray(), value.toarray())
        else:
            assert isinstance(back[name], np.ndarray), name
            np.testing.assert_array_equal(back[name], value)
    assert sp.issparse(m.grad["weight_hh_l0"]) and not sp.issparse(m.grad["weight_hh_l1"])
    back["weight_hh_l1"][...] = 0  # copies: the model is unaffected
    assert np.any(m.state_dict()["weight_hh_l1"])


def test_weight_bytes_counts_what_is_stored():
    m = numlstm.LSTM(8, 16, seed=0)
    dense = m.weight_bytes()
    assert dense == 4 * (64 * 8 + 64 * 16 + 64 + 64)
    state = m.state_dict()
    w = state["weight_hh_l0"]
    w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
    state["weight_hh_l0"] = sp.csr_array(w)
    m.load_state_dict(state)
    nnz = state["weight_hh_l0"].nnz
    layout = m._params["weight_hh_l0"].step_layout()  # the per-step copy (numlstm.layouts)
    extra = 0 if layout is m._params["weight_hh_l0"] else layout.nbytes
    assert extra == m._params["weight_hh_l0"].nbytes_parts()["layout"]
    assert m.weight_bytes() == dense - 64 * 16 * 4 + nnz * 8 + 65 * 4 + extra

"""Gradient accumulation: backward ADDS into model.grad, so k micro-batches
(split along the batch axis) give the gradient of the whole batch."""

import numpy as np
from helpers import build
from hypothesis import given
from hypothesis import strategies as st
from strategies import configs

TOL64 = dict(rtol=1e-12, atol=1e-12)


def _split(a, k, axis=1):
    return np.array_split(a, k, axis=axis)


@given(configs(dtypes=(np.float64,)), st.data())
def test_micro_batches_accumulate_to_the_whole_batch_gradient(cfg, data):
    k = data.draw(st.integers(1, cfg.B), label="micro-batches")
    m, x, h0, c0, rng = build(cfg)
    y, (h_n, c_n) = m(x, (h0, c0), lengths=cfg.lengths, training=True)
    dy = rng.standard_normal(y.shape)
    dh_n = rng.standard_normal(h_n.shape)
    dc_n = rng.standard_normal(c_n.shape)
    m.zero_grad()
    dx, (dh0, dc0) = m.backward(dy, (dh_n, dc_n))
    whole = {n: g.copy() for n, g in m.grad_arrays().items()}

    m.zero_grad()
    lengths = _split(cfg.lengths, k, axis=0) if cfg.lengths is not None else [None] * k
    dxs, dh0s, dc0s = [], [], []
    for xb, h0b, c0b, lb, dyb, dhb, dcb in zip(
            _split(x, k), _split(h0, k), _split(c0, k), lengths, _split(dy, k),
            _split(dh_n, k), _split(dc_n, k), strict=True):
        m.forward(xb, (h0b, c0b), lengths=lb, training=True)
        dxb, (dh0b, dc0b) = m.backward(dyb, (dhb, dcb))  # adds into model.grad
        dxs.append(dxb)
        dh0s.append(dh0b)
        dc0s.append(dc0b)
    for n, g in m.grad_arrays().items():
        np.testing.assert_allclose(g, whole[n], err_msg=n, **TOL64)
    np.testing.assert_allclose(np.concatenate(dxs, axis=1), dx, **TOL64)
    np.testing.assert_allclose(np.concatenate(dh0s, axis=1), dh0, **TOL64)
    np.testing.assert_allclose(np.concatenate(dc0s, axis=1), dc0, **TOL64)


@given(configs(dtypes=(np.float64,), max_B=6).filter(lambda c: c.B > 1))
def test_readme_one_liner_accumulates_over_micro_batches(cfg):
    """The README's form: forward/backward per micro-batch, no state, no lengths."""
    m, x, _, _, rng = build(cfg)
    y, _ = m(x, training=True)
    dy = rng.standard_normal(y.shape)
    m.zero_grad()
    m.backward(dy)
    whole = {n: g.copy() for n, g in m.grad_arrays().items()}
    m.zero_grad()
    k = 2
    for xb, dyb in zip(np.array_split(x, k, axis=1), np.array_split(dy, k, axis=1),
                       strict=True):
        m.forward(xb, training=True)
        m.backward(dyb)
    for n, g in m.grad_arrays().items():
        np.testing.assert_allclose(g, whole[n], err_msg=n, **TOL64)

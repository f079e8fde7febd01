"""The variant cells of the kernels (kernels/cpu.py, "The cell options":
peepholes, clip, coupled input-forget gate, activations) against the oracle's
(tests/reference.py), forward and backward, on the CPU; and the CUDA twins
against the CPU under the simulator (or on a GPU).

The plain cell (``cell=()``) is covered by every other kernel and model test.
"""

import numba
import numpy as np
import pytest
import reference
from helpers import cuda_or_skip

from numlstm import weights as W
from numlstm.kernels import cpu as K

CODES = {"sigmoid": K.SIGMOID, "tanh": K.TANH, "relu": K.RELU,
         "hard_sigmoid": K.HARD_SIGMOID, "affine": K.AFFINE}

# (activations, clip, input_forget, peepholes, P)
VARIANTS = [
    (("sigmoid", "tanh", "tanh"), None, False, True, 0),
    (("sigmoid", "tanh", "tanh"), 0.6, False, False, 2),
    (("sigmoid", "tanh", "tanh"), None, True, False, 0),
    (("hard_sigmoid", "relu", "affine"), None, False, False, 0),
    ((("affine", 0.5, 0.1), ("hard_sigmoid", 0.3, 0.45), "relu"), 0.8, True, True, 2),
]


def kernel_cell(activations, clip, input_forget, peep, dtype):
    """The ``cell`` tuple of the kernels, and the oracle's options for it."""
    kinds, params = [], []
    for spec in activations:
        name, *ab = (spec,) if isinstance(spec, str) else spec
        a, b = ab if ab else reference.ACTIVATIONS[name][2:]
        kinds.append(CODES[name])
        params += [a or 0.0, b or 0.0]
    params += [np.inf if clip is None else clip, 1.0 if input_forget else 0.0]
    H = peep.shape[1]
    p = peep.astype(dtype) if peep.shape[0] else np.zeros((0, H), dtype)
    return (np.array(kinds, np.int64), np.array(params, dtype), p, np.zeros_like(p))


def problem(seed, dtype, T=5, B=3, I=3, H=4, P=0, peepholes=True):
    rng = np.random.default_rng(seed)
    O = P or H
    s = 0.9
    w = {"W_ih": rng.uniform(-s, s, (4 * H, I)), "W_hh": rng.uniform(-s, s, (4 * H, O)),
         "b_ih": rng.uniform(-s, s, 4 * H), "b_hh": rng.uniform(-s, s, 4 * H),
         "W_hr": rng.uniform(-s, s, (P, H)) if P else None,
         "P": rng.uniform(-1, 1, (3, H)) if peepholes else None}
    w = {k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in w.items()}
    return {"w": w, "x": rng.standard_normal((T, B, I)).astype(dtype),
            "h0": 0.5 * rng.standard_normal((B, O)).astype(dtype),
            "c0": 0.5 * rng.standard_normal((B, H)).astype(dtype),
            "lengths": np.array([T, 2, T - 1][:B], np.int64),
            "dy": rng.standard_normal((T, B, O)).astype(dtype),
            "dh": rng.standard_normal((B, O)).astype(dtype),
            "dc": rng.standard_normal((B, H)).astype(dtype)}


def dense(a, dtype):
    return W.Dense(np.ascontiguousarray(a, dtype)).kernel_args()


def run_kernels(ks, pb, cell, dtype):
    """Forward then backward with kernel module ``ks``; returns host arrays."""
    w, x = pb["w"], pb["x"]
    T, B, _ = x.shape
    H = w["W_hh"].shape[0] // 4
    O, P = w["W_hh"].shape[1], (0 if w["W_hr"] is None else w["W_hr"].shape[0])
    hs = np.zeros((T + 1, B, O), dtype)
    cs = np.zeros((T + 1, B, H), dtype)
    hs[0], cs[0] = pb["h0"], pb["c0"]
    gates = (x.astype(np.float64) @ w["W_ih"].T).astype(dtype)  # (T, B, G)
    rs = np.zeros((T if P else 0, B, H), dtype)
    whr = dense(w["W_hr"] if P else np.zeros((0, H)), dtype)
    ks.lstm_seq_forward(hs, cs, gates, rs, np.zeros((B, 4 * H), dtype), pb["lengths"],
                        w["b_ih"].astype(dtype), w["b_hh"].astype(dtype),
                        *dense(w["W_hh"], dtype), *whr, cell)
    fwd = {"hs": hs.copy(), "cs": cs.copy()}
    dh, dc = pb["dh"].copy(), pb["dc"].copy()
    ks.lstm_seq_backward(dh, dc, gates, np.zeros((T if P else 0, B, O), dtype),
                         np.zeros((B, O), dtype), np.zeros((B, H), dtype), pb["dy"],
                         hs, cs, rs, pb["lengths"], *dense(w["W_hh"], dtype), *whr, cell)
    x64, h64 = x.astype(np.float64), hs[:-1].astype(np.float64)
    dz = gates.astype(np.float64)
    return fwd, {"dh0": dh, "dc0": dc, "dW_ih": np.einsum("tbg,tbi->gi", dz, x64),
                 "dW_hh": np.einsum("tbg,tbo->go", dz, h64), "dP": cell[3].copy() if cell else None}


def oracle(pb, activations, clip, input_forget):
    T, B, _ = pb["x"].shape
    valid = np.arange(T)[:, None] < pb["lengths"][None, :]
    cell = reference._cell(clip, input_forget, activations)
    x = np.where(valid[:, :, None], pb["x"].astype(np.float64), 0.0)
    out, h_n, c_n, tape = reference._direction_forward(
        x, pb["w"], pb["h0"].astype(np.float64), pb["c0"].astype(np.float64), valid, False, cell)
    _, dh0, dc0, dw = reference._direction_backward(
        tape, pb["w"], pb["dy"].astype(np.float64), pb["dh"].astype(np.float64),
        pb["dc"].astype(np.float64), valid, False, cell)
    return out, h_n, c_n, {"dh0": dh0, "dc0": dc0, "dW_ih": dw["W_ih"], "dW_hh": dw["W_hh"],
                           "dP": dw.get("P")}


TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activations, clip, input_forget, peepholes, P", VARIANTS)
def test_cpu_variant_cell_matches_the_oracle(activations, clip, input_forget, peepholes, P,
                                             dtype):
    pb = problem(3, dtype, P=P, peepholes=peepholes)
    H = 4
    peep = pb["w"]["P"] if peepholes else np.zeros((0, H))
    cell = kernel_cell(activations, clip, input_forget, peep, dtype)
    fwd, grads = run_kernels(K, pb, cell, dtype)
    out, h_n, c_n, want = oracle(pb, activations, clip, input_forget)
    T, B = out.shape[:2]
    valid = np.arange(T)[:, None] < pb["lengths"][None, :]
    np.testing.assert_allclose(np.where(valid[:, :, None], fwd["hs"][1:], 0), out, **TOL[dtype])
    last = pb["lengths"] - 1  # the state after each row's last valid step
    np.testing.assert_allclose(fwd["hs"][last + 1, np.arange(B)], h_n, **TOL[dtype])
    np.testing.assert_allclose(fwd["cs"][last + 1, np.arange(B)], c_n, **TOL[dtype])
    for name in ("dh0", "dc0", "dW_ih", "dW_hh"):
        np.testing.assert_allclose(grads[name], want[name], **TOL[dtype], err_msg=name)
    if peepholes:
        np.testing.assert_allclose(grads["dP"], want["dP"], **TOL[dtype])
        assert np.abs(grads["dP"]).max() > 0


def test_variant_cell_with_plain_options_equals_the_plain_cell():
    """The variant code at PyTorch's options (sigmoid, tanh, tanh; no clip,
    coupling or peepholes) computes what the plain code does; only its tape
    differs (raw pre-activations instead of activations)."""
    dtype = np.float64
    pb = problem(5, dtype, P=2, peepholes=False)
    plain_fwd, plain = run_kernels(K, pb, (), dtype)
    cell = kernel_cell(("sigmoid", "tanh", "tanh"), None, False, np.zeros((0, 4)), dtype)
    fwd, grads = run_kernels(K, pb, cell, dtype)
    for name in ("hs", "cs"):
        np.testing.assert_allclose(fwd[name], plain_fwd[name], rtol=1e-13, atol=1e-13)
    for name in ("dh0", "dc0", "dW_ih", "dW_hh"):
        np.testing.assert_allclose(grads[name], plain[name], rtol=1e-12, atol=1e-12)


def test_step_kernel_takes_the_variant_cell():
    """``lstm_step`` with a variant cell equals one step of the sequence kernel."""
    dtype = np.float64
    pb = problem(6, dtype, T=1, peepholes=True)
    pb["lengths"][:] = 1
    cell = kernel_cell(("hard_sigmoid", "tanh", "relu"), 0.7, True, pb["w"]["P"], dtype)
    fwd, _ = run_kernels(K, pb, cell, dtype)
    w = pb["w"]
    h, c = pb["h0"].copy(), pb["c0"].copy()
    B, H = c.shape
    K.lstm_step(h, c, np.zeros((3, B, 4 * H), dtype), np.zeros((0, H), dtype), pb["x"][0],
                *dense(w["W_ih"], dtype), w["b_ih"], w["b_hh"], *dense(w["W_hh"], dtype),
                *dense(np.zeros((0, H)), dtype), cell)
    np.testing.assert_allclose(h, fwd["hs"][1], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(c, fwd["cs"][1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("activations, clip, input_forget, peepholes, P",
                         [VARIANTS[0], VARIANTS[4]])
def test_cuda_variant_cell_matches_the_cpu(activations, clip, input_forget, peepholes, P,
                                           monkeypatch):
    cuda_or_skip()
    from numlstm import config
    from numlstm.kernels import cuda as C

    if numba.config.ENABLE_CUDASIM:  # small launches: every grid-stride loop runs twice
        monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 8)
        monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 3)
    dtype = np.float64
    pb = problem(8, dtype, T=3, B=2, H=3, P=P, peepholes=peepholes)
    peep = pb["w"]["P"] if peepholes else np.zeros((0, 3))
    want_fwd, want = run_kernels(K, pb, kernel_cell(activations, clip, input_forget, peep,
                                                    dtype), dtype)
    got_fwd, got = run_kernels(C, pb, kernel_cell(activations, clip, input_forget, peep,
                                                  dtype), dtype)
    for name in ("hs", "cs"):
        np.testing.assert_allclose(got_fwd[name], want_fwd[name], rtol=1e-12, atol=1e-12)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12,
                                   err_msg=name)

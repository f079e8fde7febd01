"""The CUDA kernels (numlstm.kernels.cuda) against the CPU kernels and the reference.

Runs on a GPU, or on the CPU under the CUDA simulator: ``NUMBA_ENABLE_CUDASIM=1``
set in the environment before numba is imported (``tox -e cudasim``). The
simulator runs every thread as a Python thread (~0.3 ms each), so shapes are
tiny and the launch geometry is patched small; the grid cap is patched small
too, so that the grid-stride loops run more than once.
"""

import numba
import numpy as np
import pytest
import scipy.sparse as sp

try:
    from numba import cuda
except ImportError as exc:  # numba without its CUDA target (numba-cuda)
    pytest.skip(f"numba's CUDA target is not installed ({exc})", allow_module_level=True)

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("no CUDA GPU, and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 "
                "before Python starts, e.g. `tox -e cudasim`)", allow_module_level=True)

import reference  # noqa: E402

from numlstm import config  # noqa: E402
from numlstm import weights as W  # noqa: E402
from numlstm.kernels import cpu as K  # noqa: E402
from numlstm.kernels import cuda as C  # noqa: E402
from numlstm.quantize import quantize_weight  # noqa: E402

SIM = bool(numba.config.ENABLE_CUDASIM)
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
KINDS = ["dense", "csr", "csr16", "bsr"]  # csr16: uint16 indices


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    if SIM:
        monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 8)
        monkeypatch.setattr(config, "CUDA_LANES", 4)
        monkeypatch.setattr(config, "CUDA_TILE", 2)
        monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 3)
        monkeypatch.setattr(config, "CUDA_PERSISTENT_THREADS", 8)


def dev(a):
    """A device copy (a simulator array under the simulator)."""
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()


def dev_args(args):
    return tuple(dev(a) for a in args)


def make_weight(kind, rng, R, C_, dtype, density=0.5, block=(2, 2)):
    """(weight, dense matrix it stands for) for one storage kind."""
    m = sp.random_array((R, C_), density=density, format="csr", dtype=dtype, rng=rng)
    dense = m.toarray()
    if kind == "dense":
        return W.Dense(dense.copy()), dense
    if kind == "bsr":
        blocked = sp.bsr_array(dense, blocksize=block)
        return W.from_value(blocked, "w", (R, C_), dtype), blocked.toarray()
    w = W.from_value(m, "w", (R, C_), dtype)
    if kind == "csr16":
        w = quantize_weight(w, None, "uint16")
        assert w.indices.dtype == np.uint16
    return w, dense


# ----------------------------------------------------------------------------
# Products and gradient accumulation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_products_match_numpy(kind, dtype):
    rng = np.random.default_rng(1)
    for N, R, C_, density in [(1, 4, 2, 0.5), (3, 6, 4, 1.0), (2, 4, 4, 0.0)]:
        w, dense = make_weight(kind, rng, R, C_, dtype, density)
        x = rng.standard_normal((N, C_)).astype(dtype)
        out = dev(np.full((N, R), np.nan, dtype))
        C.matmul(out, dev(x), *dev_args(w.kernel_args()))
        np.testing.assert_allclose(host(out), x @ dense.T, **TOL[dtype])
        if kind == "dense":
            with pytest.raises(TypeError, match="CSR or BSR"):
                C.sparse_matmul(out, dev(x), *dev_args(w.kernel_args()))
        else:
            out = dev(np.full((N, R), np.nan, dtype))
            C.sparse_matmul(out, dev(x), *dev_args(w.kernel_args()))
            np.testing.assert_allclose(host(out), x @ dense.T, **TOL[dtype])
        xr = rng.standard_normal((N, R)).astype(dtype)
        out_t = dev(np.full((N, C_), np.nan, dtype))
        C.matmul_t(out_t, dev(xr), *dev_args(w.kernel_args_t()))
        np.testing.assert_allclose(host(out_t), xr @ dense, **TOL[dtype])


def test_products_take_numpy_arrays_under_the_simulator_or_copy_on_a_gpu():
    rng = np.random.default_rng(2)
    w, dense = make_weight("csr", rng, 4, 3, np.float64)
    x = rng.standard_normal((2, 3))
    out = np.empty((2, 4))
    C.matmul(out, x, *w.kernel_args())  # numba copies NumPy arrays in and out on a GPU
    np.testing.assert_allclose(out, x @ dense.T, **TOL[np.float64])


@pytest.mark.parametrize("values", ["float16", "int8"])
def test_quantized_values_raise_a_clear_type_error(values):
    rng = np.random.default_rng(3)
    w, _ = make_weight("csr", rng, 4, 3, np.float32)
    q = quantize_weight(w, values, "uint16")
    out = np.empty((1, 4), np.float32)
    with pytest.raises(TypeError, match=values):
        C.matmul(out, np.ones((1, 3), np.float32), *q.kernel_args())


def test_mixed_dtypes_raise_a_clear_type_error():
    w, _ = make_weight("csr", np.random.default_rng(4), 4, 3, np.float64)
    with pytest.raises(TypeError, match="float32"):
        C.matmul(np.empty((1, 4), np.float32), np.ones((1, 3), np.float32), *w.kernel_args())
    with pytest.raises(TypeError, match="float32 or float64"):
        C.gather_rows(np.empty((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros(1, int))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_grad_acc(dtype):
    rng = np.random.default_rng(5)
    N, R, C_ = 5, 3, 4
    dz, a = rng.standard_normal((N, R)).astype(dtype), rng.standard_normal((N, C_)).astype(dtype)
    grad = dev(np.ones((R, C_), dtype))
    C.dense_grad_acc(grad, dev(np.zeros((R, C_), dtype)), dev(dz), dev(a))
    np.testing.assert_allclose(host(grad), 1 + dz.T @ a, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_matches_the_cpu_kernel(dtype):
    rng = np.random.default_rng(6)
    N, R, C_ = 5, 6, 4
    dz_t = rng.standard_normal((R, N)).astype(dtype)
    a_t = rng.standard_normal((C_, N)).astype(dtype)
    for kind in ("csr", "csr16"):
        w, _ = make_weight(kind, rng, R, C_, dtype, 0.4)
        g = np.ones(w.nnz, dtype)
        gd = dev(g)
        C.sddmm_acc(gd, dev(dz_t), dev(a_t), dev(w.indices), dev(w.indptr))
        K.sddmm_acc(g, dz_t, a_t, w.indices.astype(np.int32), w.indptr.astype(np.int32))
        np.testing.assert_allclose(host(gd), g, **TOL[dtype])
    for block in [(2, 2), (3, 1)]:
        w, _ = make_weight("bsr", rng, R, C_, dtype, 0.5, block)
        g = rng.standard_normal(w.data.shape).astype(dtype)
        gd = dev(g)
        C.bsr_sddmm_acc(gd, dev(dz_t), dev(a_t), dev(w.indices), dev(w.indptr))
        K.bsr_sddmm_acc(g, dz_t, a_t, w.indices, w.indptr)
        np.testing.assert_allclose(host(gd), g, **TOL[dtype])


def test_gathers():
    rng = np.random.default_rng(7)
    data = rng.standard_normal((3, 2, 4))
    perm = np.array([2, 0, 1])
    out = dev(np.zeros((3, 4, 2)))
    C.gather_blocks_t(out, dev(data), dev(perm))
    np.testing.assert_array_equal(host(out), data[perm].transpose(0, 2, 1))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    out = dev(np.zeros((4, 3), np.float32))
    C.gather_rows(out, dev(x), dev(np.array([3, 1, 2, 0])))
    np.testing.assert_array_equal(host(out), x[[3, 1, 2, 0]])
    out = dev(np.zeros((3, 4), np.float32))
    C.transpose(out, dev(x))
    np.testing.assert_array_equal(host(out), x.T)


# ----------------------------------------------------------------------------
# Cell steps and recurrences against the CPU kernels
# ----------------------------------------------------------------------------

B, H, I, T = 2, 4, 2, 3


def layer(kind, dtype, P, seed=0, density=0.6):
    """Weights, biases and inputs of one layer in one storage kind."""
    rng = np.random.default_rng(seed)
    G, O = 4 * H, P or H
    wih, _ = make_weight(kind, rng, G, I, dtype, density)
    whh, _ = make_weight(kind, rng, G, O, dtype, density)
    if P:
        whr, _ = make_weight(kind, rng, P, H, dtype, 0.8)
        whr_args, whr_args_t = whr.kernel_args(), whr.kernel_args_t()
    else:
        whr_args = whr_args_t = W.Dense(np.zeros((0, 0), dtype)).kernel_args()
    # Large biases push some gates into saturation (|z| >= 100): no overflow.
    bias_ih = (rng.standard_normal(G) * 3).astype(dtype)
    bias_ih[0] = 150.0
    bias_ih[H + 1] = -150.0
    bias_hh = rng.standard_normal(G).astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    return dict(wih=wih, whh=whh, whr_args=whr_args, whr_args_t=whr_args_t, O=O, P=P,
                bias_ih=bias_ih, bias_hh=bias_hh, x=x, rng=rng)


def cases():
    for kind in ("dense", "csr", "csr16", "bsr"):
        for P in (0, 2):
            yield kind, np.float64, P
    yield "dense", np.float32, 2
    yield "csr", np.float32, 0


@pytest.mark.parametrize("kind,dtype,P", list(cases()))
def test_lstm_step_matches_the_cpu_kernel(kind, dtype, P):
    L = layer(kind, dtype, P)
    rng, O, G = L["rng"], L["O"], 4 * H
    h = rng.standard_normal((B, O)).astype(dtype)
    c = rng.standard_normal((B, H)).astype(dtype)
    gates = np.zeros((3, B, G), dtype)
    r = np.zeros((B if P else 0, H), dtype)
    x = L["x"][0]
    weights = (L["wih"].kernel_args() + (L["bias_ih"], L["bias_hh"])
               + L["whh"].kernel_args() + L["whr_args"])
    dargs = dev_args((h, c, gates, r, x) + weights)
    C.lstm_step(*dargs, ())
    K.lstm_step(h, c, gates, r, x, *weights, ())
    for got, want in zip(dargs[:2], (h, c), strict=True):
        np.testing.assert_allclose(host(got), want, **TOL[dtype])
    np.testing.assert_allclose(host(dargs[2])[0], gates[0], **TOL[dtype])


def forward_args(L, lengths, dtype):
    T_, O, G = L["x"].shape[0], L["O"], 4 * H
    rng = np.random.default_rng(11)
    gates = np.empty((T_, B, G), dtype)
    K.matmul(gates.reshape(T_ * B, G), L["x"].reshape(T_ * B, I), *L["wih"].kernel_args())
    hs = np.zeros((T_ + 1, B, O), dtype)
    cs = np.zeros((T_ + 1, B, H), dtype)
    hs[0] = rng.standard_normal((B, O))
    cs[0] = rng.standard_normal((B, H))
    rs = np.zeros((T_ if L["P"] else 0, B, H), dtype)
    return (hs, cs, gates, rs, np.zeros((B, G), dtype), lengths, L["bias_ih"], L["bias_hh"]) \
        + L["whh"].kernel_args() + L["whr_args"]


LENGTHS = np.array([T, 1], np.int64)  # row 1 is padded after its first step


@pytest.mark.parametrize("kind,dtype,P", list(cases()))
def test_recurrences_match_the_cpu_kernels(kind, dtype, P):
    L = layer(kind, dtype, P)
    fwd = forward_args(L, LENGTHS, dtype)
    dfwd = dev_args(fwd)
    C.lstm_seq_forward(*dfwd, ())
    K.lstm_seq_forward(*fwd, ())
    for got, want in zip(dfwd[:4], fwd[:4], strict=True):  # hs, cs, gates, rs
        np.testing.assert_allclose(host(got), want, **TOL[dtype])

    hs, cs, gates, rs = fwd[:4]
    O, rng = L["O"], np.random.default_rng(12)
    dy = rng.standard_normal((T, B, O)).astype(dtype)
    dh = rng.standard_normal((B, O)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype)
    bwd = (dh, dc, gates, np.zeros((T if P else 0, B, O), dtype), np.zeros((B, O), dtype),
           np.zeros((B, H), dtype), dy, hs, cs, rs, LENGTHS) \
        + L["whh"].kernel_args_t() + L["whr_args_t"]
    dbwd = dev_args(bwd)
    C.lstm_seq_backward(*dbwd, ())
    K.lstm_seq_backward(*bwd, ())
    for got, want in zip(dbwd[:4], bwd[:4], strict=True):  # dh, dc, dz, dhs
        np.testing.assert_allclose(host(got), want, **TOL[dtype])


def persistent_cases():
    for kind in ("dense", "csr", "csr16"):
        for P in (0, 2):
            for resident in (True, False):
                yield kind, np.float64, P, resident
    yield "dense", np.float32, 0, True
    yield "csr", np.float32, 2, True


@pytest.mark.parametrize("kind,dtype,P,resident", list(persistent_cases()))
def test_persistent_forward_matches_the_cpu_kernel(kind, dtype, P, resident, monkeypatch):
    # Under the simulator the grid is one block (blocks run one after another
    # there, so a cross-block spin barrier would wait forever); the barrier
    # code still runs at every step. On a GPU the grid spans many blocks.
    if not resident:  # too little shared memory for the weights: read from global memory
        monkeypatch.setattr(config, "CUDA_SHARED_BYTES", (B * H + 8) * 8)
    L = layer(kind, dtype, P)
    fwd = forward_args(L, LENGTHS, dtype)
    dfwd = dev_args(fwd)
    info = C.lstm_seq_forward_persistent(*dfwd, ())
    assert info["persistent"] and info["resident"] == resident, info
    K.lstm_seq_forward(*fwd, ())
    for got, want in zip(dfwd[:4], fwd[:4], strict=True):
        np.testing.assert_allclose(host(got), want, **TOL[dtype])


def test_persistent_forward_falls_back_for_bsr():
    L = layer("bsr", np.float64, 0)
    fwd = forward_args(L, LENGTHS, np.float64)
    dfwd = dev_args(fwd)
    info = C.lstm_seq_forward_persistent(*dfwd, ())
    assert not info["persistent"]
    K.lstm_seq_forward(*fwd, ())
    np.testing.assert_allclose(host(dfwd[0]), fwd[0], **TOL[np.float64])


def test_a_layer_on_the_gpu_matches_the_reference():
    """Forward, backward and every gradient of one projected CSR layer, built
    from the CUDA kernels only, against tests/reference.py."""
    dtype, P = np.float64, 2
    L = layer("csr", dtype, P, seed=3)
    O, G = L["O"], 4 * H
    wih, whh = L["wih"], L["whh"]
    rng = np.random.default_rng(13)
    whr_dense = rng.standard_normal((P, H))
    whr = W.Dense(whr_dense.copy())
    x, lengths = L["x"], np.array([T, 2], np.int64)
    h0, c0 = rng.standard_normal((B, O)), rng.standard_normal((B, H))

    d = {name: dev(a) for name, a in dict(
        x=x.reshape(T * B, I), gates=np.zeros((T, B, G)), hs=np.zeros((T + 1, B, O)),
        cs=np.zeros((T + 1, B, H)), rs=np.zeros((T, B, H)), scratch=np.zeros((B, G)),
        lengths=lengths, bias_ih=L["bias_ih"], bias_hh=L["bias_hh"]).items()}
    d["hs"][0].copy_to_device(h0)
    d["cs"][0].copy_to_device(c0)
    C.matmul(d["gates"].reshape(T * B, G), d["x"], *dev_args(wih.kernel_args()))
    C.lstm_seq_forward(d["hs"], d["cs"], d["gates"], d["rs"], d["scratch"], d["lengths"],
                       d["bias_ih"], d["bias_hh"], *dev_args(whh.kernel_args()),
                       *dev_args(whr.kernel_args()), ())
    hs = host(d["hs"])

    params = {"weight_ih_l0": wih.to_array(), "weight_hh_l0": whh.to_array(),
              "bias_ih_l0": L["bias_ih"], "bias_hh_l0": L["bias_hh"], "weight_hr_l0": whr_dense}
    y, h_n, c_n, cache = reference.lstm_forward(params, x, hidden_size=H, proj_size=P,
                                                h0=h0[None], c0=c0[None], lengths=lengths)
    valid = (np.arange(T)[:, None] < lengths[None, :])[:, :, None]
    np.testing.assert_allclose(np.where(valid, hs[1:], 0), y, **TOL[dtype])
    np.testing.assert_allclose(hs[-1], h_n[0], **TOL[dtype])
    np.testing.assert_allclose(host(d["cs"])[-1], c_n[0], **TOL[dtype])

    dy = rng.standard_normal((T, B, O))
    b = {name: dev(a) for name, a in dict(
        dh=np.zeros((B, O)), dc=np.zeros((B, H)), dhs=np.zeros((T, B, O)),
        so=np.zeros((B, O)), sh=np.zeros((B, H)), dy=dy).items()}
    C.lstm_seq_backward(b["dh"], b["dc"], d["gates"], b["dhs"], b["so"], b["sh"], b["dy"],
                        d["hs"], d["cs"], d["rs"], d["lengths"],
                        *dev_args(whh.kernel_args_t()), *dev_args(whr.kernel_args_t()), ())
    dz = d["gates"].reshape(T * B, G)
    dz_t = dev(host(dz).T)
    # Weight gradients: SDDMM on the CSR patterns, tiled products for dense ones.
    g_ih, g_hh = dev(np.zeros(wih.nnz)), dev(np.zeros(whh.nnz))
    C.sddmm_acc(g_ih, dz_t, dev(x.reshape(T * B, I).T), dev(wih.indices), dev(wih.indptr))
    C.sddmm_acc(g_hh, dz_t, dev(hs[:-1].reshape(T * B, O).T), dev(whh.indices),
                dev(whh.indptr))
    g_hr = dev(np.zeros((P, H)))
    C.dense_grad_acc(g_hr, dev(np.zeros((P, H))), b["dhs"].reshape(T * B, O),
                     d["rs"].reshape(T * B, H))
    dx = dev(np.zeros((T * B, I)))
    C.matmul_t(dx, dz, *dev_args(wih.kernel_args_t()))

    dx_ref, dh0, dc0, grads = reference.lstm_backward(cache, dy)
    np.testing.assert_allclose(host(dx).reshape(T, B, I), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(host(b["dh"]), dh0[0], **TOL[dtype])
    np.testing.assert_allclose(host(b["dc"]), dc0[0], **TOL[dtype])
    np.testing.assert_allclose(host(g_hr), grads["weight_hr_l0"], **TOL[dtype])
    np.testing.assert_allclose(host(g_ih), grads["weight_ih_l0"][wih.to_array() != 0],
                               **TOL[dtype])
    np.testing.assert_allclose(host(g_hh), grads["weight_hh_l0"][whh.to_array() != 0],
                               **TOL[dtype])
    np.testing.assert_allclose(host(dz).sum(axis=0), grads["bias_ih_l0"], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gates_stay_finite(dtype):
    """|z| >= 100 (and 1e30) saturates the gates without inf or NaN."""
    G = 4 * H
    act = np.zeros((1, G), dtype)
    act[0, :] = np.tile(np.array([1e30, -1e30, 100, -100], dtype), H)
    c = np.ones((1, H), dtype)
    dact, dc, h = dev(act), dev(c.copy()), dev(np.zeros((1, H), dtype))
    ks = C._kernels(dtype)
    zeros = dev(np.zeros(G, dtype))
    C._launch_1d(ks["_cell_forward_kernel"], H,
                 (dc, h, dact, dc, h, dev(np.zeros((1, G), dtype)), zeros, zeros,
                  C._no_lengths(), 0, 0), 0)
    got = host(dact)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(host(h)))
    assert np.all((got >= 0) & (got <= 1) | (np.abs(got) <= 1))


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("resident", [True, False])
def test_persistent_kernel_splits_the_units_over_blocks(kind, resident, monkeypatch):
    """Several blocks, each owning its slice of hidden units (and of W_hh in
    shared memory): one step without projection, the only case whose blocks do
    not wait on one another, so that the simulator (one block after another)
    can run it; the barrier counter starts high so that no block ever waits."""
    if not resident:
        monkeypatch.setattr(config, "CUDA_SHARED_BYTES", (B * H + 8) * 8)
    dtype = np.float64
    L = layer(kind, dtype, 0, seed=5)
    L["x"] = L["x"][:1]
    fwd = forward_args(L, np.array([1, 0], np.int64), dtype)
    dfwd = dev_args(fwd)
    whh = L["whh"].kernel_args()
    plan = C._persistent_plan(B, H, H, False, kind == "dense", whh[1], whh[3], 8, blocks=2)
    assert plan["blocks"] == 2 and plan["units"] == 2 and plan["resident"] == resident
    barrier = dev(np.array([10**6], np.int32))
    kernel = C._kernels(dtype)["_persistent_forward_kernel"]
    kernel[plan["blocks"], config.CUDA_PERSISTENT_THREADS, 0, plan["shared"]](
        *dfwd[:4], *dfwd[5:], barrier, plan["units"], plan["punits"], plan["lanes"],
        int(plan["resident"]))
    K.lstm_seq_forward(*fwd, ())
    for got, want in zip(dfwd[:3], fwd[:3], strict=True):
        np.testing.assert_allclose(host(got), want, **TOL[dtype])

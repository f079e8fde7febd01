"""Each CPU kernel against plain NumPy/scipy."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from numba import njit
from reference import sigmoid as reference_sigmoid

import numlstm
from numlstm import weights as W
from numlstm.kernels import cpu as K
from numlstm.kernels import vector_ir
from numlstm.quantize import quantize_weight


@njit
def _activations(sig, tnh, z):
    for k in range(z.shape[0]):
        sig[k] = K.sigmoid(z[k])
        tnh[k] = K.tanh(z[k])


# float32 uses a rational approximation (absolute error < 3e-7); float64 is exact.
ACT_TOL = {np.float32: dict(rtol=0, atol=3e-7), np.float64: dict(rtol=1e-14, atol=1e-300)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_are_accurate_and_never_overflow(dtype):
    grid = np.linspace(-30, 30, 200_001)
    extremes = [-1e30, -1e4, -100, -88.8, 88.8, 100, 1e4, 1e30, -np.inf, np.inf, 0.0, 1e-6]
    z = np.concatenate([grid, extremes]).astype(dtype)
    sig, tnh = np.empty_like(z), np.empty_like(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _activations(sig, tnh, z)
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(sig, reference_sigmoid(z64), **ACT_TOL[dtype])
    np.testing.assert_allclose(tnh, np.tanh(z64), **ACT_TOL[dtype])
    assert np.all((sig >= 0) & (sig <= 1)) and np.all(np.abs(tnh) <= 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_propagate_nan(dtype):
    sig, tnh = np.zeros(1, dtype), np.zeros(1, dtype)
    _activations(sig, tnh, np.array([np.nan], dtype))
    assert np.isnan(sig[0]) and np.isnan(tnh[0])


def _random_csr(rng, R, C, density, dtype):
    m = sp.random_array((R, C), density=density, format="csr", dtype=dtype, rng=rng)
    m.sort_indices()
    return W.from_value(m, "w", (R, C), dtype), m.toarray()


# Multiples of 8 reach the 8x1 and 1x8 BSR kernels; N >= 8 the panel kernels
# (eight rows of x at once), with N % 8 rows left for the row-by-row path.
_sizes = st.one_of(st.integers(1, 9), st.sampled_from([8, 16, 24]))
shapes = st.tuples(st.integers(1, 20), _sizes, _sizes,
                   st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([np.float32, np.float64]))


def _divisor(n, choices=(4, 3, 2, 1)):
    return next(b for b in choices if n % b == 0)


def _kinds(rng, R, C, density, dtype):
    """(weight, the dense matrix it stands for, tolerance) for every storage kind."""
    csr, dense = _random_csr(rng, R, C, density, dtype)
    blocked = sp.bsr_array(dense, blocksize=(_divisor(R), _divisor(C)))
    bsr = W.from_value(blocked, "w", (R, C), dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    out = [(W.Dense(dense.copy()), dense, tol), (csr, dense, tol),
           (quantize_weight(csr, None, "uint16"), dense, tol), (bsr, blocked.toarray(), tol)]
    for block in ((8, 1), (1, 8)):  # the shapes with vector kernels of their own
        if R % block[0] == 0 and C % block[1] == 0:
            blocked = sp.bsr_array(dense, blocksize=block)
            out.append((W.from_value(blocked, "w", (R, C), dtype), blocked.toarray(), tol))
    for values in ("float16", "int8"):
        q = quantize_weight(csr, values, "uint16")
        out.append((q, q.to_array(), tol))  # exact products of the stored values
    return out


@given(shapes, st.integers(0, 1000))
def test_products_match_numpy(shape, seed):
    N, R, C, density, dtype = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C)).astype(dtype)
    xr = rng.standard_normal((N, R)).astype(dtype)
    for weight, dense, tol in _kinds(rng, R, C, density, dtype):
        out = np.full((N, R), np.nan, dtype)
        K.matmul(out, x, *weight.kernel_args())
        np.testing.assert_allclose(out, x @ dense.T, err_msg=W.describe(weight), **tol)
        if weight.format != "dense":
            for kernel in (K.sparse_matmul, K.sparse_matmul_parallel):
                out = np.full((N, R), np.nan, dtype)
                kernel(out, x, *weight.kernel_args())
                np.testing.assert_allclose(out, x @ dense.T, **tol)
        if weight.trainable:
            out_t = np.full((N, C), np.nan, dtype)
            K.matmul_t(out_t, xr, *weight.kernel_args_t())
            np.testing.assert_allclose(out_t, xr @ dense, err_msg=W.describe(weight), **tol)
        else:
            with pytest.raises(TypeError, match="inference only"):
                weight.kernel_args_t()


def test_quantized_values_are_close_to_the_float_weight():
    rng = np.random.default_rng(1)
    csr, dense = _random_csr(rng, 64, 48, 0.2, np.float32)
    f16 = quantize_weight(csr, "float16").to_array()
    np.testing.assert_allclose(f16, dense, rtol=2**-11, atol=0)
    i8 = quantize_weight(csr, "int8").to_array()
    scale = np.abs(dense).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(i8 - dense) <= 0.57 * scale + 1e-7)
    assert np.all((i8 != 0) <= (dense != 0))  # the pattern is kept


@given(shapes, st.integers(0, 1000))
def test_sddmm_accumulates_the_gradient_on_the_pattern(shape, seed):
    N, R, C, density, dtype = shape
    rng = np.random.default_rng(seed)
    w, dense = _random_csr(rng, R, C, density, dtype)
    dz, a = rng.standard_normal((N, R)).astype(dtype), rng.standard_normal((N, C)).astype(dtype)
    dz_t, a_t = np.ascontiguousarray(dz.T), np.ascontiguousarray(a.T)
    full = dz.T @ a
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    expected = full[dense != 0]  # row-major order == CSR order with sorted indices
    for kernel in (K.sddmm_acc, K.sddmm_acc_parallel):
        g = np.ones(w.nnz, dtype)
        kernel(g, dz_t, a_t, w.indices, w.indptr)
        np.testing.assert_allclose(g, 1 + expected, rtol=rtol)
    bsr = W.from_value(sp.bsr_array(dense, blocksize=(_divisor(R), _divisor(C))), "w",
                       (R, C), dtype)
    expected = sp.bsr_array((np.ones_like(bsr.data), bsr.indices, bsr.indptr),
                            shape=(R, C)).toarray() * full  # full blocks of dz^T a
    for kernel in (K.bsr_sddmm_acc, K.bsr_sddmm_acc_parallel):
        g = np.ones_like(bsr.data)
        kernel(g, dz_t, a_t, bsr.indices, bsr.indptr)
        got = sp.bsr_array((g - 1, bsr.indices, bsr.indptr), shape=(R, C)).toarray()
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


def test_transposed_pattern_refreshes_after_in_place_updates():
    rng = np.random.default_rng(0)
    w, dense = _random_csr(rng, 5, 7, 0.4, np.float64)
    x = rng.standard_normal((2, 5))
    out = np.empty((2, 7))
    K.matmul_t(out, x, *w.kernel_args_t())
    w.data *= -3.0  # an optimizer step on .data
    K.matmul_t(out, x, *w.kernel_args_t())
    np.testing.assert_allclose(out, x @ (-3.0 * dense), atol=1e-12)


def test_gather_rows():
    x = np.arange(12.0).reshape(4, 3)
    out = np.empty_like(x)
    K.gather_rows(out, x, np.array([3, 1, 2, 0]))
    np.testing.assert_array_equal(out, x[[3, 1, 2, 0]])


@pytest.mark.parametrize("shape", [(1, 1), (31, 33), (64, 32), (70, 5)])
def test_transpose_covers_partial_tiles(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for kernel in (K.transpose, K.transpose_parallel):
        out = np.full(shape[::-1], np.nan, np.float32)
        kernel(out, x)
        np.testing.assert_array_equal(out, x.T)


def test_sequence_kernels_allocate_nothing_per_time_step():
    """NRT allocation counts of the forward and backward recurrences do not
    grow with T: the only allocations are the fixed per-call argument wrappers."""
    from numba.core.runtime import _nrt_python, rtsys

    _nrt_python.memsys_enable_stats()
    model = numlstm.LSTM(3, 4, proj_size=2, seed=0)
    counts = []
    for T in (2, 40):
        model(np.ones((T, 2, 3), np.float32), training=True)  # fills the tape's buffers
        v, lengths = model.engine.tape.views, model.engine.tape.lengths
        dy = np.ones((T, 2, 2), np.float32)  # with D = 1 backward reads dy itself
        forward = ((v["hs00"], v["cs00"], v["gates00"], v["rs00"], v["scratch"], lengths)
                   + model.biases(0, 0) + model.kernel_params().weight("hh", 0, 0).kernel_args()
                   + model.proj_args(0, 0))
        backward = ((v["dh"], v["dc"], v["gates00"], v["dhs"], v["scratch_o"], v["scratch_h"],
                     dy, v["hs00"], v["cs00"], v["rs00"], lengths)
                    + model.kernel_params().weight("hh", 0, 0).kernel_args_t()
                    + model.proj_args(0, 0, transposed=True))
        K.lstm_seq_forward(*forward, ())  # compile outside the count
        K.lstm_seq_backward(*backward, ())
        before = rtsys.get_allocation_stats().alloc
        K.lstm_seq_forward(*forward, ())
        K.lstm_seq_backward(*backward, ())
        counts.append(rtsys.get_allocation_stats().alloc - before)
    assert counts[0] == counts[1], counts


def test_every_cpu_kernel_has_a_cuda_twin_with_its_arguments():
    """docs/design.md, "5. CPU/GPU twins": kernels/cuda.py mirrors kernels/cpu.py
    name for name and argument for argument (the CUDA functions add a
    keyword-only ``stream``)."""
    import inspect

    from numba.core.registry import CPUDispatcher

    cuda_kernels = pytest.importorskip("numlstm.kernels.cuda")
    names = [n for n, f in vars(K).items() if isinstance(f, CPUDispatcher)
             and not n.startswith("_") and not n.endswith(("_parallel", "_packed", "_split"))]
    assert {"matmul", "matmul_t", "lstm_step", "sddmm_acc", "transpose"} <= set(names)
    for name in names:
        twin = getattr(cuda_kernels, name, None)
        assert callable(twin), f"kernels.cuda has no {name}"
        cpu_params = list(inspect.signature(getattr(K, name).py_func).parameters)
        gpu_params = [p.name for p in inspect.signature(twin).parameters.values()
                      if p.kind is not p.KEYWORD_ONLY]
        assert gpu_params == cpu_params, name


def test_panel_products_fall_back_row_by_row_for_very_wide_inputs():
    """A panel's transposed copy of x lives on the stack, so inputs wider than
    PANEL_MAX_K go row by row instead; both paths must give the product."""
    rng = np.random.default_rng(3)
    for C in (vector_ir.PANEL_MAX_K, vector_ir.PANEL_MAX_K + 8):
        dense = rng.standard_normal((8, C)).astype(np.float32)
        dense[rng.random((8, C)) < 0.9] = 0
        x = rng.standard_normal((9, C)).astype(np.float32)
        for value in (sp.csr_array(dense), sp.bsr_array(dense, blocksize=(8, 1))):
            weight = W.from_value(value, "w", (8, C), np.float32)
            out = np.full((9, 8), np.nan, np.float32)
            K.matmul(out, x, *weight.kernel_args())
            np.testing.assert_allclose(out, x @ dense.T, rtol=1e-4, atol=1e-4)


def _wide_sum_of_products(a, b):
    vector_ir.wide_vectors()  # the attribute's scope: this function's loops
    total = np.float32(0)
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


def _has_zmm(fn):
    import re

    return re.search(r"\bv\w+ps\s[^\n]*%zmm", next(iter(fn.inspect_asm().values()))) is not None


def test_wide_vectors_reach_the_machine_code():
    """``vector_ir.wide_vectors`` makes LLVM vectorise a function's loops
    with 512-bit registers on an AVX-512 host (its tuning alone picks 256)
    and changes nothing elsewhere; the result is the loop's. The kernels
    that rely on it are compiled here afresh from their source (cached code
    cannot be inspected), so a kernel that stops calling it fails too."""
    avx512 = vector_ir.SELL_LANES == 16
    opts = dict(fastmath=True, error_model="numpy")
    wide = njit(**opts)(_wide_sum_of_products)
    a = np.arange(1000, dtype=np.float32) / 1000
    assert abs(wide(a, a) - np.dot(a.astype(np.float64), a)) < 1e-3
    assert _has_zmm(wide) == avx512  # without AVX-512 there are none to use

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 256), np.float32), rng.standard_normal((64, 256), np.float32)
    rows = njit(**opts)(K._dense_rows.py_func)
    out = np.empty((8, 64), np.float32)
    rows(out, x, w)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-4, atol=1e-4)
    H = 64
    act, rec = rng.standard_normal(4 * H, np.float32), np.zeros(4 * H, np.float32)
    c_out, r_out, c_prev = (np.zeros(H, np.float32) for _ in range(3))
    cell = njit(**opts)(K._cell_forward.py_func)
    cell(c_out, act, r_out, c_prev, rec, rec, rec, 0, H)
    assert np.all(np.abs(r_out) < 1) and np.any(r_out != 0)
    assert _has_zmm(rows) == avx512 and _has_zmm(cell) == avx512

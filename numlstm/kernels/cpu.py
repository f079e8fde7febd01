"""CPU kernels: the only place with element loops on the CPU.

Glossary: T time steps, B batch, I input features, H hidden, P projection
(0 = none), O = P or H, G = 4H gate rows (order i, f, g, o), N = T*B rows.

Conventions (docs/design.md, "3. Kernels"):

* Arguments: outputs first, then inputs, then weights. Sizes are read off the
  array shapes, so no size arguments are needed.
* A weight crosses into a kernel as four arrays ``(w0, data, indices,
  indptr)``; the array types say which storage kind it is:

  ====================  ====================  ==================  ===============
  kind                  w0                    data                indices, indptr
  ====================  ====================  ==================  ===============
  dense                 (R, K)                empty, float        empty
  dense, float16 values (R, K) uint16 bits    empty, float        empty
  CSR                   (0, 0)                (nnz,) float        int32 or uint16
  CSR, float16 values   (0, 0)                (nnz,) uint16 bits  int32 or uint16
  CSR, int8 values      (R, 1) float16 scale  (nnz,) int8         int32 or uint16
                        bits
  BSR (br x bc blocks)  (0, 0)                (nblocks, br, bc)   over block rows
  SELL-C-sigma          as the CSR kind's     (S, C) values of    indices (S, C)
  (per-step layout of                         any CSR value kind  columns; indptr
  a CSR weight)                                                   (nslices, 2 + C)
                                                                  slice table
  windowed SELL         int8: (nslices, C)    (E, C) values,      indices (E, C)
  (float32 models)      float32 lane scales,  float32, float16    uint8 columns in
                        else (0, 0) float32   bits or int8        the window;
                                                                  indptr the table
  ====================  ====================  ==================  ===============

  Indices are sorted within each row. The SELL layout (``numlstm.layouts``) is
  derived from a CSR weight for per-step products (``matmul``). Products with
  W^T for a sparse weight take the transposed pattern (CSR/BSR of W^T) in the same four slots.
* Every product here writes ``out = x @ W^T`` (overwrite, never accumulate),
  with x (N, K), W (R, K), out (N, R).
* Kernels never allocate; every buffer comes from the caller's workspace.
"""

import types

import numpy as np
from numba import njit, prange
from numba import types as nbtypes
from numba.extending import overload

from numlstm import config
from numlstm.kernels import vector_ir as V

# error_model="numpy": a float division by zero gives inf/nan instead of raising,
# which removes a branch per division and lets LLVM vectorise the gate loops.
_OPTS = {"cache": config.CACHE, "fastmath": config.FASTMATH, "nogil": True,
         "error_model": "numpy"}


def _variants(fn):
    """Compile ``fn`` twice from one source: serial and ``parallel=True``.

    The parallel copy gets its own qualified name so that numba's on-disk
    cache, keyed by qualified name, keeps the two apart. Only Python calls a
    parallel variant: a cached kernel that calls a ``parallel=True`` function
    loaded from the cache segfaulted here (numba 0.68), so no kernel does.
    """
    par = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_parallel",
                             fn.__defaults__, fn.__closure__)
    par.__qualname__ = fn.__qualname__ + "_parallel"
    return njit(**_OPTS)(fn), njit(parallel=True, **_OPTS)(par)


# ----------------------------------------------------------------------------
# Scalar nonlinearities: overflow-free for any z, NaN in -> NaN out
# ----------------------------------------------------------------------------

# float32 tanh as Eigen's rational approximation (|error| < 3e-7): only
# multiply-adds, one division and selects, so LLVM vectorises the gate loop,
# where a libm call per element costs ~10 ns and blocks SIMD. float64 keeps
# the exact libm functions (gradient checks compare to 1e-12).
_CLAMP32 = np.float32(7.90531110763549805)
_ALPHA32 = tuple(np.float32(a) for a in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
_BETA32 = tuple(np.float32(b) for b in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


@njit(inline="always", **_OPTS)
def _tanh32(z):
    # Written so that a NaN fails every comparison and flows through.
    x = _CLAMP32 if z > _CLAMP32 else z
    x = -_CLAMP32 if x < -_CLAMP32 else x
    x2 = x * x
    a13, a11, a9, a7, a5, a3, a1 = _ALPHA32
    b6, b4, b2, b0 = _BETA32
    p = x * (((((((a13 * x2 + a11) * x2 + a9) * x2 + a7) * x2 + a5) * x2 + a3) * x2) + a1)
    q = ((b6 * x2 + b4) * x2 + b2) * x2 + b0
    return x if abs(x) < np.float32(0.0004) else p / q


@njit(inline="always", **_OPTS)
def _sigmoid_exact(z):
    # exp of a non-positive number never overflows; the two branches are the
    # same function written for z >= 0 and z < 0.
    if z >= 0:
        return 1 / (1 + np.exp(-z))
    e = np.exp(z)
    return e / (1 + e)


def tanh(z):
    """tanh inside kernels: Eigen's rational form in float32, libm in float64."""
    return np.tanh(z)


def sigmoid(z):
    """Logistic inside kernels: via tanh in float32 (|err| < 2e-7), exact in float64."""
    return _sigmoid_exact(z)


@overload(tanh, jit_options=_OPTS)
def _tanh_overload(z):
    if z == nbtypes.float32 and config.FAST_FLOAT32_ACTIVATIONS:
        return lambda z: _tanh32(z)
    return lambda z: np.tanh(z)


@overload(sigmoid, jit_options=_OPTS)
def _sigmoid_overload(z):
    if z == nbtypes.float32 and config.FAST_FLOAT32_ACTIVATIONS:
        half = np.float32(0.5)
        return lambda z: half + half * _tanh32(half * z)
    return lambda z: _sigmoid_exact(z)


# ----------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------

@njit(inline="always", **_OPTS)
def _half_to_float(h):
    """IEEE float16 bits (uint16) -> float32, exact for finite halves.

    numba has no float16 type on the CPU, so float16 weights cross as their
    uint16 bits. Shifting the exponent and mantissa into float32 position and
    scaling by 2**112 (the exponent bias difference) rebuilds normal and
    subnormal values alike in two integer ops and one multiply; inf/NaN would
    come out finite, which is why quantized weights are checked finite.
    """
    bits = np.uint32(np.uint32(h) & np.uint32(0x7FFF)) << np.uint32(13)
    sign = np.uint32(np.uint32(h) & np.uint32(0x8000)) << np.uint32(16)
    return np.uint32(bits | sign).view(np.float32) * np.float32(2.0 ** 112)


def _load(v, zero):
    """A stored weight value as the accumulator's type (``zero`` gives the type)."""
    return zero + v


@overload(_load, jit_options=_OPTS)
def _load_overload(v, zero):
    if v == nbtypes.uint16 and V.HAS_F16C:  # float16 bits, converted in a register
        return lambda v, zero: zero + V.half_bits_to_float32(v)
    if v == nbtypes.uint16:  # float16 bits, without F16C
        return lambda v, zero: zero + _half_to_float(v)
    if isinstance(v, nbtypes.Integer):  # int8 quantized, scaled per row afterwards
        return lambda v, zero: zero + np.float32(v)
    return lambda v, zero: zero + v


def _row_scale(acc, w0, r, data):
    return acc


@overload(_row_scale, jit_options=_OPTS)
def _row_scale_overload(acc, w0, r, data):
    if data.dtype == nbtypes.int8:  # int8 values: w0 holds the float16 row scales (R, 1)
        return lambda acc, w0, r, data: acc * _half_to_float(w0[r, 0])
    return lambda acc, w0, r, data: acc


@njit(inline="always", **_OPTS)
def _csr_row_dot(xn, data, indices, start, end):
    """sum_k data[k] * xn[indices[k]] over one CSR row, k in [start, end)."""
    # Slicing the row and indexing through an unsigned index (the indices are
    # validated non-negative) drops numba's negative-index fix-up and lets
    # LLVM unroll and vectorise: 2-3x faster than the plain loop.
    row_data, row_idx = data[start:end], indices[start:end]
    acc = xn.dtype.type(0)
    for k in range(end - start):
        acc += _load(row_data[k], xn.dtype.type(0)) * xn[np.uint32(row_idx[k])]
    return acc


def _panel(out, x, w0, data, indices, indptr, n0):
    """out[n0:n0+8] = x[n0:n0+8] @ W^T with a panel kernel; False (nothing
    done) when the weight's kind has none, and the caller goes row by row."""


@overload(_panel, jit_options=_OPTS)
def _panel_overload(out, x, w0, data, indices, indptr, n0):
    sell = data.ndim == 2 and indices.dtype != nbtypes.uint8  # SELL-C-sigma layout
    if sell or data.ndim == 1 and V.applies(out, x, data, indices, indptr, w0):
        panel = V.panel_sell if sell else V.panel_csr

        def csr(out, x, w0, data, indices, indptr, n0):
            if x.shape[1] > V.PANEL_MAX_K:
                return False
            panel(out, x, data, indices, indptr, w0, n0)
            return True
        return csr
    if not V.applies(out, x, data, indices, indptr, w0) or data.ndim == 2:
        return lambda out, x, w0, data, indices, indptr, n0: False

    def bsr(out, x, w0, data, indices, indptr, n0):
        br, bc = data.shape[1], data.shape[2]
        if x.shape[1] > V.PANEL_MAX_K:
            return False
        if br == 8 and bc == 1:
            V.panel_8x1(out, x, data, indices, indptr, w0, n0)
            return True
        if br == 1 and bc == 8:
            V.panel_1x8(out, x, data, indices, indptr, w0, n0)
            return True
        return False
    return bsr


def _sparse_row(on, xn, w0, data, indices, indptr):
    """on (R,) = W xn for one row xn (K,) of a sparse weight (CSR or BSR)."""


@overload(_sparse_row, jit_options=_OPTS)
def _sparse_row_overload(on, xn, w0, data, indices, indptr):
    if data.ndim == 2 and indices.dtype == nbtypes.uint8:  # windowed SELL
        # indptr holds the window table, w0 the int8 kind's lane scales
        return lambda on, xn, w0, data, indices, indptr: \
            V.sell_windows(on, xn, data, indices, indptr, w0)
    if data.ndim == 2:  # SELL-C-sigma: indptr holds the slice table
        scaled = data.dtype == nbtypes.int8  # w0: the float16 row scales (R, 1)

        def sell_row(on, xn, w0, data, indices, indptr):
            V.sell_rows(on, xn, data, indices, indptr)
            if scaled:
                for r in range(on.shape[0]):
                    on[r] *= _half_to_float(w0[r, 0])
        return sell_row
    if data.ndim == 3:  # BSR: data (nblocks, br, bc), indices and indptr over blocks
        fast = V.applies(on, xn, data, indices, indptr)

        def bsr_row(on, xn, w0, data, indices, indptr):
            br, bc = data.shape[1], data.shape[2]
            if fast and br == 8 and bc == 1:
                V.bsr_rows_8x1(on, xn, data, indices, indptr)
                return
            if fast and br == 1 and bc == 8:
                V.bsr_rows_1x8(on, xn, data, indices, indptr)
                return
            for rb in range(indptr.shape[0] - 1):
                orow = on[rb * br:(rb + 1) * br]
                orow[:] = 0
                for k in range(indptr[rb], indptr[rb + 1]):
                    c0 = np.uint32(indices[k]) * bc
                    blk = data[k]
                    # Loop order by block shape (measured): narrow blocks scale
                    # one input down a column; wide ones sum each row first.
                    if bc == 1:
                        xv = xn[c0]
                        for i in range(br):
                            orow[i] += blk[i, 0] * xv
                    else:
                        for i in range(br):
                            acc = xn.dtype.type(0)
                            for j in range(bc):
                                acc += blk[i, j] * xn[c0 + j]
                            orow[i] += acc
        return bsr_row

    def csr_row(on, xn, w0, data, indices, indptr):
        for r in range(indptr.shape[0] - 1):
            acc = _csr_row_dot(xn, data, indices, indptr[r], indptr[r + 1])
            on[r] = _row_scale(acc, w0, r, data)
    return csr_row


def _sparse_matmul(out, x, w0, data, indices, indptr):
    """out (N, R) = x (N, K) @ W^T for a sparse W (R, K): CSR of any value
    kind, or BSR. Panels of eight rows of x go through a panel kernel where
    the kind has one (float CSR, 8x1 and 1x8 BSR), the rest row by row. The
    parallel variant (for the N = T*B rows of a whole sequence) splits panels
    and rows over threads."""
    N = x.shape[0]
    panels = N // V.LANES
    done = 0
    if panels > 0 and _panel(out, x, w0, data, indices, indptr, 0):
        for p in prange(1, panels):
            _panel(out, x, w0, data, indices, indptr, p * V.LANES)
        done = panels * V.LANES
    for n in prange(done, N):
        _sparse_row(out[n], x[n], w0, data, indices, indptr)


sparse_matmul, sparse_matmul_parallel = _variants(_sparse_matmul)


# Per-step dense products x @ W^T with at most this many rows of x run in
# ``_dense_rows``; BLAS (numba's, scipy's OpenBLAS) takes the larger ones.
# Measured on a Xeon (Emerald Rapids), float32, one process, best of 5:
# W 1024x256: BLAS (two threads) 72 / 77 / 99 / 150 us at N = 4 / 8 / 16 / 32
# rows, ``_dense_rows`` (one thread, 512-bit vectors) 46 / 51 / 95 / 183 us;
# W 2048x512: BLAS 431 / 377 / 411 / 762 us, ``_dense_rows`` 169 / 247 / 414 /
# 959 us. So up to 16 rows one thread matches BLAS's two, and a batch of 32
# split over two threads (``ops.batch_parts``) takes half BLAS's time.
DENSE_ROWS_MAX_N = 16


@njit(**_OPTS)
def _dense_rows(out, x, w):
    """out (N, R) = x (N, K) @ w^T for a few rows of x, without BLAS; w
    float, or float16 bits (uint16: the float16 dense kind, converted in a
    register as it is loaded).

    Four rows of w at a time, each used for every row of x while it is in
    L1. Rows of x go four at a time too where there are four: sixteen
    independent dot products (4 weight rows x 4 input rows) that LLVM
    vectorises along K, each weight and input vector loaded once for four
    multiply-adds; the last N % 4 rows of x take four dot products each.
    """
    V.wide_vectors()
    R, Kw = w.shape
    N = x.shape[0]
    R4, N4 = R - R % 4, N - N % 4
    zero = x.dtype.type(0)
    for r in range(0, R4, 4):
        w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
        for n in range(0, N4, 4):
            x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero
            for k in range(Kw):
                p0, p1 = _load(w0[k], zero), _load(w1[k], zero)
                p2, p3 = _load(w2[k], zero), _load(w3[k], zero)
                q0, q1, q2, q3 = x0[k], x1[k], x2[k], x3[k]
                a00 += p0 * q0
                a01 += p1 * q0
                a02 += p2 * q0
                a03 += p3 * q0
                a10 += p0 * q1
                a11 += p1 * q1
                a12 += p2 * q1
                a13 += p3 * q1
                a20 += p0 * q2
                a21 += p1 * q2
                a22 += p2 * q2
                a23 += p3 * q2
                a30 += p0 * q3
                a31 += p1 * q3
                a32 += p2 * q3
                a33 += p3 * q3
            out[n, r], out[n, r + 1], out[n, r + 2], out[n, r + 3] = a00, a01, a02, a03
            out[n + 1, r], out[n + 1, r + 1], out[n + 1, r + 2], out[n + 1, r + 3] = \
                a10, a11, a12, a13
            out[n + 2, r], out[n + 2, r + 1], out[n + 2, r + 2], out[n + 2, r + 3] = \
                a20, a21, a22, a23
            out[n + 3, r], out[n + 3, r + 1], out[n + 3, r + 2], out[n + 3, r + 3] = \
                a30, a31, a32, a33
        for n in range(N4, N):
            xn = x[n]
            a0 = a1 = a2 = a3 = zero
            for k in range(Kw):
                xk = xn[k]
                a0 += _load(w0[k], zero) * xk
                a1 += _load(w1[k], zero) * xk
                a2 += _load(w2[k], zero) * xk
                a3 += _load(w3[k], zero) * xk
            out[n, r] = a0
            out[n, r + 1] = a1
            out[n, r + 2] = a2
            out[n, r + 3] = a3
    for r in range(R4, R):
        for n in range(N):
            a = zero
            for k in range(Kw):
                a += _load(w[r, k], zero) * x[n, k]
            out[n, r] = a


def _product(out, x, w0, data, indices, indptr, transposed):
    """out = x @ W^T (x @ W with W^T's pattern when ``transposed``)."""


def _dense_half(out, x, w0):
    """out (N, R) = x (N, K) @ W^T for the float16 dense kind (w0: (R, K)
    float16 bits), eight rows of x at a time (no BLAS takes float16); the
    parallel variant splits the panels over threads."""
    N = x.shape[0]
    for p in prange((N + 7) // 8):
        n0 = p * 8
        n1 = min(n0 + 8, N)
        _dense_rows(out[n0:n1], x[n0:n1], w0)


# CPU only (the float16 dense kind does not run on the device): no CUDA twin.
_half_rows, _half_rows_parallel = _variants(_dense_half)


@overload(_product, jit_options=_OPTS)
def _product_overload(out, x, w0, data, indices, indptr, transposed):
    if data.ndim == 1 and w0.dtype == nbtypes.uint16 and w0.ndim == 2 and w0.layout == "C" \
            and isinstance(data.dtype, nbtypes.Float):
        # The float16 dense kind (inference only: never transposed).
        return lambda out, x, w0, data, indices, indptr, transposed: _half_rows(out, x, w0)
    if w0.mutable and data.ndim == 1 and isinstance(data.dtype, nbtypes.Float):
        # Dense (a sparse kind's w0 is read-only: weights._no_dense).
        def dense(out, x, w0, data, indices, indptr, transposed):
            if w0.size == 0 and out.size > 0:  # a sparse kind's w0 made writeable
                raise ValueError("a dense product got no matrix (a sparse weight whose "
                                 "empty w0 is writeable: weights._no_dense)")
            if not transposed and x.shape[0] <= DENSE_ROWS_MAX_N:
                _dense_rows(out, x, w0)
            elif transposed:
                np.dot(x, w0, out)
            else:
                np.dot(x, w0.T, out)  # (w0.T is F-ordered: one branch per layout for BLAS)
        return dense
    # CSR, BSR, float16 and int8 kinds: sparse by type.
    return lambda out, x, w0, data, indices, indptr, transposed: \
        sparse_matmul(out, x, w0, data, indices, indptr)


@njit(**_OPTS)
def matmul(out, x, w0, data, indices, indptr):
    """out (N, R) = x (N, K) @ W^T, W (R, K) dense (BLAS, which has its own
    threads) or sparse (our row loops): a per-step product."""
    _product(out, x, w0, data, indices, indptr, False)


@njit(**_OPTS)
def matmul_t(out, x, w0, data_t, indices_t, indptr_t):
    """out (N, K) = x (N, R) @ W, W (R, K): dense W (BLAS), or the sparse
    pattern of W^T (the training kinds: float CSR or BSR)."""
    _product(out, x, w0, data_t, indices_t, indptr_t, True)


@njit(**_OPTS)
def dense_grad_acc(grad, tmp, dz, a):
    """grad (R, C) += dz^T a for dz (N, R), a (N, C), through scratch tmp (R, C).

    The dense products go through numba's BLAS (scipy's OpenBLAS), not NumPy's:
    the two libraries keep separate thread pools, and NumPy's pool, still
    spinning after a call, slowed the next kernel's per-step BLAS calls 3x on
    two cores. Keeping every product of a training step in one pool avoids it.
    """
    np.dot(dz.T, a, tmp)
    grad += tmp


# Columns of N per pass of the SDDMMs: a pass reads a_t[:, n0:n0+SDDMM_CHUNK]
# (K rows of 2 KiB in float32), small enough to stay in L2 while every stored
# value of a thread's rows meets it; whole rows of a_t (12.8 KB each at N =
# 3200) came from L3 or DRAM once per stored value. Measured on a Xeon
# (Emerald Rapids): 2048x512 at 90% sparsity, N = 3200, 2 threads: 21 ms
# whole rows, 15 ms in passes of 512 (25 ms at 128, 21 ms at 1024).
SDDMM_CHUNK = 512
# Row blocks of the SDDMMs' threads (numba's prange hands each thread a
# contiguous run of them).
_SDDMM_PARTS = 16


def _sddmm_acc(gdata, dz_t, a_t, indices, indptr):
    """Weight gradient on a stored pattern (sampled dense-dense product).

    For every stored (r, c) = (row, indices[k]):
    ``gdata[k] += sum_n dz_t[r, n] * a_t[c, n]``, with dz_t (R, N) and a_t (K, N)
    transposed so that each sum reads two contiguous rows, in passes of
    SDDMM_CHUNK columns. Blocks of rows are split over threads, so no two
    threads write the same value.
    """
    V.wide_vectors()
    R, N = indptr.shape[0] - 1, dz_t.shape[1]
    parts = min(R, _SDDMM_PARTS)
    zero = gdata.dtype.type(0)
    for p in prange(parts):
        for n0 in range(0, N, SDDMM_CHUNK):
            n1 = min(n0 + SDDMM_CHUNK, N)
            for r in range(p * R // parts, (p + 1) * R // parts):
                dz_row = dz_t[r, n0:n1]
                for k in range(indptr[r], indptr[r + 1]):
                    a_row = a_t[np.uint32(indices[k]), n0:n1]
                    acc = zero
                    for n in range(n1 - n0):
                        acc += dz_row[n] * a_row[n]
                    gdata[k] += acc


sddmm_acc, sddmm_acc_parallel = _variants(_sddmm_acc)


def _bsr_sddmm_acc(gdata, dz_t, a_t, indices, indptr):
    """``_sddmm_acc`` for BSR: gdata (nblocks, br, bc) over the stored blocks,
    block row rb covering rows rb*br ... and block k columns indices[k]*bc ...
    Blocks of block rows are split over threads."""
    V.wide_vectors()
    br, bc = gdata.shape[1], gdata.shape[2]
    RB, N = indptr.shape[0] - 1, dz_t.shape[1]
    parts = min(RB, _SDDMM_PARTS)
    zero = gdata.dtype.type(0)
    for p in prange(parts):
        for n0 in range(0, N, SDDMM_CHUNK):
            n1 = min(n0 + SDDMM_CHUNK, N)
            for rb in range(p * RB // parts, (p + 1) * RB // parts):
                for k in range(indptr[rb], indptr[rb + 1]):
                    c0 = np.uint32(indices[k]) * bc
                    for i in range(br):
                        dz_row = dz_t[rb * br + i, n0:n1]
                        for j in range(bc):
                            a_row = a_t[c0 + j, n0:n1]
                            acc = zero
                            for n in range(n1 - n0):
                                acc += dz_row[n] * a_row[n]
                            gdata[k, i, j] += acc


bsr_sddmm_acc, bsr_sddmm_acc_parallel = _variants(_bsr_sddmm_acc)


# ----------------------------------------------------------------------------
# Fused pointwise cell steps
# ----------------------------------------------------------------------------

# The pointwise helpers take one batch row as 1-D arrays and are not inlined
# at numba's level: LLVM then vectorises them (with runtime alias checks),
# 5x faster than the same loops written over 2-D arrays inside the kernels.

@njit(**_OPTS)
def _cell_forward(c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1):
    """Gate nonlinearities and cell update of one batch row, in place, for
    the hidden units u0 <= j < u1 (all of them: 0, H; a half: the two-thread
    step, ``numlstm.kernels.pair``).

    act (G,) holds the input product x_t W_ih^T on entry and the activations
    i, f, g, o on exit; rec (G,) = h_{t-1} W_hh^T and the biases (G,) (zeros
    for a model without bias) are added here; c_out (H,) = f*c_prev + i*g and
    r_out (H,) = o*tanh(c) (r_out is h itself when there is no projection).
    c_out must not overlap c_prev: LLVM's runtime alias check would then fall
    back to scalar code, 4x slower.
    """
    V.wide_vectors()
    H = act.shape[0] // 4
    _add_biases(act, rec, bias_ih, bias_hh, u0, u1)
    # Views from u0, indexed from 0: numba then emits no negative-index
    # fix-ups, which would keep LLVM from vectorising (4x slower).
    ai, af, ag, ao = act[u0:u1], act[H + u0:H + u1], act[2 * H + u0:2 * H + u1], \
        act[3 * H + u0:3 * H + u1]
    co, ro, cp = c_out[u0:u1], r_out[u0:u1], c_prev[u0:u1]
    for j in range(u1 - u0):
        i = sigmoid(ai[j])
        f = sigmoid(af[j])
        g = tanh(ag[j])
        o = sigmoid(ao[j])
        ai[j] = i
        af[j] = f
        ag[j] = g
        ao[j] = o
        c = f * cp[j] + i * g
        co[j] = c
        ro[j] = o * tanh(c)


@njit(inline="always", **_OPTS)
def _add_biases(act, rec, bias_ih, bias_hh, u0, u1):
    """act += rec + bias_ih + bias_hh over the rows of units u0 <= j < u1
    (g*H + j for each gate g)."""
    H = act.shape[0] // 4
    for k in range(4):
        a, w = act[k * H + u0:k * H + u1], rec[k * H + u0:k * H + u1]
        bi, bh = bias_ih[k * H + u0:k * H + u1], bias_hh[k * H + u0:k * H + u1]
        for q in range(u1 - u0):
            a[q] += w[q] + bi[q] + bh[q]


@njit(**_OPTS)
def _cell_backward(act, dc, dr, c, c_prev):
    """Backward of ``_cell_forward`` for one batch row, in place.

    act (G,) holds the activations i, f, g, o on entry and dz on exit; dc (H,)
    holds the gradient reaching c_t from step t+1 on entry and the gradient
    reaching c_{t-1} on exit; dr (H,) is the gradient reaching o*tanh(c_t);
    c, c_prev (H,) are c_t and c_{t-1}.
    """
    V.wide_vectors()
    H = dc.shape[0]
    for j in range(H):
        i = act[j]
        f = act[H + j]
        g = act[2 * H + j]
        o = act[3 * H + j]
        tc = tanh(c[j])
        dcc = dc[j] + dr[j] * o * (1 - tc * tc)
        act[j] = dcc * g * i * (1 - i)
        act[H + j] = dcc * c_prev[j] * f * (1 - f)
        act[2 * H + j] = dcc * i * (1 - g * g)
        act[3 * H + j] = dr[j] * tc * o * (1 - o)
        dc[j] = dcc * f


# The cell options of ONNX's LSTM (peepholes, clip, coupled input-forget gate,
# other activations) cross into the kernels as ``cell``, their last argument:
# the empty tuple for the plain LSTM, which keeps the code above (the choice
# is made when numba types the call, so the plain path has no branch), or
# ``(kinds, params, peep, dpeep)`` for a variant cell (``numlstm.cell``). It
# has no default, so that every caller says which cell it runs.
#   kinds  (3,) int64: the activation codes of f (gates i, f, o), g, h;
#   params (8,) model dtype: alpha, beta of f, g, h; clip (inf = none);
#          input_forget (1 = f is 1 - i);
#   peep   (3, H): peephole weights p_i, p_f, p_o, or (0, H) for none;
#   dpeep  (3, H): their gradient, accumulated by the backward, or (0, H).
# A variant cell keeps the raw pre-activations in ``act`` (its tape: the
# backward recomputes the activations, their derivatives and the clip's).

SIGMOID, TANH, RELU, HARD_SIGMOID, AFFINE = range(5)


@njit(inline="always", **_OPTS)
def _activate(kind, a, b, z):
    """Activation ``kind`` (codes above) with parameters a, b at z."""
    if kind == SIGMOID:
        return sigmoid(z)
    if kind == TANH:
        return tanh(z)
    if kind == RELU:
        return max(z, z * 0)
    if kind == HARD_SIGMOID:
        return min(max(a * z + b, z * 0), z * 0 + 1)
    return a * z + b


@njit(inline="always", **_OPTS)
def _activate_grad(kind, a, b, z):
    """Derivative of activation ``kind`` at z (0 at a kink's far side)."""
    if kind == SIGMOID:
        s = sigmoid(z)
        return s * (1 - s)
    if kind == TANH:
        t = tanh(z)
        return 1 - t * t
    if kind == RELU:
        return z * 0 + (1 if z > 0 else 0)
    if kind == HARD_SIGMOID:
        y = a * z + b
        return a if 0 < y < 1 else a * 0
    return a + z * 0


@njit(inline="always", **_OPTS)
def _clip(z, clip):
    return min(max(z, -clip), clip)


@njit(**_OPTS)
def _variant_forward(c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, kinds, params, peep,
                     u0, u1):
    """``_cell_forward`` of a variant cell (``cell`` above): act (G,) holds
    x_t W_ih^T on entry and the raw pre-activations z_i, z_f, z_g, z_o (bias
    and peephole terms in, before the clip) on exit."""
    V.wide_vectors()
    H = act.shape[0] // 4
    kf, kg, kh = kinds[0], kinds[1], kinds[2]
    af, bf, ag, bg, ah, bh, clip = (params[0], params[1], params[2], params[3], params[4],
                                    params[5], params[6])
    coupled = params[7] != 0
    peeped = peep.shape[0] > 0
    _add_biases(act, rec, bias_ih, bias_hh, u0, u1)
    for j in range(u0, u1):
        cp = c_prev[j]
        zi = act[j]
        zf = act[H + j]
        if peeped:
            zi += peep[0, j] * cp
            zf += peep[1, j] * cp
        i = _activate(kf, af, bf, _clip(zi, clip))
        g = _activate(kg, ag, bg, _clip(act[2 * H + j], clip))
        f = 1 - i if coupled else _activate(kf, af, bf, _clip(zf, clip))
        c = f * cp + i * g
        zo = act[3 * H + j] + (peep[2, j] * c if peeped else 0)
        o = _activate(kf, af, bf, _clip(zo, clip))
        act[j] = zi
        act[H + j] = zf
        act[3 * H + j] = zo
        c_out[j] = c
        r_out[j] = o * _activate(kh, ah, bh, c)


@njit(**_OPTS)
def _variant_backward(act, dc, dr, c, c_prev, kinds, params, peep, dpeep):
    """``_cell_backward`` of a variant cell: act (G,) holds the raw
    pre-activations on entry and dz on exit; the peepholes' gradient is
    added to dpeep (3, H)."""
    V.wide_vectors()
    H = dc.shape[0]
    kf, kg, kh = kinds[0], kinds[1], kinds[2]
    af, bf, ag, bg, ah, bh, clip = (params[0], params[1], params[2], params[3], params[4],
                                    params[5], params[6])
    coupled = params[7] != 0
    peeped = peep.shape[0] > 0
    for j in range(H):
        zi, zf, zg, zo = act[j], act[H + j], act[2 * H + j], act[3 * H + j]
        # The clip passes no gradient where it bites.
        mi = 1 if abs(zi) <= clip else 0
        mf = 1 if abs(zf) <= clip else 0
        mg = 1 if abs(zg) <= clip else 0
        mo = 1 if abs(zo) <= clip else 0
        zi, zf, zg, zo = _clip(zi, clip), _clip(zf, clip), _clip(zg, clip), _clip(zo, clip)
        i = _activate(kf, af, bf, zi)
        g = _activate(kg, ag, bg, zg)
        f = 1 - i if coupled else _activate(kf, af, bf, zf)
        o = _activate(kf, af, bf, zo)
        cj = c[j]
        dzo = dr[j] * _activate(kh, ah, bh, cj) * _activate_grad(kf, af, bf, zo) * mo
        dcc = dc[j] + dr[j] * o * _activate_grad(kh, ah, bh, cj)
        if peeped:
            dcc += dzo * peep[2, j]
        di = dcc * g
        df = dcc * c_prev[j]
        if coupled:  # f = 1 - i
            di -= df
            df = df * 0
        dzi = di * _activate_grad(kf, af, bf, zi) * mi
        dzf = df * _activate_grad(kf, af, bf, zf) * mf
        act[j] = dzi
        act[H + j] = dzf
        act[2 * H + j] = dcc * i * _activate_grad(kg, ag, bg, zg) * mg
        act[3 * H + j] = dzo
        dc[j] = dcc * f
        if peeped:
            dc[j] += dzi * peep[0, j] + dzf * peep[1, j]
            dpeep[0, j] += dzi * c_prev[j]
            dpeep[1, j] += dzf * c_prev[j]
            dpeep[2, j] += dzo * cj


def _cell_units(cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1):
    """The cell's forward for one batch row, hidden units u0 <= j < u1: plain
    or variant, by ``cell``'s type."""


@overload(_cell_units, jit_options=_OPTS)
def _cell_units_overload(cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1):
    if len(cell) == 0:
        return lambda cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1: \
            _cell_forward(c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1)
    return lambda cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, u0, u1: \
        _variant_forward(c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, cell[0], cell[1],
                         cell[2], u0, u1)


@njit(inline="always", **_OPTS)
def _cell_step(cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh):
    """The cell's forward for one batch row, every hidden unit."""
    _cell_units(cell, c_out, act, r_out, c_prev, rec, bias_ih, bias_hh, 0, c_prev.shape[0])


def _cell_step_back(cell, act, dc, dr, c, c_prev):
    """The cell's backward for one batch row: plain or variant, by ``cell``'s type."""


@overload(_cell_step_back, jit_options=_OPTS)
def _cell_step_back_overload(cell, act, dc, dr, c, c_prev):
    if len(cell) == 0:
        return lambda cell, act, dc, dr, c, c_prev: _cell_backward(act, dc, dr, c, c_prev)
    return lambda cell, act, dc, dr, c, c_prev: _variant_backward(
        act, dc, dr, c, c_prev, cell[0], cell[1], cell[2], cell[3])


@njit(inline="always", **_OPTS)
def _carry(act, cs, hs, rs, t, b, projected):
    """Padding step t of row b: activations zero, state carried unchanged."""
    for q in range(act.shape[1]):
        act[b, q] = 0
    for j in range(cs.shape[2]):
        cs[t + 1, b, j] = cs[t, b, j]
        if projected:
            rs[t, b, j] = 0
    if not projected:
        for j in range(hs.shape[2]):
            hs[t + 1, b, j] = hs[t, b, j]


@njit(**_OPTS)
def lstm_step(h, c, gates, r, x,
              wih, wih_data, wih_indices, wih_indptr, bias_ih, bias_hh,
              whh, whh_data, whh_indices, whh_indptr,
              whr, whr_data, whr_indices, whr_indptr, cell):
    """One LSTM step for a whole batch, state updated in place (streaming).

    Shapes: h (B, O) and c (B, H) state, read as h_{t-1}, c_{t-1} and
    overwritten with h_t, c_t; gates (3, B, G): [0] receives the gate
    activations, [1] is scratch for the recurrent product, [2] for c_t before
    it is copied into c; r (B, H)
    (= o*tanh(c), the projection's input; (0, H) when P = 0); x (B, K);
    bias_ih, bias_hh (G,) (zeros for a model without bias); W_ih (G, K),
    W_hh (G, O), W_hr (P, H) (any arrays when P = 0); cell: the cell options
    (() for the plain LSTM; see "The cell options" above).
    Both products read h before the cell update writes it.
    """
    act, rec, c_new = gates[0], gates[1], gates[2]
    matmul(act, x, wih, wih_data, wih_indices, wih_indptr)
    matmul(rec, h, whh, whh_data, whh_indices, whh_indptr)
    projected = r.shape[0] > 0
    for b in range(act.shape[0]):
        _cell_step(cell, c_new[b], act[b], r[b] if projected else h[b], c[b], rec[b],
                   bias_ih, bias_hh)
        for j in range(c.shape[1]):
            c[b, j] = c_new[b, j]
    if projected:
        matmul(h, r, whr, whr_data, whr_indices, whr_indptr)


@njit(**_OPTS)
def lstm_seq_forward(hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                     whh, whh_data, whh_indices, whh_indptr,
                     whr, whr_data, whr_indices, whr_indptr, cell):
    """Forward recurrence of one layer and direction over a whole sequence.

    Shapes: hs (T+1, B, O) and cs (T+1, B, H) with hs[0], cs[0] = h0, c0 on
    entry and hs[t+1], cs[t+1] the state after step t on exit; gates (T, B, G)
    holds x_t W_ih^T on entry and the activations i, f, g, o on exit (a
    variant ``cell``'s raw pre-activations);
    rs (T, B, H) receives o*tanh(c) when projecting (else (0, B, H));
    scratch (B, G); lengths (B,) int64 in [0, T]; bias_ih, bias_hh (G,)
    (zeros for a model without bias).

    Steps t >= lengths[b] are padding: row b's state is carried unchanged and
    its activations are set to zero.
    """
    _seq_forward_rows(0, gates.shape[1], hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                      whh, whh_data, whh_indices, whh_indptr,
                      whr, whr_data, whr_indices, whr_indptr, cell)


@njit(**_OPTS)
def _seq_forward_rows(b0, b1, hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                      whh, whh_data, whh_indices, whh_indptr,
                      whr, whr_data, whr_indices, whr_indptr, cell):
    """``lstm_seq_forward`` of the batch rows b0 <= b < b1 only: the rows'
    recurrences are independent, so threads can share a sequence by rows
    (``lstm_seq_forward_split``). Views of rows [b0, b1) of a step stay
    C-contiguous, so the products take them as they take whole steps."""
    for t in range(gates.shape[0]):
        _seq_step_rows(t, b0, b1, hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                       whh, whh_data, whh_indices, whh_indptr,
                       whr, whr_data, whr_indices, whr_indptr, cell)


@njit(**_OPTS)
def _seq_step_rows(t, b0, b1, hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                   whh, whh_data, whh_indices, whh_indptr,
                   whr, whr_data, whr_indices, whr_indptr, cell):
    """Step t of ``_seq_forward_rows`` (the two-thread sequence's caller runs
    it when it steps alone: ``numlstm.kernels.pair``)."""
    projected = rs.shape[0] > 0
    matmul(scratch[b0:b1], hs[t, b0:b1], whh, whh_data, whh_indices, whh_indptr)
    act = gates[t]
    for b in range(b0, b1):
        if t < lengths[b]:
            _cell_step(cell, cs[t + 1, b], act[b], rs[t, b] if projected else hs[t + 1, b],
                       cs[t, b], scratch[b], bias_ih, bias_hh)
        else:
            _carry(act, cs, hs, rs, t, b, projected)
    if projected:
        matmul(hs[t + 1, b0:b1], rs[t, b0:b1], whr, whr_data, whr_indices, whr_indptr)
        for b in range(b0, b1):
            if t >= lengths[b]:
                for j in range(hs.shape[2]):
                    hs[t + 1, b, j] = hs[t, b, j]


@njit(**_OPTS)
def lstm_seq_backward(dh, dc, gates, dhs, scratch_o, scratch_h,
                      dy, hs, cs, rs, lengths,
                      whh, whh_data_t, whh_indices_t, whh_indptr_t,
                      whr, whr_data_t, whr_indices_t, whr_indptr_t, cell):
    """Backward recurrence (BPTT) of one layer and direction.

    Shapes: dh (B, O) and dc (B, H) hold dh_n, dc_n on entry and dh0, dc0 on
    exit; gates (T, B, G) holds the forward activations on entry and dz, the
    gradient of the pre-activations, on exit (zero at padded steps);
    dhs (T, B, O) receives the gradient reaching each step's output h_t (needed
    for dW_hr; (0, B, O) when P = 0); scratch_o (B, O), scratch_h (B, H);
    dy (T, B, O) the gradient of this direction's outputs; hs, cs, rs, lengths
    as left by ``lstm_seq_forward``. W_hh and W_hr come dense, or as the
    transposed CSR pattern, since the products here are with W, not W^T.
    cell as given to the forward (a variant's peephole gradient is added to
    its dpeep).
    """
    _seq_backward_rows(0, gates.shape[1], dh, dc, gates, dhs, scratch_o, scratch_h,
                       dy, hs, cs, rs, lengths,
                       whh, whh_data_t, whh_indices_t, whh_indptr_t,
                       whr, whr_data_t, whr_indices_t, whr_indptr_t, cell)


@njit(**_OPTS)
def _seq_backward_rows(b0, b1, dh, dc, gates, dhs, scratch_o, scratch_h,
                       dy, hs, cs, rs, lengths,
                       whh, whh_data_t, whh_indices_t, whh_indptr_t,
                       whr, whr_data_t, whr_indices_t, whr_indptr_t, cell):
    """``lstm_seq_backward`` of the batch rows b0 <= b < b1 only (as
    ``_seq_forward_rows``). A variant cell's peephole gradient sums over
    rows, so threads may split a backward by rows only without peepholes."""
    T = gates.shape[0]
    projected = rs.shape[0] > 0
    for t in range(T - 1, -1, -1):
        act = gates[t]
        # dcur: gradient reaching h_t, from the output and from step t+1.
        dcur = dhs[t] if projected else scratch_o
        for b in range(b0, b1):
            valid = t < lengths[b]
            for j in range(dcur.shape[1]):
                dcur[b, j] = dh[b, j] + dy[t, b, j] if valid else 0
        if projected:
            matmul_t(scratch_h[b0:b1], dcur[b0:b1], whr, whr_data_t, whr_indices_t,
                     whr_indptr_t)
            dr = scratch_h
        else:
            dr = dcur
        for b in range(b0, b1):
            if t < lengths[b]:  # padding: dh, dc pass through; act is already zero
                _cell_step_back(cell, act[b], dc[b], dr[b], cs[t + 1, b], cs[t, b])
        matmul_t(scratch_o[b0:b1], act[b0:b1], whh, whh_data_t, whh_indices_t, whh_indptr_t)
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(dh.shape[1]):
                    dh[b, j] = scratch_o[b, j]


@njit(**_OPTS)
def lstm_seq_forward_packed(args, cell):
    """``lstm_seq_forward(*args, cell)``: the drivers' call from Python, the
    arguments but ``cell`` in one tuple (docs/design.md, Kernels: "Calls
    from Python pass one prebuilt tuple")."""
    lstm_seq_forward(*args, cell)


@njit(**_OPTS)
def lstm_seq_backward_packed(args, cell):
    """``lstm_seq_backward(*args, cell)``, as ``lstm_seq_forward_packed``: its
    19 other arguments in one tuple (a 20-tuple built per call would fill
    CPython 3.11's free list of 20-tuples, 400 KB)."""
    lstm_seq_backward(*args, cell)


@njit(parallel=True, **_OPTS)
def lstm_seq_forward_split(bounds, args, cell):
    """``lstm_seq_forward(*args, cell)`` on threads, one per part of the
    batch: part p takes rows bounds[p] <= b < bounds[p+1] (``bounds`` (P+1,)
    int64, from ``numlstm.ops.batch_parts``). Python calls it, never a
    kernel (see ``_variants``)."""
    for p in prange(bounds.shape[0] - 1):
        _seq_forward_rows(bounds[p], bounds[p + 1], *args, cell)


@njit(parallel=True, **_OPTS)
def lstm_seq_backward_split(bounds, args, cell):
    """``lstm_seq_backward(*args, cell)`` on threads by batch rows, as
    ``lstm_seq_forward_split`` (not for a cell with peepholes: their
    gradient sums over rows)."""
    for p in prange(bounds.shape[0] - 1):
        _seq_backward_rows(bounds[p], bounds[p + 1], *args, cell)


# ----------------------------------------------------------------------------
# Small helpers for the drivers
# ----------------------------------------------------------------------------

@njit(**_OPTS)
def gather_blocks_t(out, data, perm):
    """out[k] = data[perm[k]].T: refreshes the blocks of a BSR weight's transpose."""
    for k in range(perm.shape[0]):
        src = data[perm[k]]
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[k, i, j] = src[j, i]


@njit(**_OPTS)
def gather_rows(out, x, index):
    """out[n] = x[index[n]] for 2-D x; lets a reversed sequence be built in place."""
    for n in range(index.shape[0]):
        out[n, :] = x[index[n], :]


def _transpose(out, x):
    """out (C, N) = x (N, C)^T, in 32x32 tiles that stay in L1 on both sides
    (NumPy's strided copy of ``x.T`` touched a new cache line per element:
    ~130 ms for a 3200x2048 float32 gradient, against ~30 ms tiled)."""
    N, C = x.shape
    for tn in prange((N + 31) // 32):
        n0 = tn * 32
        for c0 in range(0, C, 32):
            for n in range(n0, min(n0 + 32, N)):
                for c in range(c0, min(c0 + 32, C)):
                    out[c, n] = x[n, c]


transpose, transpose_parallel = _variants(_transpose)



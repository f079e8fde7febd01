"""CPU drivers shared by the model, the layers and the CPU backend.

Each picks the kernel of ``numlstm.kernels.cpu`` for a weight's storage kind
and the size of the work (serial or parallel variant: docs/design.md,
Kernels), and calls it. No element loops here.
"""

import numba
import numpy as np

from numlstm import config, weights
from numlstm.kernels import cpu as cpu_kernels


def first(buf, n):
    """The first n elements of a workspace view, flat (contiguous, no copy)."""
    return buf.reshape(-1)[:n]


def kernel_ready(a):
    """Whether a kernel can take ``a`` as it is (C-contiguous and writeable, the
    array type every kernel is compiled for)."""
    return a.flags.c_contiguous and a.flags.writeable


def zero_padding(out, lengths):
    """Zero the padding in ``out`` (n, B, F): the rows of steps t >= lengths[b]
    (``lengths`` counted from out's first step). (A multiply by a broadcast
    mask would cost NumPy a 32-64 KiB buffer.)"""
    for b in np.flatnonzero(lengths < out.shape[0]):
        out[max(lengths[b], 0):, b] = 0


def matmul_batch(out, x, weight, transposed=False):
    """out (N, R) = x (N, K) @ W^T over all rows at once (W^T's pattern if
    ``transposed``: then out (N, K) = x (N, R) @ W)."""
    x = np.ascontiguousarray(x)
    args = (out, x) + (weight.kernel_args_t() if transposed else weight.kernel_args())
    if isinstance(weight, weights.Dense) and weight.half:  # float16: no BLAS takes it
        big = weight.nnz * x.shape[0] >= config.PARALLEL_MIN_WORK
        w0 = weight.kernel_args()[0]  # the float16 bits
        (cpu_kernels._half_rows_parallel if big else cpu_kernels._half_rows)(out, x, w0)
        return
    if isinstance(weight, weights.Dense):  # numba's BLAS: see kernels.cpu.dense_grad_acc
        (cpu_kernels.matmul_t if transposed else cpu_kernels.matmul)(*args)
        return
    if weight.nnz * x.shape[0] >= config.PARALLEL_MIN_WORK:
        cpu_kernels.sparse_matmul_parallel(*args)
    else:
        cpu_kernels.sparse_matmul(*args)


def sddmm_acc(grad, dz_t, a_t, weight):
    """grad += (dz_t a_t^T) on a sparse weight's stored values (CSR or BSR), with
    dz_t (R, N) and a_t (K, N); threads only where the work outweighs them."""
    parallel = weight.nnz * dz_t.shape[1] >= config.PARALLEL_MIN_WORK
    if weight.format == "bsr":
        kernel = cpu_kernels.bsr_sddmm_acc_parallel if parallel else cpu_kernels.bsr_sddmm_acc
    else:
        kernel = cpu_kernels.sddmm_acc_parallel if parallel else cpu_kernels.sddmm_acc
    kernel(grad, dz_t, a_t, weight.indices, weight.indptr)


def transpose(out, a):
    """out (C, N) = a (N, C)^T in tiles; threads only where the work outweighs them."""
    if out.size >= config.PARALLEL_MIN_WORK:
        cpu_kernels.transpose_parallel(out, np.ascontiguousarray(a))
    else:
        cpu_kernels.transpose(out, np.ascontiguousarray(a))


# Rows of a batch part: the panel kernels take eight rows of x at a time.
PART_ROWS = 8


def batch_parts(B, work, blas_above=None):
    """Row bounds (P+1,) int64 of a recurrence shared by P threads by batch
    rows (``kernels.cpu.lstm_seq_forward_split``), or None for one thread.

    Parts are whole panels of PART_ROWS rows, one per thread numba may use,
    and only for ``work`` (multiply-adds of the recurrence) of at least
    ``config.PARALLEL_MIN_WORK``. ``blas_above``: the per-step products are
    dense, and BLAS takes those of more rows than this (forward: above
    ``DENSE_ROWS_MAX_N``) and threads them itself, so parts that large are
    not split again; None: sparse products, never BLAS.
    """
    parts = min(numba.get_num_threads(), B // PART_ROWS)
    if parts < 2 or work < config.PARALLEL_MIN_WORK:
        return None
    rows = -(-B // (parts * PART_ROWS)) * PART_ROWS
    if blas_above is not None and rows > blas_above:
        return None
    return np.minimum(np.arange(0, B + rows, rows, dtype=np.int64), B)

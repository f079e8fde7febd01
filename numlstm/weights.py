"""Weight storage kinds, and their conversion to the raw arrays kernels take.

A weight is either ``Dense`` (a C-contiguous (R, K) array) or ``CSR`` (scipy's
three arrays, indices sorted, int32). Both hand the kernels the same four
slots ``(dense, data, indices, indptr)``; see ``numlstm.kernels.cpu``.

A CSR weight trains only its stored values: its gradient is a ``.data``-shaped
array, and products with W^T go through the transposed pattern (CSR of W^T),
built on first use together with ``perm`` so that ``data_t[:] = data[perm]``
refreshes it after the values change.
"""

import numpy as np
import scipy.sparse as sp

_NO_INDEX = np.zeros(0, dtype=np.int32)  # the unused CSR slots of a dense weight


def check_float_array(value, name, shape, dtype):
    """Return ``value`` as a C-contiguous array of ``dtype`` and ``shape``.

    Floating inputs of another precision are converted; integer, boolean,
    complex and object inputs are rejected, because silently turning them into
    weights or activations hides a bug in the caller.
    """
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


class Dense:
    """A dense (R, K) weight."""

    kind = "dense"

    def __init__(self, array):
        self.array = array  # (R, K)
        self.shape = array.shape
        self._empty = (np.zeros(0, array.dtype), _NO_INDEX, _NO_INDEX)

    @property
    def values(self):
        """The array the kernels read; update it in place to train."""
        return self.array

    def kernel_args(self):
        return (self.array,) + self._empty

    def kernel_args_t(self):
        return self.kernel_args()

    def new_grad(self):
        return np.zeros_like(self.array)

    def public(self, values=None):
        """A copy as the user sees it (``values`` replaces the stored values)."""
        return np.array(self.array if values is None else values)

    @property
    def nbytes(self):
        return self.array.nbytes


class CSR:
    """A CSR (R, K) weight that stores, multiplies and trains only its pattern."""

    kind = "csr"

    def __init__(self, data, indices, indptr, shape):
        self.data = data  # (nnz,)
        self.indices = indices  # (nnz,) int32, sorted within each row
        self.indptr = indptr  # (R + 1,) int32
        self.shape = tuple(shape)
        self._no_dense = np.zeros((0, 0), data.dtype)
        self._transposed = None  # (data_t, indices_t, indptr_t, perm), built lazily

    @property
    def values(self):
        return self.data

    @property
    def nnz(self):
        return self.data.shape[0]

    def kernel_args(self):
        return self._no_dense, self.data, self.indices, self.indptr

    def kernel_args_t(self):
        """The CSR pattern of W^T, its values refreshed from ``data``."""
        if self._transposed is None:
            self._transposed = _transpose_pattern(self.indices, self.indptr, self.shape,
                                                  self.data.dtype)
        data_t, indices_t, indptr_t, perm = self._transposed
        np.take(self.data, perm, out=data_t)
        return self._no_dense, data_t, indices_t, indptr_t

    def new_grad(self):
        return np.zeros_like(self.data)

    def public(self, values=None):
        data = self.data if values is None else values
        return sp.csr_array((data.copy(), self.indices.copy(), self.indptr.copy()),
                            shape=self.shape)

    @property
    def nbytes(self):
        """Bytes the model keeps for inference (the transposed pattern, built
        only for training, is not counted)."""
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes


def _transpose_pattern(indices, indptr, shape, dtype):
    nnz = indices.shape[0]
    order = sp.csr_array((np.arange(nnz, dtype=np.int64), indices, indptr), shape=shape)
    t = order.T.tocsr()
    t.sort_indices()
    perm = np.ascontiguousarray(t.data, dtype=np.int64)
    return (np.empty(nnz, dtype), t.indices.astype(np.int32), t.indptr.astype(np.int32), perm)


def from_value(value, name, shape, dtype):
    """Build a weight from a user value: a NumPy array or a scipy sparse matrix.

    Sparse values of any scipy format are converted to CSR (duplicates summed,
    indices sorted); explicitly stored zeros stay in the pattern and train.
    Raises TypeError / ValueError naming ``name`` on a wrong type, dtype or
    shape, and ValueError on non-finite values.
    """
    if sp.issparse(value):
        if value.dtype.kind != "f":
            raise TypeError(f"{name} must hold floating-point values, got dtype {value.dtype}")
        if value.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
        csr = sp.csr_array(value, dtype=dtype, copy=True)
        csr.sum_duplicates()
        csr.sort_indices()
        if csr.nnz >= 2**31:
            raise ValueError(f"{name} has {csr.nnz} stored values; at most 2**31 - 1 fit")
        if not np.all(np.isfinite(csr.data)):
            raise ValueError(f"{name} must be finite, got NaN or inf values")
        return CSR(np.ascontiguousarray(csr.data, dtype=dtype),
                   csr.indices.astype(np.int32), csr.indptr.astype(np.int32), shape)
    arr = check_float_array(value, name, shape, dtype)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return Dense(arr.copy())

"""Weight storage kinds, and their conversion to the raw arrays kernels take.

Three formats, each handing the kernels the same four slots
``(w0, data, indices, indptr)`` (the table is in ``numlstm.kernels.cpu``):

* ``Dense``: a C-contiguous (R, K) array of the model's dtype (trainable) or
  float16 (inference only).
* ``CSR``: scipy's three arrays, indices sorted; indices and indptr int32,
  or uint16 ("compact") when they fit; values of the model's dtype
  (trainable), or quantized for inference: float16, or int8 with one
  symmetric float16 scale per row.
* ``BSR``: whole (br, bc) blocks (scipy's ``bsr_array`` layout), trainable.

A sparse weight trains only its stored values: its gradient is shaped like
``values``, and products with W^T go through the transposed pattern (CSR/BSR
of W^T), built on first use together with ``perm`` so that the transposed
values can be refreshed from ``values`` after an update.
"""

import threading

import numpy as np
import scipy.sparse as sp

from numlstm import layouts
from numlstm.kernels import cpu as cpu_kernels

_NO_INDEX = np.zeros(0, dtype=np.int32)  # the unused index slots of a dense weight


_NO_DENSE = {}


def _no_dense(dtype):
    """The ``w0`` slot of a sparse weight: an empty (0, 0) array, read-only.
    Read-only is its type to numba (a dense weight's matrix is writeable), so
    a kernel compiled for a sparse kind holds no dense code, and for a dense
    kind no sparse code (docs/design.md, Storage kinds by type). One shared
    array per dtype, never an attribute: a copied or unpickled array would
    come back writeable."""
    dtype = np.dtype(dtype)
    a = _NO_DENSE.get(dtype)
    if a is None:
        a = np.zeros((0, 0), dtype)
        a.flags.writeable = False
        _NO_DENSE[dtype] = a
    return a
_STEP_LOCK = threading.Lock()  # held while a CSR weight builds its execution layout
QUANTIZED_TYPES = ("float16", "int8")


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


class _Weight:
    """What every storage kind shares. ``values`` is the array kernels read
    and training updates in place; a gradient is shaped like it."""

    indices = indptr = scales = None

    @property
    def value_type(self):
        return self.values.dtype.name

    def new_grad(self):
        return np.zeros_like(self.values)

    def transposed_nbytes(self):
        """Bytes of the W^T pattern (values, indices, indptr, perm) that a sparse
        weight builds for backward, built or not; 0 for dense."""
        if self.format == "dense":
            return 0
        built = getattr(self, "_transposed", None)
        if built is not None:
            return sum(a.nbytes for a in built)
        C = self.shape[1]
        if self.format == "bsr":
            blocks, bc = self.data.shape[0], self.blocksize[1]
            return self.data.nbytes + blocks * (4 + 8) + (C // bc + 1) * 4
        return self.nnz * (self.dtype.itemsize + 4 + 8) + (C + 1) * 4

    def transposed_built(self):
        """Bytes of the W^T pattern built so far (0 before the first backward)."""
        built = getattr(self, "_transposed", None)
        return 0 if built is None else sum(a.nbytes for a in built)

    def step_args(self):
        """Kernel arguments of per-step products: the stored arrays (CSR
        weights may have an execution layout of their own)."""
        return self.kernel_args()

    def refresh_step(self):
        """Nothing to refresh: per-step products read the stored arrays."""

    def first_step(self):
        """(kept, peak) bytes of the layout the first ``step_args`` call builds:
        none here, per-step products read the stored arrays."""
        return 0, 0

    step_built = True  # no execution layout to build

    def drop_step(self):
        """Nothing to forget: per-step products read the stored arrays."""

    def to_array(self):
        """The weight as a dense (R, K) array of the model's dtype (a copy)."""
        return self.public().toarray()

    def nbytes_parts(self):
        """Stored bytes by part: values, indices, indptr, scales. A sparse
        weight's transposed pattern, built only for training, is not counted."""
        def size(a):
            return 0 if a is None else a.nbytes
        return {"values": self.values.nbytes, "indices": size(self.indices),
                "indptr": size(self.indptr), "scales": size(self.scales)}

    @property
    def nbytes(self):
        """Bytes the model keeps for inference."""
        return sum(self.nbytes_parts().values())


class Dense(_Weight):
    """A dense (R, K) weight: values of the model's dtype (trainable), or
    float16 (``quantize(model, "float16")``: half the bytes, inference only;
    kernels read the float16 bits and convert each value in a register).

    Parameters
    ----------
    array : array (R, K), C-contiguous
        The values: the model's dtype, or float16.
    dtype : the model's dtype (default: the array's)
    """

    format = "dense"
    index_type = None

    def __init__(self, array, dtype=None):
        if not array.flags.writeable:  # writeable is what tells the kernels it is dense
            array = array.copy()
        self.array = array  # (R, K)
        self.shape = array.shape
        self.dtype = np.dtype(dtype if dtype is not None else array.dtype)
        self.half = array.dtype == np.float16 and self.dtype != np.float16
        self.trainable = not self.half
        # float16 crosses into kernels as its bits (numba has no CPU float16).
        self._w0 = array.view(np.uint16) if self.half else array
        self._empty = (np.zeros(0, self.dtype), _NO_INDEX, _NO_INDEX)

    @property
    def values(self):
        return self.array

    @property
    def nnz(self):
        """Stored values (every entry, zeros included)."""
        return self.array.size

    def kernel_args(self):
        return (self._w0,) + self._empty

    def kernel_args_t(self):
        if self.half:  # training refuses such a model before any kernel runs
            raise TypeError("a float16 dense weight is for inference: no W^T products")
        return self.kernel_args()

    def public(self, values=None):
        """A copy as the user sees it, in the model's dtype (float16 values
        dequantized; ``values`` replaces the stored values)."""
        return np.array(self.array if values is None else values, dtype=self.dtype)

    def to_array(self):
        """The weight as a dense array of the model's dtype (a copy)."""
        return self.public()


class CSR(_Weight):
    """A CSR (R, K) weight that stores and multiplies only its pattern.

    Parameters
    ----------
    data : array (nnz,)
        Values: the model's dtype (trainable), float16, or int8 (then
        ``scales`` is required and value = data * scales[row]).
    indices : array (nnz,) int32 or uint16
        Column of each value, sorted within each row.
    indptr : array (R + 1,) int32 or uint16
    shape : (R, K)
    dtype : the model's dtype
    scales : array (R,) float16, only for int8 values
    """

    format = "csr"

    def __init__(self, data, indices, indptr, shape, dtype=None, scales=None):
        self._data = data  # (nnz,); None once an execution layout holds the values
        self._indices = indices  # (nnz,) int32 or uint16, sorted within each row
        self._index_dtype = indices.dtype
        self.indptr = indptr  # (R + 1,) int32 or uint16
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype if dtype is not None else data.dtype)
        self.scales = scales  # (R,) float16 for int8 values, else None
        self._transposed = None  # (data_t, indices_t, indptr_t, perm), built lazily
        self._bind()

    @property
    def data(self):
        """The values (nnz,) in CSR order: the live array of a trainable weight; a
        copy rebuilt from the layout for a quantized one stored as SELL."""
        return self._data if self._data is not None else self._store.csr_values()

    @data.setter
    def data(self, value):
        # ``w.data *= s`` updates in place and assigns the same array back.
        if value is not self._data:
            raise AttributeError("a CSR weight's values are updated in place (w.data[...] = "
                                 "v); to replace the weight use LSTM.load_state_dict")

    @property
    def indices(self):
        """Column indices (nnz,), sorted within each row (a rebuilt copy when the
        SELL layout is the storage)."""
        if self._indices is not None:
            return self._indices
        return self._store.csr_indices(self._index_dtype)

    def _bind(self):
        """The kernel arguments (views of the stored arrays, made once).

        The per-step execution layout is built on first use (``step_args``:
        a stream, or a forward at batch < ``STEP_MAX_B``), so a model that
        only trains, or only runs batches, never pays its bytes. A quantized
        weight (inference only, values never updated) is stored now as the
        layout ``layouts.build`` picks, and when that is a SELL layout keeps
        only it (``_store``): batched products run on it, and the CSR arrays
        are rebuilt from it when asked for (``data``, ``indices``)."""
        data = self._data
        if data.dtype == np.int8:  # (R, 1) scale bits
            w0, kdata = self.scales.view(np.uint16).reshape(-1, 1), data
        elif data.dtype == np.float16:
            w0, kdata = _no_dense(self.dtype), data.view(np.uint16)  # kernels read the bits
        else:
            w0, kdata = _no_dense(self.dtype), data
        self._args = (w0, kdata, self._indices, self.indptr)
        self._step = None  # (layout or self, its kernel arguments), built on first use
        self._store = None  # the SELL layout that stores a quantized weight, if any
        if not self.trainable:
            layout = layouts.build(self)
            if isinstance(layout, layouts.SELL_KINDS):
                self._store = layout
                self._args = self.layout_args(layout)
                self._data = self._indices = None
            elif layout is not None:  # a dense copy (config.DENSE_FOR_QUANTIZED)
                self._step = (layout, self.layout_args(layout))

    def first_step(self):
        """(kept, peak): bytes of the per-step execution layout that the first
        ``step_args`` call builds (``layouts.choose``'s pick, sized without
        building it; for a quantized weight its windowed copy, if any), and an
        upper bound of what building it holds at once (``layouts.build_peak``).
        (0, 0) once built."""
        if self._step is not None:
            return 0, 0
        if self.trainable:
            kind, planned = layouts.choose(self)
        else:
            planned = layouts.quantized_step(self, self._store, planned_only=True)
            kind = "csr" if planned is None else "windows"
        return layouts.build_peak(self, kind, planned)

    @property
    def step_built(self):
        """Whether the per-step execution layout exists (built by ``step_args``)."""
        return self._step is not None

    def drop_step(self):
        """Forget the per-step execution layout; the next ``step_args`` builds it
        again. Only for a layout nothing has bound yet (no stream or pool made
        since it was built): ``memory_report(measure=True)`` drops those its
        warm-up call built, so that the call it measures builds them as the
        prediction says."""
        with _STEP_LOCK:
            self._step = None

    def _build_step(self):
        # Under a lock, checked again inside: two threads making streams of one
        # model must bind the same layout (the one refresh_step updates).
        with _STEP_LOCK:
            if self._step is None:
                if self.trainable:
                    layout = layouts.build(self)
                else:  # its storage, or a windowed copy for the per-step products
                    layout = layouts.quantized_step(self, self._store) or self._store
                self._step = (self if layout is None else layout, self.layout_args(layout))

    def __getstate__(self):
        # Views would pickle as copies that in-place updates no longer reach.
        state = dict(self.__dict__, _transposed=None, _data=self.data, _indices=self.indices,
                     _step=None, _store=None)
        del state["_args"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._bind()

    @property
    def values(self):
        return self.data

    @property
    def index_type(self):
        return self._index_dtype.name

    @property
    def trainable(self):
        return self.value_type not in QUANTIZED_TYPES

    @property
    def nnz(self):
        return int(self.indptr[-1])

    def kernel_args(self):
        return self._args

    def nbytes_parts(self):
        """As for every kind, plus ``layout``: the per-step execution layout's copy
        (0 when the per-step products read the stored arrays themselves). When a
        SELL layout is the storage, values and indices are its arrays (padding
        included) and ``layout`` also holds the rest of it (slice table, lane
        scales)."""
        step = self._step[0] if self._step is not None else self
        copy = 0 if step is self or step is self._store else step.nbytes
        store = self._store
        if store is not None:
            return {"values": store.data.nbytes, "indices": store.indices.nbytes,
                    "indptr": self.indptr.nbytes, "scales": self.scales.nbytes
                    if self.scales is not None else 0,
                    "layout": store.nbytes - store.data.nbytes - store.indices.nbytes + copy}
        return dict(super().nbytes_parts(), layout=copy)

    def layout_args(self, layout):
        """Kernel arguments of this weight through ``layout`` (as
        ``numlstm.layouts.build`` returns it; None: the CSR arrays)."""
        if layout is None:
            return self._args
        if isinstance(layout, Dense):
            return layout.kernel_args()
        if isinstance(layout, layouts.SellWindows) and layout.words is not None:
            # int8: the packed words (the kernel takes no indices of its own)
            return layout.lane_scales, layout.words, layout.words.view(np.uint8), layout.table
        values = layouts.value_bits(layout.data)  # how the kernels see the value type
        if isinstance(layout, layouts.SellWindows):
            return layout.lane_scales, values, layout.indices, layout.table
        return self._args[0], values, layout.indices, layout.slices  # w0: int8's row scales

    def dense_copy(self):
        """A ``Dense`` copy of the weight (the ``dense`` execution layout)."""
        return Dense(self.public().toarray())

    def step_layout(self):
        """The execution layout of per-step products (``SellWindows``, ``Sell``,
        ``Dense`` or self), built on first use."""
        if self._step is None:
            self._build_step()
        return self._step[0]

    def step_args(self):
        """Kernel arguments of the per-step execution layout (``step_layout``)."""
        if self._step is None:
            self._build_step()
        return self._step[1]

    def refresh_step(self):
        """Copy the current values into the execution layout, if it holds a copy."""
        if self._step is None or not self.trainable:  # none yet, or values never change
            return
        layout = self._step[0]
        if isinstance(layout, layouts.SELL_KINDS):
            layout.refresh(self.data)
        elif isinstance(layout, Dense):
            layout.array[...] = self.public().toarray()

    def kernel_args_t(self):
        """The CSR pattern of W^T, its values refreshed from ``data``."""
        if not self.trainable:
            raise TypeError(f"a {self.value_type} weight is for inference only")
        if self._transposed is None:
            pattern = transpose_pattern(self.indices, self.indptr, self.shape)
            self._transposed = (np.empty_like(self.data),) + pattern
        data_t, indices_t, indptr_t, perm = self._transposed
        np.take(self.data, perm, out=data_t)
        return _no_dense(self.dtype), data_t, indices_t, indptr_t

    def dequantized(self):
        """The values as the model's dtype (nnz,): data itself when trainable."""
        if self.value_type == "int8":
            rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
            return self.data.astype(self.dtype) * self.scales[rows].astype(self.dtype)
        return self.data.astype(self.dtype, copy=False)

    def public(self, values=None):
        """A ``csr_array`` copy (quantized values come back dequantized)."""
        data = self.dequantized() if values is None else values
        return sp.csr_array((np.array(data), self.indices.astype(np.int32),
                             self.indptr.astype(np.int32)), shape=self.shape)


class BSR(_Weight):
    """A block-sparse (R, K) weight: whole (br, bc) blocks, scipy's BSR layout.

    data (nblocks, br, bc); indices (nblocks,) int32, the block column of
    each block, sorted within each block row; indptr (R/br + 1,) int32.
    Contiguous blocks let the kernels keep several rows' sums in registers.
    """

    format = "bsr"
    index_type = "int32"
    trainable = True

    def __init__(self, data, indices, indptr, shape):
        self.data = data  # (nblocks, br, bc)
        self.indices = indices  # (nblocks,) int32
        self.indptr = indptr  # (R / br + 1,) int32
        self.shape = tuple(shape)
        self.dtype = data.dtype
        self.blocksize = data.shape[1:]
        self._transposed = None

    @property
    def values(self):
        return self.data

    @property
    def nnz(self):
        """Stored values (every entry of every stored block)."""
        return self.data.size

    def kernel_args(self):
        return _no_dense(self.dtype), self.data, self.indices, self.indptr

    def kernel_args_t(self):
        """The BSR pattern of W^T ((bc, br) blocks), refreshed from ``data``."""
        if self._transposed is None:
            self._transposed = transpose_blocks(self.data, self.indices, self.indptr,
                                                 self.shape)
        data_t, indices_t, indptr_t, perm = self._transposed
        cpu_kernels.gather_blocks_t(data_t, self.data, perm)
        return _no_dense(self.dtype), data_t, indices_t, indptr_t

    def public(self, values=None):
        data = self.data if values is None else values
        return sp.bsr_array((np.array(data), self.indices.copy(), self.indptr.copy()),
                            shape=self.shape)


def describe(weight):
    """A short storage description: ``dense float32``, ``csr float16/uint16``, ..."""
    if weight.format == "dense":
        return f"dense {weight.value_type}"
    if weight.format == "bsr":
        br, bc = weight.blocksize
        return f"bsr {br}x{bc} {weight.value_type}"
    return f"csr {weight.value_type}/{weight.index_type}"


def transpose_pattern(indices, indptr, shape):
    """(indices_t, indptr_t, perm): the CSR pattern of W^T, and for each of its
    values the position of the same value in W's."""
    nnz = indices.shape[0]
    order = sp.csr_array((np.arange(nnz, dtype=np.int64), indices.astype(np.int32), indptr),
                         shape=shape)
    t = order.T.tocsr()
    t.sort_indices()
    perm = np.ascontiguousarray(t.data, dtype=np.int64)
    return t.indices.astype(np.int32), t.indptr.astype(np.int32), perm


def transpose_blocks(data, indices, indptr, shape):
    """Block pattern of W^T: the transposed block-level CSR plus ``perm``."""
    br, bc = data.shape[1:]
    nb = data.shape[0]
    grid = (shape[0] // br, shape[1] // bc)
    indices_t, indptr_t, perm = transpose_pattern(indices, indptr, grid)
    data_t = np.empty((nb, bc, br), data.dtype)
    return data_t, indices_t, indptr_t, perm


def _check_finite(values, name):
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite, got NaN or inf values")


def _checked_structure(value, name):
    """A copy of the scipy value ``value`` whose index arrays are in range.

    scipy's conversions, ``sum_duplicates`` and ``sort_indices`` trust the
    index arrays (C++ loops without bounds checks): out-of-range indices or a
    broken indptr, easy to make with ``check=False`` or by assigning
    ``.indices``, would crash the process there or reach a kernel. Checked
    here, on a copy, before any of them runs. dok, lil and dia values go
    through COO, whose coordinates are checked too.
    """
    fmt = value.format
    try:
        if fmt not in ("csr", "csc", "bsr", "coo"):
            value, fmt = value.tocoo(), "coo"
        value = value.copy()
        if fmt == "coo":
            for idx, n in zip(value.coords, value.shape, strict=True):
                if idx.shape != value.data.shape:
                    raise ValueError(f"coordinates must have shape {value.data.shape} like "
                                     f"the data, got {idx.shape}")
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise ValueError(f"coordinates must lie in [0, {n}), got "
                                     f"[{idx.min()}, {idx.max()}]")
        else:
            value.check_format(full_check=True)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{name} is not a valid scipy {fmt} matrix: {e}") from None
    return value


def from_value(value, name, shape, dtype):
    """Build a trainable weight from a user value: a NumPy array or scipy sparse.

    A scipy BSR value (``bsr_array`` / ``bsr_matrix``) stays block-sparse;
    other scipy formats become CSR (duplicates summed, indices sorted);
    explicitly stored zeros stay in the pattern and train. Raises TypeError /
    ValueError naming ``name`` on a wrong type, dtype or shape, and
    ValueError on non-finite values.
    """
    if sp.issparse(value):
        if value.dtype.kind != "f":
            raise TypeError(f"{name} must hold floating-point values, got dtype {value.dtype}")
        if value.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
        value = _checked_structure(value, name)
        if value.format == "bsr":
            bsr = sp.bsr_array(value, dtype=dtype, copy=True)
            bsr.sum_duplicates()
            bsr.sort_indices()
            _check_finite(bsr.data, name)
            return BSR(np.ascontiguousarray(bsr.data, dtype=dtype),
                       bsr.indices.astype(np.int32), bsr.indptr.astype(np.int32), shape)
        csr = sp.csr_array(value, dtype=dtype, copy=True)
        csr.sum_duplicates()
        csr.sort_indices()
        if csr.nnz >= 2**31:
            raise ValueError(f"{name} has {csr.nnz} stored values; at most 2**31 - 1 fit")
        _check_finite(csr.data, name)
        return CSR(np.ascontiguousarray(csr.data, dtype=dtype),
                   csr.indices.astype(np.int32), csr.indptr.astype(np.int32), shape)
    arr = check_float_array(value, name, shape, dtype)
    _check_finite(arr, name)
    return Dense(arr.copy())

"""Execution layouts: how a stored CSR weight is laid out for the per-step kernels.

The user's weight stays scipy CSR (``state_dict``, ``save``, pruning and the
batched products of a whole sequence use it). The per-step products of a
stream or a recurrence, one row of x (or a few) against the whole weight, run
faster from a layout derived from it once, chosen per weight by a cost model:

* ``sell``: SELL-C-sigma (Kreutzer et al. 2014). Rows sorted by their length
  (within windows of sigma rows) are cut into slices of C = ``SELL_LANES``
  rows; a slice stores its rows' k-th values side by side, padded to its
  longest row, so the kernel runs C rows per vector multiply-add with the C
  inputs fetched by one gather from L1. Equal row lengths (``per_row``
  pruning) need no padding at all.
* ``dense``: a dense copy of the weight, when it is dense enough that reading
  every entry costs less than gathering the stored ones (50% sparsity).
* ``csr``: the CSR arrays themselves (row loops), when nothing beats them.

The layout holds a copy of the values: ``refresh`` copies them again after an
in-place update (the model calls it when its version changes, forward does it
on entry). Its bytes are counted by ``nbytes`` (``weight_bytes`` and
``memory_report`` include them).
"""

import numpy as np

from numlstm import config
from numlstm.kernels import sell as K_
from numlstm.kernels.vector_ir import SELL_LANES

KINDS = ("sell", "dense", "csr")


def costs(weight, lanes=SELL_LANES):
    """Estimated ns of one product with one row of x, per layout kind.

    From the padded SELL size (``sell_padded``), R*K and nnz, with the per-
    element costs of ``config.STEP_COSTS`` (measured per ISA: see there).
    """
    R, K = weight.shape
    c = config.STEP_COSTS["avx512" if lanes == 16 else "avx2"]
    lens = np.diff(weight.indptr.astype(np.int64))
    entries = sell_entries(lens, lanes, config.SELL_SIGMA or R)
    quantized = weight.values.dtype.kind != "f" or weight.values.dtype.itemsize < 4
    return {"sell": entries * lanes * c["sell"] + (R // lanes + 1) * c["slice"],
            "dense": R * K * c["dense"] + (np.inf if quantized and
                                           not config.DENSE_FOR_QUANTIZED else 0),
            "csr": lens.sum() * c["csr"] + R * c["row"]}


def choose(weight):
    """The layout kind for ``weight``'s per-step products: ``config.STEP_LAYOUT``
    when it forces one, else the cheapest by ``costs``."""
    forced = config.STEP_LAYOUT
    if forced != "auto":
        return forced
    est = costs(weight)
    return min(KINDS, key=lambda k: est[k])


def _order(lens, sigma):
    """Rows by decreasing length within each window of sigma rows (stable)."""
    R = lens.shape[0]
    window = np.arange(R) // max(int(sigma), 1)
    return np.lexsort((np.arange(R), -lens, window))


def sell_entries(lens, lanes, sigma):
    """Entries (vectors of ``lanes`` values) of the SELL layout of these row lengths."""
    order = _order(lens, sigma)
    padded = np.zeros(-(-lens.shape[0] // lanes) * lanes, np.int64)
    padded[:lens.shape[0]] = lens[order]
    return int(padded.reshape(-1, lanes).max(axis=1).sum())


def _bits(a):
    """float16 arrays as their uint16 bits (numba has no float16 on the CPU)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


class Sell:
    """The SELL-C-sigma layout of a CSR weight (R, K).

    Attributes
    ----------
    data : array (S, C)
        Values (the weight's own value type: float, float16 bits as uint16,
        or int8); entry k of a slice, lane l: the k-th value of the slice's
        row l (0 past the row's end).
    indices : array (S, C) uint16 (int32 when K > 65536)
        Their columns (0 for padding, a valid column).
    slices : array (nslices, 2 + C) int32
        Per slice: first and past-last entry, then the row of each lane (-1
        for the lanes of the last slice beyond R).
    """

    kind = "sell"

    def __init__(self, values, indices, indptr, shape, lanes=SELL_LANES, sigma=None):
        R, K = shape
        C = lanes
        lens = np.diff(indptr.astype(np.int64))
        order = _order(lens, sigma or R)
        nslices = -(-R // C)
        rows = np.full(nslices * C, -1, np.int64)
        rows[:R] = order
        widths = np.where(rows >= 0, lens[np.maximum(rows, 0)], 0).reshape(nslices, C)
        widths = widths.max(axis=1)
        starts = np.concatenate([[0], np.cumsum(widths)])
        self.slices = np.empty((nslices, 2 + C), np.int32)
        self.slices[:, 0], self.slices[:, 1] = starts[:-1], starts[1:]
        self.slices[:, 2:] = rows.reshape(nslices, C)
        S = int(starts[-1])
        self.data = np.zeros((S, C), values.dtype)
        self.indices = np.zeros((S, C), np.uint16 if K <= 65536 else np.int32)
        self._indptr = indptr
        K_.sell_scatter(self.indices, indices, indptr, self.slices)
        self.refresh(values)

    def refresh(self, values):
        """Copy the weight's current values (nnz,) into the layout."""
        K_.sell_scatter(_bits(self.data), _bits(values), self._indptr, self.slices)

    def csr_values(self):
        """The values in CSR order (nnz,): a new array."""
        out = np.empty(int(self._indptr[-1]), self.data.dtype)
        K_.sell_gather(_bits(out), _bits(self.data), self._indptr, self.slices)
        return out

    def csr_indices(self, dtype):
        """The column indices in CSR order (nnz,) as ``dtype``: a new array."""
        out = np.empty(int(self._indptr[-1]), self.indices.dtype)
        K_.sell_gather(out, self.indices, self._indptr, self.slices)
        return out.astype(dtype, copy=False)

    @property
    def nbytes(self):
        return self.data.nbytes + self.indices.nbytes + self.slices.nbytes

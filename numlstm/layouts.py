"""Execution layouts: how a stored CSR weight is laid out for the per-step kernels.

The user's weight stays scipy CSR (``state_dict``, ``save``, pruning, and the
batched products of a whole sequence and of training use it). The per-step
products of a stream or a recurrence at small batch, one row of x against the
whole weight, run faster from a layout derived from it once, chosen per
weight by a cost model (``build``):

* ``windows`` (``SellWindows``): SELL slices whose entries each stay inside
  one window of 32 columns (8 on AVX2), so the inputs come from one register
  permute; cheapest for the small inputs of an LSTM (K <= ~512) at 80-95%
  sparsity, float32 only.
* ``sell`` (``Sell``): SELL-C-sigma (Kreutzer et al. 2014). Rows sorted by
  length are cut into slices of C = ``SELL_LANES`` rows; a slice stores its
  rows' k-th values side by side, padded to its longest row, and the kernel
  runs C rows per vector multiply-add, the C inputs fetched by one gather.
  Equal row lengths (``per_row`` pruning) need no padding at all.
* ``dense`` (``weights.Dense``): a dense copy, when reading every entry costs
  less than fetching the stored ones (50% sparsity).
* ``csr``: the CSR arrays themselves (row loops), when nothing beats them.

A layout holds a copy of the values: ``refresh`` copies them again after an
in-place update (``LSTM.refresh_layouts``). A quantized weight, never updated,
keeps only its layout (``weights.CSR``). The bytes are counted in
``weight_bytes`` and ``memory_report`` (their "layout" part).
"""

import logging
import os
from typing import NamedTuple

import numpy as np

from numlstm import config
from numlstm.kernels import sell as sell_kernels
from numlstm.kernels.vector_ir import SELL_LANES, WINDOW, WINDOW_PAD

log = logging.getLogger("numlstm")

KINDS = ("windows", "sell", "dense", "csr")
_BLOCK = 2**12  # values per block of rows that ``SellWindows`` sizes and fills at once
_OBJECT_BYTES = 2**14  # a layout's Python objects (views, tuples, the weight's bindings)


def _l2_bytes():
    """This core's L2 cache in bytes (1 MiB when the system does not say).

    Linux's sysfs first: Python's ``os.sysconf`` does not know the
    ``SC_LEVEL2_CACHE_SIZE`` name on most builds (it raised ValueError, and a
    2 MiB L2 was taken for the 1 MiB default)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(f"{base}/{entry}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip()
            digits = size.rstrip("KM")
            if level == "2" and digits.isdigit():
                return int(digits) * {"K": 2**10, "M": 2**20}.get(size[len(digits):], 1)
    except OSError:
        pass
    try:
        return os.sysconf("SC_LEVEL2_CACHE_SIZE") or 2**20
    except (ValueError, OSError):
        return 2**20


L2_BYTES = _l2_bytes()


class Planned(NamedTuple):
    """A layout's sizes, known before it is built (``Sell.planned``,
    ``SellWindows.planned``): what ``cost`` and ``build`` read."""

    kind: str  # "sell" or "windows"
    values: int  # entries times lanes: the size of its ``data``
    units: int  # Sell: slices; SellWindows: slice windows (nslices * nwin)
    nbytes: int  # its ``nbytes`` once built


def choose(weight, forced=None):
    """The kind of execution layout ``build`` makes for the CSR ``weight``
    ("windows", "sell", "dense" or "csr") and its ``Planned`` sizes (None for
    "dense" and "csr").

    ``forced`` (default ``config.STEP_LAYOUT``) names a kind, or "auto": the
    cheapest by ``cost``; for a quantized weight, whose layout replaces its
    arrays, only among those at most ``config.QUANTIZED_LAYOUT_SLACK`` larger
    than the CSR arrays (so ``sell``, not ``windows``). A kind that cannot
    hold the weight (``windows`` needs float32 inputs and an AVX2 or AVX-512
    CPU; ``dense`` a float value kind unless ``config.DENSE_FOR_QUANTIZED``)
    falls back to "auto". The candidates are priced from their sizes, never
    built: ``build`` makes only the chosen one, so choosing costs no layout's
    bytes, and ``memory_report`` can say what a first call builds.
    """
    kind = forced or config.STEP_LAYOUT
    if kind not in KINDS + ("auto",):
        raise ValueError(f"the step layout (NUMLSTM_STEP_LAYOUT / config.STEP_LAYOUT) must "
                         f"be one of {KINDS + ('auto',)}, got {kind!r}")
    sigma = config.SELL_SIGMA
    candidates = {"sell": lambda: Sell.planned(weight, sigma=sigma), "csr": lambda: None}
    quantized = weight.value_type in ("float16", "int8")
    if SellWindows.applies(weight.dtype):
        candidates["windows"] = lambda: SellWindows.planned(weight, sigma=sigma)
    if not quantized or config.DENSE_FOR_QUANTIZED:
        candidates["dense"] = lambda: None
    if kind in candidates:
        return kind, candidates[kind]()
    sized = {k: make() for k, make in candidates.items() if k != "dense"}
    nbytes = {k: 0 if v is None else v.nbytes for k, v in sized.items()}
    est = {k: cost(weight, v) for k, v in sized.items()}
    if "dense" in candidates:
        R, K = weight.shape
        nbytes["dense"] = R * K * weight.dtype.itemsize
        est["dense"] = dense_cost(weight.shape, weight.dtype.itemsize)
    if quantized:  # the layout replaces the stored arrays: it must not cost bytes
        stored = sum(a.nbytes for a in (weight.data, weight.indices, weight.indptr))
        limit = stored * (1 + config.QUANTIZED_LAYOUT_SLACK)
        est = {k: e for k, e in est.items() if k == "csr" or nbytes[k] <= limit}
    best = min(est, key=est.get)
    log.debug("step layout of a %dx%d weight with %d stored values: %s (estimated ns: %s)",
              weight.shape[0], weight.shape[1], weight.nnz, best,
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(est.items())))
    return best, sized.get(best)


def build_peak(weight, kind, planned):
    """(kept, peak): the bytes of ``weight``'s layout of ``kind`` (``choose``'s
    answer, ``planned`` its sizes) and an upper bound of the NumPy bytes
    building it holds at once, that layout included: first the candidates'
    sizing (``choose``, freed before building), then the chosen layout and
    its own temporaries. Counted from the code's arrays: per-row arrays (row
    lengths, the sort, slots: at most ``12 R`` int64), per-block index
    arithmetic (``_row_blocks``: at most ``12 * _BLOCK`` int64), the window
    table's (nslices, nwin + 1) int64 arrays (at most six at once), a dense
    copy's CSR copy, for a quantized weight stored as SELL the CSR arrays
    rebuilt to read it, and ``_OBJECT_BYTES`` for the Python objects. What
    ``memory_report`` adds for a call that builds layouts."""
    R, K = weight.shape
    nnz, C = weight.nnz, SELL_LANES
    item = value_bits(np.zeros(0, weight.value_type)).itemsize
    rows = 12 * R * 8
    block = 12 * min(nnz, _BLOCK) * 8
    nwin = max(-(-K // WINDOW), 1) if WINDOW else 0
    table = 6 * -(-R // C) * (nwin + 1) * 8 + rows + block
    rebuilt = 0
    if weight.value_type in ("float16", "int8") and getattr(weight, "_store", None) is not None:
        rebuilt = nnz * (8 + 4 + item)  # csr_indices (int64, then the index type), data
    sizing = rows + (table if SellWindows.applies(weight.dtype) else 0) + rebuilt
    if kind == "dense":
        kept = R * K * weight.dtype.itemsize
        temps = nnz * (weight.dtype.itemsize + 4) + (R + 1) * 4 + rebuilt  # public()'s copy
    elif kind in ("sell", "windows"):
        kept = planned.nbytes
        temps = (rows if kind == "sell" else table + R * 8) + rebuilt
    else:
        kept = temps = 0
    return kept, max(sizing, kept + temps) + _OBJECT_BYTES


def build(weight, forced=None):
    """The per-step execution layout of the CSR ``weight``: a ``SellWindows``,
    ``Sell``, dense copy (``weights.Dense``) or None (use the CSR arrays), of
    the kind ``choose`` picks (``forced``: see there)."""
    kind, _ = choose(weight, forced)
    sigma = config.SELL_SIGMA
    if kind == "sell":
        return Sell(weight.data, weight.indices, weight.indptr, weight.shape, sigma=sigma)
    if kind == "windows":
        return SellWindows(weight.data, weight.indices, weight.indptr, weight.shape,
                           weight.scales, sigma=sigma)
    if kind == "dense":
        return weight.dense_copy()  # weights.Dense (no import back: no cycle)
    return None


def quantized_step(weight, stored, planned_only=False):
    """The per-step layout of a quantized (float16 / int8) ``weight`` stored as
    ``stored`` (its SELL layout, or None: its CSR arrays): a windowed copy
    where ``config.QUANTIZED_STEP_COPY`` allows one and ``cost`` prices it
    below the storage, else None (the per-step products read the storage).
    Only under "auto": a forced ``config.STEP_LAYOUT`` already chose the
    storage ("windows" included). ``planned_only``: the copy's ``Planned``
    sizes instead of the copy (None where none would be made)."""
    if (not config.QUANTIZED_STEP_COPY or config.STEP_LAYOUT != "auto"
            or isinstance(stored, SellWindows) or not SellWindows.applies(weight.dtype)):
        return None
    planned = SellWindows.planned(weight, sigma=config.SELL_SIGMA)
    if cost(weight, planned) >= cost(weight, stored):
        return None
    if planned_only:
        return planned
    return SellWindows(weight.data, weight.indices, weight.indptr, weight.shape, weight.scales,
                       sigma=config.SELL_SIGMA)


def step_costs():
    """This CPU's ``config.STEP_COSTS`` (by its vector width)."""
    return config.STEP_COSTS["avx512" if SELL_LANES == 16 else "avx2"]


def _streamed(ns, nbytes):
    """``ns`` of a product whose operand is ``nbytes`` long: beyond L2 the
    operand streams from L3 or memory at every product, so the product takes
    at least its bytes at ``stream_byte`` ns each (a roofline: computing and
    streaming overlap)."""
    return max(ns, nbytes * step_costs()["stream_byte"]) if nbytes > L2_BYTES else ns


def dense_cost(shape, itemsize):
    """Estimated ns of a product with one row of x through a dense (R, K)
    matrix of ``itemsize``-byte values."""
    R, K = shape
    return _streamed(R * K * step_costs()["dense"], R * K * itemsize)


def cost(weight, layout):
    """Estimated ns of one product with one row of x through ``layout``
    (as ``build`` returns it, or its ``Planned`` sizes), from its sizes and
    ``config.STEP_COSTS``.

    Measured per ISA (``benchmarks/layout_costs.py``); what matters is their
    ratios. Past L2, each is at least its bytes streamed (``_streamed``): a
    gathering SELL product, which computes slowly, then beats a windowed one,
    which reads twice the bytes (4096x1024 at 10%: 108 against 172 us).
    """
    c = step_costs()
    R = weight.shape[0]
    if layout is None:
        nbytes = weight.data.nbytes + weight.indices.nbytes + weight.indptr.nbytes
        return _streamed(weight.nnz * c["csr"] + R * c["row"], nbytes)
    if isinstance(layout, SELL_KINDS):
        layout = layout.sizes()
    if isinstance(layout, Planned):
        lane, unit = ("window_lane", "window") if layout.kind == "windows" else \
            ("sell_lane", "slice")
        return _streamed(layout.values * c[lane] + layout.units * c[unit], layout.nbytes)
    return dense_cost(weight.shape, weight.dtype.itemsize)


def halved(R, C):
    """Whether a layout of R rows in slices of C splits into two halves by
    hidden unit: the rows g*H + j with j < H/2 (H = R/4, any gate g) in the
    first R/(2C) slices, the rest in the others, so that each of the two
    threads of a batch-1 step (``numlstm.kernels.pair``) runs its own slices
    and writes only its own units' rows."""
    return R % 8 == 0 and (R // 2) % C == 0


def _order(lens, sigma, C):
    """Rows by decreasing length within each window of sigma rows (stable),
    the first half of the hidden units' rows first where ``halved``."""
    R = lens.shape[0]
    rows = np.arange(R)
    window = rows // max(int(sigma), 1)
    half = (rows % (R // 4) >= R // 8) if halved(R, C) else np.zeros(R, bool)
    return np.lexsort((rows, -lens, window, half))


def value_bits(a):
    """float16 arrays as their uint16 bits (numba has no float16 on the CPU)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _row_blocks(indptr):
    """``(r0, r1, a, b)``: rows [r0, r1) holding values [a, b), whole rows of
    about ``_BLOCK`` values each (a longer row alone), empty blocks skipped.
    Per-value index arithmetic done a block at a time needs O(_BLOCK)
    temporaries instead of several O(nnz) arrays (``build_peak``); every
    (row, window) group lies inside one block."""
    ptr = indptr.astype(np.int64)
    R, r0 = ptr.shape[0] - 1, 0
    while r0 < R:
        r1 = min(max(int(np.searchsorted(ptr, ptr[r0] + _BLOCK, "right")) - 1, r0 + 1), R)
        if ptr[r1] > ptr[r0]:
            yield r0, r1, int(ptr[r0]), int(ptr[r1])
        r0 = r1


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
    halves : bool
        Whether the slices split into hidden-unit halves (``halved``).
    """

    kind = "sell"

    def __init__(self, values, indices, indptr, shape, lanes=SELL_LANES, sigma=None):
        R, K = shape
        C = lanes
        self.halves = halved(R, C)
        self.slices = self._slices(indptr, R, C, sigma)
        S = int(self.slices[-1, 1])
        self.data = np.zeros((S, C), values.dtype)
        self.indices = np.zeros((S, C), self._index_type(K))
        self._indptr = indptr
        sell_kernels.sell_copy(self.indices, indices, indptr, self.slices, True)
        self.refresh(values)

    @staticmethod
    def _index_type(K):
        return np.uint16 if K <= 65536 else np.int32

    @staticmethod
    def _slices(indptr, R, C, sigma):
        """The slice table (nslices, 2 + C) int32 of rows with these ``indptr``."""
        lens = np.diff(indptr.astype(np.int64))
        order = _order(lens, sigma or R, C)
        nslices = -(-R // C)
        rows = np.full(nslices * C, -1, np.int64)
        rows[:R] = order
        widths = np.where(rows >= 0, lens[np.maximum(rows, 0)], 0).reshape(nslices, C)
        widths = widths.max(axis=1)
        starts = np.concatenate([[0], np.cumsum(widths)])
        slices = np.empty((nslices, 2 + C), np.int32)
        slices[:, 0], slices[:, 1] = starts[:-1], starts[1:]
        slices[:, 2:] = rows.reshape(nslices, C)
        return slices

    @classmethod
    def planned(cls, weight, lanes=SELL_LANES, sigma=None):
        """The ``Planned`` sizes of ``Sell(weight's arrays)``, from its indptr
        alone (O(R) work and memory)."""
        R, K = weight.shape
        slices = cls._slices(weight.indptr, R, lanes, sigma)
        values = int(slices[-1, 1]) * lanes
        item = value_bits(np.zeros(0, weight.value_type)).itemsize
        index = np.dtype(cls._index_type(K)).itemsize
        return Planned("sell", values, slices.shape[0],
                       values * (item + index) + slices.nbytes)

    def sizes(self):
        """This layout's ``Planned`` sizes."""
        return Planned("sell", self.data.size, self.slices.shape[0], self.nbytes)

    def refresh(self, values):
        """Copy the weight's current values (nnz,) into the layout."""
        sell_kernels.sell_copy(value_bits(self.data), value_bits(values), self._indptr,
                               self.slices, True)

    def csr_values(self):
        """The values in CSR order (nnz,): a new array."""
        out = np.empty(int(self._indptr[-1]), self.data.dtype)
        sell_kernels.sell_copy(value_bits(self.data), value_bits(out), self._indptr,
                               self.slices, False)
        return out

    def csr_indices(self, dtype):
        """The column indices in CSR order (nnz,) as ``dtype``: a new array."""
        out = np.empty(int(self._indptr[-1]), self.indices.dtype)
        sell_kernels.sell_copy(self.indices, out, self._indptr, self.slices, False)
        return out.astype(dtype, copy=False)

    @property
    def nbytes(self):
        return self.data.nbytes + self.indices.nbytes + self.slices.nbytes


class SellWindows:
    """Windowed SELL: the SELL-C-sigma slices, each entry's C values confined
    to one window of ``WINDOW`` consecutive columns (32 on AVX-512, 8 on AVX2).

    The kernel then fetches the C inputs an entry meets with one register
    permute of the window (``vpermi2ps`` / ``vpermps``) instead of a gather:
    a slice's entries are grouped by window, as many per window as its lane
    with the most stored values there; padding entries have value 0 and a
    local column >= ``WINDOW_PAD``. More entries than plain SELL (a row's
    values in a window are padded to the slice's most), each far cheaper.

    Attributes
    ----------
    data : array (E, C)
        Values (the weight's value type; float16 as is, int8).
    indices : array (E, C) uint8
        Column within the entry's window (>= ``WINDOW_PAD``: padding).
    words : array (E, C) int16, or None
        int8 values only: value << 8 | column in one word a lane, the array
        the kernel reads (``data`` and ``indices`` are views of its bytes).
    table : array (nslices, nwin + 1 + C) int32
        Per slice: the first entry of each window and the slice's end, then
        the row of each lane (-1: none).
    lane_scales : array (nslices, C) float32
        int8 values: each lane's row scale; (0, 0) otherwise.
    halves : bool
        Whether the slices split into hidden-unit halves (``halved``).
    """

    kind = "windows"

    @staticmethod
    def applies(dtype):
        """Whether a weight of model ``dtype`` has a windowed layout here:
        float32 inputs, and an AVX2 or AVX-512 CPU."""
        return bool(WINDOW) and dtype == np.float32

    def __init__(self, values, indices, indptr, shape, scales=None, lanes=SELL_LANES,
                 sigma=None):
        R, K = shape
        C, WW = lanes, WINDOW
        nwin = max(-(-K // WW), 1)
        lens = np.diff(indptr.astype(np.int64))
        self.halves = halved(R, C)
        nslices = -(-R // C)
        order, offsets, self.table = self._table(indices, indptr, R, K, C, sigma)
        slot = np.empty(R, np.int64)
        slot[order] = np.arange(R)
        E = int(offsets[-1])
        self.words = None
        if values.dtype == np.int8:
            # int8 values travel with their columns, one int16 word a lane
            # (value << 8 | column, little-endian): the kernel sign-extends a
            # vector of words once for both (``vector_ir._window_codegen``).
            self.words = np.full((E, C), WINDOW_PAD, np.int16)
            self.indices = self.words.view(np.uint8)[:, 0::2]  # views of the words' bytes
            self.data = self.words.view(np.int8)[:, 1::2]
        else:
            self.indices = np.full((E, C), WINDOW_PAD, np.uint8)
            self.data = np.zeros((E, C), values.dtype)
        # Each value's place, block by block (``_row_blocks``): its rank among
        # its row's values in its window gives its entry, its slot its lane.
        for r0, r1, a, b in _row_blocks(indptr):
            row_of = np.repeat(np.arange(r0, r1), lens[r0:r1])
            cols = indices[a:b].astype(np.int64)
            key = row_of * nwin + cols // WW  # (row, window) of each value, sorted
            new = np.ones(b - a, bool)
            new[1:] = key[1:] != key[:-1]
            first = np.maximum.accumulate(np.where(new, np.arange(b - a), 0))
            s, lane = np.divmod(slot[row_of], C)
            pos = (offsets[s * nwin + cols // WW] + np.arange(b - a) - first) * C + lane
            if self.words is not None:
                self.words.reshape(-1)[pos] = (values[a:b].astype(np.int16) << 8) | (cols % WW)
            else:
                self.indices.reshape(-1)[pos] = cols % WW
                self.data.reshape(-1)[pos] = values[a:b]
        self._indptr = indptr
        self.lane_scales = np.zeros((0, 0), np.float32)
        if scales is not None:
            self.lane_scales = np.ones(nslices * C, np.float32)
            self.lane_scales[:R] = scales[order].astype(np.float32)
            self.lane_scales = self.lane_scales.reshape(nslices, C)

    @staticmethod
    def _table(indices, indptr, R, K, C, sigma):
        """``(order, offsets, table)`` of rows with these ``indices`` and
        ``indptr``: the rows in slice order, the first entry of every slice
        window (nslices * nwin + 1,) and the table (nslices, nwin + 1 + C)."""
        WW = WINDOW
        nwin = max(-(-K // WW), 1)
        lens = np.diff(indptr.astype(np.int64))
        order = _order(lens, sigma or R, C)
        nslices = -(-R // C)
        # The most values any lane of a slice has in each window, from the
        # (row, window) groups of the stored values, block by block: never the
        # (R, nwin) counts nor an O(nnz) temporary.
        slot = np.empty(R, np.int64)
        slot[order] = np.arange(R)
        per_window = np.zeros(nslices * nwin, np.int64)
        for r0, r1, a, b in _row_blocks(indptr):
            key = np.repeat(np.arange(r0, r1) * nwin, lens[r0:r1]) + indices[a:b] // WW
            new = np.ones(b - a, bool)
            new[1:] = key[1:] != key[:-1]
            first = np.flatnonzero(new)
            counts = np.diff(first, append=b - a)
            group = key[first]
            np.maximum.at(per_window, slot[group // nwin] // C * nwin + group % nwin, counts)
        offsets = np.concatenate([[0], np.cumsum(per_window)])
        table = np.empty((nslices, nwin + 1 + C), np.int32)
        starts = np.arange(nslices)[:, None] * nwin + np.arange(nwin + 1)[None, :]
        table[:, :nwin + 1] = offsets[starts]
        rows = np.full(nslices * C, -1, np.int64)
        rows[:R] = order
        table[:, nwin + 1:] = rows.reshape(nslices, C)
        return order, offsets, table

    @classmethod
    def planned(cls, weight, lanes=SELL_LANES, sigma=None):
        """The ``Planned`` sizes of ``SellWindows(weight's arrays)``, from its
        pattern (one pass over the indices)."""
        R, K = weight.shape
        _, offsets, table = cls._table(weight.indices, weight.indptr, R, K, lanes, sigma)
        values = int(offsets[-1]) * lanes
        item = value_bits(np.zeros(0, weight.value_type)).itemsize
        nslices = table.shape[0]
        scales = nslices * lanes * 4 if weight.value_type == "int8" else 0
        return Planned("windows", values, nslices * (table.shape[1] - 1 - lanes),
                       values * (item + 1) + table.nbytes + scales)

    def sizes(self):
        """This layout's ``Planned`` sizes."""
        windows = self.table.shape[0] * (self.table.shape[1] - 1 - self.data.shape[1])
        return Planned("windows", self.data.size, windows, self.nbytes)

    def refresh(self, values):
        """Copy the weight's current values (nnz,) into the layout."""
        sell_kernels.window_copy(value_bits(self.data), value_bits(values), self._indptr,
                                 self.indices, self.table, WINDOW_PAD, True)

    def csr_values(self):
        """The values in CSR order (nnz,): a new array."""
        out = np.empty(int(self._indptr[-1]), self.data.dtype)
        sell_kernels.window_copy(value_bits(self.data), value_bits(out), self._indptr, self.indices,
                                 self.table, WINDOW_PAD, False)
        return out

    def csr_indices(self, dtype):
        """The column indices in CSR order (nnz,) as ``dtype``: a new array."""
        out = np.empty(int(self._indptr[-1]), np.int64)
        sell_kernels.window_columns(out, self._indptr, self.indices, self.table, WINDOW, WINDOW_PAD)
        return out.astype(dtype)

    @property
    def nbytes(self):
        return (self.data.nbytes + self.indices.nbytes + self.table.nbytes
                + self.lane_scales.nbytes)


SELL_KINDS = (Sell, SellWindows)  # layouts that hold the values in slices

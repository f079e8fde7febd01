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

import os

import numpy as np

from numlstm import config
from numlstm.kernels import sell as sell_kernels
from numlstm.kernels.vector_ir import SELL_LANES, WINDOW, WINDOW_PAD

KINDS = ("windows", "sell", "dense", "csr")


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


def build(weight, forced=None):
    """The per-step execution layout of the CSR ``weight``: a ``SellWindows``,
    ``Sell``, dense copy (``weights.Dense``) or None (use the CSR arrays).

    ``forced`` (default ``config.STEP_LAYOUT``) names a kind, or "auto": the
    cheapest by ``cost``; for a quantized weight, whose layout replaces its
    arrays, only among those at most ``config.QUANTIZED_LAYOUT_SLACK`` larger
    than the CSR arrays (so ``sell``, not ``windows``). A kind that cannot
    hold the weight (``windows`` needs float32 inputs and an AVX2 or AVX-512
    CPU; ``dense`` a float value kind unless ``config.DENSE_FOR_QUANTIZED``)
    falls back to "auto".
    """
    kind = forced or config.STEP_LAYOUT
    if kind not in KINDS + ("auto",):
        raise ValueError(f"the step layout (NUMLSTM_STEP_LAYOUT / config.STEP_LAYOUT) must "
                         f"be one of {KINDS + ('auto',)}, got {kind!r}")
    sigma = config.SELL_SIGMA
    candidates = {"sell": lambda: Sell(weight.data, weight.indices, weight.indptr,
                                       weight.shape, sigma=sigma),
                  "csr": lambda: None}
    quantized = weight.value_type in ("float16", "int8")
    if SellWindows.applies(weight.dtype):
        candidates["windows"] = lambda: SellWindows(
            weight.data, weight.indices, weight.indptr, weight.shape, weight.scales,
            sigma=sigma)
    if not quantized or config.DENSE_FOR_QUANTIZED:
        candidates["dense"] = weight.dense_copy  # weights.Dense (no import back: no cycle)
    if kind in candidates:
        return candidates[kind]()
    # The SELL kinds are built to be measured; a dense copy is priced from its
    # shape and made only if chosen (it may be large).
    built = {k: make() for k, make in candidates.items() if k != "dense"}
    nbytes = {k: 0 if v is None else v.nbytes for k, v in built.items()}
    est = {k: cost(weight, v) for k, v in built.items()}
    if "dense" in candidates:
        R, K = weight.shape
        nbytes["dense"] = R * K * weight.dtype.itemsize
        est["dense"] = dense_cost(weight.shape, weight.dtype.itemsize)
    if quantized:  # the layout replaces the stored arrays: it must not cost bytes
        stored = sum(a.nbytes for a in (weight.data, weight.indices, weight.indptr))
        limit = stored * (1 + config.QUANTIZED_LAYOUT_SLACK)
        est = {k: e for k, e in est.items() if k == "csr" or nbytes[k] <= limit}
    best = min(est, key=est.get)
    return built[best] if best != "dense" else candidates["dense"]()


def quantized_step(weight, stored):
    """The per-step layout of a quantized (float16 / int8) ``weight`` stored as
    ``stored`` (its SELL layout, or None: its CSR arrays): a windowed copy
    where ``config.QUANTIZED_STEP_COPY`` allows one and ``cost`` prices it
    below the storage, else None (the per-step products read the storage).
    Only under "auto": a forced ``config.STEP_LAYOUT`` already chose the
    storage ("windows" included)."""
    if (not config.QUANTIZED_STEP_COPY or config.STEP_LAYOUT != "auto"
            or isinstance(stored, SellWindows) or not SellWindows.applies(weight.dtype)):
        return None
    copy = SellWindows(weight.data, weight.indices, weight.indptr, weight.shape, weight.scales,
                       sigma=config.SELL_SIGMA)
    return copy if cost(weight, copy) < cost(weight, stored) else None


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
    (as ``build`` returns it), from its sizes and ``config.STEP_COSTS``.

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
    if isinstance(layout, SellWindows):
        windows = layout.table.shape[0] * (layout.table.shape[1] - 1 - SELL_LANES)
        return _streamed(layout.data.size * c["window_lane"] + windows * c["window"],
                         layout.nbytes)
    if isinstance(layout, Sell):
        return _streamed(layout.data.size * c["sell_lane"] + layout.slices.shape[0] * c["slice"],
                         layout.nbytes)
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
        lens = np.diff(indptr.astype(np.int64))
        order = _order(lens, sigma or R, C)
        self.halves = halved(R, C)
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
        sell_kernels.sell_copy(self.indices, indices, indptr, self.slices, True)
        self.refresh(values)

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
        order = _order(lens, sigma or R, C)
        self.halves = halved(R, C)
        nslices = -(-R // C)
        slot = np.empty(R, np.int64)
        slot[order] = np.arange(R)
        row_of = np.repeat(np.arange(R), lens)
        cols = indices.astype(np.int64)
        key = row_of * nwin + cols // WW  # (row, window) of each stored value, sorted
        counts = np.bincount(key, minlength=R * nwin).reshape(R, nwin)
        lane_counts = np.zeros((nslices * C, nwin), np.int64)
        lane_counts[:R] = counts[order]
        per_window = lane_counts.reshape(nslices, C, nwin).max(axis=1)  # (nslices, nwin)
        offsets = np.concatenate([[0], np.cumsum(per_window.reshape(-1))])
        self.table = np.empty((nslices, nwin + 1 + C), np.int32)
        starts = np.arange(nslices)[:, None] * nwin + np.arange(nwin + 1)[None, :]
        self.table[:, :nwin + 1] = offsets[starts]
        rows = np.full(nslices * C, -1, np.int64)
        rows[:R] = order
        self.table[:, nwin + 1:] = rows.reshape(nslices, C)
        # Each value's rank among its row's values in its window.
        new = np.ones(key.shape[0], bool)
        new[1:] = key[1:] != key[:-1]
        first = np.maximum.accumulate(np.where(new, np.arange(key.shape[0]), 0))
        s, lane = np.divmod(slot[row_of], C)
        pos = (offsets[s * nwin + cols // WW] + np.arange(key.shape[0]) - first) * C + lane
        E = int(offsets[-1])
        self.words = None
        if values.dtype == np.int8:
            # int8 values travel with their columns, one int16 word a lane
            # (value << 8 | column, little-endian): the kernel sign-extends a
            # vector of words once for both (``vector_ir._window_codegen``).
            self.words = np.full((E, C), WINDOW_PAD, np.int16)
            self.words.reshape(-1)[pos] = (values.astype(np.int16) << 8) | (cols % WW)
            self.indices = self.words.view(np.uint8)[:, 0::2]  # views of the words' bytes
            self.data = self.words.view(np.int8)[:, 1::2]
        else:
            self.indices = np.full((E, C), WINDOW_PAD, np.uint8)
            self.indices.reshape(-1)[pos] = cols % WW
            self.data = np.zeros((E, C), values.dtype)
            self.data.reshape(-1)[pos] = values
        self._indptr = indptr
        self.lane_scales = np.zeros((0, 0), np.float32)
        if scales is not None:
            self.lane_scales = np.ones(nslices * C, np.float32)
            self.lane_scales[:R] = scales[order].astype(np.float32)
            self.lane_scales = self.lane_scales.reshape(nslices, C)

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

"""Tunables read by the kernels and their drivers.

Kernel options (``FASTMATH``, ``CACHE``) are read once, when ``numlstm.kernels``
is first imported; tests that want other values patch them before that import.
Driver thresholds (``PARALLEL_MIN_WORK``) are read at every call.
"""

import os

# LLVM fast-math flags for the kernels. Reassociation lets LLVM vectorise dot
# products; "nnan"/"ninf" are deliberately absent so that NaN and inf inputs
# propagate as IEEE arithmetic says instead of being assumed away.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

# float32 sigmoid and tanh as a vectorisable rational approximation
# (|error| < 3e-7) instead of libm calls; float64 always uses libm.
FAST_FLOAT32_ACTIVATIONS = os.environ.get("NUMLSTM_EXACT_ACTIVATIONS", "") == ""

# Numba's on-disk cache (``cache=True``): the first process compiles (a few
# seconds per dtype), later processes load machine code from the kernel cache,
# a per-user folder (numlstm.kernels.cache), never the package's __pycache__.
CACHE = os.environ.get("NUMLSTM_NO_CACHE", "") == ""

# Per-step kernels (streaming, and the recurrences of forward and backward)
# are serial: a parallel region costs ~3.5 us to enter, and on a shared 2-core
# machine a step waits for the slower thread (H=256, B=1: 36-128 us parallel
# against a steady 54 us serial). Dense per-step products go to BLAS, which
# threads them itself.

# Per-step products of a CSR weight (streams and recurrences, B < STEP_MAX_B)
# run from an execution layout chosen per weight (numlstm.layouts.build):
# "auto" picks the cheapest by the cost model below; "windows", "sell",
# "dense" or "csr" forces one where it applies (environment:
# NUMLSTM_STEP_LAYOUT).
STEP_LAYOUT = os.environ.get("NUMLSTM_STEP_LAYOUT", "auto")
# Below this batch the per-step products use the execution layout; from it on,
# the CSR panel kernels (eight rows of x per stored weight) are faster.
STEP_MAX_B = 4
# Rows sorted by length within windows of this many rows before slicing
# (None: the whole weight, the least padding; the output row of each lane is
# stored, so the order costs nothing at run time).
SELL_SIGMA = None
# Whether a quantized (float16 / int8) CSR weight may run from a dense copy in
# the model's dtype: off, since it would undo the bytes quantization saved.
DENSE_FOR_QUANTIZED = False
# A quantized weight is stored as its layout (values never change): "auto"
# takes only layouts at most this fraction larger than its CSR arrays. SELL's
# padding is 1-2% after sorting rows, but its slice table (72 bytes per 16
# rows) is ~16% of a small weight's bytes (an LSTM's W_ih at I=64, 90%), which
# 0.1 excluded, leaving that weight on the CSR row loop (50% slower streams
# at I=64, H=256). The windowed layout's padding is ~2x, so a quantized
# weight is stored as SELL and keeps about the bytes it was quantized for (the
# windowed layout would also lose the batched panel kernel: 1.6x slower at
# B=16); its per-step products may still run on a windowed copy
# (QUANTIZED_STEP_COPY below).
QUANTIZED_LAYOUT_SLACK = 0.25
# A quantized weight's per-step products (streams, and recurrences at batch
# < STEP_MAX_B) may run from a windowed copy of it, built at their first use
# where the cost model prices it below the stored SELL layout (it does at
# I=64, H=256, 90%: float16 and int8 then stream about as fast as float32,
# against 0.8x on SELL's gathers), for more bytes than the stored ones
# (counted in weight_bytes and memory_report as "layout"). Off
# (NUMLSTM_QUANTIZED_STEP_COPY=0): a quantized model keeps to its stored bytes.
QUANTIZED_STEP_COPY = os.environ.get("NUMLSTM_QUANTIZED_STEP_COPY", "1") != "0"
# Threads of a batch-1 stream step (NUMLSTM_STEP_THREADS): "auto" (two where
# the process may run on two cores), or a number (1: never a worker thread).
# Two only for steps estimated (by STEP_COSTS) at PAIR_MIN_NS or more: below
# it the handoffs between cores cost about what half the work saves
# (benchmarks/results/pair.md: forced two threads 0.8-1.15x of one at H=256,
# 1.2-3x from H=512). 20 us sits between the estimates of H=256 dense (18 us,
# two threads 0.87x) and H=512 90% CSR (23.5 us, 1.13x); it was 25 us while
# the cost model took this CPU's 2 MiB L2 for 1 MiB (H=512 90% CSR: 32 us).
STEP_THREADS = os.environ.get("NUMLSTM_STEP_THREADS", "auto")
PAIR_MIN_NS = 20_000
# When the two-thread kernels of a stream or sequence type are compiled
# (NUMLSTM_PAIR_COMPILE): "background" (a stream or sequence runs on one
# thread until a background thread has compiled them, which it starts once
# the process has compiled nothing for PAIR_COMPILE_DELAY seconds: ~11 s on a
# 2-core Zen 3 for a dense H=256 stream, a cache load when the kernel cache
# is warm; an exit waits for a compile under way), or "now" (at the first
# step, on the caller's thread, as ``numlstm.compile`` does).
PAIR_COMPILE = os.environ.get("NUMLSTM_PAIR_COMPILE", "background")
PAIR_COMPILE_DELAY = 2.0
# A whole-sequence forward at B = 1 shares each time step between two threads
# (numlstm.pair.worth_two_seq) when W_hh's product is estimated (STEP_COSTS)
# at PAIR_SEQ_MIN_NS or more and the whole sequence's at PAIR_SEQ_MIN_TOTAL_NS
# (a worker thread costs ~0.1 ms to start). Measured on the Xeon below
# (benchmarks/results/pair.md, T=1000, quiet, two threads allowed over one;
# the estimate in brackets): H=512 dense 2.58x (144 us), float16 dense 1.68x;
# H=1024 90% CSR 1.90x (186 us), 95% CSR 1.68x (107 us), 90% BSR 1.21x
# (34 us), dense 1.02x (577 us: DRAM-bound either way); H=512 90% CSR 0.88x
# (32 us), 95% 0.96x (15 us); every H=256 kind 0.58-1.05x forced (<= 14 us).
# (Those estimates took the 2 MiB L2 for 1 MiB; read right: H=512 dense 180
# us, H=1024 90% CSR 127 us, 95% 64 us, H=512 90% CSR 21 us: the same side
# of the threshold.)
PAIR_SEQ_MIN_NS = 40_000
PAIR_SEQ_MIN_TOTAL_NS = 1_000_000
# ns of one product with one row of x, by ISA: per lane of a layout's entries
# (padding included), per window or slice, per dense entry, per CSR value and
# row; and for an operand larger than L2, at least "stream_byte" per byte of
# it (numlstm.layouts._streamed; measured 0.041-0.045 for dense, windowed and
# SELL layouts of a 4096x1024 weight). Fitted with benchmarks/layout_costs.py
# on a Xeon (Emerald Rapids, AVX-512, 2 MiB L2); the AVX2 figures are
# estimates (gathers and permutes 8 lanes wide). Only their ratios matter.
STEP_COSTS = {
    "avx512": {"window_lane": 0.08, "window": 2.3, "sell_lane": 0.3, "slice": 2.0,
               "dense": 0.055, "csr": 0.45, "row": 3.0, "stream_byte": 0.043},
    "avx2": {"window_lane": 0.12, "window": 2.3, "sell_lane": 0.45, "slice": 2.0,
             "dense": 0.065, "csr": 0.45, "row": 3.0, "stream_byte": 0.043},
}

# Batched kernels (input projections over all T*B rows, weight-gradient SDDMM)
# use the ``parallel=True`` variant when their work, counted in multiply-adds,
# is at least this large.
PARALLEL_MIN_WORK = 2_000_000

# numba's BLAS is scipy's OpenBLAS, whose threads spin for 2**28 cycles
# (~0.1 s) after every call before they sleep. A whole-sequence forward runs
# its input projection as one BLAS call and then the recurrence on threads
# of its own (batch parts, two-thread steps), which then shared a core with
# a spinning thread for the whole sequence. Measured on the Xeon above,
# T=1000: B=16 dense 126 -> 88 us a step, B=1 H=512 dense on two threads
# 126 -> 58-73 us a step with 2**20 cycles (~0.5 ms, longer than the gap
# between the per-step BLAS calls of a batched recurrence, so those do not
# wait for threads to wake). Set here unless the environment sets it; it
# takes effect only where scipy's OpenBLAS is not loaded yet (numba loads it
# at the first compiled BLAS call, after ``import numlstm``). It is set in
# os.environ, so child processes inherit it; NUMLSTM_OPENBLAS_THREAD_TIMEOUT=0
# (or "off") opts out and leaves the environment untouched (then this is the
# environment's value, or None).
if os.environ.get("NUMLSTM_OPENBLAS_THREAD_TIMEOUT", "").strip().lower() in ("0", "off"):
    OPENBLAS_THREAD_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
else:
    OPENBLAS_THREAD_TIMEOUT = os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

# ---------------------------------------------------------------------------
# CUDA launch geometry (numlstm.kernels.cuda), read at every launch. Tests
# running under NUMBA_ENABLE_CUDASIM=1 patch these small: the simulator runs
# each thread as a Python thread (~0.3 ms each).
# ---------------------------------------------------------------------------

# Threads per block of the 1-D kernels (pointwise steps, sparse products,
# SDDMM). A multiple of CUDA_LANES.
CUDA_THREADS_PER_BLOCK = 256

# Most threads that cooperate on one sparse dot product or one SDDMM value (a
# power of two, at most a warp). Fewer are used when rows are short.
CUDA_LANES = 32

# Edge of the square tile of the dense product kernel (CUDA_TILE**2 threads).
CUDA_TILE = 16

# Cap on the grid of grid-stride kernels.
CUDA_MAX_BLOCKS = 4096

# Threads per block of the persistent whole-sequence kernel.
CUDA_PERSISTENT_THREADS = 256

# Blocks of the persistent kernel; None sizes the grid from the device (no more
# than can be resident at once, as its grid barrier requires). The simulator
# always uses one block: it runs blocks one after another, so a cross-block
# barrier would wait forever there.
CUDA_PERSISTENT_BLOCKS = None

# Dynamic shared memory a block may use (bytes): 48 KiB works on every device
# without an opt-in. The persistent kernel keeps the recurrent weights in
# shared memory when they fit under this, and reads them from global (L2)
# memory otherwise.
CUDA_SHARED_BYTES = 48 * 1024

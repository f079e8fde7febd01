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
# seconds per dtype), later processes load machine code from __pycache__.
CACHE = os.environ.get("NUMLSTM_NO_CACHE", "") == ""

# Per-step kernels (streaming, and the recurrences of forward and backward)
# are serial: a parallel region costs ~3.5 us to enter, and on a shared 2-core
# machine a step waits for the slower thread (H=256, B=1: 36-128 us parallel
# against a steady 54 us serial). Dense per-step products go to BLAS, which
# threads them itself.

# Batched kernels (input projections over all T*B rows, weight-gradient SDDMM)
# use the ``parallel=True`` variant when their work, counted in multiply-adds,
# is at least this large.
PARALLEL_MIN_WORK = 2_000_000

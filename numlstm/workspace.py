"""One block of memory, many named views (llm.c's ``malloc_and_point``).

A ``Workspace`` owns a single 1-D block. ``carve(spec)`` lays the named views
of a plan out in it, each 64-byte aligned and C-contiguous. The block grows
when a plan needs more than it holds and is otherwise reused as it is, so a
model called again with the same or a smaller (T, B) allocates nothing.
"""

import math

import numpy as np

_ALIGN = 64  # bytes; a cache line, and enough for any SIMD load


def plan_layout(spec, dtype):
    """Where ``Workspace.carve`` puts each view of ``spec``, in elements.

    Returns ``(entries, total)``: ``entries`` lists ``(name, shape, offset,
    size, padded)`` (``padded`` is the size rounded up to the 64-byte
    alignment) and ``total`` the elements the views span. A block for the plan
    holds ``total`` plus one alignment step (room to align its start), so its
    bytes are ``(total + step) * itemsize``: see ``plan_nbytes``. Sizes are
    exact Python ints: a prediction for sizes past int64 (``memory_report``
    of 10**12 steps) must not wrap around.
    """
    step = _ALIGN // np.dtype(dtype).itemsize
    entries, total = [], 0
    for name, shape in spec:
        size = math.prod(int(n) for n in shape)
        padded = -(-size // step) * step
        entries.append((name, tuple(shape), total, size, padded))
        total += padded
    return entries, total


def plan_nbytes(spec, dtype):
    """Bytes of the block that ``carve(spec)`` allocates for an empty workspace."""
    itemsize = np.dtype(dtype).itemsize
    _, total = plan_layout(spec, dtype)
    return (total + _ALIGN // itemsize) * itemsize


class Workspace:
    """A growable block of ``dtype`` elements, carved into named views.

    Attributes
    ----------
    views : dict[str, np.ndarray]
        The views of the last ``carve``; every later ``carve`` may reuse their
        memory, so results that must outlive a call are copied out of them.
    """

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._block = np.zeros(0, self.dtype)
        self._base = 0  # first 64-byte aligned element of the block
        self.views = {}

    @property
    def nbytes(self):
        """Bytes held by the block."""
        return self._block.nbytes

    def release(self):
        """Drop the block (and the views into it); the next ``carve`` allocates anew."""
        self._block = np.zeros(0, self.dtype)
        self._base = 0
        self.views = {}

    def carve(self, spec):
        """Lay out ``spec`` (an iterable of ``(name, shape)``) and return the views.

        The contents of the views are whatever the block held before: callers
        initialise what they read.
        """
        step = _ALIGN // self.dtype.itemsize
        offsets, total = plan_layout(spec, self.dtype)
        if total + step > self._block.size:
            self._block = np.zeros(total + step, self.dtype)  # grow, never shrink
            # Start at the first aligned element of the block. Found once per
            # block: ``ndarray.ctypes`` retains a few bytes per use (numpy 2.4),
            # which a training loop calling ``carve`` every step would accumulate.
            address = self._block.__array_interface__["data"][0]
            self._base = (-address % _ALIGN) // self.dtype.itemsize
        block = self._block[self._base:]
        self.views = {name: block[off:off + size].reshape(shape)
                      for name, shape, off, size, _ in offsets}
        return self.views

"""One block of memory, many named views (llm.c's ``malloc_and_point``).

A ``Workspace`` owns a single 1-D block. ``carve(spec)`` lays the named views
of a plan out in it, each 64-byte aligned and C-contiguous. The block grows
when a plan needs more than it holds and is otherwise reused as it is, so a
model called again with the same or a smaller (T, B) allocates nothing.
"""

import numpy as np

_ALIGN = 64  # bytes; a cache line, and enough for any SIMD load


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
        self.views = {}

    @property
    def nbytes(self):
        """Bytes held by the block."""
        return self._block.nbytes

    def carve(self, spec):
        """Lay out ``spec`` (an iterable of ``(name, shape)``) and return the views.

        The contents of the views are whatever the block held before: callers
        initialise what they read.
        """
        step = _ALIGN // self.dtype.itemsize
        offsets, total = [], 0
        for name, shape in spec:
            size = int(np.prod(shape, dtype=np.int64))
            offsets.append((name, tuple(shape), total, size))
            total += -(-size // step) * step
        if total + step > self._block.size:
            self._block = np.zeros(total + step, self.dtype)  # grow, never shrink
        # Start at the first aligned element of the block.
        base = (-self._block.ctypes.data % _ALIGN) // self.dtype.itemsize
        block = self._block[base:]
        self.views = {name: block[off:off + size].reshape(shape)
                      for name, shape, off, size in offsets}
        return self.views

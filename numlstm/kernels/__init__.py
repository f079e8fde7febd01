"""Numba kernels: ``cpu.py`` (``@njit``), ``cuda.py`` (``@cuda.jit`` twins), ``vector_ir.py``.

``cache`` is imported first, before any kernel is decorated: it sends numba's
on-disk cache of this package to a per-user folder instead of ``__pycache__``
inside the installed package (see its docstring and docs/design.md).
"""

from numlstm.kernels import cache as _cache  # noqa: F401
from numlstm.kernels import compile_log as _compile_log  # noqa: F401

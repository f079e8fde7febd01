"""Say what is compiling: one line on the ``numlstm`` logger per kernel compile.

A process with an empty kernel cache spends seconds in numba before its
first results, and without a word that is indistinguishable from a hang.
numba announces every compile on its event bus ("numba:compile"; a kernel
loaded from the cache is no compile and sends none). The listener here
logs, at INFO, the outermost compile of each of numlstm's kernels (the one a
call triggered; the helpers it compiles inside are part of it) with the
value kinds it is compiled for and the folder it will be cached in, and when
it finished. The library adds no handler (``logging.NullHandler``), so
nothing is printed unless the application configures logging; the CLI and
the demo show these lines on stderr.
"""

import logging
import threading
import time

from numba.core import event
from numba.core import types as nbtypes

log = logging.getLogger("numlstm")
log.addHandler(logging.NullHandler())

_local = threading.local()
# Compiles under way in the process (any thread, any package's) and when the
# last one began or ended (time.monotonic()): ``quiet_for`` tells how long
# the process has compiled nothing (numlstm.pair waits for such a pause).
_busy = [0, time.monotonic()]
_busy_lock = threading.Lock()


def quiet_for():
    """Seconds since the process last compiled anything (0 while it compiles)."""
    with _busy_lock:
        return 0.0 if _busy[0] else time.monotonic() - _busy[1]


def _activity(delta):
    with _busy_lock:
        _busy[0] += delta
        _busy[1] = time.monotonic()


def _ours(dispatcher):
    module = getattr(dispatcher.py_func, "__module__", "") or ""
    return module == "numlstm" or module.startswith("numlstm.")


def _value_kinds(args):
    """The element types of every array among argument types ``args``
    (through tuples and StructRef fields), e.g. "float32, int32"."""
    seen, stack = [], list(args)
    while stack:
        t = stack.pop(0)
        if isinstance(t, nbtypes.Array):
            name = str(t.dtype)
            if name not in seen:
                seen.append(name)
        elif isinstance(t, nbtypes.BaseTuple):
            stack[:0] = list(t.types)
        elif isinstance(t, nbtypes.StructRef):
            stack[:0] = [ft for _, ft in t.field_dict.items()]
    return ", ".join(seen) or "scalars"


class _Listener(event.Listener):
    def on_start(self, ev):
        _activity(1)
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        d = ev.data["dispatcher"]
        if depth == 0 and _ours(d) and log.isEnabledFor(logging.INFO):
            from numlstm.kernels import cache

            _local.t0 = time.perf_counter()
            log.info("compiling %s for %s (first use; cached in %s)", d.py_func.__qualname__,
                     _value_kinds(ev.data.get("args", ())), cache.cache_folder())

    def on_end(self, ev):
        _activity(-1)
        _local.depth = depth = getattr(_local, "depth", 1) - 1
        d = ev.data["dispatcher"]
        if depth == 0 and _ours(d) and log.isEnabledFor(logging.INFO) \
                and getattr(_local, "t0", None) is not None:
            log.info("compiled %s in %.1f s", d.py_func.__qualname__,
                     time.perf_counter() - _local.t0)
            _local.t0 = None


_LISTENER = _Listener()
event.register("numba:compile", _LISTENER)

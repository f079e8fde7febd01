"""Where numba keeps numlstm's compiled kernels: a per-user folder, never the package.

numba's default home for ``cache=True`` is the ``__pycache__`` folder beside
the source file. For an installed numlstm that folder is inside
site-packages, and pip neither records nor removes what numba writes there:
an uninstall (and so every reinstall, upgrade or switch to an editable
install) leaves ``numlstm/kernels/__pycache__/*.nbi, *.nbc`` behind, and the
otherwise empty ``site-packages/numlstm/`` imports as a namespace package that
shadows the next install for any process started outside the repository
(issue 14). So every numba function defined in this package is cached in

    ``$XDG_CACHE_HOME/numlstm/`` (default ``~/.cache/numlstm/``;
    ``~/Library/Caches/numlstm/`` on macOS, ``%LOCALAPPDATA%\\numlstm\\`` on Windows)

in a subfolder per source folder, named as numba names them (the folder's
name and the SHA-1 of its path): two installs or checkouts never share
entries, and entries are keyed by a stamp of all kernel sources together
(``_kernel_sources_stamp``: numba's own stamp of one file misses edits to the
code a kernel inlines from others), the Python version and numba's version.
A read-only site-packages is fine. Deleting the folder is always safe (the next process recompiles).

Precedence, first match wins:

1. ``NUMBA_CACHE_DIR`` set: numba's own user-provided folder (the CI's
   bounds-checked run and the cold-start benchmark use it for a fresh cache);
2. the per-user folder above, when it can be created and written;
3. numba's own chain (``__pycache__`` if writable, then numba's per-user folder).

4. when none of those can be written (a read-only file system), the
   per-user folder all the same, read only: kernels found there load, new
   ones compile uncached.

The cache never breaks a call (``_guard``): an entry that cannot be read
(a truncated or foreign file) is compiled afresh, a corrupt index is
replaced, and a write that fails (a full disk, a file-size limit, a
read-only folder) leaves the kernel compiled in memory, with one
``RuntimeWarning`` per process saying why; this process then stops writing,
and the next one tries again.

``NUMLSTM_NO_CACHE=1`` (``numlstm.config.CACHE``) turns caching off altogether;
``NUMBA_CACHE_LOCATOR_CLASSES`` (numba >= 0.68), when set, replaces numba's
whole list and so this locator too.

Mechanism: numba picks a locator for each cached function from
``CacheImpl._locator_classes`` (``_CacheImpl`` before numba 0.68), asking each
class in turn; this module puts one in front that answers only for files
inside this package. It must run before the first kernel is decorated:
``numlstm/kernels/__init__.py`` imports it.
"""

import os
import pickle
import sys

from numba.core import caching
from numba.core import config as _numba_config

# The package folder (numlstm/): every numba function defined under it is ours.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def cache_root():
    """The folder under which numlstm's kernels are cached when ``NUMBA_CACHE_DIR`` is unset."""
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
            base = os.path.join(home, ".cache")
    return os.path.join(base, "numlstm")


def cache_folder():
    """The folder numlstm's kernels are cached under now: ``NUMBA_CACHE_DIR``
    when set, else :func:`cache_root`."""
    return _numba_config.CACHE_DIR or cache_root()


def _kernel_sources_stamp():
    """SHA-256 of every source file a kernel may compile in (``kernels/*.py``,
    ``config.py``) and of the config switches read from the environment."""
    global _STAMP
    if _STAMP is None:
        import hashlib

        digest = hashlib.sha256()
        kernels = os.path.join(PACKAGE_DIR, "kernels")
        files = sorted(os.path.join(kernels, f) for f in os.listdir(kernels)
                       if f.endswith(".py"))
        for path in files + [os.path.join(PACKAGE_DIR, "config.py")]:
            with open(path, "rb") as f:
                digest.update(f.read())
        digest.update(repr(sorted(os.environ.get(k, "") for k in (
            "NUMLSTM_EXACT_ACTIVATIONS",))).encode())
        _STAMP = digest.hexdigest()
    return _STAMP


_STAMP = None


def _in_package(py_file):
    try:
        path = os.path.realpath(py_file)
        return os.path.commonpath([path, PACKAGE_DIR]) == PACKAGE_DIR
    except ValueError:  # another drive (Windows), or a placeholder name
        return False


class PerUserCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator for numlstm's own source files: :func:`cache_root`."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_root(), self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        # numba stamps an entry with its own source file only, but a cached
        # kernel holds the code of every jitted function it calls, inlined
        # from other files (vector_ir.py's IR, cpu.py's kernels in plan.py)
        # and constants read from config: an edit to any of them must
        # invalidate every entry. So the stamp is of all of them together.
        return _kernel_sources_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if _numba_config.CACHE_DIR or not _in_package(py_file):
            return None
        # The mixin returns None when the folder cannot be created or written.
        return super().from_function(py_func, py_file)


class ReadOnlyCacheLocator(PerUserCacheLocator):
    """The last resort for numlstm's files when no folder can be written:
    the per-user folder, not checked for writing (saves fail, and ``_guard``
    turns that into one warning)."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _in_package(py_file):
            return None
        return cls(py_func, py_file)


_WARNED = False  # one warning per process about the cache
_WRITES_OFF = False  # a write failed: this process stops writing


def _ours(cache):
    """Whether numba's ``cache`` is of a function defined in this package
    (whichever locator placed it: ``NUMBA_CACHE_DIR``'s too)."""
    func = getattr(cache, "_py_func", None)
    code = getattr(func, "__code__", None)
    return code is not None and _in_package(code.co_filename)


def _warn_once(what, cache, exc):
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    import warnings

    warnings.warn(f"numlstm: could not {what} the kernel cache in {cache.cache_path} "
                  f"({type(exc).__name__}: {exc}); kernels compile and run uncached "
                  "in this process", RuntimeWarning, stacklevel=4)


def _guard():
    """Wrap numba's ``Cache.load_overload`` / ``save_overload`` so that for
    numlstm's kernels a cache that cannot be read or written costs a compile,
    never a call. Other functions' caches are left to numba as they are."""
    load, save = caching.Cache.load_overload, caching.Cache.save_overload
    if getattr(load, "_numlstm_guard", False):
        return

    def load_overload(self, sig, target_context):
        if not _ours(self):
            return load(self, sig, target_context)
        try:
            return load(self, sig, target_context)
        except Exception as exc:  # truncated, foreign or unreadable: compile instead
            _warn_once("read", self, exc)
            return None

    def save_overload(self, sig, data):
        global _WRITES_OFF
        if not _ours(self):
            return save(self, sig, data)
        if _WRITES_OFF:
            return None
        for attempt in (0, 1):
            try:
                return save(self, sig, data)
            except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                    AttributeError, ImportError) as exc:
                if attempt == 0 and not isinstance(exc, OSError):
                    # A corrupt index (saving reads it first): replace it.
                    try:
                        os.unlink(self._cache_file._index_path)
                        continue
                    except OSError:
                        pass
                _WRITES_OFF = True
                _warn_once("write", self, exc)
                return None

    load_overload._numlstm_guard = True
    caching.Cache.load_overload = load_overload
    caching.Cache.save_overload = save_overload


def _register():
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    classes = impl._locator_classes
    if not any(c.__name__ == PerUserCacheLocator.__name__ and c.__module__ == __name__
               for c in classes):
        classes.insert(0, PerUserCacheLocator)
        classes.append(ReadOnlyCacheLocator)
    _guard()


_register()

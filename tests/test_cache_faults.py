"""The kernel cache never breaks a call (numlstm.kernels.cache, ``_guard``).

Each case runs in fresh processes, since numba reads the cache when a kernel
is first compiled in a process: a cache folder that holds truncated or
foreign files, one on a file-size limit (as a full disk fails writes), and a
file system where nothing can be written. The kernel compiles and runs
uncached, one RuntimeWarning says why, and the next healthy process caches
again (its successor compiles nothing).
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import COUNT_COMPILES

CHILD = COUNT_COMPILES + r"""
import json, sys, warnings
import numpy as np
from numba.core import caching

if "--read-only" in sys.argv:  # no folder anywhere can be written
    def refuse(self):
        raise PermissionError(13, "Read-only file system", self.get_cache_path())
    caching._CacheLocator.ensure_cache_path = refuse

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from numlstm.kernels import cpu
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = np.empty((3, 2), np.float32)
    cpu.gather_rows(out, x, np.array([2, 0, 1]))
ours = [str(w.message) for w in caught if "kernel cache" in str(w.message)]
print(json.dumps({"out": out.tolist(), "compiled": compiled, "warnings": ours}))
"""


def _run(cache, *args, limit=None, numba_dir=False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "NUMBA_CACHE_LOCATOR_CLASSES", "NUMLSTM_NO_CACHE")}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1")
    if numba_dir:  # numba's own locator places the files: the guard holds there too
        env["NUMBA_CACHE_DIR"] = str(cache)

    def fsize_limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=fsize_limit if limit is not None else None)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["out"] == [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]  # right, cached or not
    return res


def _files(cache, suffix):
    return sorted(pathlib.Path(cache).rglob(f"cpu.gather_rows-*{suffix}"))


def _healthy_again(cache, run=_run):
    """The next process caches (compiling once more where the fault lost the
    entry), and the one after it loads everything from the cache."""
    again = run(cache)
    assert again["warnings"] == []
    last = run(cache)
    assert last["compiled"] == [] and last["warnings"] == []


@pytest.mark.parametrize("numba_dir", [False, True])
@pytest.mark.parametrize("damage", ["truncated index", "foreign data"])
def test_a_damaged_cache_entry_is_compiled_afresh(tmp_path, damage, numba_dir):
    run = functools.partial(_run, numba_dir=numba_dir)
    first = run(tmp_path)
    assert "gather_rows" in first["compiled"] and first["warnings"] == []
    assert run(tmp_path)["compiled"] == []  # cached
    if damage == "truncated index":
        for p in _files(tmp_path, ".nbi"):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        for p in _files(tmp_path, ".nbc"):
            p.write_bytes(b"not a numba cache entry" * 10)
    hurt = run(tmp_path)
    assert "gather_rows" in hurt["compiled"]
    assert len(hurt["warnings"]) == 1 and "could not read" in hurt["warnings"][0]
    _healthy_again(tmp_path, run)


def test_a_cache_on_a_file_size_limit_warns_once_and_runs_uncached(tmp_path):
    """RLIMIT_FSIZE 0: every write fails with EFBIG, as a full disk fails
    with ENOSPC; the process keeps going and warns once, not per kernel."""
    full = _run(tmp_path, limit=0)
    assert "gather_rows" in full["compiled"]
    assert len(full["warnings"]) == 1 and "could not write" in full["warnings"][0]
    assert "File too large" in full["warnings"][0]
    assert _files(tmp_path, ".nbc") == []
    _healthy_again(tmp_path)


def test_a_read_only_file_system_loads_what_the_cache_holds(tmp_path):
    """An image whose cache was filled at build time and is mounted read-only:
    kernels load from it; with nothing in it, they compile and run."""
    empty = _run(tmp_path / "empty", "--read-only")
    assert "gather_rows" in empty["compiled"] and len(empty["warnings"]) == 1
    _run(tmp_path / "baked")  # filled while writable
    baked = _run(tmp_path / "baked", "--read-only")
    assert baked["compiled"] == [] and baked["warnings"] == []

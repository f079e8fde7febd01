"""Where numba caches numlstm's kernels (numlstm.kernels.cache, issue 14).

numba's default, ``__pycache__`` beside the source, lies inside an installed
package, where pip neither records nor removes it: an uninstall then leaves
an empty ``site-packages/numlstm/`` that shadows the next (editable) install.
So the kernels are cached in a per-user folder instead. Each case runs in a
fresh process, since the locator is chosen when a kernel is decorated. The
whole install -> run -> reinstall -> editable install sequence is in .ci/run.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numlstm

PACKAGE = pathlib.Path(numlstm.__file__).resolve().parent

CHILD = r"""
import json
import numpy as np
from numba.core.registry import CPUDispatcher
from numlstm.kernels import cache, cpu

paths = {name: f._cache.cache_path for name, f in vars(cpu).items()
         if isinstance(f, CPUDispatcher) and f._cache.cache_path is not None}
index = np.arange(3, dtype=np.int64)
out = np.empty((3, 2), np.float32)
cpu.gather_rows(out, np.ones((3, 2), np.float32), index)  # compiles, and writes the cache
print(json.dumps({"paths": paths, "root": cache.cache_root()}))
"""


def _run(env_updates, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "NUMBA_CACHE_LOCATOR_CLASSES", "NUMLSTM_NO_CACHE",
                        "XDG_CACHE_HOME")}
    env.update(env_updates)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _cache_files(folder):
    return {p for p in pathlib.Path(folder).rglob("*") if p.suffix in (".nbi", ".nbc")}


def test_kernels_are_cached_in_a_per_user_folder_outside_the_package(tmp_path):
    xdg = tmp_path / "xdg"
    started = time.time() - 1
    res = _run({"XDG_CACHE_HOME": str(xdg)}, tmp_path)
    root = pathlib.Path(res["root"])
    assert root == xdg / "numlstm"
    assert res["paths"], "no cached kernel found"
    for name, path in res["paths"].items():
        assert pathlib.Path(path).parent == root, (name, path)
    written = _cache_files(root)
    assert any(p.name.startswith("cpu.gather_rows-") for p in written), written
    beside = [p for p in _cache_files(PACKAGE) if p.stat().st_mtime >= started]
    assert not [p for p in beside if p.name.startswith("cpu.gather_rows-")], beside


def test_numba_cache_dir_still_wins(tmp_path):
    chosen = tmp_path / "numba-cache"
    res = _run({"NUMBA_CACHE_DIR": str(chosen), "XDG_CACHE_HOME": str(tmp_path / "xdg")},
               tmp_path)
    for name, path in res["paths"].items():
        assert pathlib.Path(path).parent == chosen, (name, path)
    assert not (tmp_path / "xdg" / "numlstm").exists()


def test_an_unusable_cache_folder_falls_back_to_numba(tmp_path):
    """A per-user folder that cannot be made (here: its parent is a file) leaves
    the choice to numba's own chain; the kernels still import and run."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    res = _run({"XDG_CACHE_HOME": str(blocker)}, tmp_path)
    assert res["paths"]
    for name, path in res["paths"].items():
        assert not path.startswith(str(blocker)), (name, path)

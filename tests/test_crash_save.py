"""Crash-safe saves: a writer killed (SIGKILL) at random moments leaves either no
file (its first save had not finished) or a complete model equal to one of the
saved versions, plus at most one stray ``.numlstm-*.tmp`` temporary: the one
the killed writer was filling (``save`` cannot remove it; it is a hidden file
beside the model, and a later kill may leave another)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import numlstm

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")

# Version k is LSTM(..., seed=k): the parent can rebuild every version the child saved.
WRITER = """
import os, sys
import numpy as np
import numlstm
path = sys.argv[1]
k = 0
while True:
    model = numlstm.LSTM(64, 256, num_layers=2, seed=k)   # ~3 MiB of float32 weights
    numlstm.save(model, path)
    print(k, flush=True)
    k += 1
"""


_VERSIONS = {}


def _version(k):
    if k not in _VERSIONS:
        _VERSIONS[k] = numlstm.LSTM(64, 256, num_layers=2, seed=k)
    return _VERSIONS[k]


def test_killed_writer_leaves_a_complete_model_or_none(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 1, 64)).astype(np.float32)
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    outcomes = []
    deadline = time.monotonic() + 15
    for round_ in range(8):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        path = folder / "model.npz"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True, env=env)
        if round_ % 2:  # wait for a first save, then kill at a random moment after it
            first = proc.stdout.readline()
            assert first.strip() == "0", first
            time.sleep(float(rng.uniform(0, 0.3)))
        else:  # kill at a random moment, perhaps before the first save ends
            time.sleep(float(rng.uniform(0.2, 1.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        saved = [int(line) for line in proc.stdout.read().split()] if round_ % 2 == 0 \
            else [0] + [int(line) for line in proc.stdout.read().split()]
        proc.stdout.close()
        stray = [n for n in os.listdir(folder) if n != "model.npz"]
        assert len(stray) <= 1, stray
        assert all(n.startswith(".numlstm-") and n.endswith(".tmp") for n in stray), stray
        if not path.exists():
            assert not saved, "a save was reported but no file is there"
            outcomes.append("absent")
            continue
        model = numlstm.load(path)  # complete and valid, never a torn file
        # The file holds the last reported version or the one after it (saved,
        # then killed before it could print).
        last = saved[-1] if saved else -1
        candidates = [k for k in (last, last + 1) if k >= 0]
        y = model(x)[0]
        assert any(np.array_equal(y, _version(k)(x)[0]) for k in candidates), candidates
        outcomes.append(f"v{last}+" if stray else f"v{last}")
        if time.monotonic() > deadline:
            break
    print(f"\nkill outcomes (v<k>: version k on disk, +: a stray temporary): {outcomes}")
    assert len(outcomes) >= 3 and any(o != "absent" for o in outcomes), outcomes

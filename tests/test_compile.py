"""Compiling ahead and in the background (numlstm.ahead, numlstm.pair,
numlstm.kernels.compile_log): ``numlstm.compile`` leaves nothing for a later
process to compile; what is compiling is logged; a stream that would use two
threads steps on one until their kernels are ready, with the same results.

The cache cases run in fresh processes with a cache folder of their own,
since numba reads the cache when a process first compiles a kernel.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import COUNT_COMPILES

import numlstm
from numlstm import cli

CHILD = COUNT_COMPILES + r"""
import json, logging, sys
import numpy as np
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("numlstm").addHandler(Keep())
logging.getLogger("numlstm").setLevel(logging.INFO)

import numlstm
m = numlstm.LSTM(4, 8, seed=0)
if sys.argv[1] == "compile":
    numlstm.compile(m, [1, 2], seq_lens=[5], training=True)
else:
    m.stream(1).step(np.ones((1, 4), np.float32))
    m.stream(2).step(np.ones((2, 4), np.float32))
    for B in (1, 2):
        x = np.ones((5, B, 4), np.float32)
        m(x)
        y, _ = m(x, training=True)
        m.backward(np.ones_like(y))
print(json.dumps({"compiled": compiled, "log": lines}))
"""


def _child(what, cache, env=None):
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("NUMBA_CACHE_DIR", "NUMLSTM_NO_CACHE")},
           "XDG_CACHE_HOME": str(cache), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", CHILD, what], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_compile_ahead_leaves_nothing_to_compile(tmp_path):
    ahead = _child("compile", tmp_path)
    assert ahead["compiled"]  # an empty cache: it compiled
    announced = [line for line in ahead["log"] if line.startswith("compiling ")]
    assert announced and all(str(tmp_path) in line for line in announced)
    later = _child("use", tmp_path)
    assert later["compiled"] == []  # every kernel of those calls came from the cache
    assert not [line for line in later["log"] if line.startswith("compiling ")]


def test_compile_checks_its_arguments():
    m = numlstm.LSTM(3, 4, seed=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        numlstm.compile(m, [0])
    with pytest.raises(ValueError, match="seq_lens"):
        numlstm.compile(m, [1], seq_lens=[2.5])
    with pytest.raises(TypeError, match="numlstm.LSTM"):
        numlstm.compile("model.npz")
    numlstm.quantize.quantize(m, "float16")
    with pytest.raises(TypeError, match="inference only"):
        numlstm.compile(m, training=True)


def test_compile_leaves_the_model_as_it_was():
    m = numlstm.LSTM(3, 4, seed=0)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    grads = {k: g.copy() for k, g in m.grad_arrays().items()}
    times = numlstm.compile(m, [1, 2], seq_lens=[3], training=True, pool=True)
    assert set(times) >= {"stream B=1", "forward T=3 B=2", "training T=3 B=1", "pool B=2",
                          "cache"}
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    for k, g in m.grad_arrays().items():
        np.testing.assert_array_equal(g, grads[k])


def test_the_compile_command(tmp_path, capsys):
    path = tmp_path / "m.npz"
    m = numlstm.LSTM(3, 4, seed=0)
    numlstm.save(m, path)
    assert cli.main(["compile", str(path), "--batch", "1", "2", "--seq-len", "3"]) == 0
    out = capsys.readouterr().out
    assert "stream B=2" in out and "forward T=3 B=1" in out and "calls ready" in out
    numlstm.quantize.quantize(m, "float16")
    numlstm.save(m, path)
    assert cli.main(["compile", str(path), "--training"]) == 1
    assert "--training" in capsys.readouterr().err


BACKGROUND = r"""
import json, time
import numpy as np
import numlstm
from numlstm import config

config.STEP_THREADS, config.PAIR_MIN_NS, config.PAIR_COMPILE_DELAY = "2", 0, 0.0
m = numlstm.LSTM(8, 64, seed=0)
xs = np.random.default_rng(0).standard_normal((4000, 1, 8)).astype(np.float32)
s = m.stream(1)
first = s._pair is None  # the first steps run on one thread
ys, t, deadline = [], 0, time.monotonic() + 300
while s._pair is None and time.monotonic() < deadline:
    ys.append(s.step(xs[t % len(xs)]).copy())
    t += 1
    time.sleep(0.001)  # a service's gaps between requests: the compile gets the GIL
two_at = t
for _ in range(20):  # then on two threads, from the step after the kernels were ready
    ys.append(s.step(xs[t % len(xs)]).copy())
    t += 1
config.STEP_THREADS = "1"
ref, one = m.stream(1), []
for k in range(t):
    one.append(ref.step(xs[k % len(xs)]).copy())
print(json.dumps({"first_alone": first, "two": s._pair is not None, "two_at": two_at,
                  "err": float(np.abs(np.array(ys) - np.array(one)).max())}))
"""


def test_a_stream_steps_alone_until_its_two_thread_kernels_are_compiled(tmp_path):
    env = {**os.environ, "NUMLSTM_PAIR_COMPILE": "background"}
    proc = subprocess.run([sys.executable, "-c", BACKGROUND], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["first_alone"] and res["two"], res
    assert res["err"] < 1e-5, res  # one thread or two, whoever computes: the same outputs


def test_the_logger_records_the_layout_and_thread_choices(caplog, monkeypatch):
    """At DEBUG the numlstm logger says which layout each weight steps on, with
    the estimates it chose by, and whether a stream runs on one thread or two."""
    import logging

    from numlstm import config

    monkeypatch.setattr(config, "STEP_LAYOUT", "auto")
    m = numlstm.LSTM(8, 32, seed=0)
    numlstm.prune.magnitude(m, 0.9)
    with caplog.at_level(logging.DEBUG, logger="numlstm"):
        m.stream(1).step(np.ones((1, 8), np.float32))
        monkeypatch.setattr(config, "STEP_THREADS", "1")
        numlstm.LSTM(8, 32, seed=1).stream(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "numlstm"]
    layout = [x for x in lines if x.startswith("step layout of a 128x")]
    assert len(layout) == 2 and all("estimated ns: " in x and "csr" in x for x in layout)
    assert "stream of batch 1: one thread" in lines

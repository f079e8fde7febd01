"""Cold start: how long a new process takes to its first results, by kernel cache state.

``python -m benchmarks --only coldstart`` runs the same sequence of first
calls in fresh processes (every figure is the time of that call in a new
process, numba compilation included):

    import numlstm; a dense stream's first step (I=64, H=256, B=1); a first
    inference forward (T=10, B=1); a first training step (forward and
    backward, T=10, B=4); the first stream step of each further storage kind
    (90% CSR, 90% BSR 8x1, 90% CSR with float16 values, with int8 values)

three ways: **cold** (an empty kernel cache, as a new container or CI runner
meets it), **warm** (the cache the cold process wrote), and **ahead** (an
empty cache filled by ``numlstm.compile`` on the same models in another
process first, as ``RUN numlstm compile model.npz`` bakes an image). Each
figure is wall and CPU seconds (user + sys, which a shared machine disturbs
less). The cold process also lists the costliest compilations (numba's
"numba:compile" events: exclusive time of each kernel, and inclusive of the
helpers it compiled inside it).
"""

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.common import machine_info, machine_markdown, run_worker, write_results

NAME = "coldstart"
I, H = 64, 256
STAGES = ("import", "dense stream step", "forward T=10 B=1", "training step T=10 B=4",
          "CSR 90% stream step", "BSR 90% stream step", "CSR float16 stream step",
          "CSR int8 stream step")
QUICK_STAGES = STAGES[:2]


def _models(np, numlstm):
    """The models of the stages after the dense ones, by stage name."""
    def pruned(kind):
        m = numlstm.LSTM(I, H, seed=0)
        if kind == "bsr":
            numlstm.prune.blocks(m, 0.9, block=(8, 1))
        else:
            numlstm.prune.magnitude(m, 0.9)
        if kind in ("float16", "int8"):
            numlstm.quantize.quantize(m, kind)
        return m
    return {"CSR 90% stream step": lambda: pruned("csr"),
            "BSR 90% stream step": lambda: pruned("bsr"),
            "CSR float16 stream step": lambda: pruned("float16"),
            "CSR int8 stream step": lambda: pruned("int8")}


def _worker(mode, stages):
    """Run ``stages`` in this (fresh) process; print one JSON line."""
    t0, c0 = time.perf_counter(), time.process_time()
    from numba.core import event

    excl, incl, stack = {}, {}, []

    class Listen(event.Listener):
        def on_start(self, ev):
            f = ev.data["dispatcher"].py_func
            stack.append([f"{f.__module__}.{f.__qualname__}", time.perf_counter(), 0.0])

        def on_end(self, ev):
            name, start, child = stack.pop()
            d = time.perf_counter() - start
            excl[name] = excl.get(name, 0.0) + d - child
            incl[name] = incl.get(name, 0.0) + d
            if stack:
                stack[-1][2] += d

    event.register("numba:compile", Listen())
    import numpy as np

    import numlstm

    marks = {"import": (time.perf_counter() - t0, time.process_time() - c0)}
    dense = numlstm.LSTM(I, H, seed=0)
    models = _models(np, numlstm)
    if mode == "ahead":
        for name in stages[1:]:
            m = models[name]() if name in models else dense
            training = name.startswith("training")
            numlstm.compile(m, [4 if training else 1], seq_lens=[10],
                            stream="stream" in name, forward=name.startswith("forward"),
                            training=training)
        print(json.dumps({"compiled": True}))
        return

    def timed(name, call):
        t, c = time.perf_counter(), time.process_time()
        call()
        marks[name] = (time.perf_counter() - t, time.process_time() - c)

    x1 = np.zeros((1, I), np.float32)
    for name in stages[1:]:
        if name == "dense stream step":
            timed(name, lambda: dense.stream(1).step(x1))
        elif name.startswith("forward"):
            timed(name, lambda: dense(np.zeros((10, 1, I), np.float32)))
        elif name.startswith("training"):
            def train():
                y, _ = dense(np.zeros((10, 4, I), np.float32), training=True)
                dense.backward(np.ones_like(y))
            timed(name, train)
        else:
            m = models[name]()  # pruning and quantizing are not timed: the step is
            timed(name, lambda m=m: m.stream(1).step(x1))
    top = sorted(excl, key=excl.get, reverse=True)[:10]
    print(json.dumps({"marks": marks, "total": (time.perf_counter() - t0,
                                                time.process_time() - c0),
                      "top": [(n, excl[n], incl[n]) for n in top]}))


def run(quick=False, out_dir=None, log=print):
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stages = QUICK_STAGES if quick else STAGES
    result = {"machine": machine_info(), "stages": list(stages), "runs": {}}
    env_base = {"NUMLSTM_NO_CACHE": "", "XDG_CACHE_HOME": ""}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cache, mode in (("cold", "a", "run"), ("warm", "a", "run"),
                                   ("ahead", "b", "ahead"), ("after ahead", "b", "run")):
            env = dict(env_base, NUMBA_CACHE_DIR=os.path.join(tmp, cache))
            log(f"{label} ...")
            res = run_worker("benchmarks.coldstart", ["--worker", mode, *stages], 1800,
                             f"coldstart {label}", env=env)
            if mode == "run":
                result["runs"][label] = res
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def markdown(result):
    runs = result["runs"]
    lines = ["# Cold start: seconds from a new process to first results", "",
             "Each figure is that call's time in a fresh process, numba compilation "
             "included: wall / CPU (user + sys) seconds. **cold**: an empty kernel cache; "
             "**warm**: the cache the cold process wrote; **after ahead**: an empty cache "
             "filled first by `numlstm.compile` on the same models in another process. "
             "`python -m benchmarks --only coldstart`.", "",
             "| first call | cold | warm | after ahead |", "|---|---:|---:|---:|"]
    for stage in result["stages"]:
        cells = []
        for label in ("cold", "warm", "after ahead"):
            wall, cpu = runs[label]["marks"][stage]
            cells.append(f"{wall:.2f} / {cpu:.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    cells = [f"{runs[k]['total'][0]:.2f} / {runs[k]['total'][1]:.2f}"
             for k in ("cold", "warm", "after ahead")]
    lines += ["| **whole sequence** | " + " | ".join(cells) + " |", "",
              "## Costliest compilations of the cold process", "",
              "| kernel | exclusive s | inclusive s |", "|---|---:|---:|"]
    for name, ex, inc in runs["cold"]["top"]:
        lines.append(f"| `{name}` | {ex:.2f} | {inc:.2f} |")
    lines += [""] + machine_markdown(result["machine"], "defaults (two-thread kernels "
                                     "compile in the background)") + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs="+", required=True)
    a = p.parse_args()
    sys.exit(_worker(a.worker[0], a.worker[1:]))

"""Scoring speedup on a local Dask cluster: ``numlstm.dask.score`` with 2 worker
processes against 1, and against ``model(xs)`` in this process.

    python -m benchmarks.dask_scale [--quick] [--out DIR]

Job: 256 sequences, T=200, I=64, H=128, one layer, float32 (``--quick``: 32
sequences, T=20). Clusters: ``LocalCluster(n_workers=n, threads_per_worker=1,
processes=True)`` on loopback, workers with ``NUMBA_NUM_THREADS=1`` (one core
each; dask already sets one BLAS thread). Each figure is the median of
``repeats`` runs after one warm-up run (kernel cache load in the workers); a
run includes scattering the input chunks and gathering the outputs, with the
model scattered once beforehand (``scatter_model``). Not part of ``python -m
benchmarks`` (it needs the dask extra); results go to
``benchmarks/results/dask_scale.{json,md}``.
"""

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.common import REPO, machine_info, machine_markdown, write_results
from benchmarks.common import stats as _stats

NAME = "dask_scale"
FULL = {"B": 256, "T": 200, "I": 64, "H": 128, "repeats": 5}
QUICK = {"B": 32, "T": 20, "I": 64, "H": 128, "repeats": 2}


def _time(fn, repeats):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _stats(times)


def run(quick=False, out_dir=None, log=print):
    import logging

    from distributed import Client, LocalCluster

    import numlstm
    from numlstm import dask as nd

    cfg = QUICK if quick else FULL
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    model = numlstm.LSTM(cfg["I"], cfg["H"], seed=0)
    xs = np.random.default_rng(0).standard_normal((cfg["T"], cfg["B"], cfg["I"]),
                                                  dtype=np.float32)
    result = {"benchmark": NAME, "quick": quick, "config": cfg, "machine": machine_info(),
              "cases": {}}
    ref = model(xs)[0]
    result["cases"]["local"] = _time(lambda: model(xs), cfg["repeats"])
    log(f"local model(xs): {result['cases']['local']['median']:.3f} s")
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, host="127.0.0.1",
                          silence_logs=logging.ERROR,
                          env={"NUMBA_NUM_THREADS": "1"}) as cluster, \
                Client(cluster) as client:
            future = nd.scatter_model(client, model)
            y = nd.score(client, model, xs, model_future=future)
            diff = float(np.max(np.abs(y - ref)))
            stats = _time(lambda c=client, f=future: nd.score(c, model, xs, model_future=f),
                          cfg["repeats"])
            stats["max_abs_diff_to_local"] = diff
            result["cases"][f"{n} worker{'s' if n > 1 else ''}"] = stats
            log(f"{n} worker(s): {stats['median']:.3f} s (max |Δy| to local {diff:.1e})")
    c = result["cases"]
    result["speedup_2_vs_1"] = c["1 worker"]["median"] / c["2 workers"]["median"]
    result["speedup_2_vs_local"] = c["local"]["median"] / c["2 workers"]["median"]
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def markdown(result):
    c = result["config"]
    lines = [f"# Benchmark `{NAME}`: batch scoring on a local Dask cluster"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             f"`numlstm.dask.score` over {c['B']} sequences, T={c['T']}, I={c['I']}, "
             f"H={c['H']}, float32, one layer; LocalCluster of worker processes on loopback, "
             "one thread each (`NUMBA_NUM_THREADS=1`); the model scattered once beforehand. "
             f"Median (min–max) of {c['repeats']} runs after a warm-up.", "",
             "| system | seconds | speedup vs 1 worker | max abs diff to local |",
             "|---|---:|---:|---:|"]
    one = result["cases"]["1 worker"]["median"]
    for name, s in result["cases"].items():
        diff = s.get("max_abs_diff_to_local")
        label = "local `model(xs)` (this process, default threads)" if name == "local" \
            else f"`score`, {name}"
        lines.append(f"| {label} | {s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) | "
                     f"{one / s['median']:.2f} | {'–' if diff is None else f'{diff:.1e}'} |")
    lines += ["", f"Speedup of 2 workers over 1: **{result['speedup_2_vs_1']:.2f}x**; "
              f"over the local forward: {result['speedup_2_vs_local']:.2f}x.", ""]
    lines += machine_markdown(result["machine"], "workers NUMBA_NUM_THREADS=1")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.dask_scale")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(quick=a.quick, out_dir=a.out)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

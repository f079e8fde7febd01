"""The benchmark suite of issue 6: ``python -m benchmarks --only suite [--cases a b ...]``.

Cases (float32; ``benchmarks/suite/config.py`` holds the sizes):

a. streaming inference, batch 1, I=64, H=256, one step per call, state carried;
b. whole-sequence inference, batch 1 and 16, T=1000;
c. training step (forward + backward), T=100, B=32, I=128, H=512;
d. training memory, B=16, I=64, H=256, T in {100, 1000, 10000}, full tape and
   checkpointed (``benchmarks.memory``'s worker);
e. weight bytes of every storage kind;
f. cold start: fresh process, ``import numlstm``, load, first step (warm and
   empty kernel cache);
g. scaling: µs per streaming step as H grows and as sparsity grows.

Systems: numlstm dense, CSR 50/90/95%, BSR 8x1 90%, compact (uint16 indices)
and quantized (float16, int8 values) kinds, all made with the public API from
the same weights; torch ``nn.LSTMCell`` and ``nn.LSTM`` (2 threads), ONNX
Runtime on torch's export (2 threads), a NumPy float32 loop (the float64
reference for training) and scipy CSR/BSR loops for the sparse kinds. Absent
peers are skipped and said so. Every system runs in its own process on inputs
the parent writes once; medians (min–max) over repeats after warm-up; every
numlstm figure as a speedup over each peer from the same run, with the max
|difference| of their outputs beside it; the machine's GEMM rate and
bandwidth, measured first, give each figure a floor.
"""

import os
import tempfile
import time

NAME = "suite"


def run(quick=False, out_dir=None, log=print, cases=None):
    """Run ``cases`` (letters; default all); write ``suite.json``, ``suite.md``
    and the scaling plots to ``out_dir``; return the result dict."""
    from benchmarks.common import REPO, machine_info, write_results
    from benchmarks.suite import cases as K
    from benchmarks.suite import coldstart, report
    from benchmarks.suite.config import (
        CASES,
        FULL,
        NOMINAL_BANDWIDTH_GBS,
        NOMINAL_GEMM_GFLOPS,
        ORT_THREADS,
        QUICK,
        TORCH_THREADS,
    )

    cfg = QUICK if quick else FULL
    letters = [c for c in CASES if c in (cases or CASES)]
    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown:
        raise ValueError(f"cases must be letters among {list(CASES)}, got {unknown}")
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    result = {"benchmark": NAME, "quick": quick, "cases_run": letters,
              "config": {k: cfg[k] for k in ["limits", *letters]},
              "machine": machine_info(),
              "threads": {"torch": 1 if quick else TORCH_THREADS,
                          "onnxruntime": 1 if quick else ORT_THREADS,
                          "blas": "1" if quick else "default"},
              "nominal": {"gemm_gflops": NOMINAL_GEMM_GFLOPS,
                          "bandwidth_gbs": NOMINAL_BANDWIDTH_GBS},
              "cases": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="numlstm-suite-") as tmp:
        ctx = K.Context(cfg, tmp, log, quick)
        log("limits: GEMM rate and memory bandwidth ...")
        result["limits"] = _limits(ctx)
        ctx.limits = result["limits"] and {k: result["limits"][k]["best"]
                                           for k in ("gemm_gflops", "bandwidth_gbs")}
        for letter in letters:
            log(f"case {letter}: {CASES[letter]}")
            t0 = time.perf_counter()
            if letter == "f":
                paths, _, _ = K._ab_models(ctx)
                res = coldstart.case_f(ctx, paths, _weights_npz(ctx),
                                       ctx.once("onnx", lambda: K._export_onnx(ctx, {
                                           "skipped": {}})))
            else:
                res = getattr(K, f"case_{letter}")(ctx)
            res["seconds"] = time.perf_counter() - t0
            result["cases"][letter] = res
            log(f"case {letter}: {res['seconds']:.1f} s")
    result["seconds"] = time.perf_counter() - t_start
    result["targets"] = report.targets(result)
    plots = report.plots(result)
    result["files"] = write_results(NAME, result, out_dir, report.markdown, plots=plots)
    return result


def markdown(result):
    from benchmarks.suite import report

    return report.markdown(result)


def _limits(ctx):
    from benchmarks.common import stats
    from benchmarks.suite.cases import run_job

    c = ctx.cfg["limits"]
    res = run_job(ctx, {"kind": "limits", "system": "numpy", **c}, "limits", {"skipped": {}})
    if res is None:
        return None
    out = {}
    for k in ("gemm_gflops", "bandwidth_gbs"):
        out[k] = {**stats(res[k]), "best": max(res[k])}
    out["blas"] = res.get("blas")
    out["gemm_n"], out["copy_mib"] = c["n"], c["mib"]
    return out


def _weights_npz(ctx):
    import numpy as np

    from benchmarks.suite.cases import _inputs

    return _inputs(ctx, "export", np.zeros((1, 1, ctx.cfg["a"]["I"]), np.float32))

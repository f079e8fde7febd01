"""Soak benchmark: a long run of streaming steps and of training iterations,
with resident memory sampled along the way and every output checked for NaN.

Cases (float32, I=64, H=256, one layer; inputs standard normal, a sane range):

* stream — ``model.stream(batch_size=1)`` stepped 10^6 times (``--quick``:
  2*10^3), the state carried throughout;
* train  — 10^3 iterations (``--quick``: 20) of ``zero_grad``, a training
  forward at T=50, B=16 (``--quick``: T=10), a ``Linear`` head, MSE,
  ``backward`` and an ``Adam`` step: a loop a training job runs for hours.

Each case runs in a fresh worker process (``python -m benchmarks.soak --worker
CASE ...``). After a warm-up (kernel compilation or cache load, first
buffers, optimizer state), the worker samples VmRSS (``/proc/self/status``)
and numba's NRT net allocation count (allocations minus frees) about 20
times over the run. Reported: RSS before (after the warm-up), after, growth
(after - before), the peak's rise over the run, the trace, µs per step or ms
per iteration, and the number of non-finite values among the outputs (every
step's h for the stream; every iteration's loss and the final parameters for
training). The verdict: growth <= 1 MiB and no non-finite value. numlstm only:
no peer runs here (``memory`` has torch's streaming RSS beside ours).

Workers run with one BLAS thread (``OPENBLAS_NUM_THREADS=1`` and friends,
unless set already): the recurrences' per-step products go to BLAS, and on a
shared 2-core machine whose other core is busy, BLAS threads that wait for
each other made a training iteration 5-40x slower (T=10, B=16: 16 ms with one
thread, 80-600 ms with two). Speed is not what this benchmark measures.
"""

import argparse
import gc
import json
import os
import time

import numpy as np

from benchmarks.common import REPO, machine_info, machine_markdown, run_worker, write_results
from benchmarks.memory import MIB, _maxrss_kib, _reset_peak, _rss_kib

NAME = "soak"
I, H = 64, 256
SEED = 0
FULL = {"stream_steps": 10**6, "stream_batch": 1, "train_iters": 1000, "train_T": 50,
        "train_B": 16, "samples": 20}
QUICK = {"stream_steps": 2000, "stream_batch": 1, "train_iters": 20, "train_T": 10,
         "train_B": 16, "samples": 4}
CASES = ("stream", "train")
GROWTH_BOUND_MIB = 1.0
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _nrt_net():
    from numba.core.runtime import rtsys

    s = rtsys.get_allocation_stats()
    return s.alloc - s.free


def _enable_nrt_stats():
    from numba.core.runtime import _nrt_python

    _nrt_python.memsys_enable_stats()


# ----------------------------------------------------------------------------
# Workers (each in its own process)
# ----------------------------------------------------------------------------

def _sampler(total, samples):
    """Step numbers (1-based) after which to sample: ``samples`` evenly spaced."""
    return {max(1, round(total * (k + 1) / samples)) for k in range(samples)}


def worker_stream(steps, batch, samples):
    import numlstm

    _enable_nrt_stats()
    model = numlstm.LSTM(I, H, seed=SEED)
    stream = model.stream(batch_size=batch)
    rng = np.random.default_rng(SEED)
    block = rng.standard_normal((min(steps, 1000), batch, I), dtype=np.float32)
    xs = [block[k] for k in range(len(block))]  # (B, I) views, made before measuring
    h = np.empty((batch, model.output_size), model.dtype)  # each output, reused: no allocation
    for x_t in xs[:10]:  # warm up
        stream.step(x_t, out=h)
    stream.reset()
    marks = _sampler(steps, samples)
    nonfinite = 0
    absmax = 0.0
    gc.collect()
    reset = _reset_peak()
    before, peak_before, nrt_before = _rss_kib(), _maxrss_kib(), _nrt_net()
    trace = [(0, before / MIB, 0)]
    n = len(xs)
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        stream.step(xs[k % n], out=h)
        if k in marks:  # between samples the outputs are checked in bulk below
            trace.append((k, _rss_kib() / MIB, _nrt_net() - nrt_before))
        if k % 64 == 0 or k == steps:
            m = float(np.abs(h).max())  # NaN compares false: counted below
            if not np.isfinite(m):
                nonfinite += 1
            else:
                absmax = max(absmax, m)
    seconds = time.perf_counter() - t0
    after = _rss_kib()
    # The sparse check above reads every 64th step; NaN or inf, once in the
    # state, persists through the recurrence, so it cannot hide between checks.
    return {"case": "stream", "steps": steps, "batch": batch,
            "rss_before_mib": before / MIB, "rss_after_mib": after / MIB,
            "growth_mib": (after - before) / MIB,
            "peak_rise_mib": (_maxrss_kib() - peak_before) / MIB, "peak_reset": reset,
            "nrt_net_growth": _nrt_net() - nrt_before,
            "rss_trace": trace, "us_per_step": seconds / steps * 1e6,
            "nonfinite_checks": nonfinite, "checks": steps // 64 + (steps % 64 != 0),
            "max_abs_h": absmax}


def worker_train(iters, T, B, samples):
    import numlstm
    from numlstm import losses, optim
    from numlstm.layers import Linear

    _enable_nrt_stats()
    model = numlstm.LSTM(I, H, seed=SEED)
    head = Linear(H, 1, seed=SEED)
    opt = optim.Adam([model, head], lr=1e-3)
    rng = np.random.default_rng(SEED)
    batches = 8  # a few distinct batches, made before measuring, used cyclically
    x = rng.standard_normal((batches, T, B, I), dtype=np.float32)
    target = np.tanh(np.cumsum(x[..., :1], axis=1) / 4).astype(np.float32)  # (., T, B, 1)
    loss_hist = np.zeros(iters)

    def iteration(k):
        opt.zero_grad()
        out, _ = model(x[k % batches], training=True)
        loss, dpred = losses.mse(head(out, training=True), target[k % batches])
        model.backward(head.backward(dpred))
        opt.step()
        return loss

    for k in range(3):  # warm up: compile / load kernels, Adam state, workspaces
        iteration(k)
    marks = _sampler(iters, samples)
    gc.collect()
    reset = _reset_peak()
    before, peak_before, nrt_before = _rss_kib(), _maxrss_kib(), _nrt_net()
    trace = [(0, before / MIB, 0)]
    t0 = time.perf_counter()
    for k in range(iters):
        loss_hist[k] = iteration(k)
        if k + 1 in marks:
            trace.append((k + 1, _rss_kib() / MIB, _nrt_net() - nrt_before))
    seconds = time.perf_counter() - t0
    after = _rss_kib()
    params = [p for m in (model, head) for p in m.parameters().values()]
    nonfinite_params = int(sum(np.count_nonzero(~np.isfinite(p)) for p in params))
    q = max(1, iters // 10)
    return {"case": "train", "iterations": iters, "T": T, "B": B,
            "rss_before_mib": before / MIB, "rss_after_mib": after / MIB,
            "growth_mib": (after - before) / MIB,
            "peak_rise_mib": (_maxrss_kib() - peak_before) / MIB, "peak_reset": reset,
            "nrt_net_growth": _nrt_net() - nrt_before,
            "rss_trace": trace, "ms_per_iteration": seconds / iters * 1e3,
            "nonfinite_losses": int(np.count_nonzero(~np.isfinite(loss_hist))),
            "nonfinite_params": nonfinite_params,
            "loss_first": float(np.mean(loss_hist[:q])),
            "loss_last": float(np.mean(loss_hist[-q:]))}


def worker_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    p.add_argument("--worker", choices=CASES, required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--samples", type=int, default=10)
    a = p.parse_args(argv)
    if a.worker == "stream":
        res = worker_stream(a.steps, a.batch, a.samples)
    else:
        res = worker_train(a.steps, a.T, a.batch, a.samples)
    print(json.dumps(res))


# ----------------------------------------------------------------------------
# Parent: run the workers, report
# ----------------------------------------------------------------------------

def run(quick=False, out_dir=None, log=print):
    """Run both cases, write ``soak.json`` and ``soak.md`` to ``out_dir``; return the dict."""
    cfg = QUICK if quick else FULL
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    timeout = 300 if quick else 1800
    result = {"benchmark": NAME, "quick": quick,
              "config": {"dtype": "float32", "I": I, "H": H, "layers": 1, **cfg,
                         "seed": SEED, "growth_bound_mib": GROWTH_BOUND_MIB},
              "machine": machine_info(), "cases": {}, "skipped": {}}
    saved = {k: os.environ.get(k) for k in BLAS_ENV}
    for k in BLAS_ENV:
        os.environ.setdefault(k, "1")
    result["config"]["worker_env"] = {k: os.environ[k] for k in BLAS_ENV}
    try:
        for case in CASES:
            _run_case(case, cfg, timeout, result, log)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def _run_case(case, cfg, timeout, result, log):
    """One worker; a failure is recorded in ``result["skipped"]`` and the run goes on."""
    import subprocess

    args = {"stream": ["--steps", str(cfg["stream_steps"]), "--batch", str(cfg["stream_batch"])],
            "train": ["--steps", str(cfg["train_iters"]), "--T", str(cfg["train_T"]),
                      "--batch", str(cfg["train_B"])]}[case]
    log(f"soak {case}: running ...")
    try:
        res = run_worker("benchmarks.soak",
                         ["--worker", case, "--samples", str(cfg["samples"]), *args],
                         timeout, case)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result["skipped"][case] = f"worker failed: {exc}"
        log(f"soak {case}: skipped ({exc})")
        return
    finite = (res["nonfinite_checks"] == 0 if case == "stream"
              else res["nonfinite_losses"] == 0 and res["nonfinite_params"] == 0)
    res["finite"] = bool(finite)
    res["flat"] = bool(res["growth_mib"] <= GROWTH_BOUND_MIB)
    result["cases"][case] = res
    log(f"soak {case}: RSS {res['rss_before_mib']:.1f} -> {res['rss_after_mib']:.1f} MiB "
        f"({res['growth_mib']:+.2f}), finite: {finite}")


def markdown(result):
    """The result as a Markdown report."""
    c = result["config"]
    lines = [f"# Benchmark `{NAME}`: long runs hold their memory"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             f"{c['dtype']}, I={c['I']}, H={c['H']}, one layer, inputs standard normal. "
             "Each case in a fresh process; after a warm-up (kernels, buffers, optimizer "
             "state), resident memory (VmRSS) before the first measured step and after the "
             "last, the peak's rise over the run, and numba's NRT net allocations "
             "(allocations - frees) gained over the run. Verdict: flat if growth <= "
             f"{c['growth_bound_mib']:g} MiB; finite if no output, loss or parameter is NaN "
             "or inf.", "",
             "| case | work | RSS before MiB | RSS after MiB | growth MiB | peak rise MiB "
             "| NRT net | speed | finite | flat |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    yes = {True: "yes", False: "**no**"}
    for case in CASES:
        e = result["cases"].get(case)
        if e is None:
            why = result["skipped"].get(case, "not run")
            lines.append(f"| {case} | skipped: {why.splitlines()[0]} | | | | | | | | |")
            continue
        if case == "stream":
            work = f"{e['steps']:,} `Stream.step` calls, batch {e['batch']}"
            speed = f"{e['us_per_step']:.1f} µs/step"
        else:
            work = (f"{e['iterations']:,} iterations of forward + backward + Adam, "
                    f"T={e['T']}, B={e['B']}")
            speed = f"{e['ms_per_iteration']:.1f} ms/iteration"
        lines.append(f"| {case} | {work} | {e['rss_before_mib']:.1f} | "
                     f"{e['rss_after_mib']:.1f} | {e['growth_mib']:+.2f} | "
                     f"{e['peak_rise_mib']:.2f} | {e['nrt_net_growth']:+d} | {speed} | "
                     f"{yes[e['finite']]} | {yes[e['flat']]} |")
    for case in CASES:
        e = result["cases"].get(case)
        if e is None:
            continue
        unit = "steps" if case == "stream" else "iterations"
        lines += ["", f"{case}: RSS along the run ({unit}: MiB) — "
                  + ", ".join(f"{n:,}: {v:.1f}" for n, v, _ in e["rss_trace"]) + "."]
        if case == "train":
            lines.append(f"Mean loss over the first tenth {e['loss_first']:.4f}, over the "
                         f"last tenth {e['loss_last']:.4f}.")
        else:
            lines.append(f"Largest |h| seen: {e['max_abs_h']:.3f} (every 64th step checked).")
    env = ", ".join(f"{k}={v}" for k, v in c.get("worker_env", {}).items())
    lines += [""] + machine_markdown(result["machine"], f"numba defaults; workers {env}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    worker_main()

"""Stream pool benchmark: many sessions in one batched step, against one
``Stream`` per session (issue 13's targets, measured in one run).

Cases (float32, inputs standard normal; each group in a fresh worker process,
``python -m benchmarks.pool --worker speed|memory ...``):

* rounds: S sessions (1,000; ``--quick``: 100), each stepped once per round.
  ``pool.step`` over all S ids, against S ``Stream.step`` calls (one batch-1
  stream per session), for the I=64, H=256, 2-layer model dense and 90%
  CSR (magnitude-pruned), and for the service example's I=8, H=64, 2-layer
  model. Session-steps/s = S / a round's time (median of the repeats).
* GEMM rate: in the same worker, the products one round of the dense model
  makes, at the same shapes (S x K by K x 4H for every W_ih and W_hh), as
  flops / time, with NumPy's matmul and with numba's ``np.dot`` (scipy's
  OpenBLAS, what the kernels call), the better of the two; the pool's rate
  is the same flops over a pool step's time (which also holds the gates'
  nonlinearities and the gather/scatter), reported as a % of it.
* memory: 10,000 sessions (``--quick``: 500) opened in one pool of the I=64,
  H=256 model and all stepped once, in a fresh process: the rise of resident
  memory (VmRSS) against ``numlstm.pool.pool_memory``'s prediction (states +
  workspace + index; the model's weights are made before the first reading).
* service: ``examples/service_load.py`` against ``examples/service.py`` in
  its three modes (pool, streams, noop), I=8, H=512 (``--quick``: 64), two
  layers, 1, 8, 32 and 128 clients (``--quick``: 1, 4).
* threads: 64 threads (``--quick``: 8), each with one session, each making
  T single steps (200; ``--quick``: 20): through one ``numlstm.serve.Batcher``
  on a pool (each thread waits for its step's result before sending the
  next) against the same threads each stepping its own ``Stream``; for both
  models. Session-steps/s = all steps / wall time.

Kernels are compiled (or loaded from the cache) before anything is timed.
Workers run with one BLAS thread (``OPENBLAS_NUM_THREADS=1`` and friends,
unless set already), for the pool's products as for the GEMM reference: on a
shared 2-core machine, BLAS threads waiting for each other made the same
product 2-10x slower from one call to the next. Threads of the 64-thread
case still run on every core (kernels release the GIL). The machine may be
shared: compare ratios within one run.
"""

import argparse
import json
import os
import threading
import time

import numpy as np

from benchmarks.common import (
    REPO,
    machine_info,
    machine_markdown,
    run_worker,
    stats,
    time_repeats,
    write_results,
)

NAME = "pool"
SEED = 0
BIG = {"I": 64, "H": 256, "L": 2}
SMALL = {"I": 8, "H": 64, "L": 2}
FULL = {"sessions": 1000, "memory_sessions": 10_000, "threads": 64, "thread_steps": 200,
        "repeats": 7, "stream_repeats": 3, "service_hidden": 512,
        "service_clients": [1, 8, 32, 128], "service_steps": 100}
QUICK = {"sessions": 100, "memory_sessions": 500, "threads": 8, "thread_steps": 20,
         "repeats": 3, "stream_repeats": 2, "service_hidden": 64, "service_clients": [1, 4],
         "service_steps": 10}
WORKERS = ("speed", "memory", "service")
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TARGETS = {"gemm_pct": 70.0, "dense_x": 2.5, "csr_x": 3.0, "small_x": 3.0, "memory_pct": 10.0,
           "threads_x": 3.0, "service_noop_pct": 80.0}


def _model(spec, kind):
    import numlstm

    m = numlstm.LSTM(spec["I"], spec["H"], num_layers=spec["L"], seed=SEED)
    if kind == "csr90":
        numlstm.prune.magnitude(m, 0.9)
    return m


def _flops_per_session_step(spec):
    """Multiply-adds x 2 of one session's step: W_ih and W_hh of every layer
    (the pointwise cell is a few flops per gate, left out)."""
    I, H, L = spec["I"], spec["H"], spec["L"]
    G = 4 * H
    return sum(2 * G * ((I if l == 0 else H) + H) for l in range(L))


def _gemm_rate(spec, S, repeats):
    """The machine's GEMM rate over one round's products at their shapes: the
    better of NumPy's matmul and ``np.dot`` compiled by numba (scipy's
    OpenBLAS, the library the pool's kernels call), as flops / time."""
    from numba import njit

    @njit(nogil=True)
    def dot(a, b, out):
        np.dot(a, b, out)

    rng = np.random.default_rng(SEED)
    I, H, L = spec["I"], spec["H"], spec["L"]
    G = 4 * H
    pairs = []
    for l in range(L):
        for K in ((I if l == 0 else H), H):
            pairs.append((rng.standard_normal((S, K)).astype(np.float32),
                          rng.standard_normal((G, K)).astype(np.float32).T.copy(),
                          np.empty((S, G), np.float32)))

    def numpy_round():
        for a, b, out in pairs:
            np.matmul(a, b, out=out)

    def numba_round():
        for a, b, out in pairs:
            dot(a, b, out)

    flops = _flops_per_session_step(spec) * S
    res = {"flops": flops}
    for name, fn in (("numpy", numpy_round), ("numba", numba_round)):
        t = stats(time_repeats(fn, repeats, 2))
        res[name] = {"seconds": t, "gflops": flops / t["median"] / 1e9}
    res["gflops"] = max(res["numpy"]["gflops"], res["numba"]["gflops"])
    return res


def _rounds(spec, kind, S, repeats, stream_repeats):
    """One round = every session stepped once: a pool step against S streams."""
    from numlstm.pool import StreamPool

    m = _model(spec, kind)
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((S, spec["I"])).astype(np.float32)
    pool = StreamPool(m, S)
    sids = np.array([pool.open() for _ in range(S)], np.int64)
    h = np.empty((S, m.output_size), m.dtype)  # each step's outputs, reused
    pool_t = stats(time_repeats(lambda: pool.step(sids, x, out=h), repeats, 2))
    streams = [m.stream(1) for _ in range(S)]
    rows = [x[k:k + 1] for k in range(S)]
    h_rows = [h[k:k + 1] for k in range(S)]

    def streams_round():
        for s, r, hr in zip(streams, rows, h_rows, strict=True):
            s.step(r, out=hr)

    stream_t = stats(time_repeats(streams_round, stream_repeats, 1))
    # Agreement: from zeros again, one step each way.
    zeros = (np.zeros((spec["L"], spec["H"]), np.float32),) * 2
    for sid in sids:
        pool.set_state(int(sid), zeros)
    for s in streams:
        s.reset()
    h_pool = pool.step(sids, x)
    h_streams = np.stack([s.step(r)[0] for s, r in zip(streams, rows, strict=True)])
    same = float(np.max(np.abs(h_pool - h_streams)))
    flops = _flops_per_session_step(spec) * S
    return {"pool_s": pool_t, "streams_s": stream_t,
            "pool_steps_per_s": S / pool_t["median"],
            "streams_steps_per_s": S / stream_t["median"],
            "speedup": stream_t["median"] / pool_t["median"],
            "pool_gflops": flops / pool_t["median"] / 1e9,
            "weights": repr(m), "max_abs_diff": same}


def _threads(spec, n_threads, steps):
    """n threads, one session each, T single steps: Batcher vs own streams."""
    from numlstm.pool import StreamPool
    from numlstm.serve import Batcher

    m = _model(spec, "dense")
    rng = np.random.default_rng(SEED)
    xs = rng.standard_normal((n_threads, steps, spec["I"])).astype(np.float32)
    out = {}

    def timed(client):
        start = threading.Barrier(n_threads + 1)
        threads = [threading.Thread(target=client, args=(k, start)) for k in range(n_threads)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    results = {}

    def own_stream(k, start):
        s = m.stream(1)
        s.step(xs[k, 0:1])  # warm
        s.reset()
        start.wait()
        hs = [s.step(xs[k, t:t + 1])[0] for t in range(steps)]  # each a new array
        results[("stream", k)] = np.stack(hs)

    seconds = timed(own_stream)
    out["streams"] = {"seconds": seconds, "steps_per_s": n_threads * steps / seconds}

    pool = StreamPool(m, n_threads)
    with Batcher(pool, max_batch=n_threads, max_delay=0.0005) as batcher:
        batcher.step(pool.open(), xs[0, 0])  # warm, then a fresh pool slot per thread
        pool.close(0)

        def through_batcher(k, start):
            sid = pool.open()
            start.wait()
            hs = [batcher.submit(sid, xs[k, t]).result() for t in range(steps)]
            results[("batcher", k)] = np.stack(hs)

        seconds = timed(through_batcher)
        batches, stepped = batcher.batches, batcher.stepped
    out["batcher"] = {"seconds": seconds, "steps_per_s": n_threads * steps / seconds,
                      "mean_batch": (stepped - 1) / max(batches - 1, 1)}
    out["speedup"] = out["batcher"]["steps_per_s"] / out["streams"]["steps_per_s"]
    out["max_abs_diff"] = max(float(np.max(np.abs(results[("stream", k)]
                                                  - results[("batcher", k)])))
                              for k in range(n_threads))
    return out


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _memory(spec, S):
    """RSS rise of a pool of S sessions, all open and stepped once, vs the prediction."""
    from numlstm.pool import CHUNK, StreamPool, pool_memory

    m = _model(spec, "dense")
    warm = StreamPool(m, 2)  # compile (or load) the kernels before the first reading
    warm.step(np.array([warm.open()]), np.zeros((1, spec["I"]), np.float32))
    del warm
    x = np.random.default_rng(SEED).standard_normal((S, spec["I"])).astype(np.float32)
    predicted = pool_memory(m, S)
    before = _rss_kib()
    pool = StreamPool(m, S)
    sids = np.array([pool.open() for _ in range(S)], np.int64)
    pool.step(sids, x)
    after = _rss_kib()
    del sids  # (S,) int64, the caller's: not the pool's memory
    rise = (after - before) * 1024
    return {"sessions": S, "chunk": CHUNK, "predicted": predicted, "rss_rise_bytes": rise,
            "measured_parts": pool.memory_parts(),
            "error_pct": 100 * (rise - predicted["total"]) / predicted["total"]}


def _service(cfg):
    """examples/service_load.py against examples/service.py in each mode (pool,
    streams, noop), each server in its own process: requests/s and latency
    percentiles per number of clients, outputs checked against each client's
    own sequence streamed alone (pool and streams)."""
    import contextlib
    import sys

    sys.path.insert(0, os.path.join(REPO, "examples"))
    import service_load

    with contextlib.redirect_stdout(sys.stderr):  # its tables; our JSON is the last line
        res = service_load.main(["--hidden", str(cfg["service_hidden"]), "--steps",
                                 str(cfg["service_steps"]), "--clients",
                                 *map(str, cfg["service_clients"])])
    keys = ("clients", "requests", "throughput_rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    return {"hidden": cfg["service_hidden"], "ok": res["ok"],
            "runs": [{"mode": r["mode"], "errors": len(r["errors"]),
                      **{k: r[k] for k in keys}} for r in res["load"]]}


def worker_main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=WORKERS, required=True)
    p.add_argument("--config", required=True, help="the run's config, as JSON")
    args = p.parse_args(argv)
    cfg = json.loads(args.config)
    if args.worker == "service":
        res = _service(cfg)
    elif args.worker == "memory":
        res = _memory(BIG, cfg["memory_sessions"])
    else:
        S = cfg["sessions"]
        res = {"gemm": _gemm_rate(BIG, S, cfg["repeats"]), "rounds": {}, "threads": {}}
        for label, spec, kind in (("dense", BIG, "dense"), ("csr90", BIG, "csr90"),
                                  ("small", SMALL, "dense")):
            res["rounds"][label] = _rounds(spec, kind, S, cfg["repeats"],
                                           cfg["stream_repeats"])
        res["rounds"]["dense"]["gemm_pct"] = (100 * res["rounds"]["dense"]["pool_gflops"]
                                              / res["gemm"]["gflops"])
        for label, spec in (("big", BIG), ("small", SMALL)):
            res["threads"][label] = _threads(spec, cfg["threads"], cfg["thread_steps"])
    print(json.dumps(res))


# ----------------------------------------------------------------------------
# Parent: run the workers, report
# ----------------------------------------------------------------------------

def run(quick=False, out_dir=None, log=print):
    """Run both workers, write ``pool.json`` and ``pool.md`` to ``out_dir``; return the dict."""
    cfg = QUICK if quick else FULL
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    timeout = 300 if quick else 1800
    result = {"benchmark": NAME, "quick": quick,
              "config": {"dtype": "float32", "big": BIG, "small": SMALL, **cfg, "seed": SEED,
                         "targets": TARGETS},
              "machine": machine_info()}
    env = {k: os.environ.get(k, "1") for k in BLAS_ENV}
    result["config"]["worker_env"] = env
    for worker in WORKERS:
        log(f"pool {worker}: running ...")
        result[worker] = run_worker("benchmarks.pool",
                                    ["--worker", worker, "--config", json.dumps(cfg)],
                                    timeout, worker, env=env)
    result["verdicts"] = _verdicts(result)
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def _verdicts(result):
    r, t = result["speed"]["rounds"], result["speed"]["threads"]
    T = TARGETS
    return {
        "dense pool at >= 70% of the GEMM rate": r["dense"]["gemm_pct"] >= T["gemm_pct"],
        "dense pool >= 2.5x the streams": r["dense"]["speedup"] >= T["dense_x"],
        "90% CSR pool >= 3x the CSR streams": r["csr90"]["speedup"] >= T["csr_x"],
        "small model pool >= 3x the streams": r["small"]["speedup"] >= T["small_x"],
        "10,000 sessions' memory within 10% of the prediction":
            abs(result["memory"]["error_pct"]) <= T["memory_pct"],
        "64 threads: Batcher >= 3x own streams (I=64, H=256)":
            t["big"]["speedup"] >= T["threads_x"],
        **_service_verdicts(result["service"]),
    }


def _service_verdicts(svc):
    rps = {(r["mode"], r["clients"]): r["throughput_rps"] for r in svc["runs"]}
    out = {}
    for c in (32, 128):
        if all((m, c) in rps for m in ("pool", "streams", "noop")):
            out[f"service, H={svc['hidden']}, {c} clients: pool >= 80% of noop"] = \
                rps["pool", c] >= TARGETS["service_noop_pct"] / 100 * rps["noop", c]
            out[f"service, H={svc['hidden']}, {c} clients: pool above streams"] = \
                rps["pool", c] > rps["streams", c]
    return out


def markdown(result):
    """The result as a Markdown report."""
    c, sp, mem = result["config"], result["speed"], result["memory"]
    r, g = sp["rounds"], sp["gemm"]
    yes = {True: "met", False: "**missed**"}
    lines = [f"# Benchmark `{NAME}`: many sessions in one batched step"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             f"float32. Big model I={c['big']['I']}, H={c['big']['H']}, {c['big']['L']} layers; "
             f"small model (the service example's) I={c['small']['I']}, H={c['small']['H']}, "
             f"{c['small']['L']} layers. Medians of {c['repeats']} pool rounds and "
             f"{c['stream_repeats']} stream rounds.", "",
             f"## One round: {c['sessions']:,} sessions, each stepped once", "",
             "| model | `pool.step` ms | session-steps/s | streams ms | session-steps/s "
             "| pool / streams | pool GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, title in (("dense", "big, dense"), ("csr90", "big, 90% CSR"),
                         ("small", "small, dense")):
        e = r[label]
        lines.append(f"| {title} | {1e3 * e['pool_s']['median']:.2f} | "
                     f"{e['pool_steps_per_s']:,.0f} | {1e3 * e['streams_s']['median']:.1f} | "
                     f"{e['streams_steps_per_s']:,.0f} | {e['speedup']:.1f}x | "
                     f"{e['pool_gflops']:.1f} |")
    lines += ["", f"GEMM rate of this machine in the same run (one dense round's products, "
              f"{c['sessions']:,} rows, {g['flops'] / 1e9:.2f} GFLOP): NumPy matmul "
              f"{g['numpy']['gflops']:.1f} GFLOP/s, numba's np.dot {g['numba']['gflops']:.1f} "
              f"GFLOP/s; the dense pool step runs at {r['dense']['gemm_pct']:.0f}% of the "
              "better.", "",
              f"## Memory: {mem['sessions']:,} sessions in one pool (big model)", "",
              "| | bytes | MiB |", "|---|---:|---:|"]
    for part in ("states", "workspace", "index", "total"):
        lines.append(f"| predicted {part} | {mem['predicted'][part]:,} | "
                     f"{mem['predicted'][part] / 2**20:.1f} |")
    lines += [f"| measured RSS rise | {mem['rss_rise_bytes']:,} | "
              f"{mem['rss_rise_bytes'] / 2**20:.1f} |", "",
              f"Measured - predicted: {mem['error_pct']:+.1f}% (work rows: chunks of "
              f"{mem['chunk']}).", "",
              f"## {c['threads']} threads, one session each, {c['thread_steps']} single steps",
              "", "| model | own `Stream` steps/s | `Batcher` steps/s | mean batch | ratio |",
              "|---|---:|---:|---:|---:|"]
    for label in ("big", "small"):
        e = sp["threads"][label]
        lines.append(f"| {label} | {e['streams']['steps_per_s']:,.0f} | "
                     f"{e['batcher']['steps_per_s']:,.0f} | {e['batcher']['mean_batch']:.1f} | "
                     f"{e['speedup']:.1f}x |")
    svc = result["service"]
    lines += ["", f"## The service: examples/service.py, I=8, H={svc['hidden']}, 2 layers, "
              f"{c['service_steps']} single-step requests per client, keep-alive", "",
              "Each mode's server in its own process, the load generator in another, all on "
              "this machine's cores. pool: sessions in one StreamPool, steps through a "
              "Batcher; streams: one Stream per session; noop: the same server with no "
              "model (the HTTP layer's own limit).", "",
              "| mode | clients | req/s | p50 ms | p99 ms | errors |",
              "|---|---:|---:|---:|---:|---:|"]
    for run in svc["runs"]:
        lines.append(f"| {run['mode']} | {run['clients']} | {run['throughput_rps']:.0f} | "
                     f"{run['p50_ms']:.2f} | {run['p99_ms']:.2f} | {run['errors']} |")
    lines += ["", "Every client's outputs equal its own sequence streamed alone (to 1e-6): "
              + ("yes" if svc["ok"] else "**no** (see the JSON)") + "."]
    lines += ["", "## The issue's targets", "", "| target | verdict |", "|---|---|"]
    lines += [f"| {k} | {yes[v]} |" for k, v in result["verdicts"].items()]
    env = ", ".join(f"{k}={v}" for k, v in c.get("worker_env", {}).items())
    lines += [""] + machine_markdown(result["machine"], f"numba defaults; workers {env}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    worker_main()

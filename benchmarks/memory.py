"""Memory benchmark: training memory and time, and O(1)-memory streaming.

Training case: float32, B=16, I=64, H=256, T in {100, 1000, 10000}
(``--quick``: T in {50, 200}). For each T and system, one fresh process
(a worker: ``python -m benchmarks.memory --worker train ...``) imports its
library, warms it up on a tiny input (numba compilation or cache load,
torch's first call), allocates x (T, B, I) and dy (T, B, H), resets the
process's peak-RSS mark (``/proc/self/clear_refs``) and then runs one
forward + backward. The figure is the increase of the peak RSS (VmHWM in
/proc/self/status, else ``ru_maxrss``) over its value just before the
step: the memory of the training step itself (tape, outputs, gradients), not
of the interpreter, the libraries or the data. Its time is the median of
further repeats of the same step. Systems:

* torch          — ``torch.nn.LSTM``, ``torch.set_num_threads(2)``, ``y.backward(dy)``;
* numlstm        — ``LSTM.forward(x, training=True)`` + ``backward(dy)``, full tape;
* numlstm-ckpt   — the same with ``checkpoint="auto"`` (skipped, and said so,
  while ``LSTM.forward`` does not accept ``checkpoint``).

Every numlstm figure is reported beside torch's from the same run as a ratio
(memory and time); the checkpointed step's time also as a ratio to numlstm's
own full-tape step.

Streaming case: ``model.stream()`` at batch 1 over 10^6 steps (``--quick``:
10^4), resident memory (VmRSS) before, during and after, and the peak; torch's
``nn.LSTMCell`` under ``no_grad`` in a Python loop runs beside it (10^4 steps
in the full run, to bound its time; µs per step compare across counts).

The parent imports neither numba nor torch. torch is optional: without it
its rows are skipped and the report says so.
"""

import argparse
import gc
import importlib.util
import json
import os
import resource
import time

import numpy as np

from benchmarks.common import REPO, machine_info, machine_markdown, run_worker, write_results
from benchmarks.common import stats as _stats

NAME = "memory"
B, I, H = 16, 64, 256
SEED = 0
FULL = {"T": (100, 1000, 10000), "repeats": 2, "repeats_at_max_T": 1, "stream_steps": 10**6,
        "torch_stream_steps": 10**4}
QUICK = {"T": (50, 200), "repeats": 1, "repeats_at_max_T": 1, "stream_steps": 10**4,
         "torch_stream_steps": 500}
SYSTEMS = ("torch", "numlstm", "numlstm-ckpt")
STREAM_SYSTEMS = ("numlstm", "torch")
TARGETS = {"ckpt_memory_to_torch": 0.1, "ckpt_time_to_full_tape": 1.35,
           "stream_growth_mib": 1.0}
TARGET_T = 10000  # the T at which the issue states the checkpoint targets
MIB = 1024.0  # VmHWM, VmRSS and ru_maxrss are in KiB on Linux


# ----------------------------------------------------------------------------
# Process memory
# ----------------------------------------------------------------------------

def _maxrss_kib():
    """Peak resident set size (VmHWM, which ``clear_refs`` resets), KiB.

    Not ``ru_maxrss`` where /proc exists: Linux starts a worker's ru_maxrss at
    its parent's peak and ``clear_refs`` does not lower it, so a worker of a
    large parent measured +0.0 MiB."""
    return _status_kib("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib():
    """Current resident set size (VmRSS), or None where /proc is absent."""
    return _status_kib("VmRSS:")


def _status_kib(field):
    """A KiB field of /proc/self/status, or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_increase(fn):
    """(peak RSS increase in MiB, seconds, whether the peak mark was reset) of fn()."""
    gc.collect()
    reset = _reset_peak()
    base = _maxrss_kib()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return (_maxrss_kib() - base) / MIB, seconds, reset


# ----------------------------------------------------------------------------
# Workers (each in its own process)
# ----------------------------------------------------------------------------

def _init_weights(rng):
    k = 1 / np.sqrt(H)
    w = {"weight_ih_l0": rng.uniform(-k, k, (4 * H, I)),
         "weight_hh_l0": rng.uniform(-k, k, (4 * H, H)),
         "bias_ih_l0": rng.uniform(-k, k, 4 * H),
         "bias_hh_l0": rng.uniform(-k, k, 4 * H)}
    return {n: v.astype(np.float32) for n, v in w.items()}


def _data(T, rng):
    """x (T, B, I) and dy (T, B, H), float32, made without float64 temporaries."""
    x = rng.standard_normal((T, B, I), dtype=np.float32)
    dy = rng.standard_normal((T, B, H), dtype=np.float32)
    dy *= np.float32(1 / np.sqrt(T * B))
    return x, dy


def _numlstm_train_step(system):
    import inspect

    import numlstm

    kwargs = {}
    if system == "numlstm-ckpt":
        if "checkpoint" not in inspect.signature(numlstm.LSTM.forward).parameters:
            return None, "LSTM.forward does not accept checkpoint= yet"
        kwargs["checkpoint"] = "auto"
    model = numlstm.LSTM(I, H, seed=SEED)

    def setup(weights):
        model.load_state_dict(weights)

    def step(x, dy):
        model.zero_grad()
        model.forward(x, training=True, **kwargs)
        model.backward(dy)

    def grads():
        return {n: np.asarray(g) for n, g in model.grad_arrays().items()}

    return (setup, step, grads), None


def _torch_train_step():
    import torch

    torch.set_num_threads(2)
    lstm = torch.nn.LSTM(I, H)

    def setup(weights):
        with torch.no_grad():
            for n, v in weights.items():
                getattr(lstm, n).copy_(torch.from_numpy(v))

    def step(x, dy):
        lstm.zero_grad()
        y, _ = lstm(torch.from_numpy(x))
        y.backward(torch.from_numpy(dy))

    def grads():
        return {n: p.grad.numpy() for n, p in lstm.named_parameters()}

    return (setup, step, grads), None


def worker_train(system, T, repeats):
    rng = np.random.default_rng(SEED)
    weights = _init_weights(rng)
    t0 = time.perf_counter()
    fns, skipped = _torch_train_step() if system == "torch" else _numlstm_train_step(system)
    if skipped:
        return {"case": system, "T": T, "skipped": skipped}
    setup, step, grads = fns
    setup(weights)
    step(*_data(2, np.random.default_rng(1)))  # warm up: compile / load kernels
    first_call = time.perf_counter() - t0
    x, dy = _data(T, rng)  # before the baseline: the data is not the step's memory
    rss_before = _rss_kib()
    increase, first_s, reset = _peak_increase(lambda: step(x, dy))
    g = grads()  # of the measured step: the same in every system, up to rounding
    checksum = {n: float(np.sum(np.abs(v), dtype=np.float64)) for n, v in g.items()}
    times = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        step(x, dy)
        times.append(time.perf_counter() - t1)
    info = {"torch_threads": _torch_threads()} if system == "torch" else \
        {"numba_threads": _numba_threads()}
    return {"case": system, "T": T, "peak_increase_mib": increase,
            "peak_reset": reset, "rss_before_mib": (rss_before or 0) / MIB,
            "first_step_s": first_s, "step_s": _stats(times or [first_s]),
            "first_call_s": first_call, "grad_abs_sum": checksum,
            "data_mib": (x.nbytes + dy.nbytes) / 2**20, **info}


def _torch_threads():
    import torch

    return torch.get_num_threads()


def _numba_threads():
    import numba

    return numba.config.NUMBA_NUM_THREADS


def worker_stream(system, steps):
    """Step one stream ``steps`` times at batch 1; RSS before, during and after."""
    rng = np.random.default_rng(SEED)
    weights = _init_weights(rng)
    block = rng.standard_normal((min(steps, 1000), 1, I), dtype=np.float32)  # used cyclically
    xs = [block[k] for k in range(len(block))]  # (1, I) views, made before measuring
    if system == "torch":
        import torch

        torch.set_num_threads(2)
        cell = torch.nn.LSTMCell(I, H)
        with torch.no_grad():
            for n, v in weights.items():
                getattr(cell, n.removesuffix("_l0")).copy_(torch.from_numpy(v))
        xs = [torch.from_numpy(xt) for xt in xs]
        state = [torch.zeros(1, H), torch.zeros(1, H)]

        def advance(xt):
            state[0], state[1] = cell(xt, (state[0], state[1]))

        ctx = torch.no_grad
    else:
        import contextlib

        import numlstm

        model = numlstm.LSTM(I, H, seed=SEED)
        model.load_state_dict(weights)
        stream = model.stream(batch_size=1)
        advance = stream.step
        ctx = contextlib.nullcontext
    with ctx():
        for xt in xs[:10]:  # warm up
            advance(xt)
        rounds = max(1, steps // len(xs))
        marks = max(1, rounds // 10)
        gc.collect()
        reset = _reset_peak()
        before, peak_before = _rss_kib(), _maxrss_kib()
        trace = [(0, before / MIB)]
        t0 = time.perf_counter()
        for r in range(rounds):
            for xt in xs:
                advance(xt)
            if (r + 1) % marks == 0:
                trace.append(((r + 1) * len(xs), _rss_kib() / MIB))
        seconds = time.perf_counter() - t0
        after = _rss_kib()
    n = rounds * len(xs)
    return {"case": system, "steps": n, "rss_before_mib": before / MIB,
            "rss_after_mib": after / MIB, "growth_mib": (after - before) / MIB,
            "peak_increase_mib": (_maxrss_kib() - peak_before) / MIB, "peak_reset": reset,
            "rss_trace_mib": trace, "us_per_step": seconds / n * 1e6}


def worker_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    p.add_argument("--worker", choices=("train", "stream"), required=True)
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--T", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker == "train":
        res = worker_train(a.system, a.T, a.repeats)
    else:
        res = worker_stream(a.system, a.steps)
    print(json.dumps(res))


# ----------------------------------------------------------------------------
# Parent: run the workers, compare, report
# ----------------------------------------------------------------------------

def run(quick=False, out_dir=None, log=print):
    """Run every case, write ``memory.json`` and ``memory.md`` to ``out_dir``; return the dict."""
    cfg = QUICK if quick else FULL
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    timeout = 300 if quick else 900
    result = {"benchmark": NAME, "quick": quick,
              "config": {"dtype": "float32", "B": B, "I": I, "H": H, "T": list(cfg["T"]),
                         "repeats": cfg["repeats"], "repeats_at_max_T": cfg["repeats_at_max_T"],
                         "stream_batch": 1,
                         "stream_steps": cfg["stream_steps"],
                         "torch_stream_steps": cfg["torch_stream_steps"], "seed": SEED},
              "targets": TARGETS, "machine": machine_info(), "train": {}, "stream": {},
              "skipped": {}}
    torch_ok = importlib.util.find_spec("torch") is not None
    for T in cfg["T"]:
        for system in SYSTEMS:
            key = f"{system}@T={T}"
            if system == "torch" and not torch_ok:
                result["skipped"][key] = "torch is not importable"
                continue
            log(f"train {key}: running ...")
            repeats = cfg["repeats_at_max_T"] if T == max(cfg["T"]) else cfg["repeats"]
            res = _try(system, ["--worker", "train", "--system", system, "--T", str(T),
                                "--repeats", str(repeats)], timeout, key, result, log)
            if res is None:
                continue
            result["train"].setdefault(str(T), {})[system] = res
            log(f"train {key}: peak +{res['peak_increase_mib']:.1f} MiB, "
                f"{res['step_s']['median']:.3f} s per forward+backward")
    for system in STREAM_SYSTEMS:
        key = f"stream {system}"
        if system == "torch" and not torch_ok:
            result["skipped"][key] = "torch is not importable"
            continue
        steps = cfg["stream_steps"] if system == "numlstm" else cfg["torch_stream_steps"]
        log(f"{key}: {steps} steps ...")
        res = _try(system, ["--worker", "stream", "--system", system, "--steps", str(steps)],
                   timeout, key, result, log)
        if res is not None:
            result["stream"][system] = res
            log(f"{key}: RSS {res['rss_before_mib']:.1f} -> {res['rss_after_mib']:.1f} MiB, "
                f"{res['us_per_step']:.1f} µs/step")
    _compare(result)
    result["files"] = write_results(NAME, result, out_dir, markdown,
                                    _draw if result["train"] else None)
    return result


def _try(system, args, timeout, key, result, log):
    """Run a worker; a failing or timed-out worker, or a skip it reports, is recorded
    in ``result["skipped"]`` and the run goes on."""
    import subprocess

    try:
        res = run_worker("benchmarks.memory", args, timeout, key)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result["skipped"][key] = f"worker failed: {exc}"
        log(f"{key}: skipped ({exc})")
        return None
    if "skipped" in res:
        result["skipped"][key] = res["skipped"]
        log(f"{key}: skipped ({res['skipped']})")
        return None
    return res


def _compare(result):
    """Ratios to torch (memory, time) and to numlstm's full tape; gradient agreement;
    the issue's targets at the largest T."""
    for row in result["train"].values():
        torch_e, full = row.get("torch"), row.get("numlstm")
        for system in ("numlstm", "numlstm-ckpt"):
            e = row.get(system)
            if e is None:
                continue
            if torch_e is not None:
                e["memory_to_torch"] = _ratio(e["peak_increase_mib"],
                                              torch_e["peak_increase_mib"])
                e["time_to_torch"] = _ratio(e["step_s"]["median"], torch_e["step_s"]["median"])
                e["grad_rel_diff_to_torch"] = _grad_diff(e, torch_e)
            if system == "numlstm-ckpt" and full is not None:
                e["memory_to_full_tape"] = _ratio(e["peak_increase_mib"],
                                                  full["peak_increase_mib"])
                e["time_to_full_tape"] = _ratio(e["step_s"]["median"], full["step_s"]["median"])
                e["grad_rel_diff_to_full_tape"] = _grad_diff(e, full)
    s = result["stream"]
    if "numlstm" in s and "torch" in s:
        s["numlstm"]["time_to_torch"] = _ratio(s["numlstm"]["us_per_step"],
                                               s["torch"]["us_per_step"])

    t_max = str(max(result["config"]["T"]))
    ckpt = result["train"].get(t_max, {}).get("numlstm-ckpt", {})
    stream = s.get("numlstm")
    result["target_check"] = {
        "T": int(t_max),
        "ckpt_memory_to_torch": ckpt.get("memory_to_torch"),
        "ckpt_memory_met": _met(ckpt.get("memory_to_torch"), TARGETS["ckpt_memory_to_torch"]),
        "ckpt_time_to_full_tape": ckpt.get("time_to_full_tape"),
        "ckpt_time_met": _met(ckpt.get("time_to_full_tape"), TARGETS["ckpt_time_to_full_tape"]),
        "stream_steps": stream["steps"] if stream else None,
        "stream_growth_mib": stream["growth_mib"] if stream else None,
        "stream_met": _met(stream["growth_mib"] if stream else None,
                           TARGETS["stream_growth_mib"])}


def _ratio(a, b):
    return a / b if b else None


def _met(value, bound):
    return None if value is None else bool(value <= bound)


def _grad_diff(a, b):
    """Largest relative difference of the per-parameter sums of |gradient|."""
    ga, gb = a["grad_abs_sum"], b["grad_abs_sum"]
    return max(abs(ga[n] - gb[n]) / max(abs(gb[n]), 1e-30) for n in gb if n in ga)


def _f(value, spec=".2f", none="–"):
    return none if value is None else format(value, spec)


def markdown(result):
    """The result as a Markdown report."""
    c, m = result["config"], result["machine"]
    lines = [f"# Benchmark `{NAME}`: training memory and streaming"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             "## Training: one forward + backward", "",
             f"{c['dtype']}, B={c['B']}, I={c['I']}, H={c['H']}, one layer. **Peak increase** = "
             "rise of the peak RSS (VmHWM) during one forward + backward in a fresh process, after "
             "imports, kernel warm-up on a tiny input and allocation of x and dy (the peak "
             "mark reset to the current RSS just before the step): the step's own memory "
             "(tape, output y, dx, gradients). **Time** = median of "
             f"{c['repeats']} further step(s), {c['repeats_at_max_T']} at the largest T (first "
             "step in brackets, which also allocates). "
             "Ratios: numlstm / torch from the same run (< 1: numlstm smaller or faster); "
             "checkpointed / numlstm full tape.", "",
             "| T | system | peak increase MiB | / torch | step s (first) | / torch "
             "| / full tape (memory, time) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    labels = {"torch": "torch `nn.LSTM`", "numlstm": "numlstm full tape",
              "numlstm-ckpt": 'numlstm `checkpoint="auto"`'}
    for T in map(str, c["T"]):
        row = result["train"].get(T, {})
        for system in SYSTEMS:
            e = row.get(system)
            if e is None:
                why = result["skipped"].get(f"{system}@T={T}")
                if why:
                    lines.append(f"| {T} | {labels[system]} | skipped: {why.splitlines()[0]} "
                                 "| | | | |")
                continue
            full = (f"{_f(e.get('memory_to_full_tape'))}, {_f(e.get('time_to_full_tape'))}"
                    if system == "numlstm-ckpt" else "–")
            lines.append(
                f"| {T} | {labels[system]} | {e['peak_increase_mib']:.1f} | "
                f"{_f(e.get('memory_to_torch'), '.3f')} | {e['step_s']['median']:.3f} "
                f"({e['first_step_s']:.3f}) | {_f(e.get('time_to_torch'))} | {full} |")
    diffs = [(T, s, e[k]) for T, row in result["train"].items() for s, e in row.items()
             for k in ("grad_rel_diff_to_torch",) if k in e]
    if diffs:
        lines += ["", "Same weights and data in every system; largest relative difference "
                  "of the per-parameter sums of |gradient| against torch: "
                  + ", ".join(f"{s} T={T} {d:.1e}" for T, s, d in diffs) + "."]

    s = result["stream"]
    lines += ["", "## Streaming inference", "",
              f"Batch 1, I={c['I']}, H={c['H']}, float32, one step per call, state carried; "
              "resident memory (VmRSS) just before the first measured step and after the "
              "last, and the peak's rise over the run.", "",
              "| system | steps | RSS before MiB | RSS after MiB | growth MiB | peak rise MiB "
              "| µs/step | / torch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    slabels = {"numlstm": "numlstm `Stream.step`", "torch": "torch `nn.LSTMCell` (no_grad)"}
    for system in STREAM_SYSTEMS:
        e = s.get(system)
        if e is None:
            why = result["skipped"].get(f"stream {system}")
            if why:
                lines.append(f"| {slabels[system]} | skipped: {why.splitlines()[0]} "
                             "| | | | | | |")
            continue
        lines.append(f"| {slabels[system]} | {e['steps']:,} | {e['rss_before_mib']:.1f} | "
                     f"{e['rss_after_mib']:.1f} | {e['growth_mib']:+.2f} | "
                     f"{e['peak_increase_mib']:.2f} | {e['us_per_step']:.1f} | "
                     f"{_f(e.get('time_to_torch'))} |")
    if "numlstm" in s:
        lines += ["", "numlstm RSS during the run (steps: MiB): "
                  + ", ".join(f"{n:,}: {v:.1f}" for n, v in s["numlstm"]["rss_trace_mib"])
                  + "."]

    tc = result["target_check"]
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}
    lines += ["", "## The issue's targets", "",
              f"- `checkpoint=\"auto\"` at T={TARGET_T}: peak increase <= "
              f"{TARGETS['ckpt_memory_to_torch']:g} x torch's — measured at T={tc['T']}: "
              f"{_f(tc['ckpt_memory_to_torch'], '.3f')} x, {verdict[tc['ckpt_memory_met']]}.",
              f"- `checkpoint=\"auto\"` at T={TARGET_T}: time <= "
              f"{TARGETS['ckpt_time_to_full_tape']:g} x numlstm's own full-tape step — "
              f"measured at T={tc['T']}: {_f(tc['ckpt_time_to_full_tape'])} x, "
              f"{verdict[tc['ckpt_time_met']]}.",
              f"- Streaming over 10^6 steps: no growth (RSS after - before <= "
              f"{TARGETS['stream_growth_mib']:g} MiB) — measured over "
              f"{_f(tc['stream_steps'], ',')} steps: {_f(tc['stream_growth_mib'], '+.2f')} MiB, "
              f"{verdict[tc['stream_met']]}."]
    if result["quick"]:
        lines.append("- This is a `--quick` smoke run at small T: the verdicts above are "
                     "not the targets' measurement.")

    lines += [""] + machine_markdown(m, "torch.set_num_threads(2)")
    return "\n".join(lines) + "\n"


def _draw(result, ax):
    """Peak increase against T per system."""
    for system in SYSTEMS:
        pts = [(int(T), row[system]["peak_increase_mib"])
               for T, row in result["train"].items() if system in row]
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=system)
    ax.set_xscale("log")
    ax.set_xlabel("T (time steps)")
    ax.set_ylabel("peak RSS increase, MiB")
    ax.set_title(f"one forward+backward, B={B}, I={I}, H={H}, float32")


if __name__ == "__main__":
    worker_main()

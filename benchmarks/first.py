"""First benchmark: batch-1 LSTM inference latency, numlstm against torch.

Case: float32, batch 1, I=64, H=256, T=1000 (``--quick``: T=50, fewer repeats).
Two figures per system, both in µs per time step:

* stream   — one call per time step: ``Stream.step`` for numlstm,
             ``torch.nn.LSTMCell`` in a Python loop for torch;
* sequence — one call for the whole sequence (time / T): ``LSTM.forward``
             for numlstm, ``torch.nn.LSTM`` for torch.

numlstm runs twice, with the dense weights and with the same weights
magnitude-pruned to 90% sparsity (CSR). Every system runs in its own
subprocess (a worker: ``python -m benchmarks.first --worker CASE ...``) on
the same weights and input, written once by the parent to an .npz file. Each
figure is timed after warm-up (numba compilation, torch's first call) over
several repeats; the report gives median, min and max, and each numlstm median
as a ratio to the torch peer's median (< 1: numlstm is faster). Outputs are
compared with torch's on the same weights (torch gets the pruned weights as
dense matrices with zeros for the CSR case).

The parent imports numlstm only to prune the shared weights, and never
torch. torch is optional: without it
the torch rows are skipped and the report says so.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import time

import numpy as np

from benchmarks.common import REPO, machine_info, machine_markdown, run_worker, write_results
from benchmarks.common import peak_rss_mib as _peak_rss_mib
from benchmarks.common import stats as _stats
from benchmarks.common import time_repeats as _time_repeats

NAME = "first"
I, H = 64, 256
SPARSITY = 0.9
SEED = 0
FULL = {"T": 1000, "repeats": 7, "warmup": 2}
QUICK = {"T": 50, "repeats": 3, "warmup": 1}
CASES = ("numlstm-dense", "numlstm-csr", "torch")
PEER = {"stream": "torch.nn.LSTMCell step by step", "sequence": "torch.nn.LSTM whole sequence"}


# ----------------------------------------------------------------------------
# Inputs shared by every worker
# ----------------------------------------------------------------------------

def make_inputs(path, T, seed=SEED):
    """Write torch-style LSTM weights U(-1/sqrt(H), 1/sqrt(H)), their pruned
    copies and an input x (T, 1, I) to ``path`` (.npz)."""
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    w = {"weight_ih_l0": rng.uniform(-k, k, (4 * H, I)),
         "weight_hh_l0": rng.uniform(-k, k, (4 * H, H)),
         "bias_ih_l0": rng.uniform(-k, k, 4 * H),
         "bias_hh_l0": rng.uniform(-k, k, 4 * H)}
    w = {n: v.astype(np.float32) for n, v in w.items()}
    import numlstm

    model = numlstm.LSTM(I, H)
    model.load_state_dict(w)
    numlstm.prune.magnitude(model, SPARSITY)  # the same zeros for every system
    pruned = {f"pruned_{n}": (v.toarray() if n.startswith("weight") else v)
              for n, v in model.state_dict().items()}
    x = rng.standard_normal((T, 1, I)).astype(np.float32)
    np.savez(path, x=x, **w, **pruned)


def _weights(data, pruned):
    pre = "pruned_" if pruned else ""
    return {n: data[pre + n] for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                       "bias_hh_l0")}


# ----------------------------------------------------------------------------
# Workers (run in their own process)
# ----------------------------------------------------------------------------

def _worker_numlstm(data, sparse, repeats, warmup):
    import scipy.sparse as sp

    import numlstm

    x = data["x"]  # (T, 1, I)
    T = x.shape[0]
    state = _weights(data, pruned=sparse)
    if sparse:
        state = {n: (sp.csr_array(v) if n.startswith("weight") else v) for n, v in state.items()}
    model = numlstm.LSTM(I, H, seed=0)
    model.load_state_dict(state)
    stream = model.stream(batch_size=1)
    xs = [x[t] for t in range(T)]  # (1, I) C-contiguous views, made before timing

    def run_stream():
        stream.reset()
        for xt in xs:
            stream.step(xt)

    def run_sequence():
        model(x)

    t0 = time.perf_counter()
    model(x[:2])
    stream.step(xs[0])
    first_call = time.perf_counter() - t0  # numba compilation or cache load
    stream_times = _time_repeats(run_stream, repeats, warmup)
    seq_times = _time_repeats(run_sequence, repeats, warmup)

    stream.reset()
    y_stream = np.stack([stream.step(xt)[0].copy() for xt in xs])  # (T, H)
    y_seq = model(x)[0][:, 0]  # (T, H)
    info = {"weight_bytes": model.weight_bytes(), "first_call_s": first_call,
            "numba_threads": _numba_threads()}
    return stream_times, seq_times, {"stream": y_stream, "sequence": y_seq}, info


def _numba_threads():
    import numba

    return numba.config.NUMBA_NUM_THREADS


def _worker_torch(data, repeats, warmup):
    import torch

    torch.set_num_threads(2)
    x = torch.from_numpy(data["x"])  # (T, 1, I)
    T = x.shape[0]
    xs = [x[t] for t in range(T)]

    def build(pruned):
        w = {n: torch.from_numpy(v) for n, v in _weights(data, pruned).items()}
        cell, lstm = torch.nn.LSTMCell(I, H), torch.nn.LSTM(I, H)
        with torch.no_grad():
            for n, v in w.items():
                getattr(cell, n.removesuffix("_l0")).copy_(v)
                getattr(lstm, n).copy_(v)
        return cell.eval(), lstm.eval()

    def outputs(cell, lstm):
        with torch.no_grad():
            h = torch.zeros(1, H)
            c = torch.zeros(1, H)
            ys = []
            for xt in xs:
                h, c = cell(xt, (h, c))
                ys.append(h[0].clone())
            return {"stream": torch.stack(ys).numpy(), "sequence": lstm(x)[0][:, 0].numpy()}

    cell, lstm = build(pruned=False)

    def run_stream():
        with torch.no_grad():
            h = torch.zeros(1, H)
            c = torch.zeros(1, H)
            for xt in xs:
                h, c = cell(xt, (h, c))

    def run_sequence():
        with torch.no_grad():
            lstm(x)

    t0 = time.perf_counter()
    run_sequence()
    first_call = time.perf_counter() - t0
    stream_times = _time_repeats(run_stream, repeats, warmup)
    seq_times = _time_repeats(run_sequence, repeats, warmup)
    outs = outputs(cell, lstm)
    outs.update({f"pruned_{k}": v for k, v in outputs(*build(pruned=True)).items()})
    info = {"weight_bytes": sum(p.numel() * p.element_size() for p in lstm.parameters()),
            "first_call_s": first_call, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__}
    return stream_times, seq_times, outs, info


def worker_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.first")
    p.add_argument("--worker", choices=CASES, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help=".npz for the outputs")
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    a = p.parse_args(argv)
    data = dict(np.load(a.data))
    if a.worker == "torch":
        stream_t, seq_t, outs, info = _worker_torch(data, a.repeats, a.warmup)
    else:
        stream_t, seq_t, outs, info = _worker_numlstm(data, a.worker == "numlstm-csr",
                                                      a.repeats, a.warmup)
    np.savez(a.out, **outs)
    T = data["x"].shape[0]
    res = {"case": a.worker, "T": T,
           "stream_us": [t / T * 1e6 for t in stream_t],
           "sequence_us": [t / T * 1e6 for t in seq_t],
           "peak_rss_mib": _peak_rss_mib(), **info}
    print(json.dumps(res))


# ----------------------------------------------------------------------------
# Parent: run the workers, compare, report
# ----------------------------------------------------------------------------

def _run_worker(case, data_path, out_path, cfg, timeout):
    return run_worker("benchmarks.first",
                      ["--worker", case, "--data", data_path, "--out", out_path,
                       "--repeats", str(cfg["repeats"]), "--warmup", str(cfg["warmup"])],
                      timeout, case)


def run(quick=False, out_dir=None, log=print):
    """Run every case, write ``first.json`` and ``first.md`` to ``out_dir``; return the dict."""
    cfg = QUICK if quick else FULL
    out_dir = out_dir or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    timeout = 300 if quick else 600
    result = {"benchmark": NAME, "quick": quick,
              "config": {"dtype": "float32", "batch": 1, "I": I, "H": H, "T": cfg["T"],
                         "sparsity": SPARSITY, "repeats": cfg["repeats"],
                         "warmup": cfg["warmup"], "seed": SEED},
              "machine": machine_info(), "cases": {}, "skipped": {}, "agreement": {}}
    torch_ok = importlib.util.find_spec("torch") is not None
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "inputs.npz")
        make_inputs(data_path, cfg["T"])
        outs = {}
        for case in CASES:
            if case == "torch" and not torch_ok:
                result["skipped"][case] = "torch is not importable"
                log("torch: skipped (not importable)")
                continue
            log(f"{case}: running ...")
            out_path = os.path.join(tmp, f"{case}.npz")
            try:
                raw = _run_worker(case, data_path, out_path, cfg, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if case != "torch":
                    raise
                result["skipped"][case] = f"worker failed: {exc}"
                log(f"torch: skipped ({exc})")
                continue
            outs[case] = dict(np.load(out_path))
            entry = {k: v for k, v in raw.items() if k not in ("stream_us", "sequence_us")}
            entry["stream_us"] = _stats(raw["stream_us"])
            entry["sequence_us"] = _stats(raw["sequence_us"])
            result["cases"][case] = entry
            log(f"{case}: stream {entry['stream_us']['median']:.1f} µs/step, "
                f"sequence {entry['sequence_us']['median']:.1f} µs/step")
    _compare(result, outs)
    result["files"] = write_results(NAME, result, out_dir, markdown,
                                    _draw if result["cases"] else None)
    return result


def _compare(result, outs):
    """Ratios to the torch peers and max |difference| of outputs."""
    torch_case = result["cases"].get("torch")
    for case in ("numlstm-dense", "numlstm-csr"):
        entry = result["cases"].get(case)
        if entry is None:
            continue
        mine = outs[case]
        entry["self_agreement"] = float(np.max(np.abs(mine["stream"] - mine["sequence"])))
        if torch_case is None:
            continue
        entry["ratio_to_torch"] = {
            k: entry[f"{k}_us"]["median"] / torch_case[f"{k}_us"]["median"]
            for k in ("stream", "sequence")}
        pre = "pruned_" if case == "numlstm-csr" else ""
        theirs = outs["torch"]
        result["agreement"][case] = {
            k: float(np.max(np.abs(mine[k] - theirs[pre + k]))) for k in ("stream", "sequence")}


def _fmt(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def markdown(result):
    """The result as a Markdown report."""
    c, m = result["config"], result["machine"]
    lines = [f"# Benchmark `{NAME}`: batch-1 LSTM inference latency"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             f"{c['dtype']}, batch {c['batch']}, I={c['I']}, H={c['H']}, T={c['T']}; "
             f"CSR = the same weights magnitude-pruned to {c['sparsity']:.0%} sparsity. "
             f"µs per time step: median (min–max) of {c['repeats']} repeats after "
             f"{c['warmup']} warm-up run(s); every system in its own process. Ratio = "
             "numlstm median / torch median (< 1: numlstm faster).", "",
             "| system | stream µs/step | ratio | sequence µs/step | ratio | weight bytes "
             "| peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"numlstm-dense": "numlstm dense (`Stream.step` / `LSTM.forward`)",
              "numlstm-csr": f"numlstm {c['sparsity']:.0%} CSR (`Stream.step` / `LSTM.forward`)",
              "torch": "torch (`nn.LSTMCell` loop / `nn.LSTM`)"}
    for case in CASES:
        e = result["cases"].get(case)
        if e is None:
            continue
        r = e.get("ratio_to_torch", {})
        rs = f"{r['stream']:.2f}" if r else "–"
        rq = f"{r['sequence']:.2f}" if r else "–"
        rss = f"{e['peak_rss_mib']:.0f}" if e.get("peak_rss_mib") else "–"
        lines.append(f"| {labels[case]} | {_fmt(e['stream_us'])} | {rs} | "
                     f"{_fmt(e['sequence_us'])} | {rq} | {e['weight_bytes']:,} | {rss} |")
    for case, why in result["skipped"].items():
        lines.append(f"| {labels[case]} | skipped: {why.splitlines()[0]} | | | | | |")
    if result["agreement"]:
        lines += ["", "Agreement with torch on the same weights (max |difference| of the "
                  f"{c['T']} outputs h_t):", "",
                  "| system | stream vs `LSTMCell` | sequence vs `nn.LSTM` | own stream vs "
                  "own sequence |", "|---|---:|---:|---:|"]
        for case, a in result["agreement"].items():
            lines.append(f"| {labels[case]} | {a['stream']:.2e} | {a['sequence']:.2e} | "
                         f"{result['cases'][case]['self_agreement']:.2e} |")
    lines += ["", "First call (numba compilation or cache load; torch's first forward): "
              + ", ".join(f"{k} {e['first_call_s']:.2f} s" for k, e in result["cases"].items())
              + ".", ""]
    numba_threads = result["cases"].get("numlstm-dense", {}).get("numba_threads", "?")
    lines += machine_markdown(m, f"torch.set_num_threads(2); numba threads {numba_threads}")
    return "\n".join(lines) + "\n"


def _draw(result, ax):
    """A bar chart of the medians, beside the tables."""
    cases = list(result["cases"])
    width = 0.38
    for j, kind in enumerate(("stream", "sequence")):
        med = [result["cases"][cs][f"{kind}_us"]["median"] for cs in cases]
        ax.bar(np.arange(len(cases)) + (j - 0.5) * width, med, width, label=kind)
    ax.set_xticks(np.arange(len(cases)), cases)
    ax.set_ylabel("µs per time step (median)")
    ax.set_title(f"batch 1, I={I}, H={H}, T={result['config']['T']}, float32")


if __name__ == "__main__":
    worker_main()

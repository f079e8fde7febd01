"""Memory savings on real data: a character LSTM trained dense, pruned gradually
to 90% and 95% (single weights to CSR, and 8x1 blocks to BSR), then stored
compactly and quantized.

Data: the source text of Python standard-library modules (``numlstm.demo``'s
corpus, always available offline), last 10% of each file held out. Each row
of the table is one model: validation loss, weight bytes, the peak memory of
one training step measured from scratch (weights, gradients, Adam state,
workspace, batch: everything, by tracemalloc), and the time of a training
step and of a streaming step at batch 1.

``python -m benchmarks --only pruning`` (about 4 minutes on 2 cores);
``--quick`` for a tiny smoke run.
"""

import math
import os
import time
import tracemalloc

import numpy as np

from benchmarks.common import machine_info, machine_markdown, write_results
from numlstm import demo, prune
from numlstm.lstm import LSTM
from numlstm.quantize import quantize

NAME = "pruning"
FULL = {"hidden": 128, "seq_len": 32, "batch": 16, "dense_steps": 600, "prune_steps": 400,
        "valid_chars": 20_000, "bench_steps": 500}
QUICK = {"hidden": 16, "seq_len": 8, "batch": 4, "dense_steps": 6, "prune_steps": 10,
         "valid_chars": 400, "bench_steps": 20}
LR = 1e-2
SEED = 0


class _Trainer:
    """The demo's Adam and softmax head around one model; survives re-stored
    weights by remapping Adam's moments with ``prune.remap_state``."""

    def __init__(self, model, head, lr):
        self.model, self.head = model, head
        self.opt = demo._optimizer(model, head, lr)
        self.names = sorted(model.parameters())

    def on_prune(self, positions):
        n = len(self.names)
        m = prune.remap_state(dict(zip(self.names, self.opt.m[:n], strict=True)), positions)
        v = prune.remap_state(dict(zip(self.names, self.opt.v[:n], strict=True)), positions)
        params, grads = self.model.parameters(), self.model.grad_arrays()
        self.opt.params[:n] = [params[k] for k in self.names]
        self.opt.grads[:n] = [grads[k] for k in self.names]
        self.opt.m[:n] = [m[k] for k in self.names]
        self.opt.v[:n] = [v[k] for k in self.names]


def _train(trainer, data, eye, rng, cfg, steps, pruner=None):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        demo.train_step(trainer.model, trainer.head, trainer.opt, eye, data, rng,
                        cfg["seq_len"], cfg["batch"])
        times.append(time.perf_counter() - t0)
        if pruner is not None:
            pruner.step()
    return float(np.median(times[len(times) // 2:])) * 1e3  # ms, after warm-up


def _training_peak(state, head, eye, data, cfg, V):
    """tracemalloc peak of building the model and Adam and taking one step."""
    rng = np.random.default_rng(SEED)
    tracemalloc.start()
    model = LSTM(V, cfg["hidden"])
    model.load_state_dict(state)
    opt = demo._optimizer(model, head, LR)
    demo.train_step(model, head, opt, eye, data, rng, cfg["seq_len"], cfg["batch"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _row(label, model, head, eye, v_inp, v_tgt, bench, train_ms, peak, y_float=None):
    """One table row; ``y_float`` (the float model's validation outputs) adds
    the largest output difference of this (quantized) model from it."""
    loss = demo.evaluate(model, head, eye, v_inp, v_tgt)
    err = None if y_float is None else float(np.max(np.abs(model(eye[v_inp])[0] - y_float)))
    return {"model": label, "nats": loss, "bits": loss / math.log(2), "max_abs_dy": err,
            "sparsity": model.sparsity()["overall"], "weight_bytes": model.weight_bytes(),
            "train_peak_bytes": peak, "train_ms": train_ms,
            "stream_us": demo.stream_us_per_step(model, eye, bench)}


def run(quick=False, out_dir=None, log=print):
    cfg = QUICK if quick else FULL
    machine = machine_info()  # its load average is the one at the start
    rng = np.random.default_rng(SEED)
    train_text, valid_text, names = demo.load_corpus()
    train, valid, alphabet = demo.encode(train_text, valid_text)
    valid = valid[:cfg["valid_chars"] + 1]
    V = len(alphabet)
    eye = np.eye(V, dtype=np.float32)
    v_inp, v_tgt = demo.stream_split(valid, 16)
    bench = train[:cfg["bench_steps"]]

    log(f"dense: {cfg['dense_steps']} steps, H={cfg['hidden']}, V={V}")
    model = LSTM(V, cfg["hidden"], seed=SEED)
    head = demo.Head(cfg["hidden"], V, rng)
    base = _Trainer(model, head, LR)
    dense_ms = _train(base, train, eye, rng, cfg, cfg["dense_steps"])
    dense_state, head_state = model.state_dict(), (head.W.copy(), head.b.copy())
    rows = [_row("dense", model, head, eye, v_inp, v_tgt, bench, dense_ms,
                 _training_peak(dense_state, head, eye, train, cfg, V))]

    for sparsity, block in ((0.9, None), (0.95, None), (0.9, (8, 1))):
        kind = "CSR" if block is None else f"BSR {block[0]}x{block[1]}"
        log(f"gradual pruning to {sparsity:.0%} ({kind}): {cfg['prune_steps']} steps")
        model = LSTM(V, cfg["hidden"])
        model.load_state_dict(dense_state)
        head.W[...], head.b[...] = head_state
        trainer = _Trainer(model, head, LR / 3)
        pruner = prune.GradualPruner(model, sparsity, frequency=max(1, cfg["prune_steps"] // 16),
                                     num_updates=8, block=block, on_prune=trainer.on_prune)
        ms = _train(trainer, train, eye, rng, cfg, cfg["prune_steps"], pruner)
        label = f"{sparsity:.0%} {kind}"
        state = model.state_dict()
        peak = _training_peak(state, head, eye, train, cfg, V)
        rows.append(_row(label, model, head, eye, v_inp, v_tgt, bench, ms, peak))
        if block is None:
            y_float = model(eye[v_inp])[0]
            for values in (None, "float16", "int8"):
                quantize(model, values)
                name = {None: "uint16 indices", "float16": "float16", "int8": "int8"}[values]
                rows.append(_row(f"{label}, {name}", model, head, eye, v_inp, v_tgt, bench,
                                 None, None, y_float))
            model.load_state_dict(state)  # back to float for the next branch

    result = {"name": NAME, "quick": quick, "config": cfg, "machine": machine,
              "data": f"{train.size:,} training / {valid.size:,} validation characters of "
                      f"stdlib source ({', '.join(names)})",
              "rows": rows}
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def markdown(result):
    rows = result["rows"]
    dense = rows[0]
    lines = [f"### Pruning and quantization on real data{' (quick)' if result['quick'] else ''}",
             "",
             f"Character LSTM (H={result['config']['hidden']}) on {result['data']}. "
             "Validation loss; weight bytes of the LSTM (biases included); peak memory "
             "of one training step (T={seq_len}, B={batch}) built from scratch, by "
             "tracemalloc; median training-step time; streaming step at batch 1. "
             "Compact and quantized rows are the pruned model above them re-stored "
             "(inference only when quantized); max |Δy| is their largest LSTM output "
             "difference from it on the validation text."
             .format(**result["config"]),
             "",
             "| model | sparsity | bits/char | max \\|Δy\\| | weight bytes | x smaller | "
             "train peak | train ms/step | stream µs/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["train_peak_bytes"] is None else f"{r['train_peak_bytes'] / 2**20:.2f} MiB"
        ms = "-" if r["train_ms"] is None else f"{r['train_ms']:.1f}"
        err = "-" if r["max_abs_dy"] is None else f"{r['max_abs_dy']:.1e}"
        lines.append(f"| {r['model']} | {r['sparsity']:.1%} | {r['bits']:.3f} | {err} | "
                     f"{r['weight_bytes']:,} | {dense['weight_bytes'] / r['weight_bytes']:.1f} | "
                     f"{peak} | {ms} | {r['stream_us']:.1f} |")
    lines += ["", "Command: `python -m benchmarks --only pruning` (one process; each training "
              "peak is measured from a fresh model).", ""]
    lines += machine_markdown(result["machine"], "numba and BLAS defaults")
    return "\n".join(lines) + "\n"

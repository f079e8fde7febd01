"""A streaming anomaly detector over a long series, in constant memory.

A small LSTM forecaster (the one of ``forecast_co2.py``, trained on Mauna
Loa's weekly CO2 changes) reads a long stream one value at a time through
``model.stream()``: the held-out weeks repeated to ``--steps`` values, with
spikes of 6 standard deviations injected at random into 0.1% of them. A value
is flagged when it is further from the forecast than ``--threshold`` times
the forecaster's residual spread on the training weeks.

Reported: detection precision and recall, µs per step, and the memory held
(tracemalloc) at the start, middle and end of the stream, which does not grow.

    python examples/anomaly_stream.py                    # 10^6 steps, ~1 minute
    python examples/anomaly_stream.py --steps 10000      # shorter
"""

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forecast_co2 as fc  # noqa: E402  (the sibling example: data and training)

import numlstm  # noqa: E402
from numlstm.layers import Linear  # noqa: E402


def build_stream(z_test, steps, rate, rng):
    """The test changes repeated to ``steps`` values, with +-6 sigma spikes."""
    series = np.resize(z_test, steps).astype(np.float32)
    anomalies = rng.random(steps) < rate
    anomalies[:fc.WINDOW] = False  # let the state settle first
    series[anomalies] += np.float32(6) * rng.choice(np.float32([-1, 1]), anomalies.sum())
    return series, anomalies


def detect(model, head, series, threshold, sigma, checkpoints):
    """Stream the series; return flags (n,), µs per step and memory samples."""
    s = model.stream(1)
    w = head.parameters()["weight"][0]  # (H,)
    b = float(head.parameters()["bias"][0])
    x = np.zeros((1, 1), np.float32)
    flags = np.zeros(series.size, bool)
    at = sorted(checkpoints)
    held = np.zeros(len(at), np.int64)  # preallocated: sampling must not allocate
    h = np.zeros((1, s.model.output_size), s.model.dtype)  # each step's output, reused
    pred = 0.0
    t0 = time.perf_counter()
    for t in range(series.size):
        value = series[t]
        flags[t] = abs(value - pred) > threshold * sigma
        # An anomalous value is not fed to the model as is: the forecast stands in.
        x[0, 0] = pred if flags[t] else value
        s.step(x, out=h)
        pred = float(np.dot(h[0], w)) + b
        if t in checkpoints:
            held[at.index(t)] = tracemalloc.get_traced_memory()[0]
    us = (time.perf_counter() - t0) / series.size * 1e6
    return flags, us, list(zip(at, held.tolist(), strict=True))


def run(steps=1_000_000, hidden=16, epochs=20, threshold=5.0, rate=1e-3, seed=0, log=print):
    rng = np.random.default_rng(seed)
    co2 = fc.load_series()
    diff = np.diff(co2)
    split = int(0.8 * diff.size)
    z = diff / diff[:split].std()
    x_tr, y_tr = fc.windows(z, fc.WINDOW, split)
    model = numlstm.LSTM(1, hidden, seed=seed)
    head = Linear(hidden, 1, seed=seed)
    fc.train(model, head, x_tr, y_tr, epochs, 1e-2, seed)
    sigma = float(np.std(fc.predict(model, head, x_tr)[:, 0] - y_tr[:, 0]))
    log(f"forecaster trained ({epochs} epochs); residual sigma {sigma:.3f}")

    series, truth = build_stream(z[split:], steps, rate, rng)
    checkpoints = {steps // 10, steps // 2, steps - 1}
    tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flags, us, memory = detect(model, head, series, threshold, sigma, checkpoints)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.stop()
    hits = int(np.sum(flags & truth))
    return {"steps": steps, "hidden": hidden, "injected": int(truth.sum()),
            "flagged": int(flags.sum()), "true_positives": hits,
            "precision": hits / max(int(flags.sum()), 1), "recall": hits / max(int(truth.sum()), 1),
            "us_per_step": us, "memory": memory, "peak_rss_growth_kib": rss_after - rss_before}


def format_result(r):
    lines = [f"streaming anomaly detection: {r['steps']:,} steps, LSTM H={r['hidden']}, batch 1",
             f"injected {r['injected']:,}  flagged {r['flagged']:,}  "
             f"precision {r['precision']:.3f}  recall {r['recall']:.3f}",
             f"{r['us_per_step']:.1f} µs per step (Python loop included)",
             "memory held by Python/NumPy allocations (tracemalloc) during the stream:"]
    lines += [f"  after step {t:>9,}: {nbytes:>9,} B" for t, nbytes in r["memory"]]
    lines.append(f"peak resident memory growth during the stream: {r['peak_rss_growth_kib']} KiB")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threshold", type=float, default=5.0)
    args = p.parse_args(argv)
    r = run(steps=args.steps, epochs=args.epochs, threshold=args.threshold)
    print(format_result(r))
    return r


if __name__ == "__main__":
    main()

"""Where a batch-1 step's time goes: each weight's product alone, the rest.

``python -m benchmarks.step_parts`` builds I=64, H=256 models (dense, CSR at
90, 95 and 99.9% sparsity, BSR 8x1 at 90 and 99.9%), and on one thread
(``config.STEP_THREADS = "1"``) times, in µs: the per-step product of W_ih
and of W_hh alone, through the step layout a stream uses (``K.matmul``,
consecutive calls); a ``Stream.step``, and the compiled call it makes (its
plan alone, without the Python side); and a time step of a whole-sequence
forward (T=1000, B=1). At 99.9% sparsity the products are nearly empty, so
those rows show a step's fixed costs. It prints a Markdown table and the
machine. No targets: it explains the suite's figures (the closing notes of
issue 12 cite it as the floors of a step).
"""

import os
import time

import numpy as np
from numba import njit

import numlstm
from benchmarks.common import machine_info, machine_markdown
from numlstm import config
from numlstm.kernels import cpu as K
from numlstm.kernels.cpu import _cell_step

I, H, T = 64, 256, 1000
MODELS = (("dense", None), ("90% CSR", ("csr", 0.9)), ("95% CSR", ("csr", 0.95)),
          ("99.9% CSR", ("csr", 0.999)), ("90% BSR 8x1", ("bsr", 0.9)),
          ("99.9% BSR 8x1", ("bsr", 0.999)))


@njit(cache=True)
def _products(out, x, w0, data, indices, indptr, reps):
    for _ in range(reps):
        K.matmul(out, x, w0, data, indices, indptr)


@njit(cache=True)
def _cells(reps, c_new, act, h, c, rec, bias_ih, bias_hh):
    for _ in range(reps):
        _cell_step((), c_new, act, h, c, rec, bias_ih, bias_hh)


def _best(fn, reps, repeats=7):
    """Best µs per repetition of ``fn(reps)`` over ``repeats`` timings."""
    fn(1)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(reps)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def _product_us(weight, rng):
    x = rng.standard_normal((1, weight.shape[1])).astype(np.float32)
    out = np.empty((1, weight.shape[0]), np.float32)
    args = weight.step_args()
    return _best(lambda n: _products(out, x, *args, n), 2000)


def _model(prune):
    m = numlstm.LSTM(I, H, seed=0)
    if prune is not None and prune[0] == "csr":
        numlstm.prune.magnitude(m, prune[1])
    elif prune is not None:
        numlstm.prune.blocks(m, prune[1])
    return m


def main():
    machine = machine_info()
    config.STEP_THREADS = "1"
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((T, 1, I)).astype(np.float32)
    print(f"I={I}, H={H}, one thread; µs (best of 7)\n")
    print("| model | W_ih product | W_hh product | `Stream.step` | its compiled call |"
          " sequence step (T=1000, B=1) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, prune in MODELS:
        m = _model(prune)
        w = m.weights()
        p_ih = _product_us(w["weight_ih_l0"], rng)
        p_hh = _product_us(w["weight_hh_l0"], rng)
        s = m.stream(1)

        def steps(n, s=s):
            for t in range(n):
                s.step(xs[t % T])

        run, plan = s._run, s._plan  # the compiled call a step makes

        def calls(n, run=run, plan=plan):
            for _ in range(n):
                run(plan)

        step, call = _best(steps, 1000), _best(calls, 1000)
        seq = _best(lambda n, m=m: [m(xs) for _ in range(n)], 1, repeats=5) / T
        print(f"| {name} | {p_ih:.2f} | {p_hh:.2f} | {step:.2f} | {call:.2f} | {seq:.2f} |")
    act = rng.standard_normal(4 * H).astype(np.float32)
    zeros = np.zeros(4 * H, np.float32)
    c_new, h, c = (np.zeros(H, np.float32) for _ in range(3))
    cell = _best(lambda n: _cells(n, c_new, act, h, c, zeros, zeros, zeros), 100_000, 3)
    print(f"\nThe cell update alone (H={H}): {cell:.2f} µs.\n")
    machine["load_average_at_end"] = list(os.getloadavg())
    print("\n".join(machine_markdown(machine, "one thread a step (STEP_THREADS=1)")))


if __name__ == "__main__":
    main()

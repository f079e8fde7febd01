"""Time one product of each per-step execution layout, to fit ``config.STEP_COSTS``.

``python -m benchmarks.layout_costs`` times ``on = W x`` for one row x through
every layout ``numlstm.layouts.build`` can choose (windowed SELL, SELL, a
dense copy, CSR row loops) on LSTM-shaped weights (G x K: 1024 x 64, 1024 x
256, 4096 x 1024) at several sparsities, prints µs per product beside what
the cost model predicts, and which layout it picks. On a new kind of CPU,
refit the constants of its ISA in ``numlstm/config.py`` from these figures.
"""

import time

import numpy as np
import scipy.sparse as sp
from numba import njit

from numlstm import layouts
from numlstm import weights as W
from numlstm.kernels import cpu as K
from numlstm.kernels.vector_ir import WINDOW

SHAPES = ((1024, 64), (1024, 256), (4096, 1024))
DENSITIES = (0.5, 0.2, 0.1, 0.05)


@njit(cache=True)
def _repeat(out, x, w0, data, indices, indptr, reps):
    for _ in range(reps):
        K.matmul(out, x, w0, data, indices, indptr)


def _time(args, reps=500, repeats=5):
    _repeat(*args, 1)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _repeat(*args, reps)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def main():
    rng = np.random.default_rng(0)
    kinds = ["windows", "sell", "dense", "csr"] if WINDOW else ["sell", "dense", "csr"]
    print("| R x K | density | " + " | ".join(f"{k} µs (model)" for k in kinds)
          + " | chosen |")
    print("|---|---:|" + "---:|" * len(kinds) + "---|")
    for R, C in SHAPES:
        for density in DENSITIES:
            m = sp.random_array((R, C), density=density, format="csr", dtype=np.float32,
                                rng=rng)
            m.sort_indices()
            weight = W.from_value(m, "w", (R, C), np.float32)
            x = rng.standard_normal((1, C)).astype(np.float32)
            out = np.empty((1, R), np.float32)
            cells = []
            for kind in kinds:
                layout = layouts.build(weight, kind)
                args = weight.layout_args(layout)
                cells.append(f"{_time((out, x) + args):.2f} "
                             f"({layouts.cost(weight, layout) / 1e3:.2f})")
            chosen = type(weight.step_layout()).__name__
            print(f"| {R} x {C} | {density} | " + " | ".join(cells) + f" | {chosen} |")


if __name__ == "__main__":
    main()

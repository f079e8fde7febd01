"""GPU benchmark: numlstm on the device beside torch.nn.LSTM (cuDNN), same card.

``python -m benchmarks.gpu [--quick] [--out DIR]``: needs a CUDA GPU (it says
so and writes nothing without one; it is not part of ``python -m benchmarks``,
which runs on any machine). Case of the GPU issue: float32, I = 256,
H = 1024, T = 1000, batch 1 and 4; numlstm dense and 90% magnitude-pruned CSR,
with the host-looped recurrence and the one-launch persistent kernel
(``numlstm.backends.cuda.PERSISTENT_FORWARD``); torch.nn.LSTM on the dense weights
(and on the pruned weights as dense matrices, for the agreement check).
Figures: µs per time step of a whole-sequence forward, median of the repeats
after warm-up, timed with ``cuda.synchronize()`` around each call; every
numlstm figure also as a ratio to cuDNN's in the same run.
``benchmarks/gpu_device.sh`` runs the GPU tests and this on a lent machine.
"""

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.common import machine_info, stats, write_results

NAME = "gpu"
FULL = {"I": 256, "H": 1024, "T": 1000, "batches": (1, 4), "repeats": 10, "warmup": 3}
QUICK = {"I": 32, "H": 64, "T": 50, "batches": (1,), "repeats": 3, "warmup": 1}
TARGETS = {"csr90": 0.5, "dense": 1.5}  # time / cuDNN: 90% CSR >= 2x faster, dense within 1.5x


def _timed(fn, arg, sync, repeats, warmup):
    """Seconds of each of ``repeats`` calls fn(arg) after ``warmup`` calls,
    the device synchronised around each."""
    for _ in range(warmup):
        fn(arg)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        sync()
        times.append(time.perf_counter() - t)
    return times


def run(quick=False, out_dir=None, log=print):
    from numba import cuda

    import numlstm
    import numlstm.backends.cuda
    from numlstm import prune

    if not cuda.is_available() or numba_simulated():
        log("no CUDA GPU here (or the simulator is on): the GPU benchmark needs one")
        return None
    import torch

    cfg = QUICK if quick else FULL
    I, H, T = cfg["I"], cfg["H"], cfg["T"]
    rows = []
    for B in cfg["batches"]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        ref = torch.nn.LSTM(I, H).cuda().eval()
        xt = torch.from_numpy(x).cuda()
        with torch.no_grad():
            peer = _timed(ref, xt, torch.cuda.synchronize, cfg["repeats"], cfg["warmup"])
        peer_us = stats(peer)["median"] * 1e6 / T
        rows.append({"system": "torch.nn.LSTM (cuDNN)", "B": B, "us_per_step": peer_us})
        for kind in ("dense", "csr90"):
            model = numlstm.LSTM(I, H)
            model.load_state_dict({k: v.detach().cpu().numpy()
                                   for k, v in ref.state_dict().items()})
            if kind == "csr90":
                prune.magnitude(model, 0.9)
            with torch.no_grad():  # the peer on the same (pruned) weights
                pruned = torch.nn.LSTM(I, H).cuda()
                pruned.load_state_dict({k: torch.from_numpy(np.asarray(
                    v.toarray() if hasattr(v, "toarray") else v)).cuda()
                    for k, v in model.state_dict().items()})
                want = pruned(xt)[0].cpu().numpy()
            model.to("cuda")
            xd = cuda.to_device(x)
            for persistent in (False, True):
                numlstm.backends.cuda.PERSISTENT_FORWARD = persistent
                times = _timed(model.forward, xd, cuda.synchronize, cfg["repeats"],
                               cfg["warmup"])
                us = stats(times)["median"] * 1e6 / T
                got = model.forward(xd, to_host=True)[0]
                rows.append({"system": f"numlstm {kind}" + (" persistent" if persistent else ""),
                             "B": B, "us_per_step": us, "ratio_to_cudnn": us / peer_us,
                             "target": TARGETS[kind],
                             "max_abs_diff": float(np.abs(got - want).max())})
                log(rows[-1])
            numlstm.backends.cuda.PERSISTENT_FORWARD = False
    gpu = cuda.get_current_device().name
    result = {"name": NAME, "quick": quick, "config": dict(cfg), "rows": rows,
              "machine": machine_info() | {"gpu": gpu.decode() if isinstance(gpu, bytes)
                                           else str(gpu)}}
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    result["files"] = write_results(NAME, result, out_dir, markdown)
    return result


def numba_simulated():
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


def markdown(result):
    lines = [f"# GPU: numlstm beside cuDNN on {result['machine']['gpu']}", "",
             "| system | B | µs/step | time / cuDNN | target | max \\|Δy\\| |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_cudnn']:.2f}" if "ratio_to_cudnn" in r else "–"
        target = f"≤ {r['target']}" if "target" in r else "–"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "–"
        lines.append(f"| {r['system']} | {r['B']} | {r['us_per_step']:.1f} | {ratio} | "
                     f"{target} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(quick=args.quick, out_dir=args.out)
    if result is not None:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A worker process of the suite: ``python -m benchmarks.suite.worker JOB``.

JOB is a JSON object: ``kind`` (stream | sequence | train | bytes | limits |
scale | export | memory), ``system`` and the paths and sizes that kind needs. The worker times
one system after warm-up, writes the outputs that agreement is checked on to
``job["out"]`` (.npz), and prints one JSON line: times and facts.
"""

import json
import os
import sys
import time

import numpy as np

from benchmarks.common import REPO, peak_rss_mib, time_repeats
from benchmarks.suite import runners as R
from benchmarks.suite.config import BLOCK, SCIPY_VARIANTS, TORCH_THREADS
from benchmarks.suite.data import NAMES, build, effective, variant_weights


def _runner(system, w, B, job=None):
    """The runner of a system: numlstm from its model file, peers from weights ``w``."""
    if system == "numlstm":
        return R.Numlstm.load(job["model"], B)
    if system == "torch-cell":
        return R.TorchCell(w, B)
    if system == "torch-lstm":
        return R.TorchLSTM(w, B)
    if system == "ort":
        return R.Ort(w, B)
    if system == "numpy":
        return R.NumpyLoop(w, B)
    if system.startswith("scipy-"):
        return R.ScipyLoop(w, B, block=BLOCK if "bsr" in system else None)
    raise ValueError(f"unknown system {system!r}")


def _timed_variant(job):
    """The storage kind a system is timed on (peers: dense, scipy: its pattern)."""
    system = job["system"]
    if system == "numlstm":
        return job["variant"]
    if system.startswith("scipy-"):
        return system.removeprefix("scipy-")
    return "dense"


def _output_variants(job):
    """The kinds whose outputs a system computes for the agreement check."""
    system = job["system"]
    if system == "numlstm":
        return [job["variant"]]
    if system.startswith("scipy-"):
        return SCIPY_VARIANTS[system]
    return job["variants"]


def _facts(runner, w):
    if isinstance(runner, R.Numlstm):
        return {"weight_bytes": int(runner.model.weight_bytes())}
    if isinstance(runner, R.ScipyLoop):
        return {"weight_bytes": int(runner.weight_bytes())}
    return {"weight_bytes": int(sum(a.nbytes for a in w.values()))}


def job_stream(job, data):
    """Case a: one call per step at batch 1, T steps; µs per step."""
    x = data["x"][:, :1]  # (T, 1, I)
    T = x.shape[0]
    xs = [x[t] for t in range(T)]  # (1, I) views, made before timing
    v = _timed_variant(job)
    w = variant_weights(data, v)
    t0 = time.perf_counter()
    runner = _runner(job["system"], w, 1, job)
    inp = runner.inputs(xs)
    runner.stream(inp[:2])
    first = time.perf_counter() - t0
    times = time_repeats(lambda: runner.stream(inp), job["repeats"], job["warmup"])
    outs = {}
    for ov in _output_variants(job):
        r = runner if ov == v else _runner(job["system"], variant_weights(data, ov), 1, job)
        outs[ov] = r.stream_outputs(r.inputs(xs))[:, 0]  # (T, H)
    return {"times": [t / T * 1e6 for t in times], "unit": "µs/step", "first_call_s": first,
            **_facts(runner, w)}, outs


def job_sequence(job, data):
    """Case b: one call for the whole sequence, at each batch size; µs per step."""
    T = data["x"].shape[0]
    v = _timed_variant(job)
    res, outs = {"unit": "µs/step", "batches": {}}, {}
    for B in job["B"]:
        x = np.ascontiguousarray(data["x"][:, :B])  # (T, B, I)
        w = variant_weights(data, v)
        runner = _runner(job["system"], w, B, job)
        inp = runner.seq_input(x)
        times = time_repeats(lambda r=runner, i=inp: r.sequence(i), job["repeats"],
                             job["warmup"])
        res["batches"][str(B)] = {"times": [t / T * 1e6 for t in times], **_facts(runner, w)}
        for ov in _output_variants(job):
            r = runner if ov == v else _runner(job["system"], variant_weights(data, ov), B, job)
            outs[f"{ov}/B={B}"] = np.asarray(r.sequence(r.seq_input(x)))
    return res, outs


# ----------------------------------------------------------------------------
# Case c: training
# ----------------------------------------------------------------------------

def _dense_grad(weight, g):
    """A sparse weight's gradient (values-shaped) scattered to its dense shape."""
    if isinstance(weight, np.ndarray):
        return np.asarray(g), np.ones(weight.shape, bool)
    kind = type(weight)
    grad = kind((np.asarray(g), weight.indices, weight.indptr), shape=weight.shape).toarray()
    mask = kind((np.ones(np.shape(g), bool), weight.indices, weight.indptr),
                shape=weight.shape).toarray()
    return grad, mask


def _train_numlstm(job, x, dy):
    import numlstm

    model = numlstm.load(job["model"])

    def step():
        model.zero_grad()
        y = model.forward(x, training=True)[0]
        model.backward(dy)
        return y

    def outputs():
        y = step()
        sd, grads = model.state_dict(), model.grad_arrays()
        out = {"y": np.asarray(y)}
        for n in NAMES:
            out[n], mask = _dense_grad(sd[n], grads[n]) if n.startswith("weight") else \
                (np.asarray(grads[n]), None)
            if mask is not None:
                out[f"mask/{n}"] = mask
        return out

    return step, {job["variant"]: outputs}, {"weight_bytes": int(model.weight_bytes())}


def _train_torch(job, data, x, dy):
    import torch

    torch.set_num_threads(TORCH_THREADS)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

    def make(w):
        lstm = R.TorchLSTM(w, x.shape[1]).lstm

        def step():
            lstm.zero_grad()
            y, _ = lstm(xt)
            y.backward(dyt)
            return y

        def outputs():
            y = step()
            out = {"y": y.detach().numpy().copy()}
            out.update({n: p.grad.numpy().copy() for n, p in lstm.named_parameters()})
            return out

        return step, outputs

    step, _ = make(variant_weights(data, "dense"))
    outs = {v: make(variant_weights(data, v))[1] for v in job["variants"]}
    return step, outs, {"weight_bytes": int(sum(variant_weights(data, "dense")[n].nbytes
                                                for n in NAMES))}


def _train_reference(job, data, x, dy):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from reference import lstm_backward, lstm_forward

    H = data["dense/weight_hh_l0"].shape[1]

    def make(w):
        def outputs():
            y, _, _, cache = lstm_forward(w, x, hidden_size=H)
            grads = lstm_backward(cache, dy)[3]
            return {"y": y, **grads}

        return outputs

    step = make(variant_weights(data, "dense"))
    outs = {v: make(variant_weights(data, v)) for v in job["variants"]}
    return step, outs, {"weight_bytes": int(sum(variant_weights(data, "dense")[n].nbytes
                                                for n in NAMES)), "dtype": "float64"}


def job_train(job, data):
    """Case c: one forward + backward over x (T, B, I) with dy (T, B, H); ms per step."""
    x, dy = data["x"], data["dy"]
    system = job["system"]
    t0 = time.perf_counter()
    if system == "numlstm":
        step, makers, facts = _train_numlstm(job, x, dy)
    elif system == "torch-lstm":
        step, makers, facts = _train_torch(job, data, x, dy)
    else:
        step, makers, facts = _train_reference(job, data, x, dy)
    step()
    first = time.perf_counter() - t0
    times = time_repeats(step, job["repeats"], job["warmup"])
    outs = {}
    for v, fn in makers.items():
        for k, a in fn().items():
            outs[f"{v}/{k}"] = np.asarray(a)
    return {"times": [t * 1e3 for t in times], "unit": "ms/step", "first_call_s": first,
            **facts}, outs


# ----------------------------------------------------------------------------
# Cases e, g and the machine's limits
# ----------------------------------------------------------------------------

def job_bytes(job, data):
    """Case e: bytes of every storage kind, in memory and on disk; the floor is
    the stored values alone (read from the saved file, in their stored type)."""
    import numlstm

    rows = {}
    for v, path in job["models"].items():
        m = numlstm.load(path)
        with np.load(path) as f:
            values = sum(f[f"{n}.values"].nbytes for n in ("weight_ih_l0", "weight_hh_l0"))
            stored = sum(f[f"{n}.values"].size for n in ("weight_ih_l0", "weight_hh_l0"))
            biases = sum(f[n].nbytes for n in ("bias_ih_l0", "bias_hh_l0"))
        rows[v] = {"weight_bytes": int(m.weight_bytes()), "file_bytes": os.path.getsize(path),
                   "stored_weights": int(stored), "values_bytes": int(values + biases),
                   "sparsity": float(m.sparsity()["overall"])}
    return {"rows": rows}, {}


def job_limits(job, data):
    """GEMM rate (float32 n x n, NumPy's BLAS threads) and memory bandwidth
    (``np.copyto`` of a large array: bytes read plus bytes written)."""
    n, reps = job["n"], job["repeats"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    gemm = time_repeats(lambda: np.matmul(a, b, out=c), reps, 1)
    src = np.ones(job["mib"] * 2**20 // 4, np.float32)
    dst = np.zeros_like(src)
    copy = time_repeats(lambda: np.copyto(dst, src), reps * 2, 1)
    return {"gemm_gflops": [2 * n**3 / t / 1e9 for t in gemm],
            "bandwidth_gbs": [2 * src.nbytes / t / 1e9 for t in copy],
            "blas": _blas_threads()}, {}


def _blas_threads():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{"api": i.get("internal_api"), "threads": i.get("num_threads")}
            for i in threadpool_info()]


def _scale_runner(system, w, s):
    if system == "numlstm-dense":
        return R.Numlstm(build(w), 1)
    if system == "numlstm-csr":
        return R.Numlstm(build(w, pruning="magnitude", sparsity=s), 1)
    if system == "numlstm-bsr":
        return R.Numlstm(build(w, pruning="blocks", sparsity=s), 1)
    if system == "scipy-csr":
        return R.ScipyLoop(effective(build(w, pruning="magnitude", sparsity=s)), 1)
    if system == "scipy-bsr":
        return R.ScipyLoop(effective(build(w, pruning="blocks", sparsity=s)), 1, block=BLOCK)
    return _runner(system, w, 1)


def job_scale(job, data):
    """Case g: µs per streaming step at each (H, sparsity) point."""
    points = {}
    outs = {}
    for H, s in job["points"]:
        w = {n: data[f"H{H}/{n}"] for n in NAMES}
        x = data["x"]
        xs = [x[t] for t in range(x.shape[0])]
        runner = _scale_runner(job["system"], w, s)
        inp = runner.inputs(xs)
        times = time_repeats(lambda r=runner, i=inp: r.stream(i), job["repeats"],
                             job["warmup"])
        key = f"H={H},s={s:g}"
        points[key] = {"H": H, "sparsity": s, "times": [t / len(xs) * 1e6 for t in times],
                       **_facts(runner, w)}
        outs[key] = runner.stream_outputs(inp)[:, 0]
    return {"points": points, "unit": "µs/step"}, outs


def job_memory(job, data):
    """Case d: ``benchmarks.memory``'s training worker, started from this lean
    process: a child's ``ru_maxrss`` starts at its parent's peak, and the
    suite's parent has held every earlier case's outputs."""
    from benchmarks.common import run_worker

    return run_worker("benchmarks.memory", job["args"], job["timeout"], job["label"]), {}


def job_export(job, data):
    """torch's ONNX export of each kind's effective weights, to ``job["files"]``."""
    for v, path in job["files"].items():
        with open(path, "wb") as f:
            f.write(R.export_onnx(variant_weights(data, v)))
    return {}, {}


JOBS = {"memory": job_memory, "export": job_export, "stream": job_stream,
        "sequence": job_sequence, "train": job_train, "bytes": job_bytes,
        "limits": job_limits, "scale": job_scale}


def main(argv=None):
    job = json.loads((argv or sys.argv[1:])[0])
    data = dict(np.load(job["data"])) if job.get("data") else {}
    res, outs = JOBS[job["kind"]](job, data)
    if job.get("out"):
        np.savez(job["out"], **outs)
    if job["kind"] != "memory":  # that result is the memory worker's own
        res["peak_rss_mib"] = peak_rss_mib()
    if job["system"].startswith("numlstm"):
        import numba

        res["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    print(json.dumps(res))


if __name__ == "__main__":
    main()

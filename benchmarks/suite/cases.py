"""The parent's side of each case: write the shared inputs, run every system
in its own worker process, compare. Each ``case_<letter>(ctx)`` returns the
case's result dict: ``tables`` of rows (one per system) and comparisons, and
``skipped`` systems with the reason.
"""

import importlib.util
import os
import subprocess

import numpy as np

from benchmarks import memory
from benchmarks.common import REPO, run_worker
from benchmarks.suite import compare as C
from benchmarks.suite.config import (
    BLOCK,
    CASES,
    LABELS,
    PEERS,
    QUICK_ENV,
    SCIPY_VARIANTS,
    TRAINABLE,
    VARIANTS,
)
from benchmarks.suite.data import dense_weights, write_variants

WORKER = "benchmarks.suite.worker"


class Context:
    """What every case needs: sizes, a scratch folder, the log, the machine's
    limits, which peers are importable, and inputs made once."""

    def __init__(self, cfg, tmp, log, quick, limits=None):
        self.cfg, self.tmp, self.log, self.quick = cfg, tmp, log, quick
        self.limits = limits
        self.timeout = 300 if quick else 900
        self.env = dict(QUICK_ENV) if quick else {}
        self._made = {}
        have = {m: importlib.util.find_spec(m) is not None
                for m in ("torch", "onnx", "onnxruntime")}
        no_torch = None if have["torch"] else "torch is not importable"
        no_ort = next((f"{m} is not importable" for m in ("onnxruntime", "torch", "onnx")
                       if not have[m]), None)
        ref = os.path.join(REPO, "tests", "reference.py")
        self.absent = {"torch-cell": no_torch, "torch-lstm": no_torch, "ort": no_ort,
                       "reference": None if os.path.exists(ref) else "tests/reference.py "
                       "is absent (not an installed package's file)"}

    def map(self, fn, items):
        """``[fn(item) for item in items]``; two at a time in a quick run (a smoke
        test: the machine's two cores shared by two workers), one at a time in a
        measurement."""
        if not self.quick or len(items) < 2:
            return [fn(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(fn, items))

    def path(self, name):
        return os.path.join(self.tmp, name)

    def once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def run_job(ctx, job, label, result, outputs=None):
    """Run a worker; on failure record the reason in ``result["skipped"]`` and
    return None. With ``outputs`` (a dict), load the worker's .npz into
    ``outputs[label]``."""
    import json
    import time

    t0 = time.perf_counter()
    try:
        res = run_worker(WORKER, [json.dumps(job)], ctx.timeout, label, env=ctx.env)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result["skipped"][label] = f"worker failed: {exc}"
        ctx.log(f"  {label}: FAILED ({str(exc).strip().splitlines()[-1]})")
        return None
    if outputs is not None and job.get("out") and os.path.exists(job["out"]):
        with np.load(job["out"]) as f:
            outputs[label] = dict(f)
    ctx.log(f"    {label}: {time.perf_counter() - t0:.1f} s")
    return res


def run_jobs(ctx, items, result, outputs):
    """``run_job`` for every (label, job) of ``items`` (see ``Context.map``);
    {label: its result or None}."""
    res = ctx.map(lambda item: run_job(ctx, item[1], item[0], result, outputs), items)
    return dict(zip([label for label, _ in items], res, strict=True))


def _skip(ctx, system, result):
    why = ctx.absent.get(system)
    if why:
        result["skipped"][system] = why
        ctx.log(f"  {system}: skipped ({why})")
    return why


# ----------------------------------------------------------------------------
# Shared inputs
# ----------------------------------------------------------------------------

def _ab_models(ctx):
    """The a/b/e/f model files (I, H of case a) of every storage kind."""
    def make():
        c = ctx.cfg["a"]
        w = dense_weights(c["I"], c["H"])
        paths, arrays, facts = write_variants(ctx.tmp, "ab", w, VARIANTS)
        return paths, arrays, facts
    return ctx.once("ab", make)


def _inputs(ctx, case, x, extra=None):
    """``<case>.npz``: the effective weights of every kind, x and ``extra``."""
    def make():
        _, arrays, _ = _ab_models(ctx)
        path = ctx.path(f"{case}.npz")
        np.savez(path, x=x, **arrays, **(extra or {}))
        return path
    return ctx.once(f"inputs-{case}", make)


def _systems(ctx, result, peers):
    """(label, job fields) of every numlstm kind and every importable peer."""
    out = [(v, {"system": "numlstm", "variant": v}) for v in VARIANTS]
    for p in peers:
        if p in VARIANTS or p == "csr-f32":  # numlstm's own kinds as columns: listed
            continue
        if p == "scipy":
            out += [(s, {"system": s}) for s in sorted(SCIPY_VARIANTS)]
        elif not _skip(ctx, p, result):
            out.append((p, {"system": p}))
    return out


def _new(title, config):
    return {"title": title, "config": config, "tables": {}, "skipped": {}}


# ----------------------------------------------------------------------------
# a, b: inference
# ----------------------------------------------------------------------------

def case_a(ctx):
    c = ctx.cfg["a"]
    result = _new(CASES["a"], {**c, "B": 1})
    paths, _, facts = _ab_models(ctx)
    rng = np.random.default_rng([0, 1])
    data = _inputs(ctx, "a", rng.standard_normal((c["T"], 1, c["I"]), dtype=np.float32))
    table = {"unit": "µs/step", "rows": {}}
    outs = {}
    systems = _systems(ctx, result, PEERS["a"])
    done = run_jobs(ctx, [(label, {
        "kind": "stream", "data": data, "out": ctx.path(f"a_{label}.npz"),
        "repeats": c["repeats"], "warmup": c["warmup"], "variants": list(VARIANTS),
        "model": paths.get(fields.get("variant")), **fields}) for label, fields in systems],
        result, outs)
    for label, fields in systems:
        res = done[label]
        if res is None:
            continue
        kind = "numlstm" if fields["system"] == "numlstm" else "peer"
        r = table["rows"][label] = C.row(LABELS[label], kind, res["times"], table["unit"],
                                         weight_bytes=res["weight_bytes"],
                                         first_call_s=res["first_call_s"])
        nnz = _nnz(label, facts)
        C.set_floor(r, ctx.limits, *C.step_work(res["weight_bytes"], nnz, 1, c["I"], c["H"]),
                    1e6)
    C.compare("a", "stream", table, PEERS["a"], outs)
    result["tables"]["stream"] = table
    return result


def _nnz(label, facts):
    """Stored weights a system multiplies by: its kind's (scipy: its pattern's)."""
    v = label.removeprefix("scipy-") if label.startswith("scipy-") else label
    return sum(facts.get(v, facts["dense"])["nnz"].values())


def case_b(ctx):
    c = ctx.cfg["b"]
    result = _new(CASES["b"], c)
    paths, _, facts = _ab_models(ctx)
    rng = np.random.default_rng([0, 2])
    data = _inputs(ctx, "b", rng.standard_normal((c["T"], max(c["B"]), c["I"]),
                                                 dtype=np.float32))
    result["skipped"]["torch-cell"] = ("`nn.LSTMCell` has no whole-sequence call; its "
                                       "Python loop is case a's")
    tables = {f"B={B}": {"unit": "µs/step", "rows": {}} for B in c["B"]}
    outs = {}
    systems = _systems(ctx, result, PEERS["b"])
    done = run_jobs(ctx, [(label, {
        "kind": "sequence", "data": data, "out": ctx.path(f"b_{label}.npz"),
        "repeats": c["repeats"], "warmup": c["warmup"], "variants": list(VARIANTS),
        "B": c["B"], "model": paths.get(fields.get("variant")), **fields})
        for label, fields in systems], result, outs)
    for label, fields in systems:
        res = done[label]
        if res is None:
            continue
        kind = "numlstm" if fields["system"] == "numlstm" else "peer"
        for B in c["B"]:
            e = res["batches"][str(B)]
            r = tables[f"B={B}"]["rows"][label] = C.row(LABELS[label], kind, e["times"],
                                                        "µs/step",
                                                        weight_bytes=e["weight_bytes"])
            # Per step: the recurrent weights' share read once (the input
            # projection can be one product over the whole sequence).
            nbytes = e["weight_bytes"] * c["H"] / (c["I"] + c["H"])
            C.set_floor(r, ctx.limits, *C.step_work(nbytes, _nnz(label, facts), B, c["I"],
                                                    c["H"]), 1e6)
    for B in c["B"]:
        C.compare("b", f"B={B}", tables[f"B={B}"], PEERS["b"], outs,
                  out_key=lambda v, B=B: f"{v}/B={B}")
        result["tables"][f"B={B}"] = tables[f"B={B}"]
    return result


# ----------------------------------------------------------------------------
# c, d: training
# ----------------------------------------------------------------------------

def case_c(ctx):
    c = ctx.cfg["c"]
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    result = _new(CASES["c"], c)
    w = dense_weights(I, H)
    paths, arrays, facts = write_variants(ctx.tmp, "c", w, TRAINABLE)
    rng = np.random.default_rng([0, 3])
    x = rng.standard_normal((T, B, I), dtype=np.float32)
    dy = rng.standard_normal((T, B, H), dtype=np.float32) / np.float32(np.sqrt(T * B))
    data = ctx.path("c.npz")
    np.savez(data, x=x, dy=dy, **arrays)
    for v in VARIANTS:
        if v not in TRAINABLE:
            result["skipped"][v] = ("float16 / int8 values are for inference: "
                                    "numlstm refuses to train them (TypeError)")
    for p in ("ort", "scipy", "numpy"):
        result["skipped"][p] = {"ort": "ONNX Runtime's CPU provider runs inference only",
                                "scipy": "no scipy training loop (no autograd)",
                                "numpy": "the float64 NumPy reference is the NumPy peer "
                                         "for training"}[p]
    table = {"unit": "ms/step", "rows": {}}
    outs = {}
    systems = [(v, {"system": "numlstm", "variant": v}) for v in TRAINABLE]
    systems += [(p, {"system": p}) for p in PEERS["c"]
                if p not in VARIANTS and not _skip(ctx, p, result)]
    def job(label, fields):
        ref = fields["system"] == "reference"
        return {"kind": "train", "data": data, "out": ctx.path(f"c_{label}.npz"),
                "repeats": c["reference_repeats"] if ref else c["repeats"],
                "warmup": 0 if ref else c["warmup"], "variants": list(TRAINABLE),
                "model": paths.get(fields.get("variant")), **fields}

    done = run_jobs(ctx, [(label, job(label, fields)) for label, fields in systems],
                    result, outs)
    for label, fields in systems:
        ref = fields["system"] == "reference"
        res = done[label]
        if res is None:
            continue
        kind = "numlstm" if fields["system"] == "numlstm" else "peer"
        r = table["rows"][label] = C.row(LABELS[label], kind, res["times"], "ms/step",
                                         weight_bytes=res["weight_bytes"],
                                         first_call_s=res["first_call_s"])
        if ref:
            r["dtype"] = "float64"
        nnz = sum(facts.get(label, facts["dense"])["nnz"].values())
        C.set_floor(r, ctx.limits, *C.train_work(T, B, I, H, nnz), 1e3)
    C.compare("c", "train", table, PEERS["c"], outs, diff=C.train_diff)
    result["tables"]["train"] = table
    return result


def case_d(ctx):
    """Reuses ``benchmarks.memory``'s training worker (its T, B, I, H), each
    started from a lean worker process (see ``worker.job_memory``)."""
    c = ctx.cfg["d"]
    result = _new(CASES["d"], {**c, "B": memory.B, "I": memory.I, "H": memory.H})
    train = {}
    items = []
    for T in c["T"]:
        for system in memory.SYSTEMS:
            key = f"{system}@T={T}"
            if system == "torch" and ctx.absent["torch-lstm"]:
                result["skipped"][key] = ctx.absent["torch-lstm"]
                continue
            items.append((T, system, key))

    def one(item):
        T, system, key = item
        repeats = c["repeats_at_max_T"] if T == max(c["T"]) else c["repeats"]
        args = ["--worker", "train", "--system", system, "--T", str(T),
                "--repeats", str(repeats)]
        res = run_job(ctx, {"kind": "memory", "system": "numpy", "args": args,
                            "timeout": ctx.timeout, "label": key}, key, result)
        if res is not None and "peak_increase_mib" in res:
            ctx.log(f"    {key}: peak +{res['peak_increase_mib']:.1f} MiB")
        return res

    for (T, system, key), res in zip(items, ctx.map(one, items), strict=True):
        if res is None:
            continue
        if "skipped" in res:
            result["skipped"][key] = res["skipped"]
            continue
        train.setdefault(str(T), {})[system] = res
    sub = {"train": train, "stream": {}, "config": {"T": c["T"]}}
    memory._compare(sub)
    result["train"] = train
    for T, row in train.items():
        T = int(T)
        # The floor: what any implementation returns (y (T, B, H) and
        # dx (T, B, I)) and the flops of one forward + backward.
        mem_floor = T * memory.B * (memory.H + memory.I) * C.F32 / 2**20
        nbytes, flops = C.train_work(T, memory.B, memory.I, memory.H,
                                     4 * memory.H * (memory.I + memory.H))
        for e in row.values():
            e["memory_floor_mib"] = mem_floor
            e["memory_to_floor"] = e["peak_increase_mib"] / mem_floor
            f = C.floor_s(ctx.limits, nbytes, flops)
            if f:
                e["time_floor_s"] = f
                e["time_to_floor"] = e["step_s"]["median"] / f
    return result


# ----------------------------------------------------------------------------
# e: weight bytes; g: scaling
# ----------------------------------------------------------------------------

def case_e(ctx):
    c = ctx.cfg["e"]
    result = _new(CASES["e"], c)
    paths, _, _ = _ab_models(ctx)
    res = run_job(ctx, {"kind": "bytes", "system": "numlstm", "models": paths}, "numlstm",
                  result)
    I, H = ctx.cfg["a"]["I"], ctx.cfg["a"]["H"]
    torch_bytes = (4 * H * (I + H) + 8 * H) * C.F32  # nn.LSTM's float32 parameters
    result["torch_bytes"] = torch_bytes
    onnx = ctx.once("onnx", lambda: _export_onnx(ctx, result))
    if onnx:
        result["onnx_file_bytes"] = os.path.getsize(onnx["dense"])
    if res is not None:
        for v, r in res["rows"].items():
            r["label"] = LABELS[v]
            r["to_torch"] = r["weight_bytes"] / torch_bytes
            r["to_floor"] = r["weight_bytes"] / r["values_bytes"]
            if ctx.limits:
                r["read_floor_us"] = r["weight_bytes"] / (ctx.limits["bandwidth_gbs"] * 1e3)
        result["rows"] = res["rows"]
    return result


def _export_onnx(ctx, result):
    """torch's ONNX export of the dense and 90% CSR weights (for e and f), or None."""
    if ctx.absent["ort"]:
        return None
    _, arrays, _ = _ab_models(ctx)
    data = _inputs(ctx, "export", np.zeros((1, 1, ctx.cfg["a"]["I"]), np.float32))
    files = {v: ctx.path(f"ab_{v}.onnx") for v in ("dense", "csr90")}
    res = run_job(ctx, {"kind": "export", "system": "ort", "data": data, "files": files},
                  "onnx export", result)
    return files if res is not None else None


G_SYSTEMS = {  # system: (sparsity in the H sweep, in the sparsity sweep?)
    "numlstm-dense": (0.0, False), "numlstm-csr": (0.9, True), "numlstm-bsr": (0.9, True),
    "torch-cell": (0.0, False), "scipy-csr": (0.9, True), "scipy-bsr": (None, True),
}
G_LABELS = {"numlstm-dense": "numlstm dense", "numlstm-csr": "numlstm CSR",
            "numlstm-bsr": "numlstm BSR 8x1", "torch-cell": "torch `nn.LSTMCell` loop",
            "scipy-csr": "scipy CSR loop", "scipy-bsr": "scipy BSR 8x1 loop"}


def case_g(ctx):
    c = ctx.cfg["g"]
    result = _new(CASES["g"], {**c, "B": 1, "block": list(BLOCK)})
    Hs = sorted(set(c["H"]) | {c["sparsity_H"]})
    rng = np.random.default_rng([0, 4])
    arrays = {f"H{H}/{n}": a for H in Hs for n, a in dense_weights(c["I"], H).items()}
    data = ctx.path("g.npz")
    np.savez(data, x=rng.standard_normal((c["T"], 1, c["I"]), dtype=np.float32), **arrays)
    del arrays
    outs, points, items = {}, {}, []
    for system, (s_h, in_sweep) in G_SYSTEMS.items():
        if system == "torch-cell" and _skip(ctx, system, result):
            continue
        pts = [(H, s_h) for H in c["H"]] if s_h is not None else []
        if in_sweep:
            pts += [(c["sparsity_H"], s) for s in c["sparsity"]]
        else:
            pts.append((c["sparsity_H"], 0.0))
        items.append((system, {"kind": "scale", "system": system, "data": data,
                               "out": ctx.path(f"g_{system}.npz"), "points": sorted(set(pts)),
                               "repeats": c["repeats"], "warmup": c["warmup"]}))
    done = run_jobs(ctx, items, result, outs)
    for system, _ in items:
        res = done[system]
        if res is None:
            continue
        for p in res["points"].values():
            p["stats"] = C.stats(p.pop("times"))
            H, s = p["H"], p["sparsity"]
            nnz = (1 - s) * 4 * H * (c["I"] + H)
            f = C.floor_s(ctx.limits, *C.step_work(p["weight_bytes"], nnz, 1, c["I"], H))
            if f:
                p["floor"] = f * 1e6
                p["to_floor"] = p["stats"]["median"] / p["floor"]
        points[system] = res["points"]
    result["points"] = points
    result["comparisons"] = _g_compare(points, outs)
    result["crossover"] = _crossover(points, c)
    return result


def _g_compare(points, outs):
    """At every point: numlstm kinds against torch (same H, dense weights: time
    only unless dense) and against the scipy loop of the same pattern."""
    comps = []
    pairs = [("numlstm-dense", "torch-cell", True), ("numlstm-csr", "torch-cell", False),
             ("numlstm-bsr", "torch-cell", False), ("numlstm-csr", "scipy-csr", True),
             ("numlstm-bsr", "scipy-bsr", True), ("numlstm-csr", "numlstm-dense", False),
             ("numlstm-bsr", "numlstm-dense", False)]
    for mine, peer, agree in pairs:
        for key, p in points.get(mine, {}).items():
            H = p["H"]
            pk = key if peer != "torch-cell" and peer != "numlstm-dense" else f"H={H},s=0"
            q = points.get(peer, {}).get(pk)
            if q is None:
                continue
            c = {"system": mine, "peer": peer, "point": key, "H": H, "sparsity": p["sparsity"],
                 "speedup": q["stats"]["median"] / p["stats"]["median"]}
            if agree and key in outs.get(mine, {}) and pk in outs.get(peer, {}):
                c["max_abs_diff"] = C.max_diff(outs[mine][key], outs[peer][pk])
            comps.append(c)
    return comps


def _crossover(points, c):
    """The smallest sparsity at which each sparse kind beats dense numlstm at sparsity_H."""
    dense = points.get("numlstm-dense", {}).get(f"H={c['sparsity_H']},s=0")
    out = {}
    for system in ("numlstm-csr", "numlstm-bsr"):
        faster = [p["sparsity"] for p in points.get(system, {}).values()
                  if dense and p["H"] == c["sparsity_H"]
                  and p["stats"]["median"] < dense["stats"]["median"]]
        out[system] = min(faster) if faster else None
    return out

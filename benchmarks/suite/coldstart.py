"""Case f: cold start. A fresh ``python -c`` process imports its library,
loads a saved model and runs one step; the figure is the wall time from
starting the process to reading its first line of output, which the child
prints right after that step. The child also reports, from inside, the time
of its imports, of loading, and of the first step.

numlstm runs with a warm kernel cache (a priming run first, then the timed
ones) and with an empty one (``NUMBA_CACHE_DIR`` set to a fresh folder for
every run: every kernel the step needs is compiled). Peers: torch
(``nn.LSTMCell`` built and filled from an .npz) and ONNX Runtime (a session on
torch's export). The floor: ``python -c "import numpy"``.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import REPO, worker_env
from benchmarks.suite import compare as C
from benchmarks.suite.config import CASES, COLD_START_TARGET_S, LABELS, ORT_THREADS, TORCH_THREADS

_HEAD = """import time
t0 = time.perf_counter()
import sys, json, os
"""
_TAIL = """t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "step_s": t3 - t2}), flush=True)
np.save(sys.argv[3], np.asarray(y, dtype=np.float32).reshape(-1))
"""
CHILD = {
    "numlstm": _HEAD + """import numpy as np
import numlstm
t1 = time.perf_counter()
model = numlstm.load(sys.argv[1])
stream = model.stream(batch_size=1)
x = np.load(sys.argv[2])
t2 = time.perf_counter()
y = stream.step(x)
""" + _TAIL,
    "torch-cell": _HEAD + f"""import numpy as np
import torch
torch.set_num_threads(int(os.environ.get("NUMLSTM_SUITE_THREADS", "{TORCH_THREADS}")))
t1 = time.perf_counter()
w = np.load(sys.argv[1])
I, H = w["weight_ih_l0"].shape[1], w["weight_hh_l0"].shape[1]
cell = torch.nn.LSTMCell(I, H)
with torch.no_grad():
    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, n).copy_(torch.from_numpy(w[n + "_l0"]))
x = torch.from_numpy(np.load(sys.argv[2]))
t2 = time.perf_counter()
with torch.no_grad():
    y = cell(x)[0].numpy()
""" + _TAIL,
    "ort": _HEAD + f"""import numpy as np
import onnxruntime as ort
t1 = time.perf_counter()
opts = ort.SessionOptions()
opts.intra_op_num_threads = int(os.environ.get("NUMLSTM_SUITE_THREADS", "{ORT_THREADS}"))
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])[None]
H = sess.get_inputs()[1].shape[2]
h = np.zeros((1, 1, H), np.float32)
t2 = time.perf_counter()
y = sess.run(None, {{"x": x, "h0": h, "c0": h}})[0]
""" + _TAIL,
}
FLOOR = "import numpy; print(1, flush=True)"


def _spawn(code, args, env=None):
    """(seconds from start to the first output line, the child's JSON or None).
    ``env`` adds environment variables."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=worker_env(env), cwd=REPO)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"cold-start child failed (exit {proc.returncode}): {err[-2000:]}")
    try:
        inside = json.loads(line)
    except ValueError:
        inside = None
    return seconds, inside


def _runs(code, args, repeats, empty_cache=False, env=None):
    walls, inside = [], []
    for _ in range(repeats):
        if empty_cache:
            with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
                s, i = _spawn(code, args, {**(env or {}), "NUMBA_CACHE_DIR": cache})
        else:
            s, i = _spawn(code, args, env)
        walls.append(s)
        inside.append(i)
    parts = {k: float(np.median([i[k] for i in inside])) for k in inside[0]} \
        if isinstance(inside[0], dict) else {}
    return walls, parts


def case_f(ctx, models, weights_npz, onnx_files):
    """``models``: numlstm files per kind; ``weights_npz``: effective weights
    per kind (``<kind>/<name>``); ``onnx_files``: torch's export per kind or None."""
    c = ctx.cfg["f"]
    result = {"title": CASES["f"], "config": c, "tables": {}, "skipped": {},
              "target_s": COLD_START_TARGET_S,
              "kernel_cache": "off (NUMLSTM_NO_CACHE is set)"
              if os.environ.get("NUMLSTM_NO_CACHE") else "on"}
    x_path = ctx.path("f_x.npy")
    np.save(x_path, np.random.default_rng([0, 5]).standard_normal((1, c["I"]),
                                                                   dtype=np.float32))
    w_paths = {}
    with np.load(weights_npz) as data:
        for v in ("dense", "csr90"):
            w_paths[v] = ctx.path(f"f_{v}_weights.npz")
            np.savez(w_paths[v], **{n.split("/", 1)[1]: data[n] for n in data.files
                                    if n.startswith(f"{v}/")})
    table = {"unit": "s", "rows": {}}
    outs = {}
    floor_walls, _ = _runs(FLOOR, [], max(c["warm_repeats"], 2), env=ctx.env)
    floor = float(np.median(floor_walls))
    result["floor_s"] = floor
    plan = []
    for v in ("dense", "csr90"):
        plan.append((f"{v}", "numlstm", models[v], v, False))
    for v in c["cold_kinds"]:
        plan.append((f"{v} (empty cache)", "numlstm", models[v], v, True))
    for v in ("dense", "csr90"):
        if not ctx.absent["torch-cell"]:
            plan.append((f"torch-cell/{v}", "torch-cell", w_paths[v], v, False))
        if onnx_files:
            plan.append((f"ort/{v}", "ort", onnx_files[v], v, False))
    for p in ("torch-cell", "ort"):
        if ctx.absent[p] or (p == "ort" and not onnx_files):
            result["skipped"][p] = ctx.absent[p] or "the ONNX export failed"
    def one(item):
        label, system, model, v, empty = item
        out = ctx.path(f"f_{label.replace('/', '_').replace(' ', '_')}.npy")
        args = [model, x_path, out]
        peer_twin = system != "numlstm" and v != "dense"  # agreement only: run once
        try:
            if not empty and not (peer_twin or (ctx.quick and system != "numlstm")):
                _spawn(CHILD[system], args, ctx.env)  # prime the cache; warm the disk
            reps = 1 if peer_twin else c["cold_repeats"] if empty else c["warm_repeats"]
            walls, parts = _runs(CHILD[system], args, reps, empty, ctx.env)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["skipped"][label] = str(exc)
            ctx.log(f"    f {label}: FAILED")
            return None
        ctx.log(f"    f {label}: {np.median(walls):.2f} s")
        return walls, parts, np.load(out)

    for (label, system, _, v, empty), done in zip(plan, ctx.map(one, plan), strict=True):
        if done is None:
            continue
        walls, parts, y = done
        outs.setdefault(system, {})[v] = y
        if system != "numlstm" and v != "dense":
            continue
        key = label if system == "numlstm" else system
        kind = "numlstm" if system == "numlstm" else "peer"
        name = LABELS[v] if system == "numlstm" else LABELS[system]
        r = table["rows"][key] = C.row(name + (", empty kernel cache" if empty else
                                               ", warm kernel cache" if kind == "numlstm"
                                               else ""), kind, walls, "s", **parts)
        r["variant"] = v
        r["empty_cache"] = empty
        r["floor"] = floor
        r["to_floor"] = r["stats"]["median"] / floor
    _compare(table, outs)
    warm = table["rows"].get("dense")
    if warm:
        result["target_met"] = bool(warm["stats"]["median"] < COLD_START_TARGET_S)
    result["tables"]["cold"] = table
    return result


def _compare(table, outs):
    rows = table["rows"]
    comps = table["comparisons"] = []
    for key, r in rows.items():
        if r["kind"] != "numlstm":
            continue
        v = r["variant"]
        for peer in ("torch-cell", "ort"):
            if peer not in rows:
                continue
            c = {"system": key, "peer": peer, "column": peer,
                 "speedup": rows[peer]["stats"]["median"] / r["stats"]["median"]}
            mine, theirs = outs.get("numlstm", {}).get(v), outs.get(peer, {}).get(v)
            if mine is not None and theirs is not None:
                c["max_abs_diff"] = C.max_diff(mine, theirs)
            comps.append(c)

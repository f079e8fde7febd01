"""Ratios to peers, numerical agreement, the issue's targets and the floors
that the machine's limits imply.

speedup = peer median / numlstm median, from the same run (> 1: numlstm faster).
A floor is the time the machine's measured limits allow at best: bytes that
must move / bandwidth, or flops / GEMM rate, whichever is larger. It is a
DRAM floor: weights that stay in cache between steps can beat it.
"""

import numpy as np

from benchmarks.common import stats
from benchmarks.suite.config import F32_PEER, SCIPY_PEER, TARGETS

F32 = 4


def row(label, kind, values, unit, **facts):
    """A table row: a system's label, kind ("numlstm" | "peer"), statistics."""
    return {"label": label, "kind": kind, "unit": unit, "stats": stats(values), **facts}


def floor_s(limits, nbytes, flops):
    """Seconds the machine needs at least to move ``nbytes`` and do ``flops``."""
    if not limits:
        return None
    return max(nbytes / (limits["bandwidth_gbs"] * 1e9), flops / (limits["gemm_gflops"] * 1e9))


def set_floor(r, limits, nbytes, flops, scale):
    """Attach the floor (in the row's unit: seconds times ``scale``) and the
    median's distance from it."""
    f = floor_s(limits, nbytes, flops)
    if f is None:
        return
    r["floor"] = f * scale
    r["floor_bytes"], r["floor_flops"] = float(nbytes), float(flops)
    r["to_floor"] = r["stats"]["median"] / r["floor"]


def step_work(weight_bytes, nnz, B=1, I=0, H=0):
    """(bytes, flops) of one LSTM step: every weight read once, 2 flops per
    stored weight and sequence, plus x_t read and h_t, c_t written."""
    return weight_bytes + B * (I + 2 * H) * F32, 2.0 * nnz * B


def train_work(T, B, I, H, nnz):
    """(bytes, flops) of one forward + backward: the three weight products
    (forward, input/state gradients, weight gradients: 6 flops per stored
    weight, step and sequence); the tape (gates 4H, c and h per step and
    sequence) written once and read once; x, dy read and y, dx written."""
    tape = T * B * 6 * H * F32
    io = T * B * 2 * (I + H) * F32
    return 2 * tape + io, 6.0 * T * B * nnz


def max_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {a.shape} and {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def peer_key(variant, peer):
    """The row a numlstm kind is compared with for a peer column; None when
    the column does not apply (no scipy loop for dense weights)."""
    if peer == "scipy":
        return SCIPY_PEER.get(variant)
    return F32_PEER.get(variant) if peer == "csr-f32" else peer


def target(case, table, system, peer):
    for c, t, s, p, bound in TARGETS:
        if (c, t, s, p) == (case, table, system, peer):
            return bound
    return None


def compare(case, table_name, table, peers, outputs, out_key=None, diff=None):
    """Fill ``table["comparisons"]``: every numlstm row against every peer
    column that applies, with the agreement of their outputs on the same
    weights. ``outputs[system][key]`` holds each system's outputs;
    ``out_key(variant)`` names the output compared (default the variant);
    ``diff(mine, theirs, key)`` returns the agreement figures (default the
    max |difference| of ``[key]``). A missing output leaves them out."""
    rows = table["rows"]
    comps = table.setdefault("comparisons", [])
    for system, r in rows.items():
        if r["kind"] != "numlstm":
            continue
        for peer in peers:
            pk = peer_key(system, peer)
            if pk is None or pk not in rows or pk == system:
                continue
            c = {"system": system, "peer": pk, "column": peer,
                 "speedup": rows[pk]["stats"]["median"] / r["stats"]["median"]}
            key = out_key(system) if out_key else system
            mine, theirs = outputs.get(system, {}), outputs.get(pk, {})
            try:
                c.update(diff(mine, theirs, key) if diff else
                         {"max_abs_diff": max_diff(mine[key], theirs[key])})
            except KeyError:
                pass
            bound = target(case, table_name, system, peer)
            if bound is not None:
                c["target"] = bound
                c["met"] = bool(c["speedup"] >= bound)
            comps.append(c)


def train_diff(mine, theirs, variant):
    """Agreement of a training step: y's max |difference|, and every gradient's
    max |difference| on the stored positions relative to the peer's largest
    |gradient| there (the largest over parameters)."""
    y = max_diff(mine[f"{variant}/y"], theirs[f"{variant}/y"])
    worst = 0.0
    for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        a = np.asarray(mine[f"{variant}/{n}"], np.float64)
        b = np.asarray(theirs[f"{variant}/{n}"], np.float64)
        mask = mine.get(f"{variant}/mask/{n}")
        if mask is not None:
            a, b = a[mask], b[mask]
        scale = max(float(np.max(np.abs(b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return {"max_abs_diff": y, "grad_rel_diff": worst}

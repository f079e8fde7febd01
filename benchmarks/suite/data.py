"""Shared inputs: weights, storage kinds and data, made once by the parent.

Every storage kind is made through numlstm's public API (``numlstm.prune``,
``numlstm.quantize``) from the same dense weights and saved with
``numlstm.save``; numlstm workers ``numlstm.load`` it. Peers get each kind's
effective weights as dense float32 arrays (quantized values dequantized), so
that every system computes with the same numbers.
"""

import copy

import numpy as np

from benchmarks.suite.config import BLOCK, SEED, VARIANTS

NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def dense_weights(I, H, seed=SEED):
    """torch's initialisation, U(-1/sqrt(H), 1/sqrt(H)), float32."""
    rng = np.random.default_rng([seed, I, H])
    k = np.float32(1 / np.sqrt(H))
    shapes = {"weight_ih_l0": (4 * H, I), "weight_hh_l0": (4 * H, H),
              "bias_ih_l0": (4 * H,), "bias_hh_l0": (4 * H,)}
    return {n: (rng.random(s, dtype=np.float32) * 2 - 1) * k for n, s in shapes.items()}


def build(weights, variant=None, *, pruning=None, sparsity=0.0, values=None, indices=None):
    """A numlstm.LSTM with ``weights`` stored as ``variant`` (a key of VARIANTS),
    or as given by ``pruning`` ("magnitude" | "blocks"), ``sparsity`` and the
    quantize arguments ``values`` ("keep" | "float16" | "int8") and ``indices``."""
    import numlstm

    if variant is not None:
        pruning, sparsity, values, indices = VARIANTS[variant]
    I, H = weights["weight_ih_l0"].shape[1], weights["weight_hh_l0"].shape[1]
    model = numlstm.LSTM(I, H)
    model.load_state_dict(dict(weights))
    if pruning == "magnitude":
        numlstm.prune.magnitude(model, sparsity)
    elif pruning == "blocks":
        numlstm.prune.blocks(model, sparsity, block=BLOCK)
    if indices is not None:
        numlstm.quantize.quantize(model, values=None if values == "keep" else values,
                                  indices=indices)
    return model


def effective(model):
    """The weights a model computes with, as dense float32 arrays."""
    dense = copy.deepcopy(model).to_dense().state_dict()
    return {n: np.ascontiguousarray(dense[n], dtype=np.float32) for n in NAMES}


def nnz(model):
    """Stored weight values (biases excluded), per weight."""
    sd = model.state_dict()
    out = {}
    for n in ("weight_ih_l0", "weight_hh_l0"):
        w = sd[n]
        out[n] = int(w.size if isinstance(w, np.ndarray) else w.data.size)
    return out


def write_variants(folder, tag, weights, variants):
    """Save every variant's model to ``<folder>/<tag>_<variant>.npz``; return
    ({variant: path}, {f"{variant}/{name}": effective array}, {variant: facts})."""
    import os

    import numlstm

    paths, arrays, facts = {}, {}, {}
    for v in variants:
        model = build(weights, v)
        paths[v] = os.path.join(folder, f"{tag}_{v}.npz")
        numlstm.save(model, paths[v])
        for n, a in effective(model).items():
            arrays[f"{v}/{n}"] = a
        facts[v] = {"weight_bytes": int(model.weight_bytes()), "nnz": nnz(model),
                    "file_bytes": os.path.getsize(paths[v]),
                    "sparsity": float(model.sparsity()["overall"])}
    return paths, arrays, facts


def variant_weights(data, variant):
    """A variant's effective weights from a loaded inputs .npz."""
    return {n: data[f"{variant}/{n}"] for n in NAMES}

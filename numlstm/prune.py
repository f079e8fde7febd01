"""Pruning: magnitude and threshold pruning to CSR, block pruning to BSR, and
Zhu & Gupta's gradual schedule.

Every function prunes a model's weight matrices in place (biases are never
touched) and returns, per weight it changed, ``positions``: for each value
of the new storage, its index in the old storage's flat values (``-1`` for a
value the old storage did not hold). ``remap_state`` uses it to carry any
per-value state (an optimizer's moments) over to the new pattern.

Pruning only removes: a weight that is already sparse is pruned among the
values it stores, so each new pattern is a subset of the previous one.
Targets are exact counts: a (R, K) weight pruned to sparsity s keeps
``round((1 - s) * R * K)`` values (fewer if it stored fewer).

Scopes
------
``per_matrix``: every weight matrix reaches the target on its own.
``global``: one magnitude threshold across all selected matrices (Han et al.).
``per_row``: every row keeps the same count, ``round((1 - s) * K)``: the
load-balanced sparsity of ESE (Han et al. 2017), which keeps the rows a
parallel kernel hands to each thread equally long.
"""

import numpy as np

from numlstm import weights as weights_mod
from numlstm.lstm import LSTM

SCOPES = ("per_matrix", "global", "per_row")
KINDS = ("ih", "hh", "hr")


def magnitude(model, sparsity, *, scope="per_matrix", weights=KINDS):
    """Keep the largest-magnitude weights so that a ``sparsity`` fraction is gone.

    Parameters
    ----------
    model : numlstm.LSTM
    sparsity : float in [0, 1)
    scope : {"per_matrix", "global", "per_row"}
    weights : iterable of {"ih", "hh", "hr"}
        Which weight matrices to prune (default all).

    Returns
    -------
    dict[str, np.ndarray]
        ``positions`` of every pruned weight (see the module docstring).
    """
    _check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    grids = _grids(model, weights)
    keep = {}
    if scope == "global":
        scores = np.concatenate([g.scores.ravel() for g in grids.values()])
        mask = _top(scores, _count(sparsity, scores.size))
        offset = 0
        for name, g in grids.items():
            keep[name] = mask[offset:offset + g.scores.size].reshape(g.scores.shape)
            offset += g.scores.size
    elif scope == "per_row":
        for name, g in grids.items():
            k = _count(sparsity, g.scores.shape[1])
            order = np.argsort(-g.scores, axis=1, kind="stable")[:, :k]
            mask = np.zeros(g.scores.shape, bool)
            np.put_along_axis(mask, order, True, axis=1)
            keep[name] = mask & g.stored
    else:
        for name, g in grids.items():
            keep[name] = _top(g.scores.ravel(), _count(sparsity, g.scores.size)) \
                .reshape(g.scores.shape)
    return _install(model, {name: _to_csr(grids[name], keep[name], model.dtype)
                            for name in grids})


def threshold(model, threshold, *, weights=KINDS):
    """Drop every weight with ``|w| < threshold`` (the simplest pruning).

    Returns ``positions`` per weight, as ``magnitude`` does.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
            or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    grids = _grids(model, weights)
    return _install(model, {name: _to_csr(g, g.scores >= threshold, model.dtype)
                            for name, g in grids.items()})


def blocks(model, sparsity, *, block=(8, 1), scope="per_matrix", weights=KINDS):
    """Keep the whole (br, bc) blocks of largest L2 norm, as block-sparse BSR.

    Block pruning (Narang et al. 2017, "Block-Sparse Recurrent Neural
    Networks"): contiguous blocks let a kernel keep ``br`` row sums in
    registers and read ``bc`` inputs in a row, where CSR gathers one value at
    a time. Every pruned matrix's shape must be divisible by the block.

    Parameters
    ----------
    block : (br, bc)
        Block shape, e.g. (8, 1), (1, 8), (4, 4); each side in [1, 32].
    scope : {"per_matrix", "global"}
    sparsity, weights : as in ``magnitude`` (counted in blocks)
    """
    _check_fraction(sparsity, "sparsity")
    if scope not in ("per_matrix", "global"):
        raise ValueError(f"scope must be 'per_matrix' or 'global' for blocks, got {scope!r}")
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, (int, np.integer)) and 1 <= b <= 32 for b in block)):
        raise ValueError(f"block must be a pair (br, bc) of ints in [1, 32], got {block!r}")
    br, bc = (int(b) for b in block)
    grids = _grids(model, weights)
    norms = {}
    for name, g in grids.items():
        R, C = g.values.shape
        if R % br or C % bc:
            raise ValueError(f"{name} has shape {(R, C)}, not divisible by block {(br, bc)}")
        squares = (g.values ** 2).reshape(R // br, br, C // bc, bc).sum(axis=(1, 3))
        any_stored = g.stored.reshape(R // br, br, C // bc, bc).any(axis=(1, 3))
        norms[name] = np.where(any_stored, np.sqrt(squares), -np.inf)
    keep = {}
    if scope == "global":
        flat = np.concatenate([n.ravel() for n in norms.values()])
        mask = _top(flat, _count(sparsity, flat.size))
        offset = 0
        for name, n in norms.items():
            keep[name] = mask[offset:offset + n.size].reshape(n.shape)
            offset += n.size
    else:
        keep = {name: _top(n.ravel(), _count(sparsity, n.size)).reshape(n.shape)
                for name, n in norms.items()}
    return _install(model, {name: _to_bsr(grids[name], keep[name], (br, bc), model.dtype)
                            for name in grids})


def remap_state(state, positions):
    """Carry per-value state (e.g. optimizer moments) over to pruned patterns.

    Parameters
    ----------
    state : dict[str, np.ndarray]
        Arrays shaped like each weight's old values.
    positions : dict[str, np.ndarray]
        What a pruning function returned.

    Returns
    -------
    dict[str, np.ndarray]
        New arrays shaped like the new values (zero where the old storage held
        nothing); names absent from ``positions`` are passed through.
    """
    out = dict(state)
    for name, pos in positions.items():
        if name in state:
            out[name] = remap_values(state[name], pos)
    return out


def remap_values(old, positions):
    """One array shaped like a weight's old values, carried over to its new
    pattern: ``positions`` as a pruning function returned it for that weight."""
    old = np.asarray(old).reshape(-1)
    new = np.zeros(positions.shape, old.dtype)
    held = positions >= 0
    new[held] = old[positions[held]]
    return new


class GradualPruner:
    """Zhu & Gupta's gradual pruning, called once per training step.

    The target sparsity at step t is
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``
    for t in {t0, t0 + dt, ..., t0 + n*dt}: the masks are updated every
    ``dt`` steps, fast at first and slowly near the end; before t0 nothing
    happens, after t0 + n*dt the final sparsity holds. Each update prunes
    among the kept weights only, so the patterns are nested.

    Parameters
    ----------
    model : numlstm.LSTM
    final_sparsity : float in [0, 1)
        s_f.
    initial_sparsity : float
        s_i (default 0).
    begin_step : int
        t0, the first pruning step.
    num_updates : int
        n, the number of mask updates after the first.
    frequency : int
        dt, steps between mask updates.
    scope : {"per_matrix", "global", "per_row"}
    block : (br, bc) or None
        Prune whole blocks into BSR instead of single weights into CSR.
    weights : iterable of {"ih", "hh", "hr"}
    on_prune : callable(positions) or None
        Called after every update with the ``positions`` the pruning
        returned, e.g. to ``remap_state`` an optimizer's moments.

    Notes
    -----
    An update re-stores the weights, so it resets the gradients to zero and
    rebinds streams: call ``step`` after the optimizer step, before the next
    forward.
    """

    def __init__(self, model, final_sparsity, *, initial_sparsity=0.0, begin_step=0,
                 num_updates=10, frequency=100, scope="per_matrix", block=None,
                 weights=KINDS, on_prune=None):
        _check_fraction(final_sparsity, "final_sparsity")
        _check_fraction(initial_sparsity, "initial_sparsity")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity must be <= final_sparsity={final_sparsity}, "
                             f"got {initial_sparsity}")
        for value, label, low in ((begin_step, "begin_step", 0), (num_updates, "num_updates", 1),
                                  (frequency, "frequency", 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        if on_prune is not None and not callable(on_prune):
            raise TypeError(f"on_prune must be callable or None, got {type(on_prune).__name__}")
        self.model = model
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.begin_step, self.num_updates, self.frequency = begin_step, num_updates, frequency
        self.scope, self.block, self.weights = scope, block, tuple(weights)
        self.on_prune = on_prune
        self.t = 0  # the step the next call to ``step`` is

    def __repr__(self):
        return (f"GradualPruner({self.initial_sparsity} -> {self.final_sparsity}, "
                f"begin_step={self.begin_step}, num_updates={self.num_updates}, "
                f"frequency={self.frequency}, scope={self.scope!r}, block={self.block!r}, "
                f"weights={self.weights!r}, t={self.t})")

    def target(self, t):
        """s_t: the sparsity the schedule asks for at step t."""
        span = self.num_updates * self.frequency
        progress = min(max((t - self.begin_step) / span, 0.0), 1.0)
        if t < self.begin_step:
            return 0.0
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) \
            * (1 - progress) ** 3

    def step(self):
        """Advance one training step; prune when the schedule says so.

        Returns
        -------
        dict[str, np.ndarray] or None
            The pruning's ``positions`` when the masks changed this step.
        """
        t = self.t
        self.t += 1
        offset = t - self.begin_step
        if offset < 0 or offset % self.frequency or offset > self.num_updates * self.frequency:
            return None
        s = self.target(t)
        if self.block is None:
            positions = magnitude(self.model, s, scope=self.scope, weights=self.weights)
        else:
            positions = blocks(self.model, s, block=self.block, scope=self.scope,
                               weights=self.weights)
        if self.on_prune is not None:
            self.on_prune(positions)
        return positions


# ----------------------------------------------------------------------------
# Internals: every pruning works on dense (R, K) grids of the stored weights
# ----------------------------------------------------------------------------

class _Grid:
    """A weight seen as dense grids: values, what is stored, and where."""

    def __init__(self, weight):
        if not weight.trainable:
            raise TypeError(f"cannot prune a quantized weight ({weights_mod.describe(weight)}); "
                            "prune before quantizing")
        R, C = weight.shape
        self.values = weight.to_array()  # (R, K)
        self.position = np.full((R, C), -1, np.int64)  # index into the old flat values
        if weight.format == "dense":
            self.position = np.arange(R * C, dtype=np.int64).reshape(R, C)
        elif weight.format == "csr":
            rows = np.repeat(np.arange(R), np.diff(weight.indptr))
            self.position[rows, weight.indices] = np.arange(weight.nnz)
        else:  # bsr
            br, bc = weight.blocksize
            rows = np.repeat(np.arange(R // br), np.diff(weight.indptr))
            r = (rows[:, None, None] * br + np.arange(br)[None, :, None])
            c = (weight.indices[:, None, None].astype(np.int64) * bc
                 + np.arange(bc)[None, None, :])
            self.position[r, c] = np.arange(weight.nnz).reshape(weight.data.shape)
        self.stored = self.position >= 0
        self.scores = np.where(self.stored, np.abs(self.values), -np.inf)


def _grids(model, kinds):
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"weights must be a non-empty subset of {KINDS}, got {kinds!r}")
    return {name: _Grid(w) for name, w in model.weights().items()
            if name.split("_")[1] in kinds}


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _count(sparsity, size):
    """How many of ``size`` values to keep at ``sparsity``."""
    return int(round((1 - sparsity) * size))


def _top(scores, k):
    """Boolean mask of the k largest finite scores (ties: the earlier first)."""
    mask = np.zeros(scores.shape, bool)
    k = min(k, int(np.isfinite(scores).sum()))
    if k > 0:
        mask[np.argsort(-scores, kind="stable")[:k]] = True
    return mask


def _to_csr(grid, keep, dtype):
    rows, cols = np.nonzero(keep & grid.stored)  # row-major: CSR order
    R = grid.values.shape[0]
    indptr = np.zeros(R + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=R), out=indptr[1:])
    weight = weights_mod.CSR(np.ascontiguousarray(grid.values[rows, cols], dtype=dtype),
                   cols.astype(np.int32), indptr, grid.values.shape)
    return weight, grid.position[rows, cols]


def _to_bsr(grid, keep, block, dtype):
    br, bc = block
    R, C = grid.values.shape
    rb, cb = np.nonzero(keep)  # kept blocks, row-major
    def cut(a):  # (R, K) -> the kept (nblocks, br, bc) blocks
        return a.reshape(R // br, br, C // bc, bc).transpose(0, 2, 1, 3)[rb, cb]
    indptr = np.zeros(R // br + 1, np.int32)
    np.cumsum(np.bincount(rb, minlength=R // br), out=indptr[1:])
    weight = weights_mod.BSR(np.ascontiguousarray(cut(grid.values), dtype=dtype),
                             cb.astype(np.int32), indptr, (R, C))
    return weight, np.ascontiguousarray(cut(grid.position))


def _install(model, built):
    params = dict(model.host_params.params)
    positions = {}
    for name, (weight, pos) in built.items():
        params[name] = weight
        positions[name] = pos
    model.install_params(params)
    return positions

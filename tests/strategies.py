"""Hypothesis strategies: LSTM configurations, sparsity, lengths, dtypes."""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from hypothesis import strategies as st


@dataclass
class Config:
    T: int
    B: int
    I: int
    H: int
    P: int
    L: int
    D: int
    bias: bool
    sparsity: float  # fraction of weights set to zero, in [0, 0.99]
    sparse_kinds: tuple  # per weight-name prefix: True = stored as CSR
    lengths: np.ndarray | None  # (B,) in [1, T], any order
    dtype: type
    seed: int

    @property
    def O(self):
        return self.P or self.H

    def model_kwargs(self):
        return dict(num_layers=self.L, bias=self.bias, bidirectional=self.D == 2,
                    proj_size=self.P, dtype=self.dtype, seed=self.seed)


@st.composite
def configs(draw, dtypes=(np.float32, np.float64), max_T=6, max_B=4, max_H=6,
            max_L=2, allow_sparse=True):
    T = draw(st.integers(1, max_T))
    B = draw(st.integers(1, max_B))
    H = draw(st.integers(1, max_H))
    P = draw(st.integers(0, H - 1)) if H > 1 else 0
    with_lengths = draw(st.booleans())
    lengths = (np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
               if with_lengths else None)
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])) if allow_sparse else 0.0
    return Config(
        T=T, B=B, I=draw(st.integers(1, 5)), H=H, P=P, L=draw(st.integers(1, max_L)),
        D=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()), sparsity=sparsity,
        sparse_kinds=tuple(draw(st.booleans()) for _ in range(3)) if allow_sparse
        else (False,) * 3,
        lengths=lengths, dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)))


def sparsify(state, cfg, rng):
    """Zero a ``cfg.sparsity`` fraction of every weight; store the kinds that
    ``cfg.sparse_kinds`` selects (ih, hh, hr) as CSR, the rest dense."""
    out = {}
    for name, w in state.items():
        if name.startswith("weight"):
            w = np.array(w.toarray() if sp.issparse(w) else w)
            w[rng.random(w.shape) < cfg.sparsity] = 0
            kind = ("ih", "hh", "hr").index(name.split("_")[1])
            out[name] = sp.csr_array(w) if cfg.sparse_kinds[kind] else w
        else:
            out[name] = w
    return out


def dense64(state):
    """float64 dense copies, for the reference."""
    return {k: np.asarray(v.toarray() if sp.issparse(v) else v, np.float64)
            for k, v in state.items()}

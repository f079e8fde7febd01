"""Shared test helpers: build a model and inputs from a Config, compare results."""

import numba
import numpy as np
import pytest
import scipy.sparse as sp
from numba.core.runtime import _nrt_python, rtsys
from strategies import sparsify

import numlstm

TOL = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-10)}


def build(cfg):
    """A model with cfg's sparsity and kinds, plus x, h0, c0 and the rng."""
    rng = np.random.default_rng(cfg.seed)
    m = numlstm.LSTM(cfg.I, cfg.H, **cfg.model_kwargs())
    m.load_state_dict(sparsify(m.state_dict(), cfg, rng))
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(cfg.dtype)
    h0 = rng.standard_normal((cfg.D * cfg.L, cfg.B, cfg.O)).astype(cfg.dtype)
    c0 = rng.standard_normal((cfg.D * cfg.L, cfg.B, cfg.H)).astype(cfg.dtype)
    return m, x, h0, c0, rng


def ref_kwargs(cfg):
    return dict(hidden_size=cfg.H, num_layers=cfg.L, proj_size=cfg.P,
                bidirectional=cfg.D == 2, lengths=cfg.lengths)


def assert_grads_match(m, ref_grads, tol):
    """Every gradient equals the reference's; CSR ones on exactly their pattern."""
    state = m.state_dict()
    assert set(m.grad) == set(ref_grads)
    for name, g in m.grad.items():
        expected = ref_grads[name]
        if sp.issparse(state[name]):
            w = state[name]
            assert sp.issparse(g), name
            np.testing.assert_array_equal(g.indices, w.indices, err_msg=name)
            np.testing.assert_array_equal(g.indptr, w.indptr, err_msg=name)
            expected = expected * (w.toarray() != 0)  # a CSR weight trains its pattern only
            np.testing.assert_allclose(g.toarray(), expected, err_msg=name, **tol)
        else:
            np.testing.assert_allclose(g, expected, err_msg=name, **tol)


def cuda_or_skip():
    """``numba.cuda``, or skip the test: no CUDA target, or neither a GPU nor
    the simulator (``NUMBA_ENABLE_CUDASIM=1`` before Python starts)."""
    try:
        from numba import cuda
    except ImportError as exc:
        pytest.skip(f"numba's CUDA target is not installed ({exc})")
    if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
        pytest.skip("no CUDA GPU, and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 "
                    "before Python starts, e.g. `tox -e cudasim`)")
    return cuda


def nrt_allocations(step, n=50):
    """numba NRT heap allocations made by ``n`` calls of ``step()``."""
    _nrt_python.memsys_enable_stats()
    before = rtsys.get_allocation_stats().alloc
    for _ in range(n):
        step()
    return rtsys.get_allocation_stats().alloc - before


# The start of a child process's script that lists, in ``compiled``, every
# function numba compiles in it (a kernel loaded from the cache is none).
COUNT_COMPILES = r"""
from numba.core import event

compiled = []
class Count(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Count())
"""

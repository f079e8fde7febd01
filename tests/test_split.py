"""Whole-sequence recurrences shared between threads by batch rows
(``kernels.cpu.lstm_seq_forward_split`` / ``lstm_seq_backward_split``,
chosen by ``ops.batch_parts``): the same results as one thread for any
split of the rows, and the split only where it is allowed."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm
from numlstm import config, ops
from numlstm.kernels import cpu as kernels

CELLS = [{}, {"activations": ("hard_sigmoid", "tanh", "tanh")},
         {"input_forget": True, "clip": 3.0}, {"peepholes": True}]


def _model(kind, L, H, P, D, cell, seed):
    m = numlstm.LSTM(5, H, num_layers=L, proj_size=P, bidirectional=D == 2, seed=seed,
                     dtype=np.float64, **cell)
    if kind == "bsr":
        numlstm.prune.blocks(m, 0.5, block=(4, 1), weights=("ih", "hh"))
    elif kind == "csr":
        numlstm.prune.magnitude(m, 0.7)
    return m


def _run(m, x, lengths, dy, bounds, monkeypatch):
    """y, h_n, c_n, dx and every gradient, the recurrences split at ``bounds``
    (a function of B; None: one thread)."""
    monkeypatch.setattr(ops, "batch_parts", lambda B, work, blas_above: bounds(B))
    m.zero_grad()
    y, (h, c) = m(x, lengths=lengths, training=True)
    dx, _ = m.backward(dy)
    return [y, h, c, dx] + [np.array(g) for g in m.grad_arrays().values()]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["dense", "csr", "bsr"]), B=st.integers(1, 20),
       T=st.integers(1, 5), L=st.integers(1, 2), P=st.sampled_from([0, 3]),
       D=st.integers(1, 2), cell=st.sampled_from(range(len(CELLS))),
       cuts=st.lists(st.floats(0, 1), max_size=3), seed=st.integers(0, 2**16))
def test_split_matches_one_thread(kind, B, T, L, P, D, cell, cuts, seed):
    """Any cut of the batch (empty parts, one row, more parts than threads)
    gives one thread's forward, backward and gradients (float64; dense
    products of a few rows take another kernel than BLAS: rounding only)."""
    H = 8
    m = _model(kind, L, H, P, D, CELLS[cell], seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, 5))
    lengths = rng.integers(1, T + 1, B)
    dy = rng.standard_normal((T, B, D * (P or H)))

    def split(B_):
        inner = sorted(int(f * B_) for f in cuts)
        return np.array([0] + inner + [B_], np.int64)

    with pytest.MonkeyPatch.context() as mp:
        serial = _run(m, x, lengths, dy, lambda B_: None, mp)
        shared = _run(m, x, lengths, dy, split, mp)
    for a, b in zip(serial, shared, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13)


def test_batch_parts(monkeypatch):
    """Whole panels, one part per thread; none for small work, one thread,
    or dense parts large enough for BLAS's own threads."""
    monkeypatch.setattr(ops.numba, "get_num_threads", lambda: 2)
    big = config.PARALLEL_MIN_WORK
    assert ops.batch_parts(16, big).tolist() == [0, 8, 16]
    assert ops.batch_parts(32, big).tolist() == [0, 16, 32]
    assert ops.batch_parts(20, big).tolist() == [0, 16, 20]
    # Dense: parts up to the rows BLAS is left (16 forward, 8 backward).
    assert ops.batch_parts(16, big, 8).tolist() == [0, 8, 16]
    assert ops.batch_parts(32, big, 16).tolist() == [0, 16, 32]  # _dense_rows each
    assert ops.batch_parts(32, big, 8) is None  # 16-row parts: BLAS threads them
    assert ops.batch_parts(48, big, 16) is None
    assert ops.batch_parts(15, big) is None  # not two whole panels
    assert ops.batch_parts(16, big - 1) is None
    monkeypatch.setattr(ops.numba, "get_num_threads", lambda: 4)
    assert ops.batch_parts(32, big).tolist() == [0, 8, 16, 24, 32]
    monkeypatch.setattr(ops.numba, "get_num_threads", lambda: 1)
    assert ops.batch_parts(32, big) is None


@pytest.mark.parametrize("cell", [{}, {"peepholes": True}])
def test_peepholes_keep_backward_on_one_thread(cell, monkeypatch):
    """The peephole gradient sums over rows: a backward with peepholes never
    splits (its forward may)."""
    calls = []
    for name in ("lstm_seq_forward_split", "lstm_seq_backward_split"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a)))
    monkeypatch.setattr(ops, "batch_parts", lambda B, work, blas: np.array([0, 8, 16]))
    m = numlstm.LSTM(4, 8, dtype=np.float64, seed=0, **cell)
    x = np.ones((3, 16, 4))
    m(x, training=True)
    m.backward(np.ones((3, 16, 8)))
    split_back = "lstm_seq_backward_split" in calls
    assert "lstm_seq_forward_split" in calls
    assert split_back == (not cell)


def test_openblas_threads_stop_spinning_soon(tmp_path):
    """numlstm asks scipy's OpenBLAS (numba's BLAS) to spin ~0.5 ms after a
    call, not ~0.1 s, unless the environment says otherwise."""
    import os
    import subprocess
    import sys
    code = "import os, numlstm; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "20"
    out = subprocess.run([sys.executable, "-c", code],
                         env={**env, "OPENBLAS_THREAD_TIMEOUT": "28"}, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "28"

"""The workspace: one block, aligned named views, reused while calls fit."""

import numpy as np

import numlstm
from numlstm.workspace import Workspace


def test_views_are_aligned_contiguous_and_disjoint():
    ws = Workspace(np.float32)
    v = ws.carve([("a", (3, 5)), ("b", (7,)), ("empty", (0, 4)), ("c", (2, 2, 2))])
    assert v["a"].shape == (3, 5) and v["empty"].shape == (0, 4)
    for arr in v.values():
        assert arr.flags.c_contiguous and arr.ctypes.data % 64 == 0
    for name, arr in v.items():  # writing one view leaves the others untouched
        for other in v.values():
            other.fill(0)
        arr.fill(1)
        assert sum(int(o.sum()) for o in v.values()) == arr.size, name


def test_block_grows_and_is_reused_when_the_plan_fits():
    ws = Workspace(np.float64)
    ws.carve([("a", (100,))])
    block = ws._block
    ws.carve([("a", (10,)), ("b", (20,))])
    assert ws._block is block  # fits: no allocation
    ws.carve([("a", (1000,))])
    assert ws._block is not block and ws.nbytes >= 8000  # grows


def test_model_reuses_its_workspace_across_calls():
    m = numlstm.LSTM(4, 8, num_layers=2, seed=0)
    x = np.zeros((20, 3, 4), np.float32)
    m(x)
    block = m.engine.infer_ws._block
    m(x)
    m(x[:5, :2])  # smaller: same block
    assert m.engine.infer_ws._block is block
    y, _ = m(x, training=True)
    train_block = m.engine.train_ws._block
    m.backward(np.zeros_like(y))
    m(x, training=True)
    assert m.engine.train_ws._block is train_block

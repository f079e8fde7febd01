"""Pruning: magnitude (per matrix, global, per row), threshold, blocks, and the
gradual schedule with its state remapping."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numlstm
from numlstm import prune
from numlstm.quantize import quantize


def _model(I=6, H=8, L=2, P=0, seed=0):
    return numlstm.LSTM(I, H, num_layers=L, proj_size=P, seed=seed)


def _dense(m):
    return {k: (v.toarray() if hasattr(v, "toarray") else v) for k, v in m.state_dict().items()}


def _check_positions(before, m, positions):
    """Every new stored value is the old value at its recorded position."""
    for name, pos in positions.items():
        old = before[name].reshape(-1)
        new = m.weights()[name].values
        assert pos.shape == new.shape, name
        np.testing.assert_array_equal(new[pos >= 0], old[pos[pos >= 0]])


@given(st.sampled_from(prune.SCOPES), st.floats(0, 0.99), st.integers(0, 100),
       st.integers(0, 4))
def test_magnitude_keeps_the_largest_weights(scope, sparsity, seed, P):
    m = _model(P=P, seed=seed)
    before = _dense(m)
    values = {k: v.copy() for k, v in m.parameters().items()}
    positions = prune.magnitude(m, sparsity, scope=scope)
    after = _dense(m)
    weights = [k for k in before if k.startswith("weight")]
    assert set(positions) == set(weights)
    _check_positions(values, m, positions)
    kept_all, dropped_all = [], []
    for name in weights:
        w = m.weights()[name]
        assert w.format == "csr"
        kept = w.public().toarray() != 0
        R, C = w.shape
        if scope == "per_matrix":
            assert w.nnz == round((1 - sparsity) * R * C)
        if scope == "per_row":
            assert np.all(np.diff(w.indptr) == round((1 - sparsity) * C))
        kept_abs, dropped_abs = np.abs(before[name][kept]), np.abs(before[name][~kept])
        np.testing.assert_array_equal(after[name][kept], before[name][kept])
        if scope == "per_matrix" and kept_abs.size and dropped_abs.size:
            assert kept_abs.min() >= dropped_abs.max()
        kept_all.append(kept_abs)
        dropped_all.append(dropped_abs)
    if scope == "global":
        kept_abs, dropped_abs = np.concatenate(kept_all), np.concatenate(dropped_all)
        total = kept_abs.size + dropped_abs.size
        assert kept_abs.size == round((1 - sparsity) * total)
        if kept_abs.size and dropped_abs.size:
            assert kept_abs.min() >= dropped_abs.max()
    for name in before:  # biases untouched
        if name.startswith("bias"):
            np.testing.assert_array_equal(after[name], before[name])


def test_pruning_again_prunes_among_the_kept_weights():
    m = _model()
    prune.magnitude(m, 0.5)
    first = {k: v.toarray() != 0 for k, v in m.state_dict().items() if k.startswith("weight")}
    prune.magnitude(m, 0.8, scope="per_row")
    for name, mask in first.items():
        now = m.state_dict()[name].toarray() != 0
        assert np.all(now <= mask), name
    # Rows the first pruning thinned below the per-row count keep what they have.
    assert 0.7 < m.sparsity()["overall"] <= 0.8
    nnz = {k: w.nnz for k, w in m.weights().items()}
    prune.magnitude(m, 0.3)  # asking for less than is already pruned removes nothing
    assert {k: w.nnz for k, w in m.weights().items()} == nnz


def test_threshold_drops_exactly_the_small_weights():
    m = _model()
    before = _dense(m)
    prune.threshold(m, 0.2, weights=("hh",))
    after = _dense(m)
    w = before["weight_hh_l1"]
    np.testing.assert_array_equal(after["weight_hh_l1"], np.where(np.abs(w) >= 0.2, w, 0))
    assert m.weights()["weight_ih_l0"].format == "dense"  # not selected


@pytest.mark.parametrize("block,scope", [((8, 1), "per_matrix"), ((1, 2), "global"),
                                         ((4, 2), "per_matrix")])
def test_blocks_prune_whole_blocks_into_bsr(block, scope):
    m = _model(I=6, H=8)
    before = _dense(m)
    values = {k: v.copy() for k, v in m.parameters().items()}
    positions = prune.blocks(m, 0.75, block=block, scope=scope)
    _check_positions(values, m, positions)
    br, bc = block
    norms_kept, norms_dropped = [], []
    for name, w in m.weights().items():
        assert w.format == "bsr" and w.blocksize == block
        R, C = w.shape
        norms = np.sqrt((before[name] ** 2).reshape(R // br, br, C // bc, bc).sum(axis=(1, 3)))
        kept = np.zeros((R // br, C // bc), bool)
        kept[np.repeat(np.arange(R // br), np.diff(w.indptr)), w.indices] = True
        if scope == "per_matrix":
            assert kept.sum() == round(0.25 * kept.size)
            assert norms[kept].min() >= norms[~kept].max()
        norms_kept.append(norms[kept])
        norms_dropped.append(norms[~kept])
    assert np.concatenate(norms_kept).min() >= np.concatenate(norms_dropped).max() \
        or scope == "per_matrix"
    # The model runs and trains on its blocks.
    x = np.ones((3, 2, 6), np.float32)
    y, _ = m(x, training=True)
    m.backward(np.ones_like(y))
    assert m.grad["weight_hh_l0"].format == "bsr"


def test_blocks_need_a_dividing_block():
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(32, 6\), not divisible"):
        prune.blocks(_model(), 0.5, block=(4, 4))


def test_gradual_schedule_follows_zhu_and_gupta():
    m = _model(H=16)
    log = []
    pruner = prune.GradualPruner(m, 0.9, initial_sparsity=0.1, begin_step=3, num_updates=4,
                                 frequency=5, on_prune=log.append)
    expected = {3 + 5 * k: 0.9 + (0.1 - 0.9) * (1 - k / 4) ** 3 for k in range(5)}
    masks, seen = [], []
    for t in range(40):
        positions = pruner.step()
        if t in expected:
            assert positions is not None and log[-1] is positions
            assert m.sparsity()["overall"] == pytest.approx(expected[t], abs=0.01)
            masks.append({k: v.toarray() != 0 for k, v in m.state_dict().items()
                          if k.startswith("weight")})
            seen.append(t)
        else:
            assert positions is None
    assert seen == sorted(expected)
    assert pruner.target(0) == 0 and pruner.target(100) == pytest.approx(0.9)
    for earlier, later in zip(masks, masks[1:], strict=False):
        for name in earlier:
            assert np.all(later[name] <= earlier[name])  # nested patterns


def test_gradual_pruning_remaps_optimizer_state():
    """A momentum-like state equal to the values stays equal to them after
    every mask update (dense -> CSR, then CSR -> CSR; and into blocks)."""
    for block in (None, (4, 1)):
        m = _model(H=8)
        state = {k: v.copy() for k, v in m.parameters().items()}
        pruner = prune.GradualPruner(
            m, 0.75, num_updates=3, frequency=2, block=block,
            on_prune=lambda positions, state=state: state.update(
                prune.remap_state(state, positions)))
        for _ in range(8):
            pruner.step()
            for name, values in m.parameters().items():
                np.testing.assert_array_equal(state[name], values)
        assert m.sparsity()["overall"] == pytest.approx(0.75, abs=0.02)


def test_pruning_errors_are_clear():
    m = _model()
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        prune.magnitude(m, 1.0)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune.magnitude(m, 0.5, scope="rows")
    with pytest.raises(ValueError, match="weights must be a non-empty subset"):
        prune.magnitude(m, 0.5, weights=("xx",))
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        prune.threshold(m, -1)
    with pytest.raises(ValueError, match="block must be a pair"):
        prune.blocks(m, 0.5, block=(64, 1))
    with pytest.raises(ValueError, match="initial_sparsity must be <= final_sparsity"):
        prune.GradualPruner(m, 0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="frequency must be an int >= 1"):
        prune.GradualPruner(m, 0.5, frequency=0)
    prune.magnitude(m, 0.5)
    quantize(m, "int8")
    with pytest.raises(TypeError, match="prune before quantizing"):
        prune.magnitude(m, 0.9)

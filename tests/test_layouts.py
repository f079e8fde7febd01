"""Per-step execution layouts of CSR weights (numlstm.layouts) against dense NumPy."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import numlstm
from numlstm import config, layouts
from numlstm import weights as W
from numlstm.kernels import cpu as K
from numlstm.kernels.vector_ir import SELL_LANES, WINDOW
from numlstm.quantize import quantize_weight

FORCED = ["sell", "csr", "dense"] + (["windows"] if WINDOW else [])


def _csr(rng, R, C, density, dtype, empty_rows):
    m = sp.random_array((R, C), density=density, format="lil", dtype=dtype, rng=rng)
    for r in empty_rows:
        if r < R:
            m[r, :] = 0
    m = sp.csr_array(m)
    m.eliminate_zeros()
    m.sort_indices()
    return W.from_value(m, "w", (R, C), dtype)


# Row counts around multiples of the slice height, widths around the window.
_rows = st.one_of(st.integers(1, 3 * SELL_LANES + 3), st.sampled_from([64, 130]))
_cols = st.one_of(st.integers(1, 70), st.sampled_from([256, 300]))


@given(_rows, _cols, st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]),
       st.sampled_from([np.float32, np.float64]), st.sampled_from([None, "float16", "int8"]),
       st.sampled_from(["int32", "uint16"]), st.sets(st.integers(0, 40), max_size=8),
       st.sampled_from(FORCED + ["auto"]), st.integers(1, 3), st.integers(0, 1000))
def test_every_layout_multiplies_like_the_dense_matrix(R, C, density, dtype, values, index,
                                                      empty, kind, N, seed):
    """Slice remainders, empty rows and all-empty slices, both index types,
    every value kind, and every layout the cost model may choose."""
    rng = np.random.default_rng(seed)
    saved = config.STEP_LAYOUT
    config.STEP_LAYOUT = kind  # read when the layout is built (quantized: when made)
    try:
        weight = quantize_weight(_csr(rng, R, C, density, dtype, empty), values, index)
        layout = weight.step_layout()
    finally:
        config.STEP_LAYOUT = saved
    expect = {"sell": layouts.Sell, "windows": layouts.SellWindows, "csr": W.CSR,
              "dense": W.Dense}
    refused = (kind == "windows" and dtype != np.float32
               or kind == "dense" and values is not None)
    if kind != "auto" and not refused:
        assert isinstance(layout, expect[kind])
    x = rng.standard_normal((N, C)).astype(dtype)
    out = np.full((N, R), np.nan, dtype)
    K.matmul(out, x, *weight.step_args())
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, x @ weight.to_array().T, rtol=tol, atol=tol)


@given(_rows, _cols, st.sampled_from([0.0, 0.1, 0.6]), st.sampled_from(["float16", "int8"]),
       st.sets(st.integers(0, 40), max_size=8), st.integers(0, 1000))
def test_quantized_weights_stored_as_a_layout_give_back_their_csr(R, C, density, values,
                                                                  empty, seed):
    rng = np.random.default_rng(seed)
    csr = _csr(rng, R, C, density, np.float32, empty)
    quantized = quantize_weight(csr, values, "uint16")
    for layout in (layouts.Sell, layouts.SellWindows if WINDOW else layouts.Sell):
        made = layout(quantized.data, quantized.indices, quantized.indptr, quantized.shape,
                      *([quantized.scales] if layout is layouts.SellWindows else []))
        np.testing.assert_array_equal(made.csr_values(), quantized.data)
        np.testing.assert_array_equal(made.csr_indices(np.int32), quantized.indices)


@pytest.mark.parametrize("kind", [k for k in FORCED if k != "csr"])
def test_a_trainable_layout_follows_in_place_updates(monkeypatch, kind):
    """forward refreshes the layouts' copies; a stream after parameters().
    The layout is forced: which one the cost model picks depends on the CPU."""
    monkeypatch.setattr(config, "STEP_LAYOUT", kind)
    m = numlstm.LSTM(6, 16, seed=0)
    numlstm.prune.magnitude(m, 0.8)
    copies = layouts.SELL_KINDS + (W.Dense,)
    assert all(isinstance(w.step_layout(), copies) for w in m.weights().values())
    x = np.random.default_rng(0).standard_normal((4, 1, 6)).astype(np.float32)
    s = m.stream(1)
    for name, p in m.parameters().items():
        if name.startswith("weight"):
            p *= -2.0
    ref = numlstm.LSTM(6, 16)
    ref.load_state_dict(m.state_dict())
    y_ref = ref(x)[0]
    np.testing.assert_allclose(m(x)[0], y_ref, rtol=1e-5, atol=1e-6)
    steps = np.stack([s.step(x[t]).copy() for t in range(4)])
    np.testing.assert_allclose(steps, y_ref, rtol=1e-5, atol=1e-6)


def test_the_layout_choice_never_changes_results(monkeypatch):
    x = np.random.default_rng(1).standard_normal((5, 1, 8)).astype(np.float32)
    outs = {}
    for kind in FORCED + ["auto"]:
        monkeypatch.setattr(config, "STEP_LAYOUT", kind)
        m = numlstm.LSTM(8, 32, num_layers=2, seed=0)
        numlstm.prune.magnitude(m, 0.9)
        s = m.stream(1)
        outs[kind] = np.stack([s.step(x[t]).copy() for t in range(5)])
    for kind, y in outs.items():
        np.testing.assert_allclose(y, outs["csr"], rtol=1e-5, atol=1e-6, err_msg=kind)


def test_per_row_pruning_needs_no_padding():
    m = numlstm.LSTM(8, 64, seed=0)
    numlstm.prune.magnitude(m, 0.75, scope="per_row")
    for w in m.weights().values():
        sell = layouts.Sell(w.data, w.indices, w.indptr, w.shape)
        assert sell.data.size == w.nnz  # every lane of every entry a stored value


@pytest.mark.parametrize("kind", ["sell", "windows"])
def test_layout_bytes_are_counted(kind, monkeypatch):
    if kind == "windows" and not WINDOW:
        pytest.skip("no windowed layout on this CPU")
    monkeypatch.setattr(config, "STEP_LAYOUT", kind)
    m = numlstm.LSTM(8, 32, seed=0)
    numlstm.prune.magnitude(m, 0.9)
    extra = sum(w.step_layout().nbytes for w in m.weights().values())
    report = numlstm.memory_report(m, 10, 1)
    assert report["weight layout"] == extra > 0


@given(_rows, _cols, st.sampled_from([0.05, 0.3]), st.sampled_from([np.float32, np.float64]),
       st.sampled_from(["float16", "int8"]), st.sampled_from([8, 9, 17]), st.integers(0, 1000))
def test_batched_products_of_a_weight_stored_as_sell(R, C, density, dtype, values, N, seed):
    """A quantized weight kept as its SELL layout multiplies whole batches with
    the panel kernel (eight rows of x per stored value), the rest row by row."""
    rng = np.random.default_rng(seed)
    saved = config.STEP_LAYOUT
    config.STEP_LAYOUT = "sell"
    try:
        weight = quantize_weight(_csr(rng, R, C, density, dtype, ()), values, "uint16")
    finally:
        config.STEP_LAYOUT = saved
    assert isinstance(weight._store, layouts.Sell) and weight.kernel_args()[1].ndim == 2
    x = rng.standard_normal((N, C)).astype(dtype)
    for kernel in (K.sparse_matmul, K.sparse_matmul_parallel):
        out = np.full((N, R), np.nan, dtype)
        kernel(out, x, *weight.kernel_args())
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(out, x @ weight.to_array().T, rtol=tol, atol=tol)


def test_an_unknown_forced_layout_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(config, "STEP_LAYOUT", "sel")
    m = numlstm.LSTM(4, 8, seed=0)
    numlstm.prune.magnitude(m, 0.5)
    with pytest.raises(ValueError, match=r"NUMLSTM_STEP_LAYOUT.*got 'sel'"):
        m.stream(1)


@pytest.mark.skipif(not WINDOW, reason="no windowed layout on this CPU")
@pytest.mark.parametrize("values", ["float16", "int8"])
def test_a_quantized_weight_steps_on_a_windowed_copy_of_its_storage(values, monkeypatch):
    """The copy is made at the first per-step use where the cost model prices
    it below the stored SELL layout, multiplies as the storage does, and its
    bytes are counted; switched off, the steps read the storage."""
    rng = np.random.default_rng(0)
    csr = _csr(rng, 1024, 256, 0.1, np.float32, ())
    with monkeypatch.context() as mp:
        mp.setattr(config, "QUANTIZED_STEP_COPY", False)
        kept = quantize_weight(csr, values)
        stored_bytes = kept.nbytes_parts()
        assert kept.step_layout() is kept._store
        assert kept.nbytes_parts() == stored_bytes

    weight = quantize_weight(csr, values)
    store = weight._store
    assert isinstance(store, layouts.Sell)
    assert weight.nbytes_parts() == stored_bytes
    candidate = layouts.SellWindows(weight.data, weight.indices, weight.indptr, weight.shape,
                                    weight.scales)
    copy = weight.step_layout()
    if layouts.cost(weight, candidate) >= layouts.cost(weight, store):  # this CPU's costs
        assert copy is store
        return
    assert isinstance(copy, layouts.SellWindows)
    after = weight.nbytes_parts()
    assert after["layout"] == stored_bytes["layout"] + copy.nbytes
    assert {k: v for k, v in after.items() if k != "layout"} == \
        {k: v for k, v in stored_bytes.items() if k != "layout"}
    x = rng.standard_normal((2, 256)).astype(np.float32)
    stepped, stored = np.empty((2, 1024), np.float32), np.empty((2, 1024), np.float32)
    K.matmul(stepped, x, *weight.step_args())
    K.matmul(stored, x, *weight.kernel_args())
    np.testing.assert_allclose(stepped, stored, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(weight.to_array(), kept.to_array())


def test_quantized_streams_with_and_without_the_step_copy_agree(monkeypatch):
    x = np.random.default_rng(2).standard_normal((6, 1, 16)).astype(np.float32)
    outs = []
    for copy in (True, False):
        monkeypatch.setattr(config, "QUANTIZED_STEP_COPY", copy)
        m = numlstm.LSTM(16, 64, num_layers=2, seed=0)
        numlstm.prune.magnitude(m, 0.9)
        numlstm.quantize.quantize(m, "int8")
        s = m.stream(1)
        outs.append(np.stack([s.step(x[t]).copy() for t in range(6)]))
        copies = [isinstance(w.step_layout(), layouts.SellWindows) for w in m.weights().values()]
        assert any(copies) == (copy and bool(WINDOW))  # the two runs differ in their layouts
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@given(_rows, _cols, st.sampled_from([0.0, 0.1, 0.6, 1.0]),
       st.sampled_from([None, "float16", "int8"]), st.sets(st.integers(0, 40), max_size=8),
       st.sampled_from([1, 5, 2**12]), st.integers(0, 1000))
def test_planned_sizes_are_those_of_the_built_layouts(R, C, density, values, empty, block,
                                                      seed):
    """The cost model prices sizes it computes without building (``planned``);
    they must be the built layouts' own, whatever the rows per block."""
    rng = np.random.default_rng(seed)
    weight = quantize_weight(_csr(rng, R, C, density, np.float32, empty), values, "int32")
    saved = layouts._BLOCK
    layouts._BLOCK = block  # SellWindows fills its values a block of rows at a time
    try:
        kinds = [layouts.Sell] + ([layouts.SellWindows] if WINDOW else [])
        for kind in kinds:
            extra = [weight.scales] if kind is layouts.SellWindows else []
            made = kind(weight.data, weight.indices, weight.indptr, weight.shape, *extra)
            assert kind.planned(weight) == made.sizes()
            np.testing.assert_array_equal(made.csr_values(), weight.data)
            np.testing.assert_array_equal(made.csr_indices(np.int32), weight.indices)
    finally:
        layouts._BLOCK = saved


def test_the_choice_builds_only_the_layout_it_picks(monkeypatch):
    made = []
    for kind in (layouts.Sell, layouts.SellWindows):
        init = kind.__init__
        monkeypatch.setattr(kind, "__init__", lambda self, *a, _init=init, **k: (
            made.append(type(self).kind), _init(self, *a, **k))[1])
    m = numlstm.LSTM(64, 256, seed=0)
    numlstm.prune.magnitude(m, 0.8)
    for w in m.weights().values():
        made.clear()
        layout = w.step_layout()
        kind, _ = layouts.choose(w)
        assert made == ([] if kind in ("csr", "dense") else [kind]), (kind, made)
        assert layout is w.step_layout()


# The cost model fed two CPUs' figures, not only the host's: an AVX2 core with
# a 512 KiB L2 (a Zen 3) and an AVX-512 core with a 2 MiB L2 (an Emerald Rapids).
CPUS = [("avx2", 512 * 2**10), ("avx512", 2 * 2**20)]


@pytest.mark.parametrize("isa,l2", CPUS)
def test_auto_picks_the_layout_the_cost_model_prices_lowest(monkeypatch, isa, l2):
    monkeypatch.setattr(layouts, "step_costs", lambda: config.STEP_COSTS[isa])
    monkeypatch.setattr(layouts, "L2_BYTES", l2)
    rng = np.random.default_rng(0)
    for R, C, density in [(1024, 64, 0.1), (1024, 256, 0.1), (1024, 256, 0.5),
                          (4096, 1024, 0.1), (256, 64, 0.01)]:
        a = sp.random(R, C, density, format="csr", random_state=rng, dtype=np.float32)
        a.sort_indices()
        w = W.CSR(a.data, a.indices.astype(np.int32), a.indptr.astype(np.int32), (R, C))
        est = {}
        for kind in FORCED:
            layout = layouts.build(w, kind)
            est[kind] = (layouts.dense_cost(w.shape, 4) if isinstance(layout, W.Dense)
                         else layouts.cost(w, layout))
        chosen = layouts.build(w, "auto")
        kind = ("dense" if isinstance(chosen, W.Dense) else "csr" if chosen is None
                else "windows" if isinstance(chosen, layouts.SellWindows) else "sell")
        assert est[kind] == min(est.values()), (R, C, density, est, kind)
        # Past L2 a product costs at least its bytes streamed (the roofline).
        nbytes = R * C * 4
        if nbytes > l2:
            assert est["dense"] >= nbytes * config.STEP_COSTS[isa]["stream_byte"]
        # A sparser weight is never priced above dense on the same CPU.
        if density <= 0.1:
            assert min(est.values()) < est["dense"], (R, C, density, est)

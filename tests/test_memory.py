"""memory_report: predicted rows, their sum, and agreement with a measured run."""

import numpy as np
import pytest
import scipy.sparse as sp

import numlstm
from numlstm.memory import ROWS, MemoryReport, memory_report
from numlstm.pool import pool_memory


def _sparse(m, fraction=0.9):
    state = m.state_dict()
    for name, w in state.items():
        if name.startswith("weight"):
            w[np.abs(w) < np.quantile(np.abs(w), fraction)] = 0
            state[name] = sp.csr_array(w)
    m.load_state_dict(state)
    return m


CASES = [
    # (model kwargs, sparse, T, B)
    (dict(num_layers=2), False, 300, 8),
    (dict(num_layers=2, bidirectional=True, proj_size=8, dropout=0.2), True, 200, 8),
    (dict(batch_first=True, dtype=np.float64), False, 150, 4),
    (dict(num_layers=3, bidirectional=True), True, 100, 4),
]


@pytest.mark.parametrize("kwargs,sparse,T,B", CASES)
@pytest.mark.parametrize("training,checkpoint", [(False, None), (True, None), (True, "auto")])
def test_prediction_matches_measurement(kwargs, sparse, T, B, training, checkpoint):
    m = numlstm.LSTM(16, 32, seed=0, **kwargs)
    if sparse:
        _sparse(m)
    grads = {k: g.copy() for k, g in m.grad_arrays().items()}
    report = memory_report(m, T, B, training=training, checkpoint=checkpoint, measure=True)
    got = report.measured
    assert got["predicted_call"] == report["recorded activations"] + report["workspace"]
    assert 0.9 <= got["ratio"] <= 1.1, (got, report)
    assert got["nrt_net"] == 0  # kernels free whatever they allocate
    for name, g in m.grad_arrays().items():  # measuring leaves the gradients as they were
        np.testing.assert_array_equal(g, grads[name])
    assert "measured call" in str(report)


@pytest.mark.parametrize("I,H,T", [(16, 32, 300), (64, 256, 300), (64, 256, 1)])
def test_a_first_small_batch_call_counts_the_layouts_it_builds(I, H, T):
    # A call at batch < config.STEP_MAX_B builds the execution layouts of W_hh on first
    # use (numlstm.layouts): 3 layers at 80%, T=300, B=2 measured 1.19x (H=32) and
    # 1.98x (H=256) the prediction that left them and their build out.
    import gc
    import tracemalloc

    B = 2

    def model(seed):
        return _sparse(numlstm.LSTM(I, H, num_layers=3, seed=seed), 0.8)

    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    model(1)(x)  # compiles the kernels this case needs (they depend on types, not values)
    m = model(0)
    report = memory_report(m, T, B)
    assert report.case["layouts"] > 0
    predicted = report["recorded activations"] + report["workspace"] + report.case["layouts"]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        m(x)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    weights = sum(v for k, v in report.items() if k.startswith("weight")) + report["biases"]
    assert weights == m.weight_bytes()  # the layouts, sized before they were built
    if T > 1:
        assert 0.9 <= peak / predicted <= 1.1, (peak, predicted, report)
    else:  # the build's temporaries are the peak: their bound holds
        assert peak <= predicted and report["workspace"] > m.memory_plan(T, B, training=False)[
            "workspace"], (peak, predicted, report)
    again = memory_report(m, T, B)  # built now: nothing more to build
    assert again.case["layouts"] == 0 and again["weight layout"] == report["weight layout"]
    fresh = model(0)
    measured = memory_report(fresh, T, B, measure=True).measured  # its warm-up builds none
    if T > 1:
        assert 0.9 <= measured["ratio"] <= 1.1, measured


def test_rows_sum_to_total_and_weights_match_weight_bytes():
    m = _sparse(numlstm.LSTM(8, 16, num_layers=2, proj_size=4, seed=0), 0.5)
    report = memory_report(m, 50, 4, training=True, checkpoint=5, optimizer="adam")
    assert isinstance(report, dict) and isinstance(report, MemoryReport)
    assert list(report) == list(ROWS) + ["total"]
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
    weights = sum(report[f"weight {p}"]
                  for p in ("values", "indices", "indptr", "scales", "layout"))
    assert weights + report["biases"] == m.weight_bytes()
    parts = {"values": 0, "indices": 0, "indptr": 0}
    for name, w in m.state_dict().items():
        if name.startswith("weight"):
            parts["values"] += w.data.nbytes
            parts["indices"] += w.indices.nbytes
            parts["indptr"] += w.indptr.nbytes
    for part, nbytes in parts.items():
        assert report[f"weight {part}"] == nbytes
    grads = sum(g.nbytes for g in m.grad_arrays().values())
    assert report["gradients"] == grads
    assert report["optimizer state"] == 2 * grads
    plan = m.memory_plan(50, 4, training=True, checkpoint=5)
    assert report["recorded activations"] == plan["activations"]
    assert report["workspace"] == plan["workspace"] + plan["transposed"] + plan["outputs"]
    assert report.as_dict() == dict(report)
    assert report.case["segment"] == 5 and report.measured is None


def test_inference_counts_no_gradients_and_less_than_training():
    m = numlstm.LSTM(8, 16, num_layers=2, seed=0)
    infer = memory_report(m, 100, 2)
    train = memory_report(m, 100, 2, training=True)
    assert infer["gradients"] == infer["optimizer state"] == infer["recorded activations"] == 0
    assert infer["total"] < train["total"]
    ckpt = memory_report(m, 100, 2, training=True, checkpoint="auto")
    assert ckpt["recorded activations"] < train["recorded activations"]


@pytest.mark.parametrize("optimizer,slots", [
    (None, 0), ("sgd", 0), ("momentum", 1), ("nesterov", 1), ("adam", 2), ("AdamW", 2)])
def test_optimizer_slots(optimizer, slots):
    m = numlstm.LSTM(4, 8, seed=0)
    r = memory_report(m, 10, 1, training=True, optimizer=optimizer)
    assert r["optimizer state"] == slots * r["gradients"]


def test_optimizer_object_with_nbytes():
    class Opt:
        nbytes = 1234

    r = memory_report(numlstm.LSTM(4, 8, seed=0), 10, 1, training=True, optimizer=Opt())
    assert r["optimizer state"] == 1234


def test_printing_is_an_aligned_table_with_units():
    m = numlstm.LSTM(64, 256, seed=0)
    text = str(memory_report(m, 1000, 16, training=True, checkpoint="auto", optimizer="adam"))
    lines = text.splitlines()
    assert "training, checkpoint='auto' (segment 32)" in lines[0]
    rows = [line for line in lines[1:] if not line.startswith("-")]
    assert [r.split("  ")[0].strip() for r in rows] == list(ROWS) + ["total"]
    assert len({len(r) for r in rows}) == 1  # aligned
    assert "MiB" in text and "KiB" in text and " B " in text
    assert f"{m.weight_bytes() - 2 * 1024 * 4:,} B" in text  # exact bytes, grouped


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("model", 10, 2), {}, TypeError, r"model must be a numlstm.LSTM, got str"),
    ((None, 0, 2), {}, ValueError, r"seq_len must be >= 1, got 0"),
    ((None, 10, 2.0), {}, TypeError, r"batch_size must be an int, got float"),
    ((None, 10, 2), dict(training="yes"), TypeError, r"training must be a bool, got str"),
    ((None, 10, 2), dict(checkpoint=4), ValueError, r"checkpoint=4 needs training=True"),
    ((None, 10, 2), dict(training=True, checkpoint=0), ValueError,
     r'checkpoint must be None, "auto" or an int >= 1, got 0'),
    ((None, 10, 2), dict(optimizer="adam"), ValueError,
     r"optimizer='adam' needs training=True"),
    ((None, 10, 2), dict(training=True, optimizer="rmsprop"), ValueError,
     r"optimizer must be None, one of .*'adam'.* got 'rmsprop'"),
    ((None, 10, 2), dict(training=True, optimizer=object()), TypeError,
     r"object with an int nbytes >= 0, got object with nbytes=None"),
    ((None, 10, 2), dict(measure=1), TypeError, r"measure must be a bool, got int"),
])
def test_bad_arguments(args, kwargs, exc, match):
    m = numlstm.LSTM(4, 8, seed=0)
    args = tuple(m if a is None else a for a in args)
    with pytest.raises(exc, match=match):
        memory_report(*args, **kwargs)


def test_sizes_past_int64_are_counted_exactly():
    # (10**12)**2 steps * rows wrapped around int64 (about -5.3e19 bytes); a pool of 2**62
    # slots came out as 64 bytes of states.
    m = numlstm.LSTM(3, 4, seed=0)  # I=3, H=O=4: every buffer below is a multiple of 64 B
    T = B = 10**12
    r = memory_report(m, T, B, training=True, checkpoint="auto")
    segment = 10**6  # ceil(sqrt(T))
    assert r.case["segment"] == segment
    # The tape: the state entering each segment (h and c) and the layer's input x.
    assert r["recorded activations"] == 4 * (T // segment * B * (4 + 4) + T * B * 3)
    assert all(type(v) is int and v >= 0 for v in r.values())
    assert r["total"] == sum(v for k, v in r.items() if k != "total")
    S = 2**62
    parts = pool_memory(m, S)
    # h, c (1, S, 4) each, x (S, 3), out (S, 4), plus one alignment step of 64 bytes
    assert parts["states"] == 4 * S * (4 + 4 + 3 + 4) + 64
    assert parts["index"] == S * (8 + 8 + 8 + 8 + 1) + 8  # pool._INDEX_BYTES a slot
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    pooled = memory_report(m, 1, 1, pool=S)
    assert pooled["stream pool states"] == parts["states"] + parts["index"]


def test_exported():
    assert numlstm.memory_report is memory_report

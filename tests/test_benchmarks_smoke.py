"""Smoke test of ``python -m benchmarks --quick`` (entries only, no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` run of every benchmark; its output folder."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_quick_benchmark_writes_expected_entries(quick_run):
    tmp_path = quick_run
    with open(tmp_path / "first.json") as f:
        res = json.load(f)
    assert (tmp_path / "first.md").read_text().startswith("# Benchmark `first`")
    assert res["quick"] is True
    assert res["config"] == {**res["config"], "batch": 1, "I": 64, "H": 256, "T": 50,
                             "dtype": "float32"}
    assert res["machine"]["cpu"] and res["machine"]["versions"]["numpy"]

    has_torch = importlib.util.find_spec("torch") is not None
    expected = {"numlstm-dense", "numlstm-csr"} | ({"torch"} if has_torch else set())
    assert set(res["cases"]) == expected
    if not has_torch:
        assert "torch" in res["skipped"]
    for case, entry in res["cases"].items():
        for kind in ("stream_us", "sequence_us"):
            s = entry[kind]
            assert len(s["all"]) == res["config"]["repeats"], (case, kind)
            assert 0 < s["min"] <= s["median"] <= s["max"], (case, kind)
    dense, csr = res["cases"]["numlstm-dense"], res["cases"]["numlstm-csr"]
    assert csr["weight_bytes"] < dense["weight_bytes"] / 4
    assert dense["self_agreement"] < 1e-4 and csr["self_agreement"] < 1e-4
    if has_torch:
        for case in ("numlstm-dense", "numlstm-csr"):
            assert set(res["cases"][case]["ratio_to_torch"]) == {"stream", "sequence"}
            agreement = res["agreement"][case]
            assert agreement["stream"] < 1e-4 and agreement["sequence"] < 1e-4, (case, agreement)


def test_quick_memory_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "memory.json") as f:
        res = json.load(f)
    md = (quick_run / "memory.md").read_text()
    assert md.startswith("# Benchmark `memory`") and "## The issue's targets" in md
    assert res["quick"] is True
    assert res["config"] == {**res["config"], "B": 16, "I": 64, "H": 256, "T": [50, 200],
                             "dtype": "float32"}
    has_torch = importlib.util.find_spec("torch") is not None
    for T in ("50", "200"):
        row = res["train"][T]
        expected = {"numlstm", "numlstm-ckpt"} | ({"torch"} if has_torch else set())
        assert expected == set(row), (T, set(row))
        for system, e in row.items():
            assert e["peak_increase_mib"] >= 0 and e["step_s"]["median"] > 0, (T, system)
            assert len(e["step_s"]["all"]) == res["config"]["repeats"]
            if has_torch and system != "torch":
                assert e["memory_to_torch"] is not None and e["time_to_torch"] > 0
                assert e["grad_rel_diff_to_torch"] < 1e-3, (T, system)  # same gradients
        assert row["numlstm-ckpt"]["grad_rel_diff_to_full_tape"] < 1e-3
    stream = res["stream"]["numlstm"]
    assert stream["steps"] == res["config"]["stream_steps"]
    assert len(stream["rss_trace_mib"]) >= 2
    if has_torch:
        assert stream["time_to_torch"] > 0
    assert set(res["target_check"]) >= {"ckpt_memory_met", "ckpt_time_met", "stream_met"}


def test_quick_pruning_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "pruning.json") as f:
        res = json.load(f)
    assert (quick_run / "pruning.md").read_text().startswith("### Pruning and quantization")
    labels = [r["model"] for r in res["rows"]]
    assert labels == ["dense", "90% CSR", "90% CSR, uint16 indices", "90% CSR, float16",
                      "90% CSR, int8", "95% CSR", "95% CSR, uint16 indices",
                      "95% CSR, float16", "95% CSR, int8", "90% BSR 8x1"]
    rows = {r["model"]: r for r in res["rows"]}
    for label, target in (("90% CSR", 0.9), ("95% CSR", 0.95), ("90% BSR 8x1", 0.9)):
        assert abs(rows[label]["sparsity"] - target) < 0.01, label
        assert rows[label]["train_peak_bytes"] > 0 and rows[label]["train_ms"] > 0
    for pct in ("90%", "95%"):  # each re-storing shrinks the weights
        sizes = [rows[f"{pct} CSR{sfx}"]["weight_bytes"] for sfx in
                 ("", ", uint16 indices", ", float16", ", int8")]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
        assert rows[f"{pct} CSR, uint16 indices"]["max_abs_dy"] == 0
        assert 0 < rows[f"{pct} CSR, float16"]["max_abs_dy"] < 0.05
    assert all(r["bits"] > 0 and r["stream_us"] > 0 for r in res["rows"])


def test_quick_soak_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "soak.json") as f:
        res = json.load(f)
    md = (quick_run / "soak.md").read_text()
    assert md.startswith("# Benchmark `soak`") and "| stream |" in md and "| train |" in md
    assert res["quick"] is True and not res["skipped"], res["skipped"]
    c = res["config"]
    assert c == {**c, "I": 64, "H": 256, "stream_steps": 2000, "train_iters": 20}
    stream, train = res["cases"]["stream"], res["cases"]["train"]
    assert stream["steps"] == c["stream_steps"] and train["iterations"] == c["train_iters"]
    for e in (stream, train):
        assert e["finite"] and e["rss_before_mib"] > 0 and e["rss_after_mib"] > 0
        assert e["growth_mib"] == e["rss_after_mib"] - e["rss_before_mib"]
        assert len(e["rss_trace"]) == c["samples"] + 1 and e["rss_trace"][0][0] == 0
        assert isinstance(e["flat"], bool) and isinstance(e["nrt_net_growth"], int)
    assert stream["nonfinite_checks"] == 0 and 0 < stream["max_abs_h"] <= 1
    assert train["nonfinite_losses"] == 0 and train["nonfinite_params"] == 0
    assert stream["us_per_step"] > 0 and train["ms_per_iteration"] > 0

"""Smoke test of ``python -m benchmarks --quick`` (entries only, no timing assertions)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` run of every benchmark (the suite
    included); its output folder."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
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
    # 90% CSR: values and int32 indices are 20% of dense; the stream adds its
    # per-step execution layout (numlstm.layouts: the windowed one is ~25%).
    assert csr["weight_bytes"] < dense["weight_bytes"] / 2
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


def test_quick_pair_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "pair.json") as f:
        res = json.load(f)
    md = (quick_run / "pair.md").read_text()
    assert md.startswith("# Benchmark `pair`") and "| dense, H=64 |" in md
    assert "| sequence: csr90, H=64 |" in md
    assert res["quick"] is True
    for cond in ("quiet", "loaded"):
        rows = res[cond]
        assert sorted(rows) == ["csr90/H=64", "dense/H=64", "sequence csr90/H=64",
                                "sequence dense/H=64"]
        for e in rows.values():
            # two threads ("two") compute exactly what one does
            assert e["max_abs_diff"] == 0
            assert e["two_threads"] == {"one": False, "auto": False, "two": True}
            assert all(e["us_per_step"][m]["median"] > 0 for m in ("one", "auto", "two"))


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


# ----------------------------------------------------------------------------
# The suite (issue 6): every case, every system row, agreement, no timings
# ----------------------------------------------------------------------------

def test_quick_step_parts_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "step_parts.json") as f:
        res = json.load(f)
    md = (quick_run / "step_parts.md").read_text()
    assert md.startswith("# Benchmark `step_parts`") and "## Floors under" in md
    assert res["quick"] is True and res["config"]["rounds"] == 1
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "90% CSR", "99.9% CSR"}
    for name, r in rows.items():
        for key in ("w_ih_us", "w_hh_us", "step_us", "call_us", "seq_us"):
            assert 0 < r[key] < 1e5, (name, key)
        assert r["w_ih_bytes"] > 0 and r["w_hh_bytes"] > 0, name
    # What a step reads shrinks with the weights it keeps.
    assert rows["99.9% CSR"]["w_hh_bytes"] < rows["90% CSR"]["w_hh_bytes"] \
        < rows["dense"]["w_hh_bytes"] == 256 * 1024 * 4
    b = res["bounds"]
    assert b["bytes"] == rows["dense"]["w_ih_bytes"] + rows["dense"]["w_hh_bytes"]
    assert b["l1_gbs"] > 0 and b["l2_gbs"] > 0 and res["cell_us"] > 0
    two_cores = res["machine"]["usable_cores"] > 1
    assert (b["l2_two_gbs"] is not None and b["round_trip_ns"] > 0) == two_cores
    from benchmarks.step_parts import floors

    targets = floors(res)
    # Without torch only the targets relative to dense remain (90% CSR here).
    assert len(targets) == (4 if _have("torch") else 1)
    for target, need, got, one, two, mine in targets:
        assert need > 0 and got > 0 and one > 0, target
        assert (two is not None) == two_cores, target
        assert mine is None or mine > one, target  # fixed costs on top of the bytes


def _have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _check_stats(s, n, where):
    assert len(s["all"]) == n, where
    assert 0 < s["min"] <= s["median"] <= s["max"], where
    assert all(math.isfinite(v) for v in s["all"]), where


@pytest.fixture(scope="module")
def suite(quick_run):
    with open(quick_run / "suite.json") as f:
        res = json.load(f)
    return res, (quick_run / "suite.md").read_text(), quick_run


def _expected_peers(case):
    from benchmarks.suite.config import PEERS

    has_torch, has_ort = _have("torch"), _have("torch", "onnx", "onnxruntime")
    peers = {p for p in PEERS[case] if p not in ("scipy", "csr-f32")}  # columns, no rows
    if not has_torch:
        peers -= {"torch-cell", "torch-lstm"}
    if not has_ort:
        peers.discard("ort")
    return peers


def test_quick_suite_runs_every_case(suite):
    from benchmarks.suite.config import CASES, TARGETS

    res, md, out = suite
    assert res["quick"] is True and res["cases_run"] == list(CASES)
    assert set(res["cases"]) == set(CASES)
    assert md.startswith("# Benchmark `suite`") and "## Targets" in md
    assert "## Machine limits" in md and "## Machine" in md
    for letter, title in CASES.items():
        assert f"## {letter}. {title}" in md, letter
    lim = res["limits"]
    assert lim["gemm_gflops"]["best"] > 0 and lim["bandwidth_gbs"]["best"] > 0
    assert len(res["targets"]) == len(TARGETS) + 1  # + f's cold start
    for t in res["targets"]:
        assert t["met"] in (True, False, None)
        if t["case"] in ("a", "c") and _have("torch") or t["case"] == "f":
            assert t["met"] is not None, t  # measured whenever the peer is present
    if _have("matplotlib"):
        assert (out / "suite_g_hidden.png").stat().st_size > 0
        assert (out / "suite_g_sparsity.png").stat().st_size > 0


def _check_timing_table(case, table, peers, repeats, variants, md, diff_bound=1e-4):
    from benchmarks.suite.config import F32_PEER, LABELS, PEERS, SCIPY_PEER

    rows = table["rows"]
    scipy = {SCIPY_PEER[v] for v in variants if v in SCIPY_PEER}
    assert set(rows) == set(variants) | peers | (scipy if case in "ab" else set()), set(rows)
    for key, r in rows.items():
        _check_stats(r["stats"], repeats if key != "reference" else len(r["stats"]["all"]),
                     (case, key))
        assert r["floor"] > 0 and r["to_floor"] > 0, (case, key)
        assert f"| {r['label']}" in md, (case, key)
        assert r["label"].startswith(LABELS[key]), (case, key)
    comps = {(c["system"], c["peer"]): c for c in table["comparisons"]}
    for v in variants:
        f32 = F32_PEER.get(v) if "csr-f32" in PEERS[case] else None  # float32 CSR
        expected = ((peers - {v}) | ({SCIPY_PEER[v]} if v in SCIPY_PEER and case in "ab"
                                     else set()) | ({f32} if f32 else set()))
        assert {p for s, p in comps if s == v} == expected, (case, v)
        for p in expected:
            c = comps[(v, p)]
            assert math.isfinite(c["speedup"]) and c["speedup"] > 0, (case, v, p)
            if p not in ("dense", f32):  # another kind's weights: a ratio, not an agreement
                assert 0 <= c["max_abs_diff"] < diff_bound, (case, v, p, c)
            if "grad_rel_diff" in c:
                assert 0 <= c["grad_rel_diff"] < 1e-3, (case, v, p, c)


def test_quick_suite_inference_cases(suite):
    from benchmarks.suite.config import VARIANTS

    res, md, _ = suite
    a = res["cases"]["a"]
    _check_timing_table("a", a["tables"]["stream"], _expected_peers("a"),
                        a["config"]["repeats"], list(VARIANTS), md)
    b = res["cases"]["b"]
    assert set(b["tables"]) == {"B=1", "B=16"}
    for table in b["tables"].values():
        _check_timing_table("b", table, _expected_peers("b"), b["config"]["repeats"],
                            list(VARIANTS), md)
    for case in (a, b):  # every absent peer is said so
        for p in ("torch-cell", "torch-lstm", "ort"):
            if p not in case["tables"][next(iter(case["tables"]))]["rows"]:
                assert p in case["skipped"], p


def test_quick_suite_training_cases(suite):
    from benchmarks.suite.config import TRAINABLE, VARIANTS

    res, md, _ = suite
    c = res["cases"]["c"]
    _check_timing_table("c", c["tables"]["train"], _expected_peers("c"), c["config"]["repeats"],
                        list(TRAINABLE), md)
    for v in set(VARIANTS) - set(TRAINABLE):
        assert "inference" in c["skipped"][v]
    d = res["cases"]["d"]
    assert set(d["train"]) == {str(T) for T in d["config"]["T"]}
    for T, row in d["train"].items():
        assert {"numlstm", "numlstm-ckpt"} <= set(row), T
        for system, e in row.items():
            # > 0: the suite's parent must not hide the step (a child's
            # ru_maxrss starts at its parent's peak)
            assert e["peak_increase_mib"] > 0 and e["step_s"]["median"] > 0, (T, system)
            assert e["memory_floor_mib"] > 0 and e["time_floor_s"] > 0, (T, system)
            if system != "torch" and "torch" in row:
                assert e["grad_rel_diff_to_torch"] < 1e-3, (T, system)


def test_quick_suite_bytes_cold_start_and_scaling(suite):
    from benchmarks.suite.config import VARIANTS

    res, md, _ = suite
    e = res["cases"]["e"]["rows"]
    assert set(e) == set(VARIANTS)
    sizes = [e[v]["weight_bytes"] for v in ("dense", "csr90", "csr90-u16", "csr90-f16",
                                            "csr90-i8")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    assert e["bsr90"]["weight_bytes"] < e["csr90"]["weight_bytes"]
    assert all(r["values_bytes"] <= r["weight_bytes"] for r in e.values())

    f = res["cases"]["f"]
    rows = f["tables"]["cold"]["rows"]
    assert {"dense", "csr90", "dense (empty cache)"} <= set(rows)
    for key, r in rows.items():
        _check_stats(r["stats"], len(r["stats"]["all"]), key)
        assert r["to_floor"] > 0 and r["import_s"] > 0, key
    for c in f["tables"]["cold"]["comparisons"]:
        assert c["speedup"] > 0 and c["max_abs_diff"] < 1e-5, c
    if _have("torch"):
        assert "torch-cell" in rows

    g = res["cases"]["g"]
    cfg = g["config"]
    expected = {"numlstm-dense", "numlstm-csr", "numlstm-bsr", "scipy-csr", "scipy-bsr"}
    expected |= {"torch-cell"} if _have("torch") else set()
    assert set(g["points"]) == expected
    csr = g["points"]["numlstm-csr"]
    assert {f"H={H},s=0.9" for H in cfg["H"]} <= set(csr)
    assert {f"H={cfg['sparsity_H']},s={s:g}" for s in cfg["sparsity"]} <= set(csr)
    for system, pts in g["points"].items():
        for key, p in pts.items():
            _check_stats(p["stats"], cfg["repeats"], (system, key))
    agreed = [c for c in g["comparisons"] if "max_abs_diff" in c]
    assert {(c["system"], c["peer"]) for c in agreed} >= {("numlstm-csr", "scipy-csr"),
                                                          ("numlstm-bsr", "scipy-bsr")}
    assert all(c["max_abs_diff"] < 1e-4 for c in agreed), agreed
    assert set(g["crossover"]) == {"numlstm-csr", "numlstm-bsr"}
    assert "**As H grows**" in md and "**As sparsity grows**" in md


def test_quick_coldstart_benchmark_writes_expected_entries(quick_run):
    with open(quick_run / "coldstart.json") as f:
        res = json.load(f)
    md = (quick_run / "coldstart.md").read_text()
    assert md.startswith("# Cold start") and "L2" in md
    assert set(res["runs"]) == {"cold", "warm", "after ahead"}
    for label, run in res["runs"].items():
        assert set(run["marks"]) == set(res["stages"]), label
        for wall, cpu in run["marks"].values():
            assert wall >= 0 and cpu >= 0, label
    assert res["runs"]["cold"]["top"]  # an empty cache: something compiled

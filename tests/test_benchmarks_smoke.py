"""Smoke test of ``python -m benchmarks --quick`` (entries only, no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_writes_expected_entries(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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

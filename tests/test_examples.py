"""Smoke tests of examples/: each runs with tiny settings; the service is driven
over loopback by concurrent clients."""

import http.client
import json
import os
import sys
import threading

import numpy as np
import pytest

import numlstm

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import anomaly_stream  # noqa: E402
import char_lm  # noqa: E402
import forecast_co2  # noqa: E402
import service  # noqa: E402


def test_forecast_runs_and_beats_nothing_silly(capsys):
    rows = forecast_co2.main(["--quick"])
    labels = [r[0] for r in rows]
    assert labels[0].startswith("persistence") and "int8" in labels[-1]
    assert all(np.isfinite(r[1]) and 0 < r[1] < 5 for r in rows)  # RMSE in ppm
    assert "RMSE (ppm)" in capsys.readouterr().out
    co2 = forecast_co2.load_series()
    assert co2.shape == (2284,) and np.all(np.isfinite(co2)) and 310 < co2.min() < co2.max() < 380


def test_char_lm_runs(capsys):
    rows = char_lm.main(["--quick"])
    assert [r[0].split()[0] for r in rows] == ["dense", "90%", "..."]
    assert rows[1][2] < rows[0][2] and rows[2][2] < rows[1][2]  # bytes shrink
    assert "bits/char" in capsys.readouterr().out


def test_anomaly_stream_holds_constant_memory():
    r = anomaly_stream.run(steps=3000, hidden=4, epochs=1, rate=0.01, log=lambda *a: None)
    assert r["injected"] > 0 and 0 <= r["recall"] <= 1
    held = [nbytes for _, nbytes in r["memory"]]
    assert max(held) == min(held), r["memory"]


def _request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data else None)


@pytest.fixture
def server():
    model = numlstm.LSTM(3, 5, num_layers=2, seed=0)
    srv = service.make_server(model, max_sessions=20)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield model, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_service_keeps_one_stream_per_session(server):
    model, port = server
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((6, 3)) for _ in range(8)]
    results, errors = {}, []

    def client(k):
        try:
            status, reply = _request(port, "POST", "/sessions")
            assert status == 201
            sid = reply["session"]
            hs = []
            for t in range(6):  # one step per request, interleaved with other clients
                status, reply = _request(port, "POST", f"/sessions/{sid}/step",
                                         {"x": inputs[k][t].tolist()})
                assert status == 200, reply
                hs.append(reply["h"][0])
            results[k] = np.array(hs)
            assert _request(port, "DELETE", f"/sessions/{sid}")[0] == 204
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(8):  # no mixed-up sessions: each equals its own sequence run alone
        y, _ = model(inputs[k].astype(np.float32)[:, None, :])
        np.testing.assert_allclose(results[k], y[:, 0], rtol=1e-5, atol=1e-6)
    assert _request(port, "GET", "/health")[1]["sessions"] == 0


def test_service_answers_bad_requests_with_4xx(server):
    _, port = server
    sid = _request(port, "POST", "/sessions")[1]["session"]
    step = f"/sessions/{sid}/step"
    cases = [("POST", step, b"{not json", 400, "not valid JSON"),
             ("POST", step, {"y": [1, 2, 3]}, 400, 'with "x"'),
             ("POST", step, {"x": [1, 2]}, 400, "x must be 3 numbers"),
             ("POST", step, {"x": ["a", "b", "c"]}, 400, "numbers only"),
             ("POST", step, {"x": [1e400, 0, 0]}, 400, "finite"),
             ("POST", "/sessions/" + "0" * 32 + "/step", {"x": [1, 2, 3]}, 404, "no session"),
             ("GET", "/nowhere", None, 404, "no such path"),
             ("GET", step, None, 405, "not allowed")]
    for method, path, body, status, message in cases:
        got, reply = _request(port, method, path, body)
        assert got == status and message in reply["error"], (path, body, got, reply)
    two = _request(port, "POST", step, {"x": [[1, 2, 3], [4, 5, 6]]})
    assert two[0] == 200 and len(two[1]["h"]) == 2
    assert _request(port, "POST", f"/sessions/{sid}/reset")[0] == 200
    for _ in range(19):
        _request(port, "POST", "/sessions")
    status, reply = _request(port, "POST", "/sessions")
    assert status == 429 and "at most 20 sessions" in reply["error"]

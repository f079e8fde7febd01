"""examples/service.py under load: many concurrent clients on loopback, each with
its own session (no lost or mixed-up sessions), and bad requests answered with
a 4xx and a message, never a 500 or a dropped connection. The load generator
is examples/service_load.py (``python examples/service_load.py`` prints the
throughput and latency table)."""

import os
import socket
import sys
import threading

import numpy as np
import pytest

import numlstm

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import service  # noqa: E402
import service_load  # noqa: E402

I = 8


@pytest.fixture(scope="module")
def served():
    model = numlstm.LSTM(I, 32, num_layers=2, seed=0)
    srv = service.make_server(model, max_sessions=200)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    service_load.run_load(srv.server_address[1], 2, 2, input_size=I)  # warm up the kernels
    yield model, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _sessions(port):
    c = service_load._Client("127.0.0.1", port, 10)
    status, reply, _ = c.request("GET", "/health")
    c.close()
    assert status == 200
    return reply["sessions"]


def test_many_concurrent_clients_each_get_their_own_sequence(served):
    model, port = served
    r = service_load.run_load(port, 24, 40, input_size=I, seed=3)
    assert not r["errors"], r["errors"][:3]
    assert r["requests"] == 24 * 40
    assert service_load.check_outputs(model, r) <= 1e-6  # each equals its own stream
    assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert _sessions(port) == 0  # every session was deleted


@pytest.mark.parametrize("per_request,keep_alive", [(5, True), (1, False)])
def test_multi_step_requests_and_new_connections(served, per_request, keep_alive):
    model, port = served
    r = service_load.run_load(port, 8, 20, input_size=I, seed=4,
                              steps_per_request=per_request, keep_alive=keep_alive)
    assert not r["errors"], r["errors"][:3]
    assert r["requests"] == 8 * 20 // per_request
    assert service_load.check_outputs(model, r) <= 1e-6


def test_a_mixed_up_session_would_be_caught(served):
    model, port = served
    r = service_load.run_load(port, 2, 5, input_size=I, seed=5)
    r["outputs"] = r["outputs"][::-1]
    with pytest.raises(AssertionError, match="client 0"):
        service_load.check_outputs(model, r)


def test_bad_requests_get_4xx_with_a_message_under_load(served):
    """Every bad request, sent while 16 clients load the service: a 4xx with a
    JSON message, and the same connection (when kept open) still serves a good
    request; the load itself sees no error."""
    model, port = served
    load = {}
    t = threading.Thread(target=lambda: load.update(
        service_load.run_load(port, 16, 30, input_size=I, seed=6)))
    t.start()
    rows = service_load.probe_bad_requests(port, I)
    t.join()
    problems = [(label, status, problem) for label, status, _, problem in rows if problem]
    assert not problems, problems
    assert {label for label, *_ in rows} >= {"malformed JSON", "wrong width", "huge body",
                                             "unknown session", "PUT", "unknown method"}
    statuses = {label: status for label, status, _, _ in rows}
    assert statuses["huge body"] == 413 and statuses["unknown session"] == 404
    assert statuses["PUT"] == 405 and statuses["GET /sessions"] == 405
    assert not load["errors"], load["errors"][:3]
    assert service_load.check_outputs(model, load) <= 1e-6
    assert _sessions(port) == 0


def _raw(port, data):
    """Send raw bytes; the whole reply until the server closes (or 5 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_protocol_errors_get_json_errors_and_close(served):
    _, port = served
    chunked = _raw(port, b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 501") and b"Transfer-Encoding is not" in chunked
    assert b"Connection: close" in chunked
    garbage = _raw(port, b"NOT A REQUEST LINE AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400") and b'{"error"' in garbage
    head = _raw(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and head.endswith(b"\r\n\r\n")  # no body


def test_an_unexpected_error_is_a_500_with_a_message_not_a_dropped_connection(served,
                                                                               monkeypatch):
    _, port = served

    def broken(self):
        raise KeyError("boom")

    monkeypatch.setattr(service.Service, "health", broken)
    c = service_load._Client("127.0.0.1", port, 10)
    status, reply, _ = c.request("GET", "/health")
    c.close()
    assert status == 500 and "KeyError" in reply["error"]


def test_load_generator_main_prints_a_table(capsys):
    res = service_load.main(["--clients", "4", "--steps", "10"])
    out = capsys.readouterr().out
    assert "p99 ms" in out and "bad request" in out
    assert res["ok"], res["probes"]
    assert np.isfinite(res["load"][0]["p99_ms"])

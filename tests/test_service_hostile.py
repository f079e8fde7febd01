"""examples/service.py against hostile clients (issue 16): slow connections up to
the descriptor limit, a deadline that trickled bytes do not extend, accept out
of descriptors, amplification (steps and reply size), sessions held for good,
numbers that are not numbers or not finite in the model's dtype, request
smuggling headers, command-line mistakes, and a protocol fuzz over raw request
bytes. Loopback only; each test is bounded in time."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SERVICE = os.path.join(EXAMPLES, "service.py")
sys.path.insert(0, EXAMPLES)

import service  # noqa: E402

try:
    import resource
except ImportError:  # not on Windows
    resource = None

I, H = 2, 4
LINUX = sys.platform.startswith("linux") and resource is not None


@pytest.fixture(scope="module")
def model():
    m = numlstm.LSTM(I, H, seed=0)
    m.stream(1).step(np.zeros((1, I), np.float32))  # compile the kernels once
    return m


@pytest.fixture
def serve(model):
    """serve(**limits) -> (server, port): an in-process server, shut down after the test."""
    servers = []

    def start(m=None, **limits):
        srv = service.make_server(m or model, **limits)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, srv.server_address[1]

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _strict(raw):
    """JSON as a strict parser reads it: NaN and Infinity are errors."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(raw, parse_constant=refuse)


def _raw(port, data, timeout=5.0, half_close=True):
    """Send raw bytes (then end the sending side); everything the server sends
    until it closes or ``timeout`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before taking everything
            pass
        chunks, end = [], time.monotonic() + timeout
        try:
            while time.monotonic() < end and (chunk := s.recv(65536)):
                chunks.append(chunk)
        except OSError:  # a timeout, or a reset after the server's reply
            pass
    return b"".join(chunks)


_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*\r\n")


def _replies(data, head_requests=False):
    """Split what the server sent into [(status, headers bytes, parsed JSON body)];
    fails on anything that is not a well-formed HTTP/1.x reply with strict JSON.
    ``head_requests``: some replies may be to HEAD (no body)."""
    out = []
    while data:
        m = _STATUS.match(data)
        assert m, f"not an HTTP status line: {data[:80]!r}"
        end = data.index(b"\r\n\r\n") + 4
        head, status = data[:end], int(m.group(1))
        if status == 100:  # "100 Continue" before the reply to an Expect header
            data = data[end:]
            continue
        n = re.search(rb"\r\nContent-Length: ([0-9]+)\r\n", head)
        assert n, f"no Content-Length: {head!r}"
        if head_requests and (not data[end:] or _STATUS.match(data[end:])):
            # A reply to HEAD: the length of a body it does not send.
            out.append((status, head, None))
            data = data[end:]
            continue
        body, data = data[end:end + int(n.group(1))], data[end + int(n.group(1)):]
        assert len(body) == int(n.group(1)), "reply shorter than its Content-Length"
        out.append((status, head, _strict(body) if body else None))
    return out


def _request(port, method, path, body=None, timeout=10.0):
    """(status, strict-JSON reply) over a fresh connection."""
    raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    raw = raw or b""
    data = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw
    replies = _replies(_raw(port, data, timeout))
    assert len(replies) == 1, replies
    return replies[0][0], replies[0][2]


def _session(port):
    status, reply = _request(port, "POST", "/sessions")
    assert status == 201, reply
    return reply["session"]


def _health(port, timeout=10.0):
    return _request(port, "GET", "/health", timeout=timeout)


# -- connections: slowloris, deadlines, descriptors ------------------------------------------

def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def slow_clients(port, n, header=b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "):
    """``n`` connections that each sent part of a request and stay open; a
    ``trickle()`` sends each one more byte (the slowloris pattern)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(header)
        socks.append(s)

    def trickle():
        for s in socks:
            try:
                s.send(b"a")
            except OSError:  # the server evicted this one
                pass
    return socks, trickle


@pytest.mark.skipif(not LINUX, reason="needs RLIMIT_NOFILE and /proc")
def test_health_answers_while_slow_connections_exceed_the_descriptor_limit(model, tmp_path):
    """The service under a 96-descriptor limit, 116 slowloris connections open
    and trickling: /health answers in well under a second, the server stays
    within its descriptors and does not spin."""
    path = str(tmp_path / "model.npz")
    numlstm.save(model, path)
    limit = 96
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc = subprocess.Popen(
        [sys.executable, SERVICE, path, "--port", "0", "--request-timeout", "60"],
        stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)))
    socks = []
    try:
        line = proc.stdout.readline()
        assert "http://" in line, line
        port = int(line.rsplit(":", 1)[1])
        assert _health(port)[0] == 200
        socks, trickle = slow_clients(port, limit + 20)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        latencies = []
        for _ in range(4):
            trickle()
            time.sleep(0.25)
            t = time.perf_counter()
            status, reply = _health(port, timeout=10)
            latencies.append(time.perf_counter() - t)
            assert status == 200 and reply["status"] == "ok"
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert max(latencies) < 2.0, latencies
        assert cpu < 0.6, f"the server used {cpu:.0%} of a core"
        assert open_fds < limit
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_the_deadline_is_per_request_in_all_not_per_read(serve):
    """A client sending a byte every 0.1 s is closed about ``request_timeout``
    after it connected, not kept forever."""
    srv, port = serve(request_timeout=1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=0.1) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        closed = None
        while closed is None and time.monotonic() - t0 < 6:
            try:
                s.send(b"a")
                if s.recv(100) == b"":
                    closed = time.monotonic() - t0
            except TimeoutError:
                pass
            except OSError:  # reset: closed
                closed = time.monotonic() - t0
    assert closed is not None and 0.9 < closed < 2.5, closed
    assert len(srv.connections) == 0


def test_a_slow_step_does_not_lose_its_reply(serve, monkeypatch):
    """The clock stops while the server steps: a step slower than
    ``request_timeout`` still gets its reply (the state moved on: the client
    must see the outputs)."""
    step = service.Service.step

    def slow_step(self, sid, body):
        time.sleep(1.5)
        return step(self, sid, body)

    monkeypatch.setattr(service.Service, "step", slow_step)
    _, port = serve(request_timeout=0.5)
    sid = _session(port)
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", {"x": [0.5, 0.5]})
    assert status == 200 and len(reply["h"]) == 1


def test_at_the_connection_limit_the_oldest_waiting_connection_gives_way(serve):
    srv, port = serve(max_connections=4, request_timeout=30.0)
    socks, trickle = slow_clients(port, 10)
    try:
        t = time.perf_counter()
        assert _health(port, timeout=5)[0] == 200
        assert time.perf_counter() - t < 1.0
        time.sleep(0.2)
        assert len(srv.connections) <= 4
        socks[0].settimeout(2)
        assert socks[0].recv(100) == b""  # the first one was evicted (closed)
    finally:
        for s in socks:
            s.close()


def test_when_every_connection_is_busy_a_new_one_gets_503(serve, monkeypatch):
    release = threading.Event()
    health = service.Service.health

    def slow_health(self):
        release.wait(10)
        return health(self)

    monkeypatch.setattr(service.Service, "health", slow_health)
    srv, port = serve(max_connections=2)
    results = []
    busy = [threading.Thread(target=lambda: results.append(_health(port))) for _ in range(2)]
    for t in busy:
        t.start()
    def both_busy():
        states = list(srv.connections._open.values())
        return len(states) == 2 and not any(evictable for _, evictable in states)

    deadline = time.monotonic() + 5
    while not both_busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    third = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    release.set()
    for t in busy:
        t.join(10)
    (status, head, reply), = _replies(third)
    assert status == 503 and "busy" in reply["error"] and b"Connection: close" in head
    assert [s for s, _ in results] == [200, 200]


class _OutOfDescriptors:
    """A listening socket whose accept fails with EMFILE, as at the descriptor limit."""

    def __init__(self, sock):
        self.sock, self.calls = sock, 0

    def fileno(self):
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_accept_out_of_descriptors_backs_off_instead_of_spinning(model):
    srv = service.make_server(model)
    real = srv.socket
    srv.socket = full = _OutOfDescriptors(real)
    pending = socket.create_connection(("127.0.0.1", srv.server_address[1]))  # readable
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        calls = full.calls
        srv.socket = real  # descriptors free again: the pending connection is served
        pending.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        pending.settimeout(5)
        reply = pending.recv(65536)
    finally:
        pending.close()
        srv.shutdown()
        srv.socket = real
        srv.server_close()
    assert 2 <= calls <= 20, f"{calls} accept calls in 1.5 s"  # a spin makes ~10^5
    assert reply.startswith(b"HTTP/1.1 200")


# -- amplification: steps and reply size -------------------------------------------------

def test_the_amplification_request_is_refused_before_any_work(serve):
    """The issue's case: a 1 MiB body asking for 262,142 steps of an I=1, H=256
    model (a 1.49 GB reply before) gets 413 at once."""
    big = numlstm.LSTM(1, 256, seed=0)
    _, port = serve(big)
    sid = _session(port)
    body = b'{"x": [' + b"[0]," * 262_141 + b"[0]]}"
    assert len(body) == 1 << 20
    t = time.perf_counter()
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", body)
    assert status == 413 and "at most 1024 steps" in reply["error"], reply
    assert time.perf_counter() - t < 5
    # The default 1 MiB reply cap: 157 steps of 256 outputs fit, 158 do not.
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", {"x": [[0.5]] * 157})
    assert status == 200 and len(reply["h"]) == 157
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", {"x": [[0.5]] * 158})
    assert status == 413 and "over 1048576" in reply["error"], reply


def test_step_and_reply_caps_are_configurable(serve):
    per_step = service.REPLY_BYTES_PER_NUMBER * H + 4
    _, port = serve(max_steps=4, max_reply_bytes=3 * per_step + 16)
    sid = _session(port)
    step = f"/sessions/{sid}/step"
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, I)) * 1e-30).tolist()  # tiny values: the longest reprs
    status, reply = _request(port, "POST", step, {"x": x[:3]})
    assert status == 200 and len(json.dumps(reply)) <= 3 * per_step + 16
    status, reply = _request(port, "POST", step, {"x": x[:4]})
    assert status == 413 and "over 340" in reply["error"], reply
    status, reply = _request(port, "POST", step, {"x": x[:5]})
    assert status == 413 and "at most 4 steps" in reply["error"], reply


def test_the_reply_bound_holds_for_the_longest_floats():
    longest = max(len(json.dumps(v)) for v in (-4.9406564584124654e-324, -1.2345678901234567e-38,
                                               -2.2250738585072014e-308, -0.12345678901234568))
    assert longest + len(", ") <= service.REPLY_BYTES_PER_NUMBER


# -- sessions: expiry and per-client cap ---------------------------------------------------

def test_unused_sessions_expire(serve):
    srv, port = serve(session_ttl=0.5)
    sid = _session(port)
    assert _request(port, "POST", f"/sessions/{sid}/step", {"x": [0.0] * I})[0] == 200
    _session(port)  # never used
    time.sleep(1.2)  # the server's loop sweeps every 0.5 s or sooner
    assert _health(port)[1]["sessions"] == 0
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", {"x": [0.0] * I})
    assert status == 404 and "unused" in reply["error"]


def test_one_client_cannot_take_every_session_for_good(serve):
    srv, port = serve(max_sessions=6, max_sessions_per_client=3, session_ttl=0.6)
    sids = [_session(port) for _ in range(3)]
    status, reply = _request(port, "POST", "/sessions")
    assert status == 429 and "3 sessions per client" in reply["error"]
    assert "session" in srv.service.create("192.0.2.7")  # another address still gets one
    assert _request(port, "DELETE", f"/sessions/{sids[0]}")[0] == 204
    _session(port)  # one ended: room again
    for _ in range(2):
        srv.service.create("192.0.2.8")
    with pytest.raises(service.BadRequest, match="at most 6 sessions"):
        srv.service.create("192.0.2.9")
    time.sleep(1.0)  # every session idle past the TTL
    assert "session" in srv.service.create("192.0.2.9")


# -- numbers -------------------------------------------------------------------------------

@pytest.mark.parametrize("label,body,message", [
    ("boolean", b'{"x": [true, 0]}', "numbers only"),
    ("numeric string", b'{"x": ["1e3", 0]}', "numbers only"),
    ("null", b'{"x": [null, 0]}', "numbers only"),
    ("object", b'{"x": [{}, 0]}', "numbers only"),
    ("5000-digit integer", b'{"x": [' + b"9" * 5000 + b', 0]}', "not valid JSON"),
    ("400-digit integer", b'{"x": [' + b"9" * 400 + b', 0]}', "within float range"),
    ("finite in float64 only", b'{"x": [1e39, 0]}', "finite as float32"),
    ("negative, float64 only", b'{"x": [[0, 0], [0, -1e39]]}', "finite as float32"),
    ("overflows to inf", b'{"x": [1e400, 0]}', "finite"),
    ("NaN token", b'{"x": [NaN, 0]}', "finite"),
    ("boolean in a later step", b'{"x": [[0, 0], [0, false]]}', "numbers only"),
    ("scalar", b'{"x": 1}', "x must be 2 numbers"),
])
def test_numbers_that_are_not_numbers_get_400(serve, label, body, message):
    _, port = serve()
    sid = _session(port)
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", body)
    assert status == 400 and message in reply["error"], (label, status, reply)
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", {"x": [0.5, -0.5]})
    assert status == 200  # the session is untouched


def test_finiteness_is_checked_in_the_models_dtype(serve):
    _, port = serve()
    sid = _session(port)
    status, reply = _request(port, "POST", f"/sessions/{sid}/step", b'{"x": [3e38, -3e38]}')
    assert status == 200 and np.all(np.isfinite(reply["h"]))  # finite in float32
    _, port64 = serve(numlstm.LSTM(I, H, seed=0, dtype=np.float64))
    sid = _session(port64)
    status, reply = _request(port64, "POST", f"/sessions/{sid}/step", b'{"x": [1e39, 0]}')
    assert status == 200 and np.all(np.isfinite(reply["h"]))


def test_a_non_finite_output_leaves_the_session_as_it_was(model):
    """Finite inputs that still overflow inside the model: 400, and the state
    is rolled back rather than NaN for every later step."""
    svc = service.Service(model)
    sid = svc.create()["session"]
    x = [[0.3, -0.2]]
    svc.step(sid, {"x": x})
    session = svc.sessions[sid]
    real = session.stream

    class Overflowing:
        state = property(lambda self: real.state)
        reset = real.reset

        def step(self, x_t, out=None):  # as a Stream's: into out when given
            h = real.step(x_t, out=out)
            h[...] = np.nan
            return h

    ref = model.stream(1)
    ref.step(np.array(x, np.float32))
    session.stream = Overflowing()
    with pytest.raises(service.BadRequest, match="state is unchanged"):
        svc.step(sid, {"x": [[1.0, 1.0], [2.0, 2.0]]})
    session.stream = real
    np.testing.assert_array_equal(svc.step(sid, {"x": x})["h"][0],
                                  ref.step(np.array(x, np.float32))[0])


def test_replies_are_strict_json_even_when_a_value_is_not_finite(serve, monkeypatch):
    monkeypatch.setattr(service.Service, "health", lambda self: {"value": float("nan")})
    _, port = serve()
    raw = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    (status, _, reply), = _replies(raw)  # _replies parses strictly
    assert status == 500 and "non-finite" in reply["error"] and b"NaN" not in raw


# -- headers: lengths and transfer codings ------------------------------------------------

_STEP = b"POST /sessions/%s/step HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("label,headers,status,message", [
    ("two equal lengths", b"Content-Length: 16\r\nContent-Length: 16\r\n", 400, "more than one"),
    ("two lengths", b"Content-Length: 16\r\nContent-Length: 3\r\n", 400, "more than one"),
    ("underscore", b"Content-Length: 1_6\r\n", 400, "bad Content-Length"),
    ("plus sign", b"Content-Length: +16\r\n", 400, "bad Content-Length"),
    ("minus sign", b"Content-Length: -1\r\n", 400, "bad Content-Length"),
    ("hex", b"Content-Length: 0x10\r\n", 400, "bad Content-Length"),
    ("two numbers", b"Content-Length: 16 16\r\n", 400, "bad Content-Length"),
    ("non-ASCII digits", "Content-Length: ١٦\r\n".encode(), 400, "bad Content-Length"),
    ("too many digits", b"Content-Length: 00000000000000000016\r\n", 400, "bad Content-Length"),
    ("chunked", b"Transfer-Encoding: chunked\r\n", 501, "Transfer-Encoding"),
    ("chunked and a length", b"Transfer-Encoding: chunked\r\nContent-Length: 16\r\n", 501,
     "Transfer-Encoding"),
    ("gzip", b"Content-Length: 16\r\nTransfer-Encoding: gzip\r\n", 501, "Transfer-Encoding"),
    ("identity", b"Content-Length: 16\r\nTransfer-Encoding: identity\r\n", 501,
     "Transfer-Encoding"),
    ("space before the colon", b"Transfer-Encoding : chunked\r\nContent-Length: 16\r\n", 400,
     "malformed header"),
    ("folded length", b"Content-Length: 1\r\n 6\r\n", 400, "folded"),
])
def test_ambiguous_request_lengths_are_refused_and_the_connection_closed(
        serve, label, headers, status, message):
    _, port = serve()
    sid = _session(port).encode()
    body = b'{"x": [0.5, 0.5]}'[:16]
    raw = _raw(port, _STEP % sid + headers + b"\r\n" + body + b"GET /health HTTP/1.1\r\n\r\n")
    replies = _replies(raw)
    assert len(replies) == 1, (label, replies)  # the smuggled request is never served
    got, head, reply = replies[0]
    assert got == status and message in reply["error"], (label, got, reply)
    assert b"Connection: close" in head


def test_a_body_shorter_than_its_length_is_400(serve):
    _, port = serve()
    sid = _session(port).encode()
    (status, _, reply), = _replies(_raw(port, _STEP % sid + b"Content-Length: 50\r\n\r\n{}"))
    assert status == 400 and "shorter" in reply["error"]


def test_http_0_9_gets_a_status_line(serve):
    _, port = serve()
    (status, _, reply), = _replies(_raw(port, b"GET /health\r\n"))
    assert status == 400 and "HTTP/0.9" in reply["error"]


# -- the request's head: a cap on the line and headers together (issue 24, case 5) --------

def test_a_header_block_over_the_cap_is_431_and_the_connection_closed(serve):
    """The issue's case: 90 header lines of 65 KB (5.9 MB, each line under
    http.server's own 64 KiB line limit, and fewer than its 100 headers)."""
    _, port = serve()
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 65000) for i in range(90))
    (status, head, reply), = _replies(_raw(port, b"GET /health HTTP/1.1\r\n" + lines + b"\r\n"))
    assert status == 431 and "header block over 16384 bytes" in reply["error"], reply
    assert b"Connection: close" in head
    (status, _, reply), = _replies(_raw(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"))
    assert status == 414 and "request line over 16384 bytes" in reply["error"], reply
    assert _health(port)[0] == 200


def test_the_cap_counts_the_whole_head_and_is_configurable(serve):
    _, port = serve(max_header_bytes=100)
    line = b"GET /health HTTP/1.1\r\n"

    def head(n):  # a head of exactly n bytes, blank line included
        return line + b"X: " + b"a" * (n - len(line) - 7) + b"\r\n\r\n"
    assert len(head(100)) == 100
    assert _replies(_raw(port, head(100)))[0][0] == 200
    assert _replies(_raw(port, head(101)))[0][0] == 431
    with pytest.raises(ValueError, match="max_header_bytes must be a positive number"):
        service.Limits(max_header_bytes=0)


def test_connections_stalled_in_their_headers_hold_bounded_memory(serve):
    """20 clients each send 1 MB of header lines and never end the block:
    each gets 431 after the cap, and the server's memory grows by well under
    a megabyte's worth a connection (it buffered up to 6.4 MB each before)."""
    import tracemalloc

    n, per_client = 20, 1 << 20
    _, port = serve(request_timeout=5.0)
    assert _health(port)[0] == 200
    line = b"X-B: " + b"b" * 60000 + b"\r\n"  # each under http.server's line limit
    payload = b"GET /health HTTP/1.1\r\n" + line * (per_client // len(line))
    statuses = [None] * n

    def client(k):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(payload)  # and no blank line: the block never ends
                statuses[k] = s.recv(64)
            except OSError as e:
                statuses[k] = e

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(r, bytes) and r.startswith(b"HTTP/1.1 431 ") for r in statuses), \
        statuses
    assert peak < n * (128 << 10), peak


# Header blocks: names and values of any sizes, from a handful to a few hundred
# lines, some past the cap; names are tokens and values visible ASCII, so that a
# block within the cap and http.server's 100 headers is a valid request.
_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                 min_size=1, max_size=40).map(lambda t: b"X-" + t.encode())
_VALUE = st.one_of(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60),
                   st.integers(0, 3000).map(lambda n: "v" * n)).map(str.encode)
_BLOCKS = st.lists(st.tuples(_TOKEN, _VALUE), max_size=120)
_CAP = 2048


def test_header_block_fuzz_gets_200_within_the_cap_and_431_past_it(serve):
    _, port = serve(max_header_bytes=_CAP, request_timeout=2.0)

    @settings(max_examples=min(_FUZZ, 120), deadline=None)
    @given(_BLOCKS, st.sampled_from([b"\r\n", b"\n"]))
    def fuzz(block, eol):
        head = b"GET /health HTTP/1.1" + eol
        head += b"".join(name + b": " + value + eol for name, value in block) + eol
        (status, _, reply), = _replies(_raw(port, head, timeout=5.0))
        if len(head) > _CAP or len(block) > 100:  # http.server allows 100 headers
            assert status == 431, (len(head), len(block), reply)
        else:
            assert status == 200, (len(head), len(block), reply)

    fuzz()
    assert _health(port)[0] == 200


# -- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--port", "99999"], "--port: must be 0 to 65535"),
    (["--port", "-1"], "--port: must be 0 to 65535"),
    (["--port", "http"], "--port: must be 0 to 65535"),
    (["--max-steps", "0"], "--max-steps: must be a positive int"),
    (["--request-timeout", "nan"], "--request-timeout: must be a positive float"),
    (["--session-ttl", "inf"], "--session-ttl: must be a positive float"),
])
def test_bad_flags_give_a_one_line_usage_error(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        service.main(["model.npz", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_port_out_of_range_from_the_shell_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, SERVICE, str(tmp_path / "m.npz"), "--port", "99999"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("must be 0 to 65535 (0: any free port), "
                                                     "got '99999'")


def test_a_missing_model_is_one_line(capsys, tmp_path):
    assert service.main([str(tmp_path / "absent.npz"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("service: error:") and len(err.strip().splitlines()) == 1


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_steps must be a positive number"):
        service.Limits(max_steps=0)
    with pytest.raises(ValueError, match="request_timeout"):
        service.Limits(request_timeout=True)


# -- protocol fuzz -------------------------------------------------------------------------

_EOL = st.sampled_from([b"\r\n", b"\n"])
_HEADER_NAMES = st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection",
                                 b"Expect", b"Host", b"Content-Type", b"X-A"])
_HEADER_VALUES = st.sampled_from([b"0", b"2", b"17", b"-1", b"1_0", b"+10", b"99999999999",
                                  b"chunked", b"close", b"keep-alive", b"100-continue",
                                  b"application/json", b""]) | st.binary(max_size=12)
_HEADER = st.tuples(_HEADER_NAMES | st.binary(max_size=8),
                    st.sampled_from([b": ", b":", b" : ", b""]), _HEADER_VALUES, _EOL
                    ).map(b"".join) | st.sampled_from([b" folded\r\n", b"\tx\r\n"])
_BODIES = st.sampled_from([b"", b'{"x": [0.5, 0.5]}', b'{"x": [[1, 2], [3, 4]]}',
                           b'{"x": [true, "1e3"]}', b'{"x": [1e39, 0]}', b'{"x": [NaN, 1]}',
                           b"[" * 50, b'{"x": [' + b"1" * 5000 + b", 0]}", b"\xff\xfe"]
                          ) | st.binary(max_size=40)
_METHODS = st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"HEAD", b"BREW", b"get", b""])
_PATHS = st.sampled_from([b"/health", b"/sessions", b"/sessions/SID/step",
                          b"/sessions/SID/reset", b"/sessions/SID", b"/", b"*", b"/%00",
                          b"/sessions/" + b"0" * 32 + b"/step", b"/health?x=1",
                          b"http://x/health"]) | st.binary(max_size=16)
_VERSIONS = st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b"", b" HTTP/0.9", b" HTTP/2.0",
                             b" HTTP/1.1 extra", b" http/1.1", b" HTTP/1.10"])


@st.composite
def _requests(draw):
    line = draw(_METHODS) + b" " + draw(_PATHS) + draw(_VERSIONS) + draw(_EOL)
    headers = b"".join(draw(st.lists(_HEADER, max_size=5)))
    body = draw(_BODIES)
    if draw(st.booleans()):  # mostly a length that matches, so that bodies get parsed
        headers += b"Content-Length: %d\r\n" % len(body)
    return line + headers + draw(_EOL) + body


_PAYLOADS = st.lists(_requests(), min_size=1, max_size=3).map(b"".join) | st.binary(max_size=200)
_FUZZ = int(os.environ.get("NUMLSTM_FUZZ_EXAMPLES") or 200)


def test_protocol_fuzz_never_crashes_the_service(serve):
    """Raw request bytes (mostly near-HTTP, some pure noise, some pipelined):
    every reply is a well-formed HTTP/1.x reply with strict JSON and no 500,
    or the connection just closes; afterwards /health and a session work."""
    srv, port = serve(request_timeout=2.0)
    sid = _session(port).encode()
    seen = set()

    @settings(max_examples=_FUZZ, deadline=None)
    @given(_PAYLOADS)
    def fuzz(payload):
        raw = _raw(port, payload.replace(b"SID", sid), timeout=5.0)
        for status, _, reply in _replies(raw, head_requests=b"HEAD" in payload):
            seen.add(status)
            assert status != 500, (payload, reply)
            assert 100 <= status < 600

    fuzz()
    assert seen & {400, 404, 405} and len(seen) >= 4, seen
    status, reply = _health(port)
    assert status == 200 and reply["status"] == "ok"
    sid = _session(port)
    assert _request(port, "POST", f"/sessions/{sid}/step", {"x": [0.1, 0.2]})[0] == 200
    time.sleep(0.6)  # connections all closed and swept
    assert len(srv.connections) == 0

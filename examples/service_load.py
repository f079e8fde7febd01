"""A load generator for examples/service.py: many concurrent clients, each with
its own session, stepping their own sequences; throughput, latency
percentiles, errors, and a check that no session was lost or mixed up.

    python examples/service_load.py [MODEL.npz] [--clients 1 8 32 128] [--steps 200]
                                    [--modes pool streams noop] [--hidden 64]

``main`` starts the service on the saved model in a separate process per
mode (``examples/service.py MODEL --port 0 --mode MODE``; without MODEL, a
random two-layer model, I=8, H=``--hidden`` (64), is saved to a temporary
folder first), runs the load for each number of clients, compares every
client's outputs with the model streamed locally on that client's own
sequence (not in ``noop`` mode, which runs no model), sends a set of bad
requests to the first mode's server, and prints a table per mode and a
comparison: ``pool`` (sessions in one StreamPool, steps batched) against
``streams`` (one Stream per session) and ``noop`` (the same server without a
model: the HTTP layer's own limit).
``run_load(port, clients, steps, ...)`` is the reusable part (the tests drive
it against an in-process server).
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


class _Client:
    """One HTTP/1.1 connection (kept alive, reopened after a close), JSON bodies."""

    def __init__(self, host, port, timeout, keep_alive=True):
        self.host, self.port, self.timeout, self.keep_alive = host, port, timeout, keep_alive
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        """(status, parsed JSON reply or None, raw bytes); raises on a dropped connection."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        try:
            self.conn.request(method, path, body=raw, headers=hdrs)
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.close()
            raise
        if resp.will_close or not self.keep_alive:
            self.close()
        try:
            reply = json.loads(data) if data else None
        except ValueError:
            reply = None
        return resp.status, reply, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _percentiles(latencies):
    lat = np.asarray(latencies) * 1e3
    if lat.size == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "max_ms": float(lat.max())}


def run_load(port, clients, steps, *, input_size, host="127.0.0.1", steps_per_request=1,
             seed=0, keep_alive=True, timeout=60.0):
    """Drive the service at ``host:port`` with ``clients`` threads.

    Each client creates a session, sends ``steps`` time steps of its own
    sequence (standard normal, float32 values, ``steps_per_request`` steps per
    request), keeps every reply, and deletes its session. All clients start
    together (a barrier) and run at once.

    Returns a dict: ``requests`` (step requests sent), ``errors`` (list of
    ``(client, what)``: a non-2xx reply or an exception, such as a dropped
    connection), ``seconds`` (wall time of the step phase), ``throughput_rps``
    (step requests per second), ``steps_per_s``, ``p50_ms``/``p90_ms``/
    ``p99_ms``/``max_ms`` (step request latencies), and per client
    ``inputs[k]`` (steps, I) float32 and ``outputs[k]`` (steps, O) or None.
    """
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((steps, input_size)).astype(np.float32)
              for _ in range(clients)]
    outputs = [None] * clients
    latencies = [[] for _ in range(clients)]
    errors = []
    start = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def client(k):
        c = _Client(host, port, timeout, keep_alive)
        try:
            status, reply, _ = c.request("POST", "/sessions")
            if status != 201:
                raise RuntimeError(f"create: {status} {reply}")
            sid = reply["session"]
        except Exception as e:  # noqa: BLE001 - counted as an error
            errors.append((k, f"create: {e!r}"))
            sid = None
        start.wait()
        try:
            if sid is not None:
                hs = []
                for t0 in range(0, steps, steps_per_request):
                    x = inputs[k][t0:t0 + steps_per_request]
                    body = {"x": x[0].tolist() if steps_per_request == 1 else x.tolist()}
                    t = time.perf_counter()
                    status, reply, raw = c.request("POST", f"/sessions/{sid}/step", body)
                    latencies[k].append(time.perf_counter() - t)
                    if status != 200:
                        raise RuntimeError(f"step at t={t0}: {status} {raw[:200]!r}")
                    hs.extend(reply["h"])
                outputs[k] = np.array(hs)
        except Exception as e:  # noqa: BLE001 - counted as an error
            errors.append((k, f"step: {e!r}"))
        done.wait()
        if sid is not None:
            try:
                status, reply, _ = c.request("DELETE", f"/sessions/{sid}")
                if status != 204:
                    errors.append((k, f"delete: {status} {reply}"))
            except Exception as e:  # noqa: BLE001 - counted as an error
                errors.append((k, f"delete: {e!r}"))
        c.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    done.wait()
    seconds = time.perf_counter() - t0
    for t in threads:
        t.join()
    lat = [v for per in latencies for v in per]
    return {"clients": clients, "steps": steps, "steps_per_request": steps_per_request,
            "keep_alive": keep_alive, "requests": len(lat), "errors": errors,
            "seconds": seconds, "throughput_rps": len(lat) / seconds if seconds else 0.0,
            "steps_per_s": sum(len(o) for o in outputs if o is not None) / seconds
            if seconds else 0.0,
            **_percentiles(lat), "inputs": inputs, "outputs": outputs}


def check_outputs(model, result):
    """Largest |difference| between each client's outputs and ``model`` streamed
    locally over that client's own inputs; raises AssertionError naming the
    first client whose outputs are missing or differ (a lost or mixed-up session)."""
    worst = 0.0
    for k, (x, h) in enumerate(zip(result["inputs"], result["outputs"], strict=True)):
        if h is None:
            raise AssertionError(f"client {k}: no outputs")
        stream = model.stream(1)
        ref = np.stack([stream.step(x[t:t + 1])[0].copy() for t in range(len(x))])
        if h.shape != ref.shape:
            raise AssertionError(f"client {k}: outputs {h.shape}, expected {ref.shape}")
        diff = float(np.max(np.abs(h - ref))) if h.size else 0.0
        if not diff <= 1e-6:
            raise AssertionError(f"client {k}: outputs differ from its own sequence's by {diff}")
        worst = max(worst, diff)
    return worst


def bad_requests(input_size, max_body=1 << 20):
    """``(label, method, path, body, headers)`` cases that must each get a 4xx with a
    JSON ``{"error": message}``. ``{sid}`` in a path stands for a live session."""
    ok_x = [0.0] * input_size
    huge = b'{"x": [' + b"0.0, " * (max_body // 5 + 1) + b"0.0]}"
    return [
        ("malformed JSON", "POST", "/sessions/{sid}/step", b"{not json", None),
        ("not UTF-8", "POST", "/sessions/{sid}/step", b"\xff\xfe{}", None),
        ("JSON not an object", "POST", "/sessions/{sid}/step", [1, 2], None),
        ("no x", "POST", "/sessions/{sid}/step", {"y": ok_x}, None),
        ("wrong width", "POST", "/sessions/{sid}/step", {"x": ok_x + [0.0]}, None),
        ("ragged steps", "POST", "/sessions/{sid}/step", {"x": [ok_x, ok_x[:-1]]}, None),
        ("3-d x", "POST", "/sessions/{sid}/step", {"x": [[ok_x]]}, None),
        ("empty x", "POST", "/sessions/{sid}/step", {"x": []}, None),
        ("strings", "POST", "/sessions/{sid}/step", {"x": ["a"] * input_size}, None),
        ("NaN", "POST", "/sessions/{sid}/step", b'{"x": [NaN' + b", 0" * (input_size - 1)
         + b"]}", None),
        ("huge integer", "POST", "/sessions/{sid}/step",
         b'{"x": [1' + b"0" * 400 + b", 0" * (input_size - 1) + b"]}", None),
        ("deep nesting", "POST", "/sessions/{sid}/step", b"[" * 100_000 + b"]" * 100_000,
         None),
        ("huge body", "POST", "/sessions/{sid}/step", huge, None),
        ("bad Content-Length", "POST", "/sessions/{sid}/step", None,
         {"Content-Length": "ten"}),
        ("unknown session", "POST", "/sessions/" + "0" * 32 + "/step", {"x": ok_x}, None),
        ("malformed session id", "POST", "/sessions/xyz/step", {"x": ok_x}, None),
        ("unknown path", "GET", "/nowhere", None, None),
        ("GET a step", "GET", "/sessions/{sid}/step", None, None),
        ("GET /sessions", "GET", "/sessions", None, None),
        ("PUT", "PUT", "/sessions/{sid}", {"x": ok_x}, None),
        ("PATCH", "PATCH", "/sessions/{sid}/step", {"x": ok_x}, None),
        ("unknown method", "BREW", "/sessions", None, None),
        ("DELETE unknown session", "DELETE", "/sessions/" + "f" * 32, None, None),
    ]


def probe_bad_requests(port, input_size, host="127.0.0.1", timeout=30.0):
    """Send every ``bad_requests`` case (each on a fresh connection, then one good
    step on the same connection where it was kept open); return a list of
    ``(label, status, error message or None, problem or None)``."""
    setup = _Client(host, port, timeout)
    status, reply, _ = setup.request("POST", "/sessions")
    sid = reply["session"]
    rows = []
    for label, method, path, body, headers in bad_requests(input_size):
        c = _Client(host, port, timeout)
        problem, message, status = None, None, None
        try:
            status, reply, raw = c.request(method, path.format(sid=sid), body, headers)
            message = reply.get("error") if isinstance(reply, dict) else None
            if not 400 <= status < 500:
                problem = f"status {status}"
            elif not message:
                problem = f"no JSON error message: {raw[:80]!r}"
            elif c.conn is not None:  # still open: the next request must work
                s2, r2, _ = c.request("POST", f"/sessions/{sid}/step",
                                      {"x": [0.0] * input_size})
                if s2 != 200:
                    problem = f"the next request on the connection got {s2} {r2}"
        except Exception as e:  # noqa: BLE001 - a dropped connection is the finding
            problem = f"{type(e).__name__}: {e}"
        c.close()
        rows.append((label, status, message, problem))
    setup.request("DELETE", f"/sessions/{sid}")
    setup.close()
    return rows


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths))]
                     + [line.format(*map(str, r)) for r in rows])


def _start_service(model_path, mode="pool"):
    """The service in a child process on a free port; (process, port). Every
    client comes from 127.0.0.1: the per-client session cap is lifted."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "service.py"), model_path,
                             "--port", "0", "--mode", mode, "--max-sessions-per-client", "1000"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT"
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"the service did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


MODES = ("pool", "streams", "noop")


def main(argv=None):
    p = argparse.ArgumentParser(description="Load-test examples/service.py on a saved model.")
    p.add_argument("model", nargs="?", help="a model file written by numlstm.save "
                   "(default: a random LSTM(8, --hidden, num_layers=2))")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--steps", type=int, default=200, help="steps per client")
    p.add_argument("--steps-per-request", type=int, default=1)
    p.add_argument("--new-connection", action="store_true",
                   help="one connection per request instead of keep-alive")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="the service's modes to load, each in its own process (default: all)")
    p.add_argument("--hidden", type=int, default=64, help="H of the default model")
    args = p.parse_args(argv)

    import numlstm

    results, tables, probes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = os.path.join(tmp, "model.npz")
            numlstm.save(numlstm.LSTM(8, args.hidden, num_layers=2, seed=0), path)
        model = numlstm.load(path)
        for mode in args.modes:
            proc, port = _start_service(path, mode)
            try:
                rows = []
                for clients in args.clients:
                    run_load(port, clients, 5, input_size=model.input_size, seed=1)  # warm up
                    r = run_load(port, clients, args.steps, input_size=model.input_size,
                                 steps_per_request=args.steps_per_request,
                                 keep_alive=not args.new_connection)
                    r["mode"] = mode
                    diff = check_outputs(model, r) if mode != "noop" else None
                    results.append(r)
                    rows.append((clients, r["requests"], len(r["errors"]),
                                 f"{r['throughput_rps']:.0f}", f"{r['steps_per_s']:.0f}",
                                 f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                                 f"{r['p99_ms']:.2f}", f"{r['max_ms']:.1f}",
                                 "-" if diff is None else f"{diff:.0e}"))
                tables.append((mode, rows))
                if not probes:
                    probes = probe_bad_requests(port, model.input_size)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    conn = "new connection per request" if args.new_connection else "keep-alive"
    print(f"{model!r}; {args.steps} steps per client, {args.steps_per_request} per "
          f"request, {conn}")
    for mode, rows in tables:
        print()
        print(f"mode {mode}")
        print(_table(rows, ("clients", "requests", "errors", "req/s", "steps/s",
                            "p50 ms", "p90 ms", "p99 ms", "max ms", "max |Δh|")))
    rps = {(r["mode"], r["clients"]): r["throughput_rps"] for r in results}
    if len(args.modes) > 1:
        print()
        cols = [m for m in ("pool", "streams", "noop") if m in args.modes]
        header = ("clients", *(f"{m} req/s" for m in cols))
        extra = []
        if "pool" in cols and "noop" in cols:
            header += ("pool / noop",)
            extra.append(lambda c: f"{rps['pool', c] / rps['noop', c]:.0%}")
        if "pool" in cols and "streams" in cols:
            header += ("pool / streams",)
            extra.append(lambda c: f"{rps['pool', c] / rps['streams', c]:.2f}x")
        print(_table([(c, *(f"{rps[m, c]:.0f}" for m in cols), *(f(c) for f in extra))
                      for c in args.clients], header))
    print()
    print(_table([(label, status, (msg or "")[:60], problem or "ok")
                  for label, status, msg, problem in probes],
                 ("bad request", "status", "message", "verdict")))
    bad = [r for r in probes if r[3]]
    return {"load": results, "probes": probes, "ok": not bad and
            not any(r["errors"] for r in results)}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

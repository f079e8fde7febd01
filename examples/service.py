"""A lightweight inference service: a saved model behind a JSON HTTP API, one
stream per client session. Standard library only (``http.server``).

    python examples/service.py MODEL.npz [--port 8000] [--host 127.0.0.1]

Endpoints (JSON bodies and replies):

``GET  /health``                 ``{"status": "ok", "sessions": n, "model": "..."}``
``POST /sessions``               ``{"session": id}``; a fresh zero state
``POST /sessions/<id>/step``     body ``{"x": [I floats]}`` (one step) or
                                 ``{"x": [[I floats], ...]}`` (several steps in order);
                                 reply ``{"h": [[O floats], ...]}``, one row per step
``POST /sessions/<id>/reset``    back to the zero state
``DELETE /sessions/<id>``        end the session

Each session owns a ``Stream`` of the shared, read-only model (streams of one
model may step in different threads at once); a session's own steps are
serialised by its lock. Bad requests get a 4xx status and ``{"error":
message}``: malformed JSON, wrong shapes, non-finite numbers, unknown
sessions or paths, other methods, too many sessions, bodies over 1 MiB.
Connections are kept alive (HTTP/1.1) and replies leave at once (no Nagle
delay); ``examples/service_load.py`` measures the service under load.
"""

import argparse
import json
import re
import sys
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import numlstm

MAX_BODY = 1 << 20
MAX_DRAIN = 16 * MAX_BODY  # an oversized body up to this is read and dropped, so that
# the client, still sending it, reads the 413 instead of a reset connection
IDLE_TIMEOUT = 60.0  # seconds a connection may sit idle or stall mid-request
_SESSION = re.compile(r"^/sessions/([0-9a-f]{32})(/step|/reset)?$")


class _Session:
    def __init__(self, model):
        self.stream = model.stream(1)
        self.lock = threading.Lock()


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Service:
    """The sessions of one model; the HTTP handler calls these methods."""

    def __init__(self, model, max_sessions=1000):
        if model.bidirectional:
            raise ValueError("a bidirectional model cannot stream; serve a unidirectional one")
        self.model = model
        self.max_sessions = max_sessions
        self.sessions = {}
        self.lock = threading.Lock()

    def create(self):
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS,
                                 f"at most {self.max_sessions} sessions; end one first")
            sid = uuid.uuid4().hex
            self.sessions[sid] = _Session(self.model)
        return {"session": sid}

    def _get(self, sid):
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid}")
        return session

    def step(self, sid, body):
        session = self._get(sid)
        I = self.model.input_size
        if not isinstance(body, dict) or "x" not in body:
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'body must be a JSON object with "x"')
        try:
            x = np.asarray(body["x"], dtype=np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             "x must hold numbers only (within float range)") from None
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != I or x.shape[0] < 1:
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             f"x must be {I} numbers or a list of steps of {I} numbers, "
                             f"got shape {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "x must be finite")
        x = x.astype(self.model.dtype)
        out = []
        with session.lock:
            for t in range(x.shape[0]):
                out.append(session.stream.step(x[t:t + 1])[0].tolist())
        return {"h": out}

    def reset(self, sid):
        session = self._get(sid)
        with session.lock:
            session.stream.reset()
        return {"session": sid}

    def delete(self, sid):
        with self.lock:
            if self.sessions.pop(sid, None) is None:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid}")

    def health(self):
        with self.lock:
            n = len(self.sessions)
        return {"status": "ok", "sessions": n, "model": repr(self.model)}


class Handler(BaseHTTPRequestHandler):
    server_version = "numlstm-service"
    protocol_version = "HTTP/1.1"
    # Reply at once: without TCP_NODELAY, the body (a second write after the
    # headers) waits for the client's delayed ACK, ~40 ms per request on a
    # kept-alive connection.
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT  # a stalled client frees its thread

    def log_message(self, fmt, *args):  # quiet; errors reach the client
        pass

    def _reply(self, status, payload=None, close=False):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by ``http.server`` itself (a malformed request
        line, headers too long, ...): JSON like every other reply."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        if self.request_version == "HTTP/0.9":  # the request line did not parse
            self.request_version = "HTTP/1.0"  # so that the status line is written
        self._reply(status, {"error": message or status.phrase}, close=True)

    def _body(self):
        """The request's JSON body (None when empty). Read for every method, so
        that a kept-alive connection stays in step; ``self._body_read`` says
        whether the body left the stream (if not, the reply closes the
        connection)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED,
                             "chunked bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length < 0:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > MAX_BODY:
            if length <= MAX_DRAIN:  # read and drop it: the client then reads the 413
                while length > 0:
                    chunk = self.rfile.read(min(1 << 16, length))
                    if not chunk:
                        break
                    length -= len(chunk)
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length > 0 else b""
        self._body_read = True
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None

    def _dispatch(self, method):
        self._body_read = False
        try:
            self._route(method)
        except BadRequest as e:
            self._reply(e.status, {"error": str(e)}, close=not self._body_read)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug: say so rather than drop the connection
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"error": f"internal error: {type(e).__name__}: {e}"}, close=True)

    def _route(self, method):
        service = self.server.service
        body = self._body()
        if self.path == "/health" and method == "GET":
            return self._reply(HTTPStatus.OK, service.health())
        if self.path == "/sessions" and method == "POST":
            return self._reply(HTTPStatus.CREATED, service.create())
        if self.path in ("/health", "/sessions"):
            raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED,
                             f"{method} is not allowed on {self.path}")
        match = _SESSION.match(self.path)
        if match is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no such path {self.path}")
        sid, action = match.groups()
        if method == "POST" and action == "/step":
            return self._reply(HTTPStatus.OK, service.step(sid, body))
        if method == "POST" and action == "/reset":
            return self._reply(HTTPStatus.OK, service.reset(sid))
        if method == "DELETE" and action is None:
            service.delete(sid)
            return self._reply(HTTPStatus.NO_CONTENT)
        raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED,
                         f"{method} is not allowed on {self.path}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def __getattr__(self, name):
        """Any other method (PUT, PATCH, HEAD, ...): 405 with a message, not
        ``http.server``'s 501 HTML page."""
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog: socketserver's default of 5 drops the SYNs of a burst
    # of new connections, which then wait 1 s to retry.
    request_queue_size = 128


def make_server(model, host="127.0.0.1", port=0, max_sessions=1000):
    """A ready ``ThreadingHTTPServer`` (port 0: any free port; see ``server_address``)."""
    server = Server((host, port), Handler)
    server.daemon_threads = True
    server.service = Service(model, max_sessions)
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve a saved numlstm model over HTTP.")
    p.add_argument("model", help="a model file written by numlstm.save")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        model = numlstm.load(args.model)
        server = make_server(model, args.host, args.port, args.max_sessions)
    except (OSError, ValueError) as e:
        print(f"service: error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {model!r} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

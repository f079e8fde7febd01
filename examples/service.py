"""A lightweight inference service: a saved model behind a JSON HTTP API, each
client session a slot of one ``StreamPool``, steps batched across sessions.
Standard library only (``http.server``).

    python examples/service.py MODEL.npz [--port 8000] [--host 127.0.0.1]
                               [--mode pool|streams|noop] [--max-batch N]
                               [--max-delay S] [limits]

Endpoints (JSON bodies and replies):

``GET  /health``                 ``{"status": "ok", "sessions": n, "model": "..."}``
``POST /sessions``               ``{"session": id}``; a fresh zero state
``POST /sessions/<id>/step``     body ``{"x": [I floats]}`` (one step) or
                                 ``{"x": [[I floats], ...]}`` (several steps in order);
                                 reply ``{"h": [[O floats], ...]}``, one row per step
``POST /sessions/<id>/reset``    back to the zero state
``DELETE /sessions/<id>``        end the session

Modes (``--mode``):

- ``pool`` (default): every session is a slot of one ``numlstm.StreamPool``
  (capacity ``max_sessions``); request threads submit their step to one
  ``numlstm.serve.Batcher``, whose worker steps every session that has a
  request waiting in one batched call (up to ``--max-batch`` sessions,
  waiting at most ``--max-delay`` seconds for a batch to fill);
- ``streams``: each session owns a ``Stream`` of the shared, read-only model
  and steps it in its request's thread (batch 1 per request: the mode before
  the pool, kept for comparison);
- ``noop``: sessions and input checks as usual, but a step returns zeros
  without running any model: the HTTP layer's own limit, for load tests.

In every mode a session's own steps are serialised by its lock, so its
requests are answered in order. Bad requests get a 4xx status (501 for
``Transfer-Encoding``) and ``{"error": message}``: malformed JSON, wrong
shapes, values that are not numbers (booleans, strings) or not finite in the
model's dtype, unknown sessions or paths, other methods, too many sessions,
bodies over 1 MiB, too many steps. Replies are strict JSON (never ``NaN``).
Connections are kept alive (HTTP/1.1) and replies leave at once (no Nagle
delay); ``examples/service_load.py`` measures the service under load.

What one client can cost is bounded (``Limits``, each a command-line flag):

- at most ``max_connections`` open connections (fewer if the descriptor limit,
  ``ulimit -n``, is lower): one more evicts the connection still waiting for
  its request whose deadline is nearest, so slow clients cannot lock out
  ``/health``;
- a client has ``request_timeout`` seconds in all to send a request, counted
  from when its connection starts waiting for it (a byte at a time does not
  extend it), and as long again to take the reply; stepping has no clock (the
  step cap bounds it), so a slow step never loses a reply;
- at most ``max_header_bytes`` of request line and headers (431 past it,
  414 for a request line alone past it): a connection buffers no more of a
  request's head than that, however its client sends it;
- at most ``max_steps`` steps per request and ``max_reply_bytes`` of reply (413,
  checked before any step);
- at most ``max_sessions`` sessions, ``max_sessions_per_client`` of them from
  one IP address; a session unused for ``session_ttl`` seconds ends.

Out of file descriptors, the server waits (up to a second) before accepting
again rather than spinning. ``Transfer-Encoding``, repeated or malformed
``Content-Length`` and malformed header lines are refused, so that a proxy in
front cannot read a request's length differently from the service.
"""

import argparse
import dataclasses
import errno
import json
import re
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import numlstm

try:
    import resource
except ImportError:  # not on Windows: no descriptor limit to read
    resource = None

MAX_BODY = 1 << 20
MAX_DRAIN = 16 * MAX_BODY  # an oversized body up to this is read and dropped, so that
# the client, still sending it, reads the 413 instead of a reset connection
FD_RESERVE = 32  # descriptors kept for the process itself (listening socket,
# selector, standard streams, files Numba or a reload opens) and for
# connections that are evicted but not yet closed by their thread
# The longest JSON a float can take ("-4.9406564584124654e-324") plus ", ": a
# reply's size is bounded before any step is taken.
REPLY_BYTES_PER_NUMBER = 26
_SESSION = re.compile(r"^/sessions/([0-9a-f]{32})(/step|/reset)?$")
_LENGTH = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() also takes "+1", "1_0", "١"
_JSON_TYPES = {bool: "a boolean", str: "a string", type(None): "null", dict: "an object"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may cost the service; each is a command-line flag.

    Attributes
    ----------
    max_sessions : int
        Sessions open at once, over all clients (429 past it).
    max_sessions_per_client : int
        Sessions open at once from one IP address (429 past it). Behind a
        proxy every client has the proxy's address: raise it there.
    session_ttl : float
        Seconds a session may go unused before it ends (its id then gets 404).
    max_steps : int
        Steps in one request (413 past it).
    max_reply_bytes : int
        The largest reply a request may ask for (413 past it, before any
        step), counted as steps * (26 * outputs + 4) + 16 bytes: no reply is
        longer.
    max_connections : int
        Connections open at once (one thread each); lowered to the
        descriptor limit less ``FD_RESERVE``.
    request_timeout : float
        Seconds a client has to send a request, in all (waiting for it on a
        kept-alive connection included), and again to take its reply.
    max_header_bytes : int
        Bytes of a request's line and headers, blank line included (431 past
        it, or 414 when the request line alone is longer).
    """

    max_sessions: int = 1000
    max_sessions_per_client: int = 100
    session_ttl: float = 600.0
    max_steps: int = 1024
    max_reply_bytes: int = 1 << 20
    max_connections: int = 256
    request_timeout: float = 10.0
    max_header_bytes: int = 16384

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < float("inf"):
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")


MODES = ("pool", "streams", "noop")


class _PoolSlot:
    """A session's slot in the service's pool, with a ``Stream``'s interface
    (``step``, ``state``, ``reset``) so that ``Service.step`` runs unchanged
    in every mode; steps go through the batcher."""

    def __init__(self, batcher, sid):
        self.batcher, self.pool, self.sid = batcher, batcher.pool, sid

    def step(self, x_t, out=None):
        """x_t (1, I) -> h_t (1, O) (into ``out`` when given), batched with the
        other sessions' steps."""
        h = self.batcher.submit(self.sid, x_t).result()
        if out is None:
            return h[None]
        out[0] = h
        return out

    @property
    def state(self):
        h, c = self.pool.state(self.sid)
        return h[:, None], c[:, None]  # (L, 1, O), (L, 1, H): as a Stream of batch 1

    def reset(self, state=None):
        if state is None:
            h = np.zeros((self.pool.model.num_layers, self.pool.model.output_size))
            c = np.zeros((self.pool.model.num_layers, self.pool.model.hidden_size))
        else:
            h, c = state[0][:, 0], state[1][:, 0]
        self.pool.set_state(self.sid, (h, c))

    def close(self):
        self.pool.close(self.sid)


class _NoopSlot:
    """A session that runs no model: its steps return zeros (``--mode noop``)."""

    def __init__(self, model):
        self.zeros = np.zeros((1, model.output_size), model.dtype)
        self.state = (np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))

    def step(self, x_t, out=None):
        if out is None:
            return self.zeros.copy()
        out[0] = 0
        return out

    def reset(self, state=None):
        pass


class _Session:
    def __init__(self, stream, client):
        self.stream = stream  # a Stream, a _PoolSlot or a _NoopSlot
        self.lock = threading.Lock()
        self.client = client  # the IP address that created it
        self.last_used = time.monotonic()
        self.ended = False  # set under the lock when the session ends

    def end(self):
        """Free what the session holds, after any step of it in flight: a pool
        slot is reused by the next session, so a request that found this
        session before it ended must not step the slot afterwards (it sees
        ``ended`` under the lock instead)."""
        with self.lock:
            self.ended = True
            close = getattr(self.stream, "close", None)
            if close is not None:
                close()


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Service:
    """The sessions of one model; the HTTP handler calls these methods.

    Parameters
    ----------
    model : numlstm.LSTM
        Unidirectional; shared read-only by every session's stream.
    limits : Limits, optional
        The caps on sessions and steps; ``Limits()`` when omitted.
    mode : {"pool", "streams", "noop"}
        How sessions step (see the module docstring).
    max_batch : int, optional
        Pool mode: most sessions per batched step (default
        ``min(max_sessions, 256)``).
    max_delay : float
        Pool mode: seconds the batcher waits for a batch to fill after the
        oldest waiting request.
    """

    def __init__(self, model, limits=None, *, mode="pool", max_batch=None, max_delay=0.0005):
        if model.bidirectional:
            raise ValueError("a bidirectional model cannot stream; serve a unidirectional one")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.limits = limits or Limits()
        self.mode = mode
        self.sessions = {}
        self.lock = threading.Lock()
        self.batcher = None
        if mode == "pool":
            from numlstm.serve import Batcher

            pool = numlstm.StreamPool(model, self.limits.max_sessions)
            self.batcher = Batcher(pool, max_batch=max_batch or min(pool.capacity, 256),
                                   max_delay=max_delay)

    def close(self):
        """Stop the batcher (pool mode), answering the steps already queued."""
        if self.batcher is not None:
            self.batcher.close()

    def _new_stream(self):
        """What a new session steps: a pool slot, a stream of its own, or nothing."""
        if self.mode == "pool":
            try:
                return _PoolSlot(self.batcher, self.batcher.pool.open())
            except RuntimeError:  # slots of ended sessions whose last step is still running
                raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS,
                                 f"at most {self.limits.max_sessions} sessions; retry "
                                 "shortly") from None
        if self.mode == "streams":
            return self.model.stream(1)
        return _NoopSlot(self.model)

    def _expired(self, session, now):
        # A session stepping right now is in use, however long it has run.
        return now - session.last_used > self.limits.session_ttl and not session.lock.locked()

    def expire(self):
        """End every session unused for ``session_ttl`` seconds; how many ended."""
        now = time.monotonic()
        with self.lock:
            old = [sid for sid, s in self.sessions.items() if self._expired(s, now)]
            ended = [self.sessions.pop(sid) for sid in old]
        for session in ended:
            session.end()
        return len(old)

    def create(self, client=""):
        """A new session for ``client`` (an IP address); 429 past either cap."""
        self.expire()  # free what idle clients hold before refusing anyone
        lim = self.limits
        with self.lock:
            if len(self.sessions) >= lim.max_sessions:
                raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS,
                                 f"at most {lim.max_sessions} sessions; end one first")
            if sum(s.client == client for s in self.sessions.values()) \
                    >= lim.max_sessions_per_client:
                raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS,
                                 f"at most {lim.max_sessions_per_client} sessions per client; "
                                 f"end one first (unused ones end after {lim.session_ttl:g} s)")
            sid = uuid.uuid4().hex
            self.sessions[sid] = _Session(self._new_stream(), client)
        return {"session": sid}

    def _get(self, sid):
        now = time.monotonic()
        with self.lock:
            session = self.sessions.get(sid)
            expired = session is not None and self._expired(session, now)
            if expired:
                del self.sessions[sid]
            elif session is not None:
                session.last_used = now  # so that a sweep cannot end it under this request
        if expired:
            session.end()
            session = None
        if session is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid} (ended, or unused for "
                             f"over {self.limits.session_ttl:g} s)")
        return session

    def _inputs(self, body):
        """``body["x"]`` as a (steps, I) array of the model's dtype, or BadRequest.

        The JSON's types are checked before NumPy sees it: ``np.asarray`` would
        take ``true`` and ``"1e3"`` as numbers.
        """
        I, O = self.model.input_size, self.model.output_size
        if not isinstance(body, dict) or "x" not in body:
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'body must be a JSON object with "x"')
        x = body["x"]
        rows = x if isinstance(x, list) and x and isinstance(x[0], list) else [x]
        lim = self.limits
        if len(rows) > lim.max_steps:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"at most {lim.max_steps} steps per request, got {len(rows)}")
        reply_bound = len(rows) * (REPLY_BYTES_PER_NUMBER * O + 4) + 16
        if reply_bound > lim.max_reply_bytes:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"{len(rows)} steps of {O} outputs could reply with "
                             f"{reply_bound} bytes, over {lim.max_reply_bytes}; send fewer steps "
                             f"per request")
        for row in rows:
            if not isinstance(row, list) or len(row) != I:
                raise BadRequest(HTTPStatus.BAD_REQUEST,
                                 f"x must be {I} numbers or a list of steps of {I} numbers")
            for v in row:
                if v.__class__ is not float and v.__class__ is not int:  # bool is not int here
                    raise BadRequest(HTTPStatus.BAD_REQUEST, f"x must hold numbers only, got "
                                     f"{_JSON_TYPES.get(v.__class__, 'a list')}")
        try:
            x = np.array(rows, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             "x must hold numbers only (within float range)") from None
        # Finite in float64 is not enough: 1e39 becomes inf in float32.
        dtype = self.model.dtype
        with np.errstate(over="ignore"):
            x = x.astype(dtype)
        if not np.isfinite(x).all():
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             f"x must be finite as {np.dtype(dtype).name} "
                             f"(|x| <= {np.finfo(dtype).max:.4g})")
        return x

    def step(self, sid, body):
        session = self._get(sid)
        x = self._inputs(body)
        out = np.empty((len(x), self.model.output_size), dtype=self.model.dtype)
        with session.lock:
            if session.ended:  # ended (deleted or expired) after _get found it
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid} (ended)")
            before = session.stream.state
            for t in range(len(x)):
                session.stream.step(x[t:t + 1], out=out[t:t + 1])
            if not np.isfinite(out).all():
                # Finite inputs could still overflow inside the model: keep the
                # session usable rather than NaN for every later step.
                session.stream.reset(before)
                raise BadRequest(HTTPStatus.BAD_REQUEST,
                                 "x is too large for the model (its output is not finite); "
                                 "the session's state is unchanged")
            session.last_used = time.monotonic()
        return {"h": out.tolist()}

    def reset(self, sid):
        session = self._get(sid)
        with session.lock:
            if session.ended:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid} (ended)")
            session.stream.reset()
        return {"session": sid}

    def delete(self, sid):
        with self.lock:
            session = self.sessions.pop(sid, None)
        if session is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no session {sid}")
        session.end()

    def health(self):
        with self.lock:
            n = len(self.sessions)
        return {"status": "ok", "sessions": n, "mode": self.mode, "model": repr(self.model)}


class _HeadTooLarge(Exception):
    """A request's line and headers ran past ``Limits.max_header_bytes``."""


class _Head:
    """The connection's reader while a request's line and headers are read
    (``http.server`` reads them with ``readline`` only): at most ``budget``
    bytes in all, so what a connection buffers of a request's head is bounded
    however many lines, of whatever length, its client sends."""

    def __init__(self, rfile, budget):
        self.rfile, self.left = rfile, budget

    def readline(self, limit=-1):
        want = self.left + 1 if limit is None or limit < 0 else min(limit, self.left + 1)
        line = self.rfile.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise _HeadTooLarge
        return line


class Handler(BaseHTTPRequestHandler):
    server_version = "numlstm-service"
    protocol_version = "HTTP/1.1"
    # Reply at once: without TCP_NODELAY, the body (a second write after the
    # headers) waits for the client's delayed ACK, ~40 ms per request on a
    # kept-alive connection.
    disable_nagle_algorithm = True

    def setup(self):
        # Each socket operation times out too: a backstop for the deadline,
        # which the server's loop enforces every quarter second.
        self.timeout = self.server.limits.request_timeout
        super().setup()

    def log_message(self, fmt, *args):  # quiet; errors reach the client
        pass

    def handle_one_request(self):
        # The request's deadline starts now, while the connection waits for it.
        self.server.connections.waiting(self.connection)
        self._rfile = self.rfile
        self.rfile = _Head(self._rfile, self.server.limits.max_header_bytes)
        try:
            super().handle_one_request()
        except _HeadTooLarge:  # in the request line: parse_request handles the headers
            self.rfile = self._rfile
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
            self._head_too_large(HTTPStatus.REQUEST_URI_TOO_LONG, "request line")
        except OSError:  # the client left, or the server closed it at its deadline
            self.close_connection = True
        finally:
            self.rfile = self._rfile

    def _head_too_large(self, status, what):
        """Refuse a request whose head is over the cap; then read and drop
        what the client is still sending (up to ``MAX_DRAIN`` bytes, a chunk
        at a time: nothing is kept), so that it reads the reply rather than a
        reset connection."""
        self.send_error(status, f"{what} over {self.server.limits.max_header_bytes} bytes "
                                "(the request's line and headers together)")
        left = MAX_DRAIN
        try:
            self.wfile.flush()
            while left > 0 and (chunk := self.rfile.read1(min(1 << 14, left))):
                left -= len(chunk)
        except OSError:  # the client left, or its deadline passed
            pass

    def parse_request(self):
        try:
            ok = super().parse_request()
        except _HeadTooLarge:
            self.rfile = self._rfile
            self._head_too_large(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header block")
            return False
        self.rfile = self._rfile  # the head is in: the body is read as it comes
        if not ok:
            return False  # http.server has sent the error
        if self.request_version == "HTTP/0.9":  # its reply would carry no status line
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
            return False
        return True

    def _reply(self, status, payload=None, close=False):
        self.server.connections.replying(self.connection)
        try:
            body = b"" if payload is None else json.dumps(payload, allow_nan=False).encode()
        except ValueError:  # NaN or inf: strict JSON parsers reject them, so never send them
            status, close = HTTPStatus.INTERNAL_SERVER_ERROR, True
            body = b'{"error": "internal error: a reply held a non-finite number"}'
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

    def _content_length(self):
        """The body's length, refusing any header a proxy in front could read
        differently (request smuggling: the rest of a body taken for a request)."""
        h = self.headers
        if h.defects or h.get_payload():  # e.g. "Name : value" ends the headers early
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
        if any("\n" in v for v in h.values()):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "folded header lines are not accepted")
        if "Transfer-Encoding" in h:
            raise BadRequest(HTTPStatus.NOT_IMPLEMENTED,
                             "Transfer-Encoding is not supported; send Content-Length")
        lengths = h.get_all("Content-Length", [])
        if len(lengths) > 1:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "more than one Content-Length")
        if not lengths:
            return 0
        if not _LENGTH.fullmatch(lengths[0].strip(" \t")):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length: digits only")
        return int(lengths[0])

    def _body(self):
        """The request's JSON body (None when empty). Read for every method, so
        that a kept-alive connection stays in step; ``self._body_read`` says
        whether the body left the stream (if not, the reply closes the
        connection)."""
        length = self._content_length()
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
        if len(raw) < length:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body shorter than its Content-Length")
        self._body_read = True
        # The request is in: the client's clock stops while the server steps.
        self.server.connections.busy(self.connection)
        if not raw:
            return None
        try:
            return json.loads(raw)
        # ValueError: malformed JSON, or an integer over Python's 4,300-digit
        # limit on int(str), which json raises as a plain ValueError.
        except (UnicodeDecodeError, ValueError, RecursionError):
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
            return self._reply(HTTPStatus.CREATED, service.create(self.client_address[0]))
        if self.path in ("/health", "/sessions"):
            raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED,
                             f"{method} is not allowed on {self.path}")
        match = _SESSION.match(self.path)
        if match is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no such path {self.path[:200]}")
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


class _Connections:
    """The open connections, each with its deadline and whether it may be
    evicted. A connection is in one of three phases:

    - waiting for a request or reading it: a deadline, evictable;
    - busy (stepping): no deadline, not evictable;
    - replying: a deadline (a client that does not read), not evictable.

    Parameters
    ----------
    limit : int
        Connections open at once.
    timeout : float
        Seconds to send a request in all, and again to take the reply.
    """

    def __init__(self, limit, timeout):
        self.limit, self.timeout = limit, timeout
        self._open = {}  # socket -> [deadline, evictable]
        self._lock = threading.Lock()

    def add(self, sock):
        """Register a new connection; at the limit, evict the waiting one whose
        deadline is nearest (it would be closed soonest anyway). False when
        every connection is busy on a request: refuse this one."""
        with self._lock:
            if len(self._open) >= self.limit:
                waiting = [(d, s) for s, (d, evictable) in self._open.items() if evictable]
                if not waiting:
                    return False
                self._close(min(waiting, key=lambda w: w[0])[1])
            self._open[sock] = [time.monotonic() + self.timeout, True]
        return True

    def _set(self, sock, deadline, evictable):
        with self._lock:
            if sock in self._open:  # not closed meanwhile
                self._open[sock] = [deadline, evictable]

    def waiting(self, sock):
        self._set(sock, time.monotonic() + self.timeout, True)

    def busy(self, sock):
        self._set(sock, float("inf"), False)

    def replying(self, sock):
        self._set(sock, time.monotonic() + self.timeout, False)

    def remove(self, sock):
        with self._lock:
            self._open.pop(sock, None)

    def close_late(self):
        """Close every connection past its deadline, however many bytes it sent."""
        now = time.monotonic()
        with self._lock:
            for sock in [s for s, (deadline, _) in self._open.items() if deadline < now]:
                self._close(sock)

    def _close(self, sock):
        # Under the lock, and only while registered: the handler's thread
        # unregisters before it closes, so the descriptor cannot have been
        # reused by another connection. Shutting down wakes that thread, which
        # reads EOF (or fails to write) and closes the socket itself.
        del self._open[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __len__(self):
        return len(self._open)


_BUSY_BODY = b'{"error": "every connection is busy on a request; retry"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with bounded connections, request deadlines,
    session expiry and a pause when out of descriptors."""

    daemon_threads = True
    # The listen backlog: socketserver's default of 5 drops the SYNs of a burst
    # of new connections, which then wait 1 s to retry.
    request_queue_size = 128
    _backoff = 0.0  # seconds the last accept that ran out of descriptors waited
    _next_sweep = 0.0

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays queued and the socket readable: retrying
                # at once would spin a core. Wait for a connection to close,
                # longer each time (up to 1 s).
                self._backoff = min(max(2 * self._backoff, 0.01), 1.0)
                time.sleep(self._backoff)
            raise  # socketserver drops the attempt and selects again
        self._backoff = 0.0
        return request

    def process_request(self, request, client_address):
        if not self.connections.add(request):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)  # a thread for the connection

    def shutdown_request(self, request):
        self.connections.remove(request)
        super().shutdown_request(request)

    def server_close(self):
        super().server_close()
        self.service.close()

    def service_actions(self):
        """Between accepts (at least every poll interval, 0.5 s): close late
        connections, end unused sessions; at most four times a second."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 0.25
            self.connections.close_late()
            self.service.expire()


def descriptor_room():
    """Connections the descriptor limit (``ulimit -n``) leaves room for, or None
    when there is no limit to read."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - FD_RESERVE)


def make_server(model, host="127.0.0.1", port=0, *, mode="pool", max_batch=None,
                max_delay=0.0005, **limits):
    """A ready server (port 0: any free port; see ``server_address``).

    Parameters
    ----------
    model : numlstm.LSTM
        The model to serve (unidirectional).
    host, port : str, int
        Where to listen.
    mode, max_batch, max_delay
        As ``Service``'s: ``"pool"`` (batched, default), ``"streams"`` (one
        stream per session) or ``"noop"`` (no model).
    **limits
        Fields of ``Limits`` (``max_sessions=200``, ``request_timeout=2.0``,
        ...); the others keep their defaults. ``max_connections`` is lowered
        to ``descriptor_room()``.

    Returns
    -------
    Server
        Call ``serve_forever()``; ``server.service`` holds the sessions and
        ``server.connections.limit`` the connection bound in force.
    """
    limits = Limits(**limits)
    # First: a bidirectional model fails before binding.
    service = Service(model, limits, mode=mode, max_batch=max_batch, max_delay=max_delay)
    # Compile the kernels now, not on the first client's step.
    model.stream(1).step(np.zeros((1, model.input_size), model.dtype))
    if mode == "pool":
        warm = service._new_stream()
        warm.step(np.zeros((1, model.input_size), model.dtype))
        warm.close()
    room = descriptor_room()
    server = Server((host, port), Handler)
    server.limits = limits
    server.service = service
    server.connections = _Connections(
        limits.max_connections if room is None else min(limits.max_connections, room),
        limits.request_timeout)
    return server


def _port(text):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535 (0: any free port), got {text!r}")
    return port


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _nonnegative(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def main(argv=None):
    d = Limits()
    p = argparse.ArgumentParser(description="Serve a saved numlstm model over HTTP.")
    p.add_argument("model", help="a model file written by numlstm.save")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--mode", choices=MODES, default="pool",
                   help="pool: sessions in one StreamPool, steps batched (default); streams: "
                        "one Stream per session; noop: no model (the HTTP layer's limit)")
    p.add_argument("--max-batch", type=_positive(int), default=None,
                   help="pool mode: most sessions per step (default min(max-sessions, 256))")
    p.add_argument("--max-delay", type=_nonnegative, default=0.0005,
                   help="pool mode: seconds to wait for a batch to fill (default 0.0005)")
    p.add_argument("--max-sessions", type=_positive(int), default=d.max_sessions)
    p.add_argument("--max-sessions-per-client", type=_positive(int),
                   default=d.max_sessions_per_client, help="per IP address")
    p.add_argument("--session-ttl", type=_positive(float), default=d.session_ttl,
                   help="seconds an unused session lives")
    p.add_argument("--max-steps", type=_positive(int), default=d.max_steps,
                   help="steps per request")
    p.add_argument("--max-reply-bytes", type=_positive(int), default=d.max_reply_bytes)
    p.add_argument("--max-connections", type=_positive(int), default=d.max_connections,
                   help=f"lowered to the descriptor limit less {FD_RESERVE}")
    p.add_argument("--request-timeout", type=_positive(float), default=d.request_timeout,
                   help="seconds per request in all")
    p.add_argument("--max-header-bytes", type=_positive(int), default=d.max_header_bytes,
                   help="request line and headers, together")
    args = p.parse_args(argv)
    limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}
    try:
        model = numlstm.load(args.model)
        server = make_server(model, args.host, args.port, mode=args.mode,
                             max_batch=args.max_batch, max_delay=args.max_delay, **limits)
    except (OSError, ValueError) as e:
        print(f"service: error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {model!r} ({args.mode} mode) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A micro-batching front for a ``StreamPool``: many threads, one batched step.

In a service, each request thread has one session's next input. Stepping
each on its own is a batch-1 call per request; a ``Batcher`` queues them and
one worker thread steps whatever has arrived (up to ``max_batch`` sessions)
in one ``StreamPool.step``, then hands every thread its own output through a
``concurrent.futures.Future``. NVIDIA Triton's sequence batcher
(``max_queue_delay``) is the model.

How long the worker waits: clients of a service typically send their next
step soon after receiving their last output, so the sessions of the last
batch are the ones expected back. After the oldest queued request arrived,
the worker waits until as many sessions have a request queued as the last
batch stepped (capped at ``max_batch``: a batch takes one request of each),
or ``max_delay`` seconds have passed,
whichever comes first. A lone client thus never waits for company, and
many clients, woken one after the other by their results, are still
gathered into one step.

Guarantees:

- a request steps the session it was submitted for or none: session ids
  are never reused by the pool, so a request for a session closed before
  (or while) its step runs gets KeyError and no other session moves;
- a session's requests are stepped in the order they were submitted, at
  most one per batch;
- sessions take turns: each has its own queue, and a batch takes the next
  request of each of the next ``max_batch`` sessions in turn (round robin),
  so one session's backlog delays another session's request by at most one
  turn of the sessions waiting, not by the backlog;
- every request is answered exactly once: a result, an exception, or a
  cancellation (``close(cancel=True)``, or ``Future.cancel`` before its step);
- an exception raised by a step reaches exactly the futures of that step,
  except that a session closed while its batch was stepping fails alone (its
  future gets KeyError, the others are stepped without it);
- each result is an array of the caller's own;
- done-callbacks added to a future never run on the worker (when it resolves
  the future they run, in order, on one callback thread of the batcher), so a
  callback may call the batcher, even block on it, without stalling others.
"""

import collections
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from numlstm import weights as weights_mod

_LOG = logging.getLogger("concurrent.futures")  # where Future logs a failing callback


class _Future(Future):
    """A Future whose done-callbacks run off the batcher's worker: a callback
    that calls the batcher (and waits on it) must not hold up the thread
    that would answer it."""

    def __init__(self, batcher):
        super().__init__()
        self._batcher = batcher

    def add_done_callback(self, fn):
        """Call ``fn(future)`` once the step is done (at once if it is), off the
        batcher's worker thread when the worker would run it."""
        batcher = self._batcher

        def call(future):
            if threading.current_thread() is batcher._worker:
                batcher._defer(fn, future)
            else:
                fn(future)
        super().add_done_callback(call)


class _Request:
    __slots__ = ("sid", "x", "future", "arrived")

    def __init__(self, sid, x, future, arrived):
        self.sid, self.x, self.future, self.arrived = sid, x, future, arrived


class Batcher:
    """Gather single-session steps from many threads into batched pool steps.

    Parameters
    ----------
    pool : numlstm.StreamPool
        The sessions; open and close them on the pool (thread-safe) while
        the batcher runs.
    max_batch : int, optional
        Most sessions per step (at most ``pool.capacity``); default
        ``min(pool.capacity, 256)``.
    max_delay : float, optional
        Most seconds the worker waits, after the oldest queued request
        arrived, for as many sessions with a request queued as the last
        step had (default 0.5 ms; 0 steps at once). A full batch never waits.

    Notes
    -----
    Use as a context manager, or call ``close()``: the worker is a daemon
    thread, so an unclosed batcher does not keep the interpreter alive, but
    requests still queued at exit are lost.
    """

    def __init__(self, pool, max_batch=None, max_delay=0.0005):
        from numlstm.pool import StreamPool

        if not isinstance(pool, StreamPool):
            raise TypeError(f"pool must be a numlstm.StreamPool, got {type(pool).__name__}")
        if max_batch is None:
            max_batch = min(pool.capacity, 256)
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) \
                or not 1 <= max_batch <= pool.capacity:
            raise ValueError(f"max_batch must be an int in [1, {pool.capacity}] (the pool's "
                             f"capacity), got {max_batch!r}")
        if isinstance(max_delay, bool) or not isinstance(max_delay, (int, float)) \
                or not 0 <= max_delay < math.inf:
            raise ValueError(f"max_delay must be a finite number of seconds >= 0, "
                             f"got {max_delay!r}")
        self.pool = pool
        self.max_batch = int(max_batch)
        self.max_delay = float(max_delay)
        model = pool.model
        self._input_size, self._dtype = model.input_size, model.dtype
        self._sids = np.zeros(self.max_batch, np.int64)  # one batch's ids and inputs
        self._x = np.zeros((self.max_batch, model.input_size), model.dtype)
        # One queue per session with requests waiting, and the sessions in turn.
        self._pending = {}  # sid -> deque of _Request, oldest first
        self._turns = collections.deque()  # the sids of _pending, the next turn first
        self._queued = 0  # requests in _pending
        self._cond = threading.Condition()
        self._callbacks = queue.SimpleQueue()  # (fn, future) the worker hands on
        self._callback_thread = None
        self._closed = False
        self.batches = 0  # steps taken, and sessions stepped in them (for monitoring)
        self.stepped = 0
        self._expect = 1  # requests to wait for: the last batch's size
        self._worker = threading.Thread(target=self._run, name="numlstm-batcher", daemon=True)
        self._worker.start()

    def __repr__(self):
        return (f"Batcher(pool with {len(self.pool)}/{self.pool.capacity} sessions open, "
                f"max_batch={self.max_batch}, max_delay={self.max_delay}, queued={self._queued}, "
                f"batches={self.batches}, closed={self._closed})")

    # ------------------------------------------------------------------
    # Callers
    # ------------------------------------------------------------------

    def submit(self, sid, x_t):
        """Queue one step of session ``sid``.

        Parameters
        ----------
        sid : int
            An open session of the pool.
        x_t : array (I,) or (1, I)
            Its input, copied now (the caller may reuse its array); another
            float precision is converted.

        Returns
        -------
        concurrent.futures.Future
            Resolves to the session's output h_t (O,): the caller's own (a
            row of an array made for its step, which no later step or other
            caller's row shares); or to the exception its step raised
            (KeyError when the session was closed before or during its
            step).

        Raises
        ------
        RuntimeError
            The batcher is closed.
        KeyError, TypeError, ValueError
            ``sid`` not an open session; ``x_t`` not a float array of I values.
        """
        I = self._input_size
        if x_t.__class__ is np.ndarray and x_t.dtype is self._dtype and x_t.shape == (I,):
            x = x_t.copy()  # the common case, quickly; a copy of our own
        else:
            if isinstance(x_t, np.ndarray) and x_t.shape == (1, I):
                x_t = x_t[0]
            x = np.array(weights_mod.check_float_array(x_t, "x_t", (I,), self._dtype))
        if not self.pool.is_open(sid):
            raise KeyError(f"sid {sid!r} is not an open session of the pool")
        future = _Future(self)
        request = _Request(int(sid), x, future, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed; make a new one to submit more")
            pending = self._pending.get(request.sid)
            if pending is None:
                self._pending[request.sid] = pending = collections.deque()
                self._turns.append(request.sid)
            pending.append(request)
            self._queued += 1
            # Wake the worker when it waits for a first request or for a batch.
            if self._queued == 1 or len(self._turns) >= self._expect:
                self._cond.notify()
        return future

    def step(self, sid, x_t, timeout=None):
        """``submit(sid, x_t).result(timeout)``: one session's step, blocking."""
        return self.submit(sid, x_t).result(timeout)

    def close(self, cancel=False):
        """Stop taking requests and wait for the worker to finish.

        Parameters
        ----------
        cancel : bool
            False (default): step every request already queued (drain).
            True: cancel the queued requests that have not started; their
            futures raise ``CancelledError``.
        """
        with self._cond:
            self._closed = True
            if cancel:
                for pending in self._pending.values():
                    for r in pending:
                        r.future.cancel()
                self._pending.clear()
                self._turns.clear()
                self._queued = 0
            self._cond.notify()
        me = threading.current_thread()
        if me is not self._worker:
            self._worker.join()
        # Then the callbacks the worker handed on (unless called from one).
        thread = self._callback_thread
        if thread is not None and me is not thread and me is not self._worker:
            self._callbacks.put(None)
            thread.join()

    @property
    def closed(self):
        """Whether ``close()`` was called: a closed batcher takes no requests."""
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        """Requests queued, not yet taken into a step."""
        return self._queued

    # ------------------------------------------------------------------
    # The worker
    # ------------------------------------------------------------------

    def _take(self):
        """The next batch (a list of requests, distinct sessions, one per
        session in turn), or None once closed and drained. Called without
        the lock."""
        cond, turns, pending = self._cond, self._turns, self._pending
        with cond:
            while not self._queued and not self._closed:
                cond.wait()
            if not self._queued:
                return None
            if len(turns) < self._expect and not self._closed:
                # Fewer sessions waiting than a batch: at most max_batch of them.
                deadline = min(pending[sid][0].arrived for sid in turns) + self.max_delay
                while len(turns) < self._expect and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
            batch = []
            for _ in range(min(len(turns), self.max_batch)):
                sid = turns.popleft()
                q = pending[sid]
                batch.append(q.popleft())
                if q:  # its next request waits for its next turn
                    turns.append(sid)
                else:
                    del pending[sid]
            self._queued -= len(batch)
            self._expect = max(1, len(batch))
        return batch

    def _run(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._step(batch)
            except BaseException as e:  # noqa: BLE001 - a bug here must not hang the callers
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _step(self, batch):
        live = []
        is_open = self.pool.is_open  # the pool checks again in its step
        for r in batch:
            if not r.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            if not is_open(r.sid):
                r.future.set_exception(KeyError(f"sid {r.sid} was closed before its step"))
                continue
            self._sids[len(live)] = r.sid
            self._x[len(live)] = r.x
            live.append(r)
        while live:
            n = len(live)
            try:
                # A new array per step (the pool's default): each caller gets its
                # own row of it, which no later step touches.
                out = self.pool.step(self._sids[:n], self._x[:n])
            except KeyError as e:
                # A session closed since it was checked above: the pool stepped
                # none, so step the others again without it.
                kept, closed = [], []
                for r in live:  # one check each: a session may close meanwhile too
                    (kept if is_open(r.sid) else closed).append(r)
                if not closed:  # pragma: no cover - the ids were open and distinct
                    for r in live:
                        r.future.set_exception(e)
                    return
                for r in closed:
                    r.future.set_exception(KeyError(f"sid {r.sid} was closed during its step"))
                live = kept
                for k, r in enumerate(live):
                    self._sids[k] = r.sid
                    self._x[k] = r.x
                continue
            except BaseException as e:  # noqa: BLE001 - routed to exactly this step's callers
                for r in live:
                    r.future.set_exception(e)
                return
            self.batches += 1
            self.stepped += n
            for r, h in zip(live, out, strict=True):
                r.future.set_result(h)
            return

    # ------------------------------------------------------------------
    # Callbacks, off the worker
    # ------------------------------------------------------------------

    def _defer(self, fn, future):
        """Run ``fn(future)`` on the callback thread (called by the worker only)."""
        if self._callback_thread is None:
            self._callback_thread = threading.Thread(
                target=self._run_callbacks, name="numlstm-batcher-callbacks", daemon=True)
            self._callback_thread.start()
        self._callbacks.put((fn, future))

    def _run_callbacks(self):
        while (item := self._callbacks.get()) is not None:
            fn, future = item
            try:
                fn(future)
            except Exception:  # noqa: BLE001 - as Future does: log it, run the next one
                _LOG.exception("exception calling callback for %r", future)

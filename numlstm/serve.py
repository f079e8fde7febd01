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
the worker waits until as many requests are queued as the last batch
stepped (capped at ``max_batch``), or ``max_delay`` seconds have passed,
whichever comes first. A lone client thus never waits for company, and
many clients, woken one after the other by their results, are still
gathered into one step.

Guarantees:

- a session's requests are stepped in the order they were submitted: a
  request whose session already has one in the batch being formed waits for
  a later batch (a batch names each session at most once);
- every request is answered exactly once: a result, an exception, or a
  cancellation (``close(cancel=True)``, or ``Future.cancel`` before its step);
- an exception raised by a step reaches exactly the futures of that step.
"""

import collections
import math
import threading
import time
from concurrent.futures import Future

import numpy as np

from numlstm import weights as weights_mod


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
        arrived, for as many requests as the last step had (default 0.5 ms;
        0 steps at once). A full batch never waits.

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
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # steps taken, and sessions stepped in them (for monitoring)
        self.stepped = 0
        self._expect = 1  # requests to wait for: the last batch's size
        self._worker = threading.Thread(target=self._run, name="numlstm-batcher", daemon=True)
        self._worker.start()

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
            Resolves to the session's output h_t (O,) (a row of an array
            made for its step, not the pool's buffer); or to
            the exception its step raised (KeyError when the session was
            closed before its step).

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
        future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed; make a new one to submit more")
            self._queue.append(_Request(int(sid), x, future, time.monotonic()))
            # Wake the worker when it waits for a first request or for a batch.
            if len(self._queue) == 1 or len(self._queue) >= self._expect:
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
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._cond.notify()
        if threading.current_thread() is not self._worker:  # a future's callback may close
            self._worker.join()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        """Requests queued, not yet taken into a step."""
        return len(self._queue)

    # ------------------------------------------------------------------
    # The worker
    # ------------------------------------------------------------------

    def _take(self):
        """The next batch (a list of requests, distinct sessions, in queue
        order), or None once closed and drained. Called without the lock."""
        q, cond = self._queue, self._cond
        with cond:
            while not q and not self._closed:
                cond.wait()
            if not q:
                return None
            deadline = q[0].arrived + self.max_delay
            while len(q) < self._expect and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                cond.wait(remaining)
            batch, seen, skipped = [], set(), []
            # A session already in this batch waits for the next one, with every
            # later request of it (so its order holds); scanning is bounded so a
            # flood from one session cannot make each batch scan the whole queue.
            scan = 4 * self.max_batch
            while q and len(batch) < self.max_batch and scan:
                scan -= 1
                r = q.popleft()
                if r.sid in seen:
                    skipped.append(r)
                else:
                    seen.add(r.sid)
                    batch.append(r)
            q.extendleft(reversed(skipped))
            self._expect = max(1, min(len(batch), self.max_batch))
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
        n = len(live)
        if n == 0:
            return
        try:
            # One copy of the pool's buffer (which the next step overwrites) per
            # step; each caller gets its row of it.
            out = self.pool.step(self._sids[:n], self._x[:n]).copy()
            results = list(out)
        except BaseException as e:  # noqa: BLE001 - routed to exactly this step's callers
            for r in live:
                r.future.set_exception(e)
            return
        self.batches += 1
        self.stepped += n
        for r, h in zip(live, results, strict=True):
            r.future.set_result(h)

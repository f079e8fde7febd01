"""numlstm.serve.Batcher: many threads, one batched pool step; order per
session, every request answered once, exceptions routed, clean close."""

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

import numlstm
from numlstm.pool import StreamPool
from numlstm.serve import Batcher

I, H = 3, 8
CLOSE = dict(rtol=1e-12, atol=1e-13)  # batched vs batch-1 products, float64


@pytest.fixture(scope="module")
def model():
    return numlstm.LSTM(I, H, dtype=np.float64, seed=0)  # the kinds test_pool compiles


def _alone(model, xs):
    """Outputs of a batch-1 stream over xs (T, I)."""
    s = model.stream(1)
    return np.stack([s.step(xs[t:t + 1])[0].copy() for t in range(len(xs))])


def test_many_threads_each_get_their_own_sequence(model):
    clients, T = 24, 40
    pool = StreamPool(model, clients)
    xs = np.random.default_rng(0).standard_normal((clients, T, I))
    outs = [None] * clients
    start = threading.Barrier(clients)

    def client(k):
        sid = pool.open()
        start.wait()
        with_futures = []
        for t in range(T):
            with_futures.append(batcher.submit(sid, xs[k, t]).result(10))
        outs[k] = np.stack(with_futures)
        pool.close(sid)

    with Batcher(pool, max_batch=16, max_delay=0.002) as batcher:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert batcher.stepped == clients * T  # none lost, none stepped twice
    assert batcher.batches < clients * T  # and they were batched
    for k in range(clients):
        np.testing.assert_allclose(outs[k], _alone(model, xs[k]), **CLOSE)
    assert len(pool) == 0


def test_a_sessions_pipelined_requests_keep_their_order(model):
    """Requests submitted back to back, without waiting, by several threads at
    once: each session's steps still run one per batch, in order."""
    sessions, T = 6, 30
    pool = StreamPool(model, sessions)
    sids = [pool.open() for _ in range(sessions)]
    xs = np.random.default_rng(1).standard_normal((sessions, T, I))
    futures = [None] * sessions
    with Batcher(pool, max_batch=sessions, max_delay=0.001) as batcher:
        def client(k):
            futures[k] = [batcher.submit(sids[k], xs[k, t]) for t in range(T)]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outs = [np.stack([f.result(10) for f in fs]) for fs in futures]
    assert batcher.stepped == sessions * T
    for k in range(sessions):
        np.testing.assert_allclose(outs[k], _alone(model, xs[k]), **CLOSE)


class _GatedPool(StreamPool):
    """A pool whose steps wait for ``gate`` (hold the worker inside a step
    while requests queue up), log the ids of every call, and fail when they
    name ``poison``."""

    poison = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls = []

    def step(self, sids, x):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(sorted(int(s) for s in sids))
        if self.poison in sids:
            raise FloatingPointError(f"step with {self.poison} failed")
        return super().step(sids, x)


def _hold(pool, batcher):
    """Send a step of a fresh session and wait until the worker is inside it
    (held at the gate); returns its future."""
    held = batcher.submit(pool.open(), np.zeros(I))
    assert pool.entered.wait(10)
    return held


def test_an_exception_reaches_exactly_the_futures_of_its_step(model):
    pool = _GatedPool(model, 5)
    with Batcher(pool, max_batch=2, max_delay=5.0) as batcher:
        held = _hold(pool, batcher)
        a, b, c, d = (pool.open() for _ in range(4))
        pool.poison = a
        x = np.zeros(I)
        futures = {sid: batcher.submit(sid, x) for sid in (a, b, c, d)}
        pool.gate.set()  # queued meanwhile: the next steps are [a, b], then [c, d]
        assert held.result(10).shape == (H,)
        for sid in (a, b):
            with pytest.raises(FloatingPointError, match=f"step with {a} failed"):
                futures[sid].result(10)
            assert not pool.state(sid)[0].any()  # did not move
        for sid in (c, d):
            np.testing.assert_array_equal(futures[sid].result(10),
                                          model.stream(1).step(x[None])[0])
        assert pool.calls[1:] == [sorted([a, b]), sorted([c, d])]
        pool.poison = None
        again = [batcher.submit(a, x), batcher.submit(b, x)]  # a full batch: no wait
        assert [f.result(10).shape for f in again] == [(H,), (H,)]  # the worker lives on


def test_a_session_closed_before_its_step_fails_alone(model):
    pool = _GatedPool(model, 3)
    with Batcher(pool, max_batch=2, max_delay=5.0) as batcher:
        _hold(pool, batcher)
        a, b = pool.open(), pool.open()
        fa = batcher.submit(a, np.zeros(I))
        pool.close(a)
        fb = batcher.submit(b, np.zeros(I))
        pool.gate.set()
        with pytest.raises(KeyError, match=f"sid {a} was closed before its step"):
            fa.result(10)
        assert fb.result(10).shape == (H,)


def test_a_closed_sessions_queued_request_never_steps_the_session_in_its_slot(model):
    """Issue 24, case 1: a request still queued when its session closes and a
    new session takes the slot fails with KeyError; the new session does not
    move."""
    pool = _GatedPool(model, 2)
    with Batcher(pool, max_batch=2, max_delay=5.0) as batcher:
        _hold(pool, batcher)
        a = pool.open()
        late = batcher.submit(a, np.ones(I))
        pool.close(a)
        c = pool.open()  # a's slot, under a new id
        assert c != a
        with pytest.raises(KeyError, match=f"sid {a} is not an open session"):
            batcher.submit(a, np.ones(I))  # and a retry of it is refused at once
        pool.gate.set()
        with pytest.raises(KeyError, match=f"sid {a} was closed before its step"):
            late.result(10)
        h, cc = pool.state(c)
        assert not h.any() and not cc.any()  # never stepped


def test_close_drains_by_default_and_cancels_when_asked(model):
    pool = _GatedPool(model, 2)
    sid = pool.open()
    batcher = Batcher(pool, max_batch=1, max_delay=0)
    first = batcher.submit(sid, np.zeros(I))
    assert pool.entered.wait(10)  # the worker is inside the first step
    queued = [batcher.submit(sid, np.ones(I)) for _ in range(3)]
    closer = threading.Thread(target=batcher.close, kwargs={"cancel": True})
    closer.start()
    while not batcher.closed:
        pass
    pool.gate.set()
    closer.join(10)
    assert first.result(10).shape == (H,)  # in flight: finished
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(0)
    with pytest.raises(RuntimeError, match="the batcher is closed"):
        batcher.submit(sid, np.zeros(I))

    pool2 = StreamPool(model, 2)
    sid = pool2.open()
    batcher = Batcher(pool2, max_batch=2, max_delay=5.0)
    futures = [batcher.submit(sid, np.full(I, float(t))) for t in range(5)]
    batcher.close()  # drains: every queued request is stepped, in order
    xs = np.array([np.full(I, t, np.float64) for t in range(5)])
    np.testing.assert_allclose(np.stack([f.result(0) for f in futures]), _alone(model, xs),
                               **CLOSE)


def test_bad_input_is_refused_at_submit(model):
    pool = StreamPool(model, 2)
    sid = pool.open()
    with Batcher(pool) as batcher:
        with pytest.raises(KeyError, match="sid 1 is not an open session"):
            batcher.submit(1, np.zeros(I))
        with pytest.raises(ValueError, match=r"x_t must have shape \(3,\), got \(4,\)"):
            batcher.submit(sid, np.zeros(4))
        with pytest.raises(TypeError, match="x_t must be a floating-point array"):
            batcher.submit(sid, np.zeros(I, np.int32))
        assert batcher.submit(sid, np.zeros((1, I), np.float32)).result(10).shape == (H,)
    with pytest.raises(ValueError, match=r"max_batch must be an int in \[1, 2\]"):
        Batcher(pool, max_batch=3)
    with pytest.raises(ValueError, match="max_delay must be a finite number"):
        Batcher(pool, max_delay=-1)
    with pytest.raises(TypeError, match="pool must be a numlstm.StreamPool"):
        Batcher(model)

"""numlstm.serve.Batcher: many threads, one batched pool step; order per
session, every request answered once, exceptions routed, clean close."""

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

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
    victim = None  # closed by the step that names it, just before it runs

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls = []

    def step(self, sids, x):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(sorted(int(s) for s in sids))
        if self.victim in sids:
            self.close(self.victim)
            self.victim = None
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


def test_a_session_closed_while_its_batch_steps_fails_alone(model):
    """Issue 24, case 2: the pool refuses a step naming a session closed after
    the batcher checked it; the batch's other sessions are stepped without it."""
    pool = _GatedPool(model, 4)
    with Batcher(pool, max_batch=3, max_delay=5.0) as batcher:
        _hold(pool, batcher)
        a, b = pool.open(), pool.open()
        fa, fb = batcher.submit(a, np.ones(I)), batcher.submit(b, np.ones(I))
        pool.victim = a
        pool.gate.set()
        with pytest.raises(KeyError, match=f"sid {a} was closed during its step"):
            fa.result(10)
        np.testing.assert_array_equal(fb.result(10), model.stream(1).step(np.ones((1, I)))[0])
        assert sorted([a, b]) in pool.calls  # one batch of both
        assert pool.state(b)[0].any()


def test_sessions_closing_in_one_thread_never_fail_another_threads_steps(model):
    """Issue 24, case 2, as reported: one thread opens, submits to and closes
    its own sessions, another steps its own; none of the latter's steps fails."""
    pool = StreamPool(model, 8)
    mine = pool.open()
    stop, failures, churned = threading.Event(), [], [0]

    def churn():
        while not stop.is_set():
            sid = pool.open()
            batcher.submit(sid, np.ones(I))
            pool.close(sid)  # while its request is queued or in flight
            churned[0] += 1

    with Batcher(pool, max_batch=8, max_delay=0) as batcher:
        other = threading.Thread(target=churn)
        other.start()
        try:
            for _ in range(1500):
                try:
                    batcher.step(mine, np.ones(I), timeout=10)
                except KeyError as e:
                    failures.append(e)
        finally:
            stop.set()
            other.join(10)
    assert not other.is_alive()
    assert churned[0] > 0 and not failures, failures[:3]


def test_a_done_callback_that_calls_the_batcher_holds_up_no_one(model):
    """Issue 24, case 3: callbacks run off the worker, so one that blocks on
    the batcher (or on anything) does not stall the other sessions."""
    pool = StreamPool(model, 3)
    a, b = pool.open(), pool.open()
    release, inside, got = threading.Event(), threading.Event(), {}

    def callback(future):
        got["thread"] = threading.current_thread().name
        got["again"] = batcher.step(a, np.ones(I), timeout=10)  # re-entry, blocking
        inside.set()
        release.wait(10)  # and then hold its thread

    with Batcher(pool, max_batch=2, max_delay=0) as batcher:
        first = batcher.submit(a, np.ones(I))
        first.add_done_callback(callback)
        assert inside.wait(10)
        assert got["again"].shape == (H,)
        assert got["thread"] != "numlstm-batcher"
        assert batcher.step(b, np.ones(I), timeout=10).shape == (H,)  # served meanwhile
        release.set()
    s = model.stream(1)
    np.testing.assert_allclose(first.result(0), s.step(np.ones((1, I)))[0], **CLOSE)
    np.testing.assert_allclose(got["again"], s.step(np.ones((1, I)))[0], **CLOSE)


def test_one_sessions_backlog_does_not_starve_another(model):
    """Issue 24, case 4: 5,000 steps queued for one session, then one for
    another: the other is in the first batch after the one in flight."""
    pool = _GatedPool(model, 3)
    batcher = Batcher(pool, max_batch=2, max_delay=0)
    try:
        _hold(pool, batcher)
        a, b = pool.open(), pool.open()
        backlog = [batcher.submit(a, np.ones(I)) for _ in range(5000)]
        late = batcher.submit(b, np.ones(I))
        pool.gate.set()
        assert late.result(10).shape == (H,)
        assert pool.calls[1] == sorted([a, b])  # its first turn
        assert backlog[0].result(10).shape == (H,)
    finally:
        batcher.close(cancel=True)
    assert all(f.done() for f in backlog)


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


# -- properties ---------------------------------------------------------------------------

class BatcherMachine(RuleBasedStateMachine):
    """Open, submit (from this thread and from several at once), close and
    reopen sessions while the worker steps them: every future resolves exactly
    once; the steps that succeed for a session are a prefix of what was
    submitted for it, in order, with the outputs a batch-1 stream gives for
    that prefix; a failed one is a KeyError; no session moves but by its own
    requests."""

    CAPACITY = 4

    @initialize(seed=st.integers(0, 2**16), max_batch=st.integers(1, 4))
    def setup(self, seed, max_batch):
        self.model = _MODEL
        self.rng = np.random.default_rng(seed)
        self.pool = StreamPool(self.model, self.CAPACITY)
        self.batcher = Batcher(self.pool, max_batch=max_batch, max_delay=0)
        self.open_ids, self.closed_ids = set(), set()
        self.sent = {}  # sid -> [(x, future)] in submission order
        self.calls = {}  # future -> times its done-callbacks ran

    def teardown(self):
        if hasattr(self, "batcher"):
            self.batcher.close()  # after the worker, waits for the callback thread
            self.settle()
            for future, n in self.calls.items():
                assert n == 1, f"{future}: its callbacks ran {n} times"

    def _submit(self, sid, x):
        future = self.batcher.submit(sid, x)
        self.calls[future] = 0

        def count(f, calls=self.calls):
            calls[f] += 1
        future.add_done_callback(count)
        return future

    @precondition(lambda self: len(self.open_ids) < self.CAPACITY)
    @rule()
    def open(self):
        sid = self.pool.open()
        assert sid not in self.open_ids | self.closed_ids  # never given twice
        self.open_ids.add(sid)
        self.sent[sid] = []

    @precondition(lambda self: self.open_ids)
    @rule(data=st.data(), steps=st.integers(1, 4))
    def submit(self, data, steps):
        sid = data.draw(st.sampled_from(sorted(self.open_ids)))
        for _ in range(steps):
            x = self.rng.standard_normal(I)
            self.sent[sid].append((x, self._submit(sid, x)))

    @precondition(lambda self: self.open_ids)
    @rule(data=st.data(), close_one=st.booleans())
    def from_threads(self, data, close_one):
        """Each open session's steps submitted by a thread of its own, all at
        once; one of them may close its session after submitting."""
        sids = sorted(self.open_ids)
        closer = data.draw(st.sampled_from(sids)) if close_one else None
        xs = {sid: self.rng.standard_normal((3, I)) for sid in sids}
        out = {}
        start = threading.Barrier(len(sids))

        def client(sid):
            start.wait(10)
            out[sid] = [(x, self._submit(sid, x)) for x in xs[sid]]
            if sid == closer:
                self.pool.close(sid)

        threads = [threading.Thread(target=client, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        for sid in sids:
            self.sent[sid].extend(out[sid])
        if closer is not None:
            self.open_ids.discard(closer)
            self.closed_ids.add(closer)

    @precondition(lambda self: self.open_ids)
    @rule(data=st.data())
    def close(self, data):
        sid = data.draw(st.sampled_from(sorted(self.open_ids)))
        self.pool.close(sid)
        self.open_ids.discard(sid)
        self.closed_ids.add(sid)

    @precondition(lambda self: self.closed_ids)
    @rule(data=st.data())
    def submit_to_a_closed_id(self, data):
        sid = data.draw(st.sampled_from(sorted(self.closed_ids)))
        with pytest.raises(KeyError, match="is not an open session"):
            self.batcher.submit(sid, np.zeros(I))

    @rule()
    def settle(self):
        """Wait for every future, then check what each session got."""
        if not hasattr(self, "batcher"):
            return
        for sid, sent in self.sent.items():
            stepped = 0
            for _x, future in sent:
                try:
                    future.result(10)
                except KeyError:
                    continue
                stepped += 1
            # Successes are a prefix: once a request failed (its session
            # closed), no later one of that session was stepped.
            results = [f.exception(0) is None for _, f in sent]
            assert results == [True] * stepped + [False] * (len(sent) - stepped), sid
            s = self.model.stream(1)
            for x, future in sent[:stepped]:
                np.testing.assert_allclose(future.result(0), s.step(x[None])[0], **CLOSE)
            if sid in self.open_ids:
                h, c = self.pool.state(sid)
                hs, cs = s.state
                np.testing.assert_allclose(h, hs[:, 0], **CLOSE)
                np.testing.assert_allclose(c, cs[:, 0], **CLOSE)
        # Callbacks run on the callback thread, perhaps not yet: never twice.
        assert all(n <= 1 for n in self.calls.values())


_MODEL = numlstm.LSTM(I, H, dtype=np.float64, seed=0)
BatcherMachine.TestCase.settings = settings(max_examples=15, stateful_step_count=12,
                                            deadline=None)
TestBatcherMachine = BatcherMachine.TestCase

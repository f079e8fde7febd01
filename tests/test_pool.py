"""StreamPool: many sessions stepped in one batched call, against plain streams.

The reference for every session is a ``Stream`` of batch 1 carrying that
session alone (equal to float64 rounding: a batched product sums in another
order than a batch-1 one), and, exactly, a ``Stream`` of batch m over the
states of each chunk of m sessions a step runs (the pool binds the arguments
a stream of that batch binds, so the same compiled code computes them).
"""

import tracemalloc

import numpy as np
import pytest
from helpers import nrt_allocations
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import numlstm
from numlstm.pool import StreamPool, pool_memory

I, H = 3, 8
CLOSE = dict(rtol=1e-12, atol=1e-13)  # batch-1 stream vs batched pool, float64


def _model(kind, L, P, dtype=np.float64):
    """A small model whose weights are stored as ``kind``."""
    m = numlstm.LSTM(I, H, num_layers=L, proj_size=P, dtype=dtype, seed=L + 10 * P)
    if kind == "bsr":
        numlstm.prune.blocks(m, 0.5, block=(8, 1), weights=("ih", "hh"))
    elif kind == "mixed":  # dense, CSR and compact CSR weights side by side
        numlstm.prune.magnitude(m, 0.7, weights=("hh",))
        numlstm.quantize.quantize(m, None, "uint16", skip_dense=True)
    elif kind != "dense":
        numlstm.prune.magnitude(m, 0.6)
        if kind != "csr":
            numlstm.quantize.quantize(m, kind.removeprefix("csr-"))
    return m


# Every storage kind, 1-3 layers, with and without projection: one compiled
# pool step per configuration, so few configurations, each covering several axes.
CONFIGS = [("dense", 1, 0), ("csr", 2, 2), ("bsr", 3, 0), ("csr-float16", 2, 0),
           ("csr-int8", 3, 2), ("mixed", 2, 3)]
CAPACITY, CHUNK = 7, 4  # steps of 5-7 sessions run in two chunks


class PoolMachine(RuleBasedStateMachine):
    """Random open, close, step of random subsets in random order, state and
    set_state, against one plain batch-1 Stream per session."""

    config = None  # (kind, L, P): set by the subclass

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        kind, L, P = self.config
        self.model = _model(kind, L, P)
        self.rng = np.random.default_rng(seed)
        self.pool = StreamPool(self.model, CAPACITY, chunk=CHUNK)
        self.streams = {}  # sid -> Stream(B=1) of that session alone
        self.exact = {}  # sid -> (h (L, O), c (L, H)) as chunk-sized streams give them
        self.given = set()  # every id open() returned

    def _random_state(self):
        m = self.model
        return (self.rng.standard_normal((m.num_layers, m.output_size)),
                self.rng.standard_normal((m.num_layers, m.hidden_size)))

    @precondition(lambda self: len(self.streams) < CAPACITY)
    @rule(with_state=st.booleans())
    def open(self, with_state):
        state = self._random_state() if with_state else None
        sid = self.pool.open(state)
        assert sid not in self.streams and sid not in self.given and sid >= 0
        self.given.add(sid)  # an id is never given twice
        s = self.model.stream(1)
        if state is not None:
            s.reset((state[0][:, None], state[1][:, None]))
        self.streams[sid] = s
        h, c = s.state
        self.exact[sid] = (h[:, 0], c[:, 0])

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def close(self, data):
        sid = data.draw(st.sampled_from(sorted(self.streams)))
        self.pool.close(sid)
        del self.streams[sid], self.exact[sid]
        with pytest.raises(KeyError, match="not an open session"):
            self.pool.state(sid)

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def step(self, data):
        sids = data.draw(st.permutations(sorted(self.streams)))
        sids = sids[:data.draw(st.integers(1, len(sids)))]
        x = self.rng.standard_normal((len(sids), I))
        out = self.pool.step(np.array(sids), x).copy()
        for k, sid in enumerate(sids):
            np.testing.assert_allclose(out[k], self.streams[sid].step(x[k:k + 1])[0], **CLOSE)
        # Exactly a stream of batch m over each chunk of m sessions.
        for start in range(0, len(sids), CHUNK):
            chunk = sids[start:start + CHUNK]
            h = np.stack([self.exact[sid][0] for sid in chunk], axis=1)
            c = np.stack([self.exact[sid][1] for sid in chunk], axis=1)
            s = self.model.stream(len(chunk), (h, c))
            np.testing.assert_array_equal(out[start:start + len(chunk)],
                                          s.step(x[start:start + len(chunk)]))
            h, c = s.state
            for k, sid in enumerate(chunk):
                self.exact[sid] = (h[:, k], c[:, k])

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def set_state(self, data):
        sid = data.draw(st.sampled_from(sorted(self.streams)))
        state = self._random_state()
        self.pool.set_state(sid, state)
        self.streams[sid].reset((state[0][:, None], state[1][:, None]))
        self.exact[sid] = state

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def bad_step_changes_nothing(self, data):
        # Closed ids, and ids never given: those of slots never opened, and
        # the next ids of open slots (what a forged or stale id looks like).
        closed = sorted(self.given - set(self.streams)
                        | set(range(CAPACITY)) - self.given
                        | {sid + CAPACITY for sid in self.streams})
        live = sorted(self.streams)
        bad = data.draw(st.sampled_from(["duplicate", "closed", "negative"]))
        if bad == "duplicate":
            sids = [live[0], *live[1:2], live[0]]
        elif bad == "closed":
            sids = [*live[:1], data.draw(st.sampled_from(closed))]
        else:
            sids = [*live[:1], -data.draw(st.integers(1, 3 * CAPACITY))]
        with pytest.raises(KeyError, match="no session was stepped"):
            self.pool.step(np.array(sids), np.zeros((len(sids), I)))

    @invariant()
    def states_match(self):
        if not hasattr(self, "pool"):
            return
        assert len(self.pool) == len(self.streams)
        for sid, s in self.streams.items():
            h, c = self.pool.state(sid)
            np.testing.assert_array_equal(h, self.exact[sid][0])
            np.testing.assert_array_equal(c, self.exact[sid][1])
            hs, cs = s.state
            np.testing.assert_allclose(h, hs[:, 0], **CLOSE)
            np.testing.assert_allclose(c, cs[:, 0], **CLOSE)


for _kind, _L, _P in CONFIGS:
    _name = f"TestPool_{_kind.replace('-', '_')}_L{_L}_P{_P}"
    _machine = type(_name, (PoolMachine,), {"config": (_kind, _L, _P)})
    _machine.TestCase.settings = settings(max_examples=6, stateful_step_count=20,
                                          deadline=None)
    globals()[_name] = _machine.TestCase


# -- state travels between pools ---------------------------------------------------------

def test_a_saved_state_resumes_exactly_in_another_pool():
    m = _model("csr", 2, 2)
    a, b = StreamPool(m, 4), StreamPool(m, 9)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 1, I))
    sid = a.open()
    other = a.open()
    for t in range(3):
        a.step(np.array([sid, other]), np.concatenate([xs[t], xs[t]]))
    moved = b.open(a.state(sid))
    for t in range(3, 6):
        np.testing.assert_array_equal(a.step(np.array([sid]), xs[t]),
                                      b.step(np.array([moved]), xs[t]))


def test_sessions_not_named_do_not_move_and_slots_are_reused():
    m = _model("dense", 1, 0)
    pool = StreamPool(m, 3)
    sids = [pool.open() for _ in range(3)]
    before = pool.state(sids[1])
    pool.step(np.array([sids[2], sids[0]]), np.ones((2, I)))
    for got, want in zip(pool.state(sids[1]), before, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="the pool is full: 3 sessions"):
        pool.open()
    pool.close(sids[1])
    again = pool.open()
    assert len(pool) == 3 and again == sids[1] + 3  # the slot, under a new id
    assert not np.any(pool.state(again)[0])  # a reopened slot starts from zeros
    for use in (pool.state, pool.close, lambda sid: pool.step(np.array([sid]), np.ones((1, I)))):
        with pytest.raises(KeyError, match=f"{sids[1]} is not an open session"):
            use(sids[1])  # the old id names no session, not the new one in its slot
    assert not pool.is_open(sids[1]) and pool.is_open(again)


def test_other_float_precisions_are_converted():
    m = _model("csr", 2, 2)
    pool = StreamPool(m, 5)
    sids = np.array([pool.open() for _ in range(5)])
    x = np.random.default_rng(1).standard_normal((5, I)).astype(np.float32)
    out = pool.step(sids, x).copy()  # float32 in: converted to the model's float64
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, m.stream(5).step(x.astype(np.float64)))


def test_step_of_no_session_is_empty():
    pool = StreamPool(_model("dense", 1, 0), 2)
    assert pool.step(np.zeros(0, np.int64), np.zeros((0, I))).shape == (0, H)


def test_weight_changes_are_seen():
    m = numlstm.LSTM(I, H, dtype=np.float64, seed=0)
    pool = StreamPool(m, 2)
    sid = pool.open()
    m.parameters()["bias_ih_l0"][:] += 1.0  # in place
    x = np.ones((1, I))
    np.testing.assert_array_equal(pool.step(np.array([sid]), x), m.stream(1).step(x))
    state = m.state_dict()
    state["weight_hh_l0"] *= 0.5
    m.load_state_dict(state)  # new arrays: the pool rebinds
    pool.set_state(sid, (np.zeros((1, H)), np.zeros((1, H))))
    np.testing.assert_array_equal(pool.step(np.array([sid]), x), m.stream(1).step(x))


# -- allocations --------------------------------------------------------------------------

# Configurations of the state machine: their kernels are compiled already.
@pytest.mark.parametrize("kind,L,P,n", [("dense", 1, 0, 1), ("csr-int8", 3, 2, 6),
                                        ("bsr", 3, 0, 3), ("mixed", 2, 3, 8)])
def test_warm_step_allocates_nothing(kind, L, P, n):
    """Into ``out``: no NRT allocation in the kernel call and no memory kept
    by the Python side of a warm step (views and shape tuples come and go)."""
    pool = StreamPool(_model(kind, L, P), 8, chunk=5)
    sids = np.array([pool.open() for _ in range(8)][::-1][:n])
    x = np.ones((n, I))
    h = np.empty((n, pool.model.output_size))
    assert pool.step(sids, x, out=h) is h
    assert nrt_allocations(lambda: pool.step(sids, x, out=h)) == 0
    assert nrt_allocations(lambda: pool.step(sids, x)) == 0  # a new output: NumPy's
    tracemalloc.start()
    try:
        for _ in range(1000):
            pool.step(sids, x, out=h)
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5000):
            pool.step(sids, x, out=h)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 64, end - start
    assert peak - start < 1024, peak - start


def test_memory_is_as_predicted():
    m = _model("mixed", 2, 3)
    predicted = pool_memory(m, 1000, chunk=64)
    StreamPool(m, 2, chunk=64)  # compiled (or loaded) outside the measurement
    tracemalloc.start()
    try:
        pool = StreamPool(m, 1000, chunk=64)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pool.memory_parts() == predicted
    assert predicted["workspace"] < predicted["states"]  # 64 work rows, 1000 slots
    assert predicted["total"] <= held <= predicted["total"] * 1.05 + 8192


def test_memory_report_adds_the_pool():
    m = _model("mixed", 2, 3)
    pool = m.stream_pool(100, chunk=16)
    plain = numlstm.memory_report(m, 1, 1)
    with_pool = numlstm.memory_report(m, 1, 1, pool=pool)
    parts = pool.memory_parts()
    assert with_pool["stream pool states"] == parts["states"] + parts["index"]
    assert with_pool["stream pool workspace"] == parts["workspace"]
    assert with_pool["total"] == plain["total"] + parts["total"]
    by_capacity = numlstm.memory_report(m, 1, 1, pool=100)  # the default chunk: 100 rows
    assert by_capacity["stream pool states"] == with_pool["stream pool states"]
    assert "stream pool workspace" in str(with_pool)
    with pytest.raises(ValueError, match="StreamPool of this model"):
        numlstm.memory_report(_model("dense", 1, 0), 1, 1, pool=pool)


# -- bad input ----------------------------------------------------------------------------

def test_bad_input_is_refused_clearly_and_changes_nothing():
    m = _model("dense", 1, 0)
    pool = StreamPool(m, 3)
    a, b = pool.open(), pool.open()
    x = np.ones((2, I))
    pool.step(np.array([a, b]), x)
    saved = [pool.state(a), pool.state(b)]
    cases = [
        (KeyError, r"sids\[1\] = 0 is named twice", ([a, a], x)),
        (KeyError, r"sids\[1\] = 2 is not an open session", ([a, 2], x)),
        (KeyError, r"sids\[1\] = -1 is negative: no session has that id", ([a, -1], x)),
        (KeyError, r"sids\[1\] = 3 is not an open session", ([a, 3], x)),
        (KeyError, r"sids\[0\] = 18446744073709551615 is not a session id",
         (np.array([2**64 - 1, 0], np.uint64), x)),
        (TypeError, "sids must be a 1-D array of int session ids, got a 1-D array of dtype "
                    "float64", ([0.0, 1.0], x)),
        (TypeError, "2-D", ([[a, b]], x)),
        (ValueError, r"x must have shape \(2, 3\), got \(2, 4\)", ([a, b], np.ones((2, 4)))),
        (ValueError, r"x must have shape \(1, 3\), got \(2, 3\)", ([a], x)),
        (TypeError, "x must be a floating-point array, got dtype int64",
         ([a, b], np.ones((2, I), np.int64))),
        (ValueError, "more than the pool's capacity 3", ([0, 1, 2, 0], np.ones((4, I)))),
    ]
    for error, message, (sids, xx) in cases:
        with pytest.raises(error, match=message):
            pool.step(np.array(sids), xx)
    for sid, (h, c) in zip([a, b], saved, strict=True):
        np.testing.assert_array_equal(pool.state(sid)[0], h)
        np.testing.assert_array_equal(pool.state(sid)[1], c)
    with pytest.raises(ValueError, match=r"state\[0\] \(h\) must have shape \(1, 8\)"):
        pool.set_state(a, (np.zeros((2, H)), np.zeros((1, H))))
    with pytest.raises(TypeError, match="state must be a tuple"):
        pool.open(np.zeros((2, H)))
    with pytest.raises(TypeError, match="sid must be an int session id, got str"):
        pool.close("0")
    with pytest.raises(KeyError, match="sid 2 is not an open session"):
        pool.set_state(2, (np.zeros((1, H)), np.zeros((1, H))))
    assert len(pool) == 2


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4"])
def test_capacity_is_checked(bad):
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        StreamPool(numlstm.LSTM(I, H), bad)


def test_bidirectional_and_device_models_are_refused():
    with pytest.raises(ValueError, match="bidirectional model cannot stream"):
        StreamPool(numlstm.LSTM(I, H, bidirectional=True), 2)

    class OnDevice(numlstm.LSTM):
        device = "cuda"  # what model.to("cuda") reports

    with pytest.raises(TypeError, match="runs on the CPU, but the model is on the GPU"):
        StreamPool(OnDevice(I, H), 2)

"""Two-thread batch-1 stream steps (numlstm.pair, numlstm.kernels.pair): the
same results as one thread, whoever computes which half; no allocation; the
worker's lifecycle; when two threads are used."""

import gc
import os
import threading
import time

import numpy as np
import pytest
from helpers import nrt_allocations
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import numlstm
from numlstm import config, layouts, pair
from numlstm.kernels import pair as kernels

KINDS = ["dense", "dense-float16", "csr", "csr-per-row", "csr-float16", "csr-int8",
         "csr-uint16", "bsr"]
CELLS = [{}, {"peepholes": True}, {"activations": ("hard_sigmoid", "tanh", "tanh")},
         {"input_forget": True, "clip": 3.0}]


@pytest.fixture
def two(monkeypatch):
    """Two threads for every batch-1 step, whatever its size."""
    monkeypatch.setattr(config, "STEP_THREADS", "2")
    monkeypatch.setattr(config, "PAIR_MIN_NS", 0)


def _model(kind, L, H, cell=None, layout="auto", seed=0, dtype=np.float32):
    """A model of ``kind`` storage, I=16."""
    m = numlstm.LSTM(16, H, num_layers=L, seed=seed, dtype=dtype, **(cell or {}))
    if kind == "dense-float16":
        numlstm.quantize.quantize(m, "float16")
    elif kind == "bsr":
        numlstm.prune.blocks(m, 0.75, block=(8, 1))
    elif kind == "csr-per-row":
        numlstm.prune.magnitude(m, 0.8, scope="per_row")
    elif kind != "dense":
        numlstm.prune.magnitude(m, 0.85)
        if kind == "csr-uint16":
            numlstm.quantize.quantize(m, values=None, indices="uint16")
        elif kind != "csr":
            numlstm.quantize.quantize(m, kind.removeprefix("csr-"))
    saved = config.STEP_LAYOUT
    config.STEP_LAYOUT = layout
    try:  # layouts are built at the first use: here
        m.refresh_layouts()
        for w in m.weights().values():
            if hasattr(w, "step_layout"):
                w.step_layout()
    finally:
        config.STEP_LAYOUT = saved
    return m


def _start_worker(p):
    """Start ``p``'s worker; another test's idle worker may hold the one
    slot for ~50 us (it leaves because this asks for it)."""
    for _ in range(10000):
        p.wake()
        if p._thread is not None:
            return
        time.sleep(0.001)
    raise AssertionError("no worker slot came free in 10 s")


@njit
def _run_half(plan, word, part):
    """Half ``part`` of job ``word`` of ``plan``, here."""
    kernels._half(kernels._job(plan), word, part)


def _one_thread(m, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(config, "STEP_THREADS", "1")
        s = m.stream(1)
    assert s._pair is None
    return s


# Every example is a new kernel type, whose two-thread step compiles in ~10-30 s:
# 12 examples, up to 2 layers (the layer loop), sample kinds, cells and layouts.
@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), L=st.integers(1, 2), H=st.sampled_from([32, 64]),
       cell=st.sampled_from(CELLS), layout=st.sampled_from(["auto", "sell", "windows", "csr",
                                                            "dense"]),
       seed=st.integers(0, 100), dtype=st.sampled_from([np.float32, np.float64]))
def test_two_threads_give_what_one_gives(kind, L, H, cell, layout, seed, dtype):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "STEP_THREADS", "2")
        mp.setattr(config, "PAIR_MIN_NS", 0)
        m = _model(kind, L, H, cell, layout, seed, dtype)
        s = m.stream(1)
        assert s._pair is not None
        one = _one_thread(m, mp)
        x = np.random.default_rng(seed).standard_normal((12, 1, 16)).astype(dtype)
        for t in range(12):
            np.testing.assert_allclose(s.step(x[t]), one.step(x[t]), rtol=1e-6, atol=1e-7)
        for a, b in zip(s.state, one.state, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_the_worker_computes_the_second_half_of_a_published_layer(kind, two, monkeypatch):
    """Deterministic split: the worker thread claims and computes half 1 of
    a layer published by hand, this thread half 0; together one step."""
    monkeypatch.setattr(pair, "SPINS", 10**9)  # the worker waits for the layer
    m = _model(kind, 1, 64, {"peepholes": True})
    s = m.stream(1)
    one = _one_thread(m, monkeypatch)
    x = np.linspace(-1, 1, 16, dtype=np.float32)[None]
    s.reset((np.full((1, 1, 64), 0.3, np.float32), np.full((1, 1, 64), -0.2, np.float32)))
    one.reset(s.state)
    p, sync = s._pair, s._pair.sync
    s._x[...] = x
    s._hprev[...] = s._h[0, 0]
    _start_worker(p)
    sync[kernels.LAYER] = 0
    sync[kernels.GO] = 1  # published: the worker claims half 1
    for _ in range(3000):
        if sync[kernels.DONE] == 1:
            break
        p._thread.join(0.01)
    assert sync[kernels.DONE] == 1 and sync[kernels.CLAIM] == 1
    _run_half(p.plan, 0, 0)
    p.stop()
    expected = one.step(x)
    np.testing.assert_allclose(s._h[0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.state[1], one.state[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["dense", "csr", "csr-float16", "bsr"])
@pytest.mark.parametrize("L", [1, 3])
def test_a_two_thread_step_allocates_nothing(kind, L, two):
    s = _model(kind, L, 64).stream(1)
    assert s._pair is not None
    x = np.ones((1, 16), np.float32)
    s.step(x)
    assert nrt_allocations(lambda: s.step(x)) == 0


def test_an_idle_worker_leaves_and_the_next_step_brings_it_back(two, monkeypatch):
    monkeypatch.setattr(pair, "SPINS", 10)
    monkeypatch.setattr(pair, "YIELDS", 10)
    m = _model("csr", 1, 32)
    s, ref = m.stream(1), _one_thread(m, monkeypatch)
    x = np.ones((1, 16), np.float32)
    _start_worker(s._pair)
    first = s._pair._thread
    first.join(10)
    assert not first.is_alive() and s._pair.sync[kernels.STATE] == kernels.ASLEEP
    np.testing.assert_allclose(s.step(x), ref.step(x), rtol=1e-6)  # alone, then restarted
    assert s._pair._thread is not first


def test_a_collected_stream_stops_its_worker(two):
    s = _model("dense", 2, 32).stream(1)
    _start_worker(s._pair)
    s.step(np.ones((1, 16), np.float32))
    thread = s._pair._thread
    assert thread.is_alive()
    del s
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_load_state_dict_rebinds_and_stops_the_old_worker(two):
    m = _model("dense", 1, 32)
    s = m.stream(1)
    x = np.ones((1, 16), np.float32)
    s.step(x)
    old = s._pair
    state = m.state_dict()
    state["weight_hh_l0"] = state["weight_hh_l0"] * 0.5
    m.load_state_dict(state)
    s.reset()
    out = s.step(x).copy()
    assert s._pair is not old and old.sync[kernels.STOP] == 1
    expected, _ = m(x[None])
    np.testing.assert_allclose(out, expected[0], rtol=1e-5, atol=1e-6)


def test_when_two_threads_are_used(two, monkeypatch):
    assert pair.worth_two(_model("dense", 1, 32), 1)
    assert not pair.worth_two(_model("dense", 1, 32), 2)  # batch 1 only
    assert not pair.worth_two(_model("dense", 1, 48), 1)  # H % 32: halves of whole lines
    assert not pair.worth_two(numlstm.LSTM(16, 32, proj_size=8), 1)
    monkeypatch.setattr(config, "PAIR_MIN_NS", 10**12)
    assert not pair.worth_two(_model("dense", 1, 32), 1)  # too small to pay
    monkeypatch.setattr(config, "PAIR_MIN_NS", 0)
    monkeypatch.setattr(config, "STEP_THREADS", "1")
    assert not pair.worth_two(_model("dense", 1, 32), 1)
    monkeypatch.setattr(config, "STEP_THREADS", "0")
    with pytest.raises(ValueError, match=r"STEP_THREADS.*'auto' or an integer >= 1, got '0'"):
        pair.worth_two(_model("dense", 1, 32), 1)


def test_the_estimate_chooses_two_threads_only_for_large_steps():
    """At the shipped threshold: an H=32 step stays on one thread, an
    H=1024 dense one (4M weights, beyond L2) goes to two where allowed."""
    assert not pair.worth_two(_model("dense", 1, 32), 1)
    big = numlstm.LSTM(64, 1024, seed=0)
    assert pair.worth_two(big, 1) == (pair._threads() >= 2)


@pytest.mark.parametrize("layout", [layouts.Sell, layouts.SellWindows])
@pytest.mark.parametrize("R", [64, 128, 96])
def test_layouts_order_rows_by_hidden_unit_half(layout, R):
    """The first half of the slices holds the rows g*H + j with j < H/2."""
    rng = np.random.default_rng(R)
    dense = rng.standard_normal((R, 40)).astype(np.float32) * (rng.random((R, 40)) < 0.2)
    indptr = np.concatenate([[0], np.cumsum((dense != 0).sum(1))]).astype(np.int32)
    indices = np.nonzero(dense)[1].astype(np.int32)
    made = layout(dense[dense != 0], indices, indptr, dense.shape)
    table = made.slices if layout is layouts.Sell else made.table
    C = made.data.shape[1]
    rows = table[:, -C:]
    assert made.halves == (R % 8 == 0 and (R // 2) % C == 0)
    if made.halves:
        H, S = R // 4, rows.shape[0]
        first, second = rows[:S // 2].ravel(), rows[S // 2:].ravel()
        assert np.all(first % H < H // 2) and np.all(second[second >= 0] % H >= H // 2)


def test_a_new_stream_takes_over_the_worker_slot_of_an_idle_one(two):
    """One worker slot: the first stream's worker, idle once that stream
    stops stepping, leaves for the second instead of waiting ~10 ms."""
    m = _model("dense", 1, 32)
    x = np.ones((1, 16), np.float32)
    a = m.stream(1)
    _start_worker(a._pair)
    a.step(x)
    first = a._pair._thread
    b = m.stream(1)
    for _ in range(20000):  # at most a few seconds, however loaded the machine
        b.step(x)
        if b._pair._thread is not None:
            break
    assert b._pair._thread is not None
    first.join(10)
    assert not first.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_forked_child_starts_workers_of_its_own(two, monkeypatch):
    m = _model("csr", 2, 32)
    x = np.random.default_rng(1).standard_normal((20, 1, 16)).astype(np.float32)
    one = _one_thread(m, monkeypatch)
    expected = np.stack([one.step(x[t]).copy() for t in range(20)])
    s = m.stream(1)
    _start_worker(s._pair)  # running in the parent when it forks
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when all is well
        ok = False
        try:
            s.reset()
            got = np.stack([s.step(x[t]).copy() for t in range(20)])
            ok = np.allclose(got, expected, rtol=1e-6, atol=1e-7) and s._pair._thread is not None
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("two_cycles,one_cycles,chosen", [(100, 200, 2), (200, 100, 3),
                                                          (98, 100, 3)])
def test_the_caller_keeps_the_way_its_probes_found_faster(two_cycles, one_cycles, chosen):
    """PROBE steps in alternate blocks of BLOCK on two threads and alone (the
    first step of each block not counted), then RUN steps the faster way
    (two only if >= 5% faster), then probe again."""
    sync = kernels.new_sync()
    P, B = kernels.PROBE, kernels.BLOCK
    for i in range(P):
        assert sync[kernels.PHASE] == 0
        alone = (i // B) % 2
        assert kernels._alone(0, sync[kernels.LEFT]) == alone
        cycles = one_cycles if alone else two_cycles
        kernels._account(sync, 0, 10**9 if i % B == 0 else cycles)  # switches not counted
    counted = P // 2 - P // B // 2
    assert sync[kernels.SUM] == counted * two_cycles
    assert sync[kernels.SUM + 1] == counted * one_cycles
    assert sync[kernels.PHASE] == chosen and sync[kernels.LEFT] == kernels.RUN
    assert kernels._alone(chosen, kernels.RUN) == (chosen == 3)
    for _ in range(kernels.RUN):
        kernels._account(sync, chosen, 1)
    assert sync[kernels.PHASE] == 0 and sync[kernels.SUM] == sync[kernels.SUM + 1] == 0


# ----------------------------------------------------------------------------
# Whole sequences at B = 1: each time step shared by unit halves
# ----------------------------------------------------------------------------

@pytest.fixture
def two_seq(monkeypatch):
    """Every batch-1 sequence on two threads, every step handed off (no probe)."""
    monkeypatch.setattr(config, "STEP_THREADS", "2")
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_NS", 0)
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 0)
    fresh = kernels.new_sync

    def always_two():
        sync = fresh()
        sync[kernels.PHASE], sync[kernels.LEFT] = 2, 10**9
        return sync
    monkeypatch.setattr(kernels, "new_sync", always_two)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), L=st.integers(1, 2), H=st.sampled_from([32, 64]),
       cell=st.sampled_from(CELLS), T=st.integers(1, 40), short=st.integers(0, 39),
       seed=st.integers(0, 100), dtype=st.sampled_from([np.float32, np.float64]))
def test_a_sequence_on_two_threads_gives_what_one_gives(kind, L, H, cell, T, short, seed,
                                                         dtype):
    """Outputs, final state and (trainable kinds) the gradients from its tape;
    a sequence shorter than T pads the rest."""
    x = np.random.default_rng(seed).standard_normal((T, 1, 16)).astype(dtype)
    lengths = np.array([max(1, T - short)])
    m = _model(kind, L, H, cell, "auto", seed, dtype)
    train = kind in ("dense", "csr", "csr-per-row", "bsr")
    results = []
    for threads in ("1", "2"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(config, "STEP_THREADS", threads)
            mp.setattr(config, "PAIR_SEQ_MIN_NS", 0)
            mp.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 0)
            calls = []  # what each two-thread attempt returned (False: no slot)
            real = pair.forward_sequence
            mp.setattr(pair, "forward_sequence",
                       lambda *a, _c=calls, _r=real: _c.append(_r(*a)) or _c[-1])
            if threads == "2":
                _wait_for_a_slot()
            y, (h, c) = m(x, lengths=lengths, training=train)
            out = [y, h, c]
            if train:
                m.zero_grad()
                dx, _ = m.backward(np.ones_like(y))
                out += [dx] + [np.array(g) for g in m.grad_arrays().values()]
            assert calls == ([True] * L if threads == "2" else [])
            results.append(out)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, **tol)


def _wait_for_a_slot():
    """Until a worker slot is free (another test's idle worker leaves within
    ~10 ms, at once when asked: ``pair._WANTED``)."""
    slots = pair._slots()
    for _ in range(10000):
        if slots.acquire(blocking=False):
            slots.release()
            return
        pair._WANTED[0] = 1
        time.sleep(0.001)
    raise AssertionError("no worker slot came free in 10 s")


def test_the_worker_computes_the_second_half_of_a_published_time_step(two_seq, monkeypatch):
    """Deterministic split of one time step: the worker thread claims half 1
    of step 0 published by hand, this thread runs half 0; together the step."""
    monkeypatch.setattr(pair, "SPINS", 10**9)  # the worker waits for the step
    H, T = 64, 3
    m = _model("csr", 1, H, {})
    x = np.random.default_rng(0).standard_normal((T, 1, 16)).astype(np.float32)
    seen = {}
    from numlstm.backends import cpu as cpu_backend
    real = cpu_backend.seq_forward

    def keep(args, cell, two=False):
        seen["args"], seen["cell"] = tuple(a.copy() if isinstance(a, np.ndarray) else a
                                           for a in args), cell
        return real(args, cell, False)
    monkeypatch.setattr(cpu_backend, "seq_forward", keep)
    y, _ = m(x)
    args, cell = seen["args"], seen["cell"]  # hs, cs as the kernel got them, gates x W_ih^T
    sync = kernels.new_sync()
    plan = kernels.make_seq_plan(args + (cell,), sync)
    slots = pair._slots()
    assert slots.acquire(timeout=10)
    sync[kernels.STATE] = kernels.RUNNING
    worker = threading.Thread(target=pair._serve, args=(plan, sync, slots))
    worker.start()
    sync[kernels.LAYER] = 0
    sync[kernels.GO] = 1  # published: the worker claims half 1
    for _ in range(3000):
        if sync[kernels.DONE] == 1:
            break
        worker.join(0.01)
    assert sync[kernels.DONE] == 1 and sync[kernels.CLAIM] == 1
    _run_half(plan, 0, 0)
    sync[kernels.STOP] = 1
    worker.join()
    hs = args[0]
    np.testing.assert_allclose(hs[1, 0], y[0, 0], rtol=1e-6, atol=1e-7)


def test_when_a_sequence_uses_two_threads(monkeypatch):
    monkeypatch.setattr(config, "STEP_THREADS", "2")
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_NS", 0)
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 0)
    w = _model("dense", 1, 64).host_params.weights["weight_hh_l0"]
    assert pair.worth_two_seq(w, 64, 0, 10, 1)
    assert not pair.worth_two_seq(w, 64, 0, 10, 2)  # batches split by rows instead
    assert not pair.worth_two_seq(w, 64, 8, 10, 1)  # a projection
    assert not pair.worth_two_seq(w, 48, 0, 10, 1)  # halves not whole cache lines
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 10**12)
    assert not pair.worth_two_seq(w, 64, 0, 10, 1)  # too short to repay the worker
    monkeypatch.setattr(config, "PAIR_SEQ_MIN_TOTAL_NS", 0)
    monkeypatch.setattr(config, "STEP_THREADS", "1")
    assert not pair.worth_two_seq(w, 64, 0, 10, 1)


def test_a_sequence_runs_alone_when_no_worker_slot_is_free(two_seq):
    m = _model("dense", 1, 32)
    x = np.ones((5, 1, 16), np.float32)
    expected, _ = m(x)
    slots = pair._slots()
    taken = []
    while slots.acquire(blocking=False):
        taken.append(1)
    try:
        assert not pair.forward_sequence(*_captured_args(m, x))
        y, _ = m(x)
    finally:
        for _ in taken:
            slots.release()
    np.testing.assert_array_equal(y, expected)


def _captured_args(m, x):
    """The (args, cell) of m's forward recurrence on x."""
    from numlstm.backends import cpu as cpu_backend
    seen = {}
    real = cpu_backend.seq_forward

    def keep(args, cell, two=False):
        seen["a"] = (args, cell)
        return real(args, cell, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_backend, "seq_forward", keep)
        m(x)
    return seen["a"]

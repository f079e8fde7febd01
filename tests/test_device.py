"""Device-resident models (``model.to("cuda")``, numlstm.backends.cuda) against the CPU model.

Without a GPU these run under the CUDA simulator, which must be switched on
before numba is imported:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/test_device.py

With neither a GPU nor the simulator, the module is skipped with that reason.
Shapes are tiny and the launch geometry is patched small under the simulator,
which runs every CUDA thread as a Python thread.
"""

import copy
import pickle
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm
from numlstm import config, optim, prune, quantize


def _skip_reason():
    try:
        import numba
        from numba import cuda
    except Exception as e:  # pragma: no cover - numba is a dependency
        return f"numba.cuda cannot be imported: {e}"
    if numba.config.ENABLE_CUDASIM:
        return None
    if not cuda.is_available():
        return ("no CUDA GPU, and the CUDA simulator is off: run with "
                "NUMBA_ENABLE_CUDASIM=1 (set before numba is imported)")
    return None


REASON = _skip_reason()
device = pytest.mark.skipif(REASON is not None, reason=REASON or "")  # every test but PTX's

if REASON is None:
    import numba
    from numba import cuda

    from numlstm.backends import cuda as CB
    from numlstm.checks import is_device_array

    SIM = bool(numba.config.ENABLE_CUDASIM)
else:  # pragma: no cover
    SIM = False

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
FEW = settings(max_examples=8, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def small_launches():
    """Under the simulator: tiny blocks, and a short GIL switch interval (the
    simulator's launcher polls its threads; at the default 5 ms interval each
    barrier costs a switch, 5-10x slower)."""
    if not SIM:
        yield
        return
    names = {"CUDA_THREADS_PER_BLOCK": 16, "CUDA_TILE": 4, "CUDA_LANES": 4,
             "CUDA_MAX_BLOCKS": 2}
    saved = {n: getattr(config, n, None) for n in names}
    interval = sys.getswitchinterval()
    for n, v in names.items():
        setattr(config, n, v)
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)
    for n, v in saved.items():
        setattr(config, n, v)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def ptr(a):
    """The address of a device array's first element (simulator: host memory)."""
    if SIM and hasattr(a, "_ary"):
        return a._ary.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def make_model(I, H, *, L=1, D2=False, P=0, bias=True, dtype=np.float64, seed=0,
               sparse=(False, False, False), sparsity=0.5, batch_first=False, dropout=0.0):
    m = numlstm.LSTM(I, H, num_layers=L, bidirectional=D2, proj_size=P, bias=bias,
                     dtype=dtype, seed=seed, batch_first=batch_first, dropout=dropout)
    rng = np.random.default_rng(seed + 1)
    state = {}
    for name, w in m.state_dict().items():
        if name.startswith("weight"):
            kind = ("ih", "hh", "hr").index(name.split("_")[1])
            if sparse[kind]:
                w = np.where(rng.random(w.shape) < sparsity, 0, w)
                w = sp.csr_array(w)
        state[name] = w
    m.load_state_dict(state)
    return m


@st.composite
def cases(draw):
    T, B = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    H = draw(st.integers(1, 4))
    L = draw(st.integers(1, 2))
    return dict(
        T=T, B=B, I=draw(st.integers(1, 3)), H=H, L=L, D2=draw(st.booleans()),
        P=draw(st.integers(0, H - 1)) if H > 1 else 0, bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        sparse=tuple(draw(st.booleans()) for _ in range(3)),
        sparsity=draw(st.sampled_from([0.0, 0.5, 0.99])),
        batch_first=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.5])) if L > 1 else 0.0,
        lengths=np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
        if draw(st.booleans()) else None,
        with_state=draw(st.booleans()), device_inputs=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))


def build(c):
    m = make_model(c["I"], c["H"], L=c["L"], D2=c["D2"], P=c["P"], bias=c["bias"],
                   dtype=c["dtype"], seed=c["seed"], sparse=c["sparse"],
                   sparsity=c["sparsity"], batch_first=c["batch_first"],
                   dropout=c["dropout"])
    rng = np.random.default_rng(c["seed"])
    T, B, I = c["T"], c["B"], c["I"]
    x = rng.standard_normal((B, T, I) if c["batch_first"] else (T, B, I)).astype(c["dtype"])
    DL, O = (2 if c["D2"] else 1) * c["L"], c["P"] or c["H"]
    state = None
    if c["with_state"]:
        state = (rng.standard_normal((DL, B, O)).astype(c["dtype"]),
                 rng.standard_normal((DL, B, c["H"])).astype(c["dtype"]))
    return m, x, state, rng


def assert_close(actual, expected, dtype, what):
    np.testing.assert_allclose(host(actual), expected, err_msg=what, **TOL[dtype])


# ----------------------------------------------------------------------------
# The device model computes what the CPU model computes
# ----------------------------------------------------------------------------

@device
@FEW
@given(cases())
def test_forward_backward_match_cpu(c):
    cpu, x, state, rng = build(c)
    dev = copy.deepcopy(cpu).to("cuda")
    assert dev.device == "cuda" and cpu.device == "cpu"
    dt = c["dtype"]

    def put(a):  # inputs on the host, or already on the device
        if a is None or not c["device_inputs"]:
            return a
        return tuple(map(cuda.to_device, a)) if isinstance(a, tuple) else cuda.to_device(a)

    # inference
    y0, (h0, c0) = cpu.forward(x, state, lengths=c["lengths"])
    y1, (h1, c1) = dev.forward(put(x), put(state), lengths=c["lengths"])
    assert is_device_array(y1) and is_device_array(h1)
    assert_close(y1, y0, dt, "y")
    assert_close(h1, h0, dt, "h_n")
    assert_close(c1, c0, dt, "c_n")
    # training: dropout masks come from the same generator state on both
    y0, (h0, c0) = cpu.forward(x, state, lengths=c["lengths"], training=True)
    y1, (h1, c1) = dev.forward(put(x), put(state), lengths=c["lengths"], training=True)
    assert_close(y1, y0, dt, "training y")
    dy = rng.standard_normal(y0.shape).astype(dt)
    dstate = (rng.standard_normal(h0.shape).astype(dt),
              rng.standard_normal(c0.shape).astype(dt))
    dx0, (dh0, dc0) = cpu.backward(dy, dstate)
    dx1, (dh1, dc1) = dev.backward(put(dy), put(dstate), to_host=True)
    assert isinstance(dx1, np.ndarray)
    tol = dict(rtol=TOL[dt]["rtol"] * 10, atol=TOL[dt]["atol"] * 10)
    np.testing.assert_allclose(dx1, dx0, err_msg="dx", **tol)
    np.testing.assert_allclose(dh1, dh0, err_msg="dh0", **tol)
    np.testing.assert_allclose(dc1, dc0, err_msg="dc0", **tol)
    g0, g1 = cpu.grad_arrays(), dev.grad_arrays()
    assert set(g0) == set(g1)
    for name in g0:
        assert is_device_array(g1[name]), name
        np.testing.assert_allclose(host(g1[name]), g0[name], err_msg=name, **tol)


@device
def test_unbatched_and_device_state():
    cpu = make_model(3, 4, L=2, P=2, sparse=(True, True, False))
    dev = copy.deepcopy(cpu).to("cuda")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3))
    h = rng.standard_normal((2, 2))
    cc = rng.standard_normal((2, 4))
    y0, (h0, c0) = cpu(x, (h, cc))
    y1, (h1, c1) = dev(cuda.to_device(x), (cuda.to_device(h), cuda.to_device(cc)))
    assert tuple(y1.shape) == (3, 2) and tuple(h1.shape) == (2, 2)
    for a, b in ((y1, y0), (h1, h0), (c1, c0)):
        assert_close(a, b, np.float64, "unbatched")
    y2, _ = dev(x, (h, cc), to_host=True)
    assert isinstance(y2, np.ndarray)
    np.testing.assert_allclose(y2, y0, **TOL[np.float64])
    # a batch of one made by None-indexing (a zero stride) is copied in correctly
    y3, _ = dev.forward(x[:, None, :], to_host=True)
    np.testing.assert_allclose(y3[:, 0], cpu(x)[0], **TOL[np.float64])


@device
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_persistent_forward_matches_cpu(sparse, monkeypatch):
    """The opt-in one-launch recurrence (numlstm.backends.cuda.PERSISTENT_FORWARD)."""
    monkeypatch.setattr(CB, "PERSISTENT_FORWARD", True)

    def per_step(*args, **kw):
        raise AssertionError("the per-step recurrence ran, not the persistent one")

    monkeypatch.setattr(CB.cuda_kernels, "lstm_seq_forward", per_step)
    cpu = make_model(2, 4, L=2, P=2, sparse=(sparse, sparse, sparse), dtype=np.float32)
    dev = copy.deepcopy(cpu).to("cuda")
    x = np.random.default_rng(2).standard_normal((3, 2, 2)).astype(np.float32)
    lengths = np.array([3, 1])
    y0, (h0, c0) = cpu.forward(x, lengths=lengths, training=True)
    y1, (h1, c1) = dev.forward(x, lengths=lengths, training=True)
    for a, b, what in ((y1, y0, "y"), (h1, h0, "h_n"), (c1, c0, "c_n")):
        assert_close(a, b, np.float32, what)
    dx0, _ = cpu.backward(np.ones(y0.shape, np.float32))
    dx1, _ = dev.backward(np.ones(y0.shape, np.float32))
    assert_close(dx1, dx0, np.float32, "dx")


@device
@settings(max_examples=6, deadline=None)
@given(c=cases(), checkpoint=st.sampled_from([1, 2, "auto"]))
def test_checkpointed_training_matches_cpu(c, checkpoint):
    """checkpoint= on the device: forward outputs, dx, the state gradients and
    every parameter gradient equal the CPU model's checkpointed run (which
    tests/test_checkpoint.py holds equal to the full tape)."""
    cpu, x, state, rng = build(c)
    dev = copy.deepcopy(cpu).to("cuda")
    dt = c["dtype"]
    kw = dict(lengths=c["lengths"], training=True, checkpoint=checkpoint)
    y0, (h0, c0) = cpu.forward(x, state, **kw)
    y1, (h1, c1) = dev.forward(x, state, **kw)
    assert dev.engine.tape.segment == cpu.engine.tape.segment is not None
    for a, b, what in ((y1, y0, "y"), (h1, h0, "h_n"), (c1, c0, "c_n")):
        assert_close(a, b, dt, what)
    dy = rng.standard_normal(y0.shape).astype(dt)
    dh = rng.standard_normal(h0.shape).astype(dt)
    dx0, (dh00, dc00) = cpu.backward(dy, (dh, np.zeros_like(c0)))
    dx1, (dh01, dc01) = dev.backward(dy, (dh, np.zeros_like(c0)))
    for a, b, what in ((dx1, dx0, "dx"), (dh01, dh00, "dh0"), (dc01, dc00, "dc0")):
        assert_close(a, b, dt, what)
    g0, g1 = cpu.grad_arrays(), dev.grad_arrays()
    for name in g0:
        assert_close(g1[name], g0[name], dt, name)


@device
def test_memory_budget_holds_on_the_device():
    """memory_budget= on the device: a budget below the full tape's plan picks a
    checkpoint plan, the device workspace stays within it, and results and
    gradients equal the CPU's."""
    cpu = make_model(3, 4, L=2, D2=True, P=2, sparse=(True, False, True), dtype=np.float64)
    dev = copy.deepcopy(cpu).to("cuda")
    T, B = 9, 2
    x = np.random.default_rng(5).standard_normal((T, B, 3))
    full = dev.memory_plan(T, B, training=True)
    budget = full["activations"] + full["workspace"] - 1  # the full tape does not fit
    y0, _ = cpu.forward(x, training=True, memory_budget=budget)
    y1, _ = dev.forward(x, training=True, memory_budget=budget)
    assert dev.engine.tape.segment is not None  # checkpointed (one segment may do)
    assert dev.engine.train_ws.nbytes <= budget
    assert_close(y1, y0, np.float64, "y")
    dx0, _ = cpu.backward(np.ones(y0.shape))
    dx1, _ = dev.backward(np.ones(y0.shape))
    assert_close(dx1, dx0, np.float64, "dx")
    for name, g in cpu.grad_arrays().items():
        assert_close(dev.grad_arrays()[name], g, np.float64, name)
    with pytest.raises(ValueError, match="cannot hold a training step"):
        dev.forward(x, training=True, memory_budget=100)


@device
@pytest.mark.parametrize("checkpoint", [None, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_memory_report_is_exact_for_device_models(checkpoint, batch_first):
    """memory_report of a device model predicts the device workspace block to
    the byte (activations + workspace), training and inference."""
    m = make_model(3, 4, L=2, D2=True, P=2, sparse=(True, True, False), dropout=0.5,
                   batch_first=batch_first, dtype=np.float32).to("cuda")
    T, B = 5, 2
    x = np.ones((B, T, 3) if batch_first else (T, B, 3), np.float32)
    for training in (True, False):
        ckpt = checkpoint if training else None
        report = numlstm.memory_report(m, T, B, training=training, checkpoint=ckpt)
        m.release_workspaces()
        y, _ = m.forward(x, training=training, checkpoint=ckpt)
        ws = m.engine.train_ws if training else m.engine.infer_ws
        assert ws.nbytes == report["recorded activations"] + \
            m.memory_plan(T, B, training=training, checkpoint=ckpt)["workspace"]
        if training:
            m.backward(np.ones(host(y).shape, np.float32))
            assert report["gradients"] == sum(g.nbytes for g in m.grad_arrays().values())
    with pytest.raises(ValueError, match="measure"):
        numlstm.memory_report(m, T, B, measure=True)


@device
def test_bsr_weights_match_cpu():
    cpu = make_model(4, 4, dtype=np.float32, seed=3)
    prune.blocks(cpu, 0.5, block=(2, 2))
    assert {w.format for w in cpu.weights().values()} == {"bsr"}
    dev = copy.deepcopy(cpu).to("cuda")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 4)).astype(np.float32)
    y0, _ = cpu.forward(x, training=True)
    y1, _ = dev.forward(x, training=True)
    assert_close(y1, y0, np.float32, "y")
    dy = rng.standard_normal(y0.shape).astype(np.float32)
    dx0, _ = cpu.backward(dy)
    dx1, _ = dev.backward(dy)
    assert_close(dx1, dx0, np.float32, "dx")
    for name, g in cpu.grad_arrays().items():
        assert_close(dev.grad_arrays()[name], g, np.float32, name)


# ----------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------

@device
@settings(max_examples=4, deadline=None)
@given(L=st.integers(1, 2), P=st.sampled_from([0, 2]), sparse=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), B=st.integers(1, 2))
def test_stream_matches_cpu(L, P, sparse, dtype, B):
    cpu = make_model(3, 4, L=L, P=P, dtype=dtype, sparse=(sparse, sparse, sparse))
    dev = copy.deepcopy(cpu).to("cuda")
    rng = np.random.default_rng(L + P)
    xs = rng.standard_normal((3, B, 3)).astype(dtype)
    s0 = cpu.stream(B)
    s1 = dev.stream(B)
    assert isinstance(s1, numlstm.Stream) and s1.model.device == "cuda"
    for t in range(3):
        h0 = s0.step(xs[t])
        # host input, device input, and a host result: all three forms
        h1 = s1.step(xs[t]) if t == 0 else (
            s1.step(cuda.to_device(xs[t])) if t == 1 else s1.step(xs[t], to_host=True))
        if t < 2:
            assert is_device_array(h1)
        assert_close(h1, h0, dtype, f"step {t}")
    # streaming T steps == forward over T, on the device
    y, _ = dev.forward(xs)
    assert_close(h1, host(y)[-1], dtype, "stream == forward")
    h, c = s1.state
    assert is_device_array(h)
    assert_close(c, s0.state[1], dtype, "state c")
    s1.reset()
    assert not host(s1.state[0]).any()
    # a stream built directly goes to the device too
    assert is_device_array(numlstm.Stream(dev, 1).step(xs[0][:1]))


@device
def test_stream_rebinds_after_load_state_dict():
    dev = make_model(2, 3).to("cuda")
    s = dev.stream()
    x = np.ones((1, 2))
    cpu = make_model(2, 3, seed=9)
    dev.load_state_dict(cpu.state_dict())
    np.testing.assert_allclose(s.step(x, to_host=True), cpu.stream().step(x),
                               **TOL[np.float64])
    dev.to("cpu")
    with pytest.raises(RuntimeError, match="moved to the CPU: make a new stream"):
        s.step(x)


@device
def test_device_stream_outputs_belong_to_the_caller():
    """Each step returns a new device (or host) array: kept without a copy they
    keep their values, and editing one changes no later step; ``out=`` takes
    a device array, or a host one with ``to_host``, and is checked."""
    cpu = make_model(2, 3, L=2)
    dev = copy.deepcopy(cpu).to("cuda")
    xs = np.random.default_rng(0).standard_normal((4, 1, 2))
    ref = cpu.stream(1)
    want = [ref.step(x) for x in xs]
    s = dev.stream(1)
    kept = [s.step(xs[0]), s.step(xs[1], to_host=True)]
    dbuf, hbuf = cuda.device_array((1, 3)), np.empty((1, 3))
    assert s.step(xs[2], out=dbuf) is dbuf and s.step(xs[3], to_host=True, out=hbuf) is hbuf
    kept += [dbuf, hbuf]
    kept[1] += 1  # a host result, edited: not the stream's
    for t, (got, w) in enumerate(zip(kept, want, strict=True)):
        assert_close(host(got) - (t == 1), w, np.float64, f"step {t}")
    assert is_device_array(kept[0]) and is_device_array(dbuf)
    state = host(s.state[0])
    for error, message, kwargs in [
        (TypeError, "out must be a device array", {"out": np.empty((1, 3))}),
        (TypeError, "out must be a NumPy array", {"out": dbuf, "to_host": True}),
        (ValueError, r"out must have shape \(1, 3\)", {"out": cuda.device_array((2, 3))}),
        (ValueError, "out overlaps the stream's own buffers", {"out": s._h[1]}),
    ]:
        with pytest.raises(error, match=message):
            s.step(xs[0], **kwargs)
    np.testing.assert_array_equal(host(s.state[0]), state)  # a refused out: no step


# ----------------------------------------------------------------------------
# Optimizers on the device
# ----------------------------------------------------------------------------

OPTIMIZERS = [
    lambda ms: optim.SGD(ms, lr=0.1),
    lambda ms: optim.SGD(ms, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ms: optim.Adam(ms, lr=0.01, weight_decay=0.1),
    lambda ms: optim.AdamW(ms, lr=0.01),
]


@device
@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "sgd-nesterov", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_steps_match_cpu(make_opt, dtype):
    cpu = make_model(2, 3, dtype=dtype, sparse=(True, False, False))
    dev = copy.deepcopy(cpu).to("cuda")
    o0, o1 = make_opt(cpu), make_opt(dev)
    rng = np.random.default_rng(5)
    for _ in range(2):
        x = rng.standard_normal((2, 1, 2)).astype(dtype)
        for m, o in ((cpu, o0), (dev, o1)):
            o.zero_grad()
            y, _ = m.forward(x, training=True)
            m.backward(np.ones(y.shape, dtype))
            norm = optim.clip_grad_norm(m, 0.5)
            if m is cpu:
                n0 = norm
            else:
                assert norm == pytest.approx(n0, rel=1e-5)
            o.step()
    assert all(is_device_array(a) for st_ in o1.state.values() for a in st_.values())
    p1 = dev.parameters()
    for name, p in cpu.parameters().items():
        assert is_device_array(p1[name])
        np.testing.assert_allclose(host(p1[name]), p, err_msg=name,
                                   rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-6 if dtype == np.float32 else 1e-13)


@device
def test_optimizer_state_follows_the_model_between_devices():
    ref = make_model(2, 3, sparse=(True, False, False))
    m = copy.deepcopy(ref)
    o_ref, o = optim.Adam(ref, lr=0.01), optim.Adam(m, lr=0.01)
    x = np.random.default_rng(3).standard_normal((2, 1, 2))
    for where in ("cpu", "cuda", "cpu"):
        m.to(where)
        for model, opt in ((ref, o_ref), (m, o)):
            opt.zero_grad()
            y, _ = model.forward(x, training=True)
            model.backward(np.ones(y.shape))
            opt.step()
        assert is_device_array(o.state[(0, "weight_hh_l0")]["v"]) == (where == "cuda")
    for name, p in ref.parameters().items():
        np.testing.assert_allclose(m.parameters()[name], p, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------
# Moving, and what moves with the model
# ----------------------------------------------------------------------------

@device
def test_round_trip_preserves_weights_exactly():
    m = make_model(3, 4, L=2, D2=True, P=2, dtype=np.float32, sparse=(True, False, True))
    before = m.state_dict()
    assert m.to("cuda") is m and m.device == "cuda"
    m.to("cuda")  # a no-op
    assert m.to("cpu") is m and m.device == "cpu"
    after = m.state_dict()
    for name, w in before.items():
        if sp.issparse(w):
            assert type(after[name]) is type(w)
            np.testing.assert_array_equal(after[name].indices, w.indices)
            np.testing.assert_array_equal(after[name].indptr, w.indptr)
            np.testing.assert_array_equal(after[name].data, w.data)
        else:
            np.testing.assert_array_equal(after[name], w)
            assert after[name].dtype == w.dtype


@device
def test_compact_indices_run_on_the_device():
    cpu = make_model(3, 4, dtype=np.float32, sparse=(True, True, False))
    quantize.quantize(cpu, None, "uint16")  # float values, uint16 patterns: trainable
    assert {w.index_type for w in cpu.weights().values()} == {"uint16"}
    dev = copy.deepcopy(cpu).to("cuda")
    x = np.random.default_rng(0).standard_normal((2, 2, 3)).astype(np.float32)
    y0, _ = cpu.forward(x, training=True)
    y1, _ = dev.forward(x, training=True)
    assert_close(y1, y0, np.float32, "y")
    dx0, _ = cpu.backward(np.ones(y0.shape, np.float32))
    dx1, _ = dev.backward(np.ones(y0.shape, np.float32))
    assert_close(dx1, dx0, np.float32, "dx")
    dev.to("cpu")
    assert {w.index_type for w in dev.weights().values()} == {"uint16"}


@device
def test_trained_values_and_grads_come_back():
    m = make_model(2, 3, sparse=(True, True, False)).to("cuda")
    x = np.ones((2, 1, 2))
    y, _ = m.forward(x, training=True)
    m.backward(np.ones(y.shape))
    optim.SGD(m, lr=0.5).step()
    params = {n: host(p) for n, p in m.parameters().items()}
    grads = {n: host(g) for n, g in m.grad_arrays().items()}
    sd = m.state_dict()  # brings the host copies up to date, still on the device
    assert m.device == "cuda"
    assert isinstance(sd["weight_hh_l0"], sp.csr_array)
    np.testing.assert_array_equal(sd["weight_hh_l0"].data, params["weight_hh_l0"])
    m.to("cpu")
    for n, p in m.parameters().items():
        np.testing.assert_array_equal(p, params[n])
        np.testing.assert_array_equal(m.grad_arrays()[n], grads[n])
    np.testing.assert_array_equal(m.grad["weight_ih_l0"].data, grads["weight_ih_l0"])
    m.zero_grad()


@device
def test_pickle_of_a_device_model_is_a_cpu_model_with_current_values():
    m = make_model(2, 3).to("cuda")
    y, _ = m.forward(np.ones((1, 1, 2)), training=True)
    m.backward(np.ones(y.shape))
    optim.SGD(m, lr=1.0).step()
    want = host(m.parameters()["weight_ih_l0"])
    back = pickle.loads(pickle.dumps(m))
    assert back.device == "cpu" and m.device == "cuda"
    np.testing.assert_array_equal(back.parameters()["weight_ih_l0"], want)


@device
def test_save_of_a_device_model_writes_current_values(tmp_path):
    m = make_model(2, 3, sparse=(True, False, False)).to("cuda")
    y, _ = m.forward(np.ones((1, 1, 2)), training=True)
    m.backward(np.ones(y.shape))
    optim.SGD(m, lr=1.0).step()
    want = {n: host(p) for n, p in m.parameters().items()}
    numlstm.save(m, tmp_path / "m.npz")
    back = numlstm.load(tmp_path / "m.npz")
    assert m.device == "cuda" and back.device == "cpu"
    for n, p in back.parameters().items():
        np.testing.assert_array_equal(p, want[n])


@device
def test_prune_on_the_device_round_trips():
    """Pruning reads the current device values (through the host) and the next
    device call uploads the pruned weights."""
    cpu = make_model(3, 4, seed=2)
    dev = copy.deepcopy(cpu).to("cuda")
    prune.magnitude(cpu, 0.5)
    prune.magnitude(dev, 0.5)
    assert dev.device == "cuda"
    x = np.random.default_rng(0).standard_normal((2, 2, 3))
    y0, _ = cpu(x)
    y1, _ = dev(x, to_host=True)
    np.testing.assert_allclose(y1, y0, **TOL[np.float64])
    assert dev.sparsity()["overall"] == pytest.approx(cpu.sparsity()["overall"])


@device
def test_pruning_mid_training_with_remapped_optimizer_state():
    """Train, prune (positions remap Adam's device state), train on: as on the CPU."""
    cpu = make_model(2, 3, seed=4)
    dev = copy.deepcopy(cpu).to("cuda")
    runs = [(cpu, optim.Adam(cpu, lr=0.01)), (dev, optim.Adam(dev, lr=0.01))]
    x = np.random.default_rng(1).standard_normal((2, 1, 2))
    for phase in range(2):
        for m, o in runs:
            o.zero_grad()
            y, _ = m.forward(x, training=True)
            m.backward(np.ones(y.shape))
            o.step()
            if phase == 0:
                o.remap(prune.magnitude(m, 0.5))
    assert is_device_array(runs[1][1].state[(0, "weight_ih_l0")]["m"])
    for name, p in cpu.parameters().items():
        np.testing.assert_allclose(host(dev.parameters()[name]), p, err_msg=name,
                                   rtol=1e-9, atol=1e-12)


@device
def test_quantized_weights_are_refused_clearly():
    m = make_model(2, 4, dtype=np.float32, sparse=(True, True, False))
    quantize.quantize(m, "int8")
    with pytest.raises(TypeError, match=r"weight_ih_l0 .*int8.*device"):
        m.to("cuda")
    assert m.device == "cpu"
    # quantized in place while on the device: the next device call says so
    m = make_model(2, 4, dtype=np.float32, sparse=(True, True, False)).to("cuda")
    quantize.quantize(m, "float16")
    with pytest.raises(TypeError, match="quantized"):
        m(np.ones((1, 1, 2), np.float32))
    m.to("cpu")  # and the model can go back to the CPU, quantized
    assert m(np.ones((1, 1, 2), np.float32))[0].shape == (1, 1, 4)


@device
def test_unsupported_and_bad_calls():
    m = make_model(2, 3)
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\), got 'tpu'"):
        m.to("tpu")
    m.to("cuda")
    x = np.ones((2, 1, 2))
    with pytest.raises(ValueError, match="needs training=True"):
        m.forward(x, checkpoint=1)
    with pytest.raises(ValueError, match="cannot hold a training step"):
        m.forward(x, training=True, memory_budget=1)
    with pytest.raises(RuntimeError, match="preceding forward"):
        m.backward(np.ones((2, 1, 3)))
    y, _ = m.forward(x, training=True)
    m.backward(np.ones(y.shape))
    with pytest.raises(RuntimeError, match="already called"):
        m.backward(np.ones(y.shape))


# ----------------------------------------------------------------------------
# Inputs: device arrays used in place, mismatches refused clearly
# ----------------------------------------------------------------------------

class Foreign:
    """A third-party array exposing only ``__cuda_array_interface__`` (as CuPy
    and torch do). Under the simulator device memory is host memory, so it
    describes a NumPy array's buffer."""

    def __init__(self, device_array):
        self.keep = device_array
        if SIM:
            a = device_array._ary
            self.__cuda_array_interface__ = {
                "shape": a.shape, "strides": None, "typestr": a.dtype.str,
                "data": (a.__array_interface__["data"][0], False), "version": 3}
        else:
            self.__cuda_array_interface__ = device_array.__cuda_array_interface__


@device
@pytest.mark.parametrize("wrap", [lambda a: a, Foreign], ids=["numba", "interface"])
def test_device_inputs_are_used_without_a_copy(wrap, monkeypatch):
    cpu = make_model(3, 4, sparse=(True, False, False))
    dev = copy.deepcopy(cpu).to("cuda")
    x = np.random.default_rng(0).standard_normal((2, 2, 3))
    xd = cuda.to_device(x)
    seen = []
    matmul = CB.cuda_kernels.matmul

    def spy(out, xin, *args, **kw):
        seen.append(ptr(xin))
        return matmul(out, xin, *args, **kw)

    monkeypatch.setattr(CB.cuda_kernels, "matmul", spy)
    uploads = []
    to_device = cuda.to_device
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: uploads.append(a) or to_device(*a, **k))
    y, _ = dev(wrap(xd))
    assert seen[0] == ptr(xd)  # layer 0's input product read the caller's memory
    assert not uploads
    assert_close(y, cpu(x)[0], np.float64, "y")


@device
def test_mismatching_device_inputs_are_refused_clearly():
    dev = make_model(3, 4, dtype=np.float32).to("cuda")
    x32 = np.ones((2, 1, 3), np.float32)
    with pytest.raises(TypeError, match=r"x must have dtype float32 .* got float64"):
        dev(cuda.to_device(x32.astype(np.float64)))
    with pytest.raises(ValueError, match=r"x must have shape \(T, B, 3\) .* got \(2, 1, 4\)"):
        dev(cuda.to_device(np.ones((2, 1, 4), np.float32)))
    wide = cuda.to_device(np.ones((2, 1, 6), np.float32))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        dev(wide[:, :, ::2])
    h = cuda.to_device(np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"state\[1\] \(c\) must have shape \(1, 1, 4\), "
                                         r"got \(1, 2, 4\)"):
        dev(x32, (h, cuda.to_device(np.zeros((1, 2, 4), np.float32))))
    with pytest.raises(TypeError, match=r"state\[1\] \(c\) must be a device array"):
        dev(x32, (h, np.zeros((1, 1, 4), np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape"):  # host input: the CPU's checks
        dev(np.ones((2, 1, 5), np.float32))
    y, _ = dev.forward(x32, training=True)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 1, 4\), got \(2, 1, 3\)"):
        dev.backward(cuda.to_device(np.ones((2, 1, 3), np.float32)))
    s = dev.stream()
    with pytest.raises(TypeError, match=r"x_t must have dtype float32"):
        s.step(cuda.to_device(np.ones((1, 3))))


@device
def test_cpu_model_refuses_device_arrays():
    m = make_model(3, 4)
    xd = cuda.to_device(np.ones((2, 1, 3)))
    with pytest.raises(TypeError, match=r"x is a CUDA device array .* model.to\('cuda'\)"):
        m(xd)
    with pytest.raises(TypeError, match=r"x is a CUDA device array"):
        m(Foreign(xd))
    with pytest.raises(TypeError, match=r"state\[0\] is a CUDA device array"):
        m(np.ones((2, 1, 3)), (cuda.to_device(np.zeros((1, 1, 4))), np.zeros((1, 1, 4))))
    y, _ = m.forward(np.ones((2, 1, 3)), training=True)
    with pytest.raises(TypeError, match=r"dy is a CUDA device array"):
        m.backward(cuda.to_device(np.ones(y.shape)))


# ----------------------------------------------------------------------------
# Workspaces: allocated once
# ----------------------------------------------------------------------------

@device
def test_workspaces_are_allocated_once(monkeypatch):
    m = make_model(2, 3, L=2, D2=True, P=2, sparse=(True, True, True), dropout=0.5).to("cuda")
    x = np.ones((3, 2, 2))
    lengths = np.array([3, 2])
    made = []
    for name in ("device_array", "to_device", "device_array_like"):
        real = getattr(cuda, name)
        monkeypatch.setattr(cuda, name, lambda *a, _r=real, _n=name, **k:
                            made.append(_n) or _r(*a, **k))

    def one_step():
        y, _ = m.forward(x, lengths=lengths, training=True)
        m.backward(np.ones(y.shape))
        m.forward(x, lengths=lengths)
        s.step(x[0])

    s = make_model(2, 3, L=2, P=2, sparse=(True, True, True)).to("cuda").stream(2)
    one_step()  # first call: workspaces, transposed patterns
    first = len(made)
    made.clear()
    one_step()
    # only the arrays returned: y, h_n, c_n (x2), dx, dh0, dc0 and the stream's output
    assert len(made) == 10, made
    assert first > len(made)
    made.clear()
    m.forward(x[:2], lengths=np.array([2, 1]))  # a smaller shape fits the workspace
    assert len(made) == 3, made


# ----------------------------------------------------------------------------
# The device glue and optimizer kernels compile for real GPUs
# ----------------------------------------------------------------------------

def _ptx_reason():
    import numba

    if numba.config.ENABLE_CUDASIM:
        return "PTX compilation needs the real CUDA target; unset NUMBA_ENABLE_CUDASIM"
    try:
        from numba import cuda

        @cuda.jit
        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe.py_func, (numba.float32[::1],), cc=(8, 0))
    except Exception as e:  # noqa: BLE001 - any missing piece of the toolchain
        return f"numba-cuda with NVVM/NVRTC is not usable here: {e!r}"
    return None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_glue_and_optimizer_kernels_compile_to_ptx(dtype, monkeypatch):
    """Every kernel of numlstm.kernels.cuda_optim compiles for sm_80 with no GPU
    (NVVM), and a float32 update computes in float32 (no f64 instruction)."""
    reason = _ptx_reason()
    if reason:
        pytest.skip(reason)
    import types

    import numba
    import numba.cuda.dispatcher as cuda_dispatcher
    from numba import boolean, cuda, float64, int64

    from numlstm.kernels import cuda_optim as K

    monkeypatch.setattr(cuda_dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(8, 0)))
    ft = getattr(numba, dtype)
    A1, A2, A3, I1 = ft[::1], ft[:, ::1], ft[:, :, ::1], int64[::1]
    sigs = {"_fill": (A1, ft), "_add": (A1, A1), "_mul": (A1, A1), "_scale": (A1, ft),
            "_put_cols": (A3, A3, I1, int64), "_take_cols": (A3, A3, int64),
            "_swap01": (A3, A3), "_scatter_cols": (A2, A2, I1, int64),
            "_add_rows_at": (A2, A2, I1), "_gather1d": (A1, A1, I1),
            "_bias_grad_acc": (A1, A1, A2, ft),
            "_sgd": (A1, A1, A1, ft, ft, ft, boolean, boolean),
            "_adam": (A1, A1, A1, A1) + (ft,) * 9, "_sumsq": (float64[::1], A1)}
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(8, 0))
        if dtype == "float32" and name in ("_sgd", "_adam", "_add", "_scale"):
            assert ".f64" not in ptx, f"{name} computes in float64"


@device
def test_readme_gpu_block_runs(tmp_path, monkeypatch):
    """The README's GPU example (its ```python gpu block, which
    tests/test_readme.py leaves out) runs as written."""
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python gpu\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(readme), "exec"), {})
    assert numlstm.load(tmp_path / "model.npz").device == "cpu"

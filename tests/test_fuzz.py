"""Fuzzing the public API with hostile arguments.

Every case ends either in a correct result, checked against a clean call where
that means something (a read-only or strided x gives the y of a contiguous
copy), or in one of the documented exception types below; never a crash, a
hang or a wrong answer. After a refused call the model still gives its old
outputs. ``NUMLSTM_FUZZ_EXAMPLES`` lowers (or raises) the examples per test:
CI runs this file once more under ``NUMBA_BOUNDSCHECK=1`` with a few.

Path-level problems of save/load (a folder, a NUL byte) may also raise the
OSError that the operating system gives (IsADirectoryError, ...).
"""

import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm
from numlstm import losses, optim, prune
from numlstm.quantize import quantize

ALLOWED = (TypeError, ValueError, KeyError, RuntimeError, MemoryError, numlstm.ModelFileError,
           FileNotFoundError)
CASES = {}  # test name -> hypothesis cases run
_N = os.environ.get("NUMLSTM_FUZZ_EXAMPLES")
fuzz = settings(max_examples=int(_N) if _N else 300)  # cheap cases: more than the profile


def _count(name):
    CASES[name] = CASES.get(name, 0) + 1


def _call(f):
    """(result, None) or (None, exception) for an allowed exception; anything else fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a cast, etc.
            return f(), None
    except ALLOWED as e:
        return None, e


TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

# ---------------------------------------------------------------------------
# Hostile values
# ---------------------------------------------------------------------------

HUGE = st.sampled_from([10**9, 10**12, 2**62, 2**63 - 1])
SIZES = st.one_of(st.integers(1, 5), st.integers(-3, 0), HUGE, st.just(np.int64(3)),
                  st.sampled_from([2.0, float("nan"), True, None, "4", 3 + 0j]))


def _layout(arr, how):
    """``arr`` in a hostile memory layout with the same values."""
    if not isinstance(arr, np.ndarray) or arr.ndim == 0:
        return arr
    if how == "strided":  # every other element of a bigger array
        big = np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), arr.dtype)
        big[..., ::2] = arr
        return big[..., ::2]
    if how == "fortran":
        return np.asfortranarray(arr)
    if how == "readonly":
        out = arr.copy()
        out.setflags(write=False)
        return out
    if how == "broadcast" and arr.ndim and arr.shape[0] > 0:  # read-only, stride 0
        return np.broadcast_to(arr[:1], arr.shape)
    if how == "list":
        return arr.tolist()
    return arr


LAYOUTS = st.sampled_from(["plain", "strided", "fortran", "readonly", "broadcast", "list"])
GOOD_FLOATS = st.sampled_from([np.float32, np.float64, np.float16])
BAD_DTYPES = st.sampled_from([np.int32, np.int64, np.bool_, np.complex64, object, np.uint8])


def _model(kind, dtype=np.float32, **kw):
    """A small model of one storage kind (dense, csr, csr16 (uint16 indices),
    float16, int8, bsr)."""
    m = numlstm.LSTM(4, 8, dtype=dtype, seed=1, **kw)
    if kind in ("csr", "csr16", "float16", "int8"):
        prune.magnitude(m, 0.6)
        if kind != "csr":
            quantize(m, None if kind == "csr16" else kind)
    elif kind == "bsr":
        prune.blocks(m, 0.5, block=(4, 2))
    return m


# ---------------------------------------------------------------------------
# Constructor
# ---------------------------------------------------------------------------

@fuzz
@given(I=SIZES, H=SIZES, L=st.one_of(st.integers(1, 3), st.integers(-2, 0),
                                     st.sampled_from([1.0, None, "2", True])),
       P=st.one_of(st.integers(0, 6), st.sampled_from([-1, 10**12, 1.5, None])),
       dropout=st.sampled_from([0.0, 0.5, 0.999, 1.0, -0.1, float("nan"), float("inf"),
                                "0.1", None, True]),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int32, "float64",
                              "nonsense", None, object, complex]),
       flags=st.sampled_from([{}, {"bidirectional": True}, {"bias": False},
                              {"batch_first": True}]))
def test_constructor(I, H, L, P, dropout, dtype, flags):
    _count("constructor")
    m, err = _call(lambda: numlstm.LSTM(I, H, L, proj_size=P, dropout=dropout, dtype=dtype,
                                        seed=0, **flags))

    def size(v, low):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and low <= v <= 5

    valid = (size(I, 1) and size(H, 1) and size(L, 1) and size(P, 0) and P < H
             and isinstance(dropout, float) and 0 <= dropout < 1
             and dtype in (np.float32, np.float64, "float64"))
    if valid:
        assert err is None, f"a valid configuration was refused: {err!r}"
    if err is not None:
        return
    assert m.input_size == I and m.hidden_size == H and m.num_layers == L
    assert m.dtype in (np.float32, np.float64) and 0 <= m.dropout < 1
    y, (h, c) = m(np.ones((2, 1, I), m.dtype))
    assert y.shape[-1] == m.num_directions * m.output_size and np.all(np.isfinite(y))


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------

@st.composite
def forward_cases(draw):
    T, B = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    ok = True
    x_kind = draw(st.sampled_from(["good"] * 4 + ["dtype", "shape", "empty", "scalar", "nan"]))
    x_dtype = draw(GOOD_FLOATS)
    if x_kind == "dtype":
        x_dtype, ok = draw(BAD_DTYPES), False
    shape = (T, B, 4)
    if x_kind == "shape":
        shape, ok = draw(st.sampled_from([(T, B, 5), (T, B), (T, B, 4, 1), (T, 3)])), False
    if x_kind == "empty":
        shape, ok = draw(st.sampled_from([(0, B, 4), (T, 0, 4), (0, 4)])), False
    layout = draw(LAYOUTS)
    lengths_kind = draw(st.sampled_from(["none", "none", "good", "list", "zero", "negative",
                                         "big", "float", "bool", "shape", "object", "uint"]))
    ok &= lengths_kind in ("none", "good", "list", "uint")
    state_kind = draw(st.sampled_from(["none", "none", "good", "readonly", "shape", "int",
                                       "single", "nan"]))
    ok &= state_kind in ("none", "good", "readonly", "nan")
    training = draw(st.sampled_from([False, True, 1, None]))  # any truthy value trains
    ckpt = draw(st.sampled_from([None, None, "auto", 1, 2, 10**12, 0, -1, 2.0, "x", True]))
    budget = draw(st.sampled_from([None, None, 10**15, 1, 0, -5, 2.5, np.int64(10**9)]))
    if ckpt is not None:
        ok &= bool(training) and (ckpt == "auto" or (type(ckpt) is int and ckpt >= 1))
    if budget is not None:
        ok &= bool(training) and isinstance(budget, (int, np.integer)) and budget >= 10**9 \
            and ckpt is None
    seed = draw(st.integers(0, 2**16))
    return dict(T=T, B=B, x_kind=x_kind, x_dtype=x_dtype, shape=shape, layout=layout,
                lengths_kind=lengths_kind, state_kind=state_kind, training=training,
                ckpt=ckpt, budget=budget, ok=ok and x_kind != "scalar", seed=seed)


def _lengths(kind, T, B, rng):
    good = rng.integers(1, T + 1, B)
    return {"none": None, "good": good, "list": good.tolist(), "zero": np.zeros(B, int),
            "negative": -good, "big": good + T, "float": good.astype(float),
            "bool": np.ones(B, bool), "shape": np.ones(B + 1, int),
            "object": good.astype(object), "uint": good.astype(np.uint16)}[kind]


def _state(kind, m, B, rng):
    DL = m.num_directions * m.num_layers
    h = rng.standard_normal((DL, B, m.output_size)).astype(m.dtype)
    c = rng.standard_normal((DL, B, m.hidden_size)).astype(m.dtype)
    if kind == "none":
        return None
    if kind == "readonly":
        h, c = _layout(h, "readonly"), _layout(c, "strided")
    elif kind == "shape":
        h = h[:, :, :-1]
    elif kind == "int":
        c = c.astype(np.int64)
    elif kind == "single":
        return h
    elif kind == "nan":
        h = h.copy()
        h[0, 0, 0] = np.nan
    return (h, c)


@fuzz
@given(case=forward_cases(), kind=st.sampled_from(["dense", "csr", "bsr", "bidir", "proj",
                                                   "f64", "int8", "batch_first"]))
def test_forward(case, kind):
    _count("forward")
    kw = {"bidir": dict(bidirectional=True), "proj": dict(proj_size=3, num_layers=2),
          "batch_first": dict(batch_first=True)}.get(kind, {})
    m = _model(kind if kind in ("csr", "bsr", "int8") else "dense",
               np.float64 if kind == "f64" else np.float32, **kw)
    rng = np.random.default_rng(case["seed"])
    T, B = case["T"], case["B"]
    clean = rng.standard_normal((T, B, 4)).astype(m.dtype)
    if case["x_kind"] == "nan":
        clean[0, 0, 0] = np.nan
    x = clean.astype(case["x_dtype"]) if case["x_kind"] != "dtype" else \
        clean.astype(case["x_dtype"])
    if case["x_kind"] in ("shape", "empty"):
        x = np.zeros(case["shape"], case["x_dtype"])
    if case["x_kind"] == "scalar":
        x = 1.0
    if m.batch_first and case["x_kind"] not in ("shape", "empty", "scalar"):
        x = x.transpose(1, 0, 2)
    x = _layout(x, case["layout"])
    lengths = _lengths(case["lengths_kind"], T, B, rng)
    state = _state(case["state_kind"], m, B, rng)
    ok = case["ok"]
    training = case["training"]
    if training and kind == "int8":
        ok = False  # quantized weights are for inference
    probe = rng.standard_normal((2, 1, 4)).astype(m.dtype)
    before = m(probe)[0]
    out, err = _call(lambda: m(x, state, lengths=lengths, training=training,
                               checkpoint=case["ckpt"], memory_budget=case["budget"]))
    if ok:
        assert err is None, f"a valid call was refused: {err!r}"
    if err is not None:
        np.testing.assert_array_equal(m(probe)[0], before)  # the model is unharmed
        return
    y, (h, c) = out
    # The clean call: contiguous input of the model's dtype, int64 lengths, inference.
    xc = np.array(x, m.dtype)  # a contiguous copy of what was passed
    st_clean = None if state is None else tuple(np.array(s, m.dtype) for s in state)
    lc = None if lengths is None else np.asarray(lengths, np.int64)
    y0, (h0, c0) = m(xc, st_clean, lengths=lc)
    tol = TOL[m.dtype.type]
    np.testing.assert_allclose(y, y0, **tol)
    np.testing.assert_allclose(h, h0, **tol)
    np.testing.assert_allclose(c, c0, **tol)
    if training and case["x_kind"] != "nan" and case["state_kind"] != "nan":
        dx, _ = m.backward(np.ones_like(y))  # the recorded tape is usable
        assert dx.shape == np.shape(xc) and np.all(np.isfinite(dx))


def test_huge_and_odd_sizes_fail_fast():
    _count("huge")
    with pytest.raises((MemoryError, ValueError)):
        numlstm.LSTM(4, 10**12)
    with pytest.raises((MemoryError, ValueError)):
        numlstm.LSTM(10**12, 4)
    with pytest.raises((MemoryError, ValueError)):
        numlstm.LSTM(4, 8).stream(10**12)
    m = numlstm.LSTM(4, 8)
    with pytest.raises(ValueError, match="memory_budget"):
        m(np.ones((3, 2, 4), np.float32), training=True, memory_budget=1)
    with pytest.raises(ValueError, match="x must have shape"):
        m(np.ones((0, 2, 4), np.float32))  # zero-length sequences are refused


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------

@fuzz
@given(kind=st.sampled_from(["dense", "csr", "bsr", "bidir", "batch_first", "unbatched"]),
       ckpt=st.sampled_from([None, 2]), layout=LAYOUTS,
       dy_kind=st.sampled_from(["good", "good", "float16", "nan", "int", "shape", "complex",
                                "object", "scalar"]),
       ds_kind=st.sampled_from(["none", "good", "readonly", "shape", "int", "single"]),
       seed=st.integers(0, 2**16))
def test_backward(kind, ckpt, layout, dy_kind, ds_kind, seed):
    _count("backward")
    kw = {"bidir": dict(bidirectional=True), "batch_first": dict(batch_first=True)}
    m = _model(kind if kind in ("csr", "bsr") else "dense", np.float64, **kw.get(kind, {}))
    rng = np.random.default_rng(seed)
    T, B = 4, 2
    x = rng.standard_normal((T, 4) if kind == "unbatched" else (T, B, 4))
    if kind == "batch_first":
        x = x.transpose(1, 0, 2).copy()
    y, (h, c) = m(x, training=True, checkpoint=ckpt)
    dy_clean = rng.standard_normal(y.shape)
    dy = {"float16": dy_clean.astype(np.float16), "int": dy_clean.astype(int),
          "shape": dy_clean[..., :-1], "complex": dy_clean.astype(complex),
          "object": dy_clean.astype(object), "scalar": 1.0}.get(dy_kind, dy_clean)
    if dy_kind == "nan":
        dy = dy.copy()
        dy.flat[0] = np.nan
        dy_clean = dy
    if dy_kind == "float16":
        dy_clean = dy.astype(np.float64)
    dy = _layout(dy, layout) if isinstance(dy, np.ndarray) else dy
    if dy_kind in ("good", "float16", "nan"):
        dy_clean = np.array(dy, np.float64)  # a contiguous copy of what was passed
    dsc = (rng.standard_normal(h.shape), rng.standard_normal(c.shape))
    ds = _state(ds_kind, m, 1 if kind == "unbatched" else B, rng)
    if ds is not None and ds_kind in ("good", "readonly"):
        ds = tuple(_layout(a, layout if layout != "broadcast" else "plain") for a in dsc)
    else:
        dsc = None if ds_kind == "none" else dsc
    if kind == "unbatched" and isinstance(ds, tuple) and ds_kind not in ("good", "readonly"):
        ds = (ds[0][:, 0], ds[1][:, 0])
    ok = dy_kind in ("good", "float16", "nan") and ds_kind in ("none", "good", "readonly")
    m.zero_grad()
    out, err = _call(lambda: m.backward(dy, ds))
    if ok:
        assert err is None, f"a valid backward was refused: {err!r}"
    if err is not None:
        if not isinstance(err, RuntimeError):  # refused before touching the tape
            assert not m.engine.tape.used
        return
    dx, (dh0, dc0) = out
    grads = {k: np.array(g.data if sp.issparse(g) else g) for k, g in m.grad.items()}
    m.zero_grad()
    m(x, training=True, checkpoint=ckpt)
    dx0, (dh00, dc00) = m.backward(dy_clean, dsc)
    np.testing.assert_allclose(dx, dx0, rtol=1e-12, atol=1e-13, equal_nan=True)
    np.testing.assert_allclose(dh0, dh00, rtol=1e-12, atol=1e-13, equal_nan=True)
    for k, g in m.grad.items():
        np.testing.assert_allclose(grads[k], g.data if sp.issparse(g) else g, rtol=1e-12,
                                   atol=1e-13, equal_nan=True, err_msg=k)
    with pytest.raises(RuntimeError, match="already called"):
        m.backward(dy_clean, dsc)


# ---------------------------------------------------------------------------
# Stream.step
# ---------------------------------------------------------------------------

@fuzz
@given(kind=st.sampled_from(["dense", "csr", "csr16", "float16", "int8", "bsr"]),
       batch=st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 2.0, True, None, "2",
                                                           np.int32(2)])),
       x_kind=st.sampled_from(["good", "good", "float16", "float64", "int", "bool", "complex",
                               "object", "shape", "1d", "nan"]),
       layout=LAYOUTS, steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_stream_step(kind, batch, x_kind, layout, steps, seed):
    _count("stream")
    m = _model(kind)
    s, err = _call(lambda: m.stream(batch))
    if err is not None:
        assert not (type(batch) in (int, np.int32) and batch >= 1)
        return
    B = s.batch_size
    ref = m.stream(B)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        clean = rng.standard_normal((B, 4)).astype(np.float32)
        x = {"float16": clean.astype(np.float16), "float64": clean.astype(np.float64),
             "int": clean.astype(int), "bool": clean > 0, "complex": clean.astype(complex),
             "object": clean.astype(object), "shape": clean[:, :3],
             "1d": clean[0]}.get(x_kind, clean)
        if x_kind == "nan":
            x = clean.copy()
            x[0, 0] = np.nan
        x = _layout(x, layout)
        if np.asarray(x).dtype.kind == "f":
            clean = np.array(x, np.float32)  # a contiguous copy of what was passed
        out, err = _call(lambda: s.step(x).copy())  # noqa: B023 (called at once)
        if err is not None:
            assert x_kind not in ("good", "float16", "float64", "nan"), err
            continue
        np.testing.assert_array_equal(out, ref.step(clean))


# ---------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------

def _unsorted(w):
    """A CSR with the same matrix, indices reversed within each row."""
    a = sp.csr_array(w)
    idx, data = a.indices.copy(), a.data.copy()
    for r in range(a.shape[0]):
        s, e = a.indptr[r], a.indptr[r + 1]
        idx[s:e], data[s:e] = idx[s:e][::-1], data[s:e][::-1]
    return sp.csr_array((data, idx, a.indptr.copy()), shape=a.shape)


def _duplicates(w):
    """A COO -> CSR with every entry split in two halves (same sum)."""
    c = sp.coo_array(w)
    row, col, data = np.r_[c.row, c.row], np.r_[c.col, c.col], np.r_[c.data, c.data] / 2
    return sp.csr_array((data, (row, col)), shape=c.shape)


def _poke(w, what):
    a = sp.csr_array(w)
    a.sum_duplicates()
    if what == "index_oob":
        a.indices[-1] = a.shape[1] + 7
    elif what == "index_negative":
        a.indices[0] = -1
    elif what == "indptr_decreasing":
        a.indptr[1] = a.indptr[-1]
    elif what == "indptr_short":
        a.indptr[-1] = a.indptr[-1] + 5
    elif what == "check_false_oob":
        idx = a.indices.copy()
        idx[0] = 10**6
        a = sp.csr_array((a.data, idx, a.indptr), shape=a.shape, copy=False)
        a.indices = idx  # in case the constructor fixed it
    elif what == "coo_oob":
        c = sp.coo_array(w)
        c.coords[1][0] = c.shape[1] + 1
        return c
    elif what == "bsr_oob":
        b = sp.bsr_array(w, blocksize=(4, 2))
        b.indices[0] = 99
        return b
    return a


LSD_KINDS = ["dense_strided", "dense_fortran", "dense_readonly", "dense_broadcast", "list",
             "float16", "float64", "float32", "int", "bool", "complex", "object", "nan", "inf",
             "empty", "shape", "transposed", "none", "str", "csr", "csr_matrix", "csc", "coo",
             "bsr", "dok", "lil", "dia", "unsorted", "duplicates", "sparse_int",
             "sparse_complex", "sparse_nan", "sparse_empty", "sparse_shape", "index_oob",
             "index_negative", "indptr_decreasing", "indptr_short", "check_false_oob",
             "coo_oob", "bsr_oob", "bias_sparse", "missing", "extra", "not_a_dict"]
LSD_VALID = {"dense_strided", "dense_fortran", "dense_readonly", "dense_broadcast", "list",
             "float16", "float64", "float32", "csr", "csr_matrix", "csc", "coo", "bsr", "dok",
             "lil", "dia", "unsorted", "duplicates", "sparse_empty"}


@fuzz
@given(kind=st.sampled_from(LSD_KINDS), target=st.sampled_from(["weight_ih_l0",
                                                                "weight_hh_l0", "bias_ih_l0"]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_load_state_dict(kind, target, dtype, seed):
    _count("load_state_dict")
    m = numlstm.LSTM(4, 8, dtype=dtype, seed=0)
    rng = np.random.default_rng(seed)
    state = m.state_dict()
    w = state[target] * (rng.random(state[target].shape) < 0.5)  # some zeros
    is_bias = target.startswith("bias")
    equiv = w  # the dense value the model must end up with, when accepted
    if is_bias and kind not in ("dense_strided", "dense_fortran", "dense_readonly",
                                "dense_broadcast", "list", "float16", "float64", "float32",
                                "int", "bool", "complex", "object", "nan", "inf", "empty",
                                "shape", "none", "str", "missing", "extra", "not_a_dict"):
        kind = "bias_sparse"
    if kind.startswith("dense_"):
        value = _layout(w, kind[6:])
        if kind == "dense_broadcast":
            equiv = np.broadcast_to(w[:1], w.shape)
    elif kind == "list":
        value = w.tolist()
    elif kind in ("float16", "float64", "float32"):
        value = w.astype(kind)
        equiv = value
    elif kind in ("int", "bool", "complex", "object"):
        value = w.astype({"int": int, "bool": bool, "complex": complex, "object": object}[kind])
    elif kind in ("nan", "inf"):
        value = w.copy()
        value.flat[3] = np.nan if kind == "nan" else -np.inf
    elif kind == "empty":
        value = np.zeros((0,) * w.ndim, dtype)
    elif kind == "shape":
        value = w[..., :-1] if w.ndim == 2 else w[:-1]
    elif kind == "transposed":
        value = w.T if w.ndim == 2 else w[:, None]
    elif kind in ("none", "str"):
        value = None if kind == "none" else "weights"
    elif kind in ("csr", "csc", "coo", "dok", "lil", "dia"):
        value = getattr(sp, f"{kind}_array")(w)
    elif kind == "csr_matrix":
        value = sp.csr_matrix(w)
    elif kind == "bsr":
        value = sp.bsr_array(w, blocksize=(4, 2))
    elif kind == "unsorted":
        value = _unsorted(w)
    elif kind == "duplicates":
        value = _duplicates(w)
        equiv = value.toarray()
    elif kind in ("sparse_int", "sparse_complex", "sparse_nan"):
        value = sp.csr_array(w.astype({"sparse_int": np.int64,
                                       "sparse_complex": np.complex128}.get(kind, w.dtype)))
        if kind == "sparse_nan":
            value.data[0] = np.nan
    elif kind == "sparse_empty":
        value = sp.csr_array(w.shape, dtype=dtype)
        equiv = np.zeros_like(w)
    elif kind == "sparse_shape":
        value = sp.csr_array(w[:, :-1])
    elif kind == "bias_sparse":
        value = sp.csr_array(w[None, :] if is_bias else w[:1])
    else:
        value = _poke(w, kind) if not kind.startswith(("missing", "extra", "not")) else w
    if kind == "missing":
        new = {k: v for k, v in state.items() if k != target}
    elif kind == "extra":
        new = {**state, "weight_xx_l9": w}
    elif kind == "not_a_dict":
        new = list(state.items())
    else:
        new = {**state, target: value}
    probe = rng.standard_normal((3, 2, 4)).astype(dtype)
    before = m(probe)[0]
    _, err = _call(lambda: m.load_state_dict(new))
    if kind in LSD_VALID:
        assert err is None, f"{kind}: a valid value was refused: {err!r}"
    else:
        assert err is not None, f"{kind}: a bad value was accepted"
        np.testing.assert_array_equal(m(probe)[0], before)  # unchanged
        return
    clean = numlstm.LSTM(4, 8, dtype=dtype, seed=0)
    clean.load_state_dict({**state, target: np.array(equiv, dtype)})
    np.testing.assert_allclose(m(probe)[0], clean(probe)[0], **TOL[np.dtype(dtype).type])
    got = m.state_dict()[target]
    np.testing.assert_allclose(got.toarray() if sp.issparse(got) else got,
                               np.array(equiv, dtype), rtol=1e-6)


# ---------------------------------------------------------------------------
# prune, quantize
# ---------------------------------------------------------------------------

FRACTIONS = st.sampled_from([0.0, 0.5, 0.9, 0.999, np.float32(0.5), 1.0, -0.1, float("nan"),
                             float("inf"), "0.5", None, True, 1])


@fuzz
@given(start=st.sampled_from(["dense", "csr", "int8", "bsr"]),
       fn=st.sampled_from(["magnitude", "threshold", "blocks", "quantize"]),
       fraction=FRACTIONS,
       scope=st.sampled_from(["per_matrix", "global", "per_row", "bogus", None]),
       weights=st.sampled_from([("ih", "hh", "hr"), ("hh",), (), ("xx",), "ih", None]),
       block=st.sampled_from([(4, 2), (8, 1), (3, 3), (0, 1), (33, 1), (4,), "4x2", None]),
       values=st.sampled_from(["int8", "float16", None, "int4", 8]),
       indices=st.sampled_from(["auto", "uint16", "int32", "int8", None]),
       skip=st.booleans(), target=st.sampled_from([None, "model", "dict", "str"]))
def test_prune_and_quantize(start, fn, fraction, scope, weights, block, values, indices, skip,
                            target):
    _count("prune_quantize")
    m = _model(start)
    obj = {None: m, "model": m, "dict": {}, "str": "model"}[target]
    probe = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    before = m(probe)[0]
    if fn == "magnitude":
        f = lambda: prune.magnitude(obj, fraction, scope=scope, weights=weights)  # noqa: E731
    elif fn == "threshold":
        f = lambda: prune.threshold(obj, fraction, weights=weights)  # noqa: E731
    elif fn == "blocks":
        f = lambda: prune.blocks(obj, fraction, block=block, scope=scope,  # noqa: E731
                                 weights=weights)
    else:
        f = lambda: quantize(obj, values, indices, skip_dense=skip)  # noqa: E731
    _, err = _call(f)
    if err is not None:
        if not isinstance(err, ValueError) or "divisible" not in str(err):
            np.testing.assert_array_equal(m(probe)[0], before)  # refused before any change
        return
    y, _ = m(probe)
    assert np.all(np.isfinite(y))
    s = m.sparsity()
    assert all(0 <= v <= 1 for v in s.values())


# ---------------------------------------------------------------------------
# losses, optimizers
# ---------------------------------------------------------------------------

ARRAYS = st.sampled_from(["good", "int", "object", "shape", "empty", "nan", "scalar", "list",
                          "readonly", "strided"])


def _arr(kind, shape, rng):
    a = rng.standard_normal(shape)
    if kind == "int":
        return a.astype(int)
    if kind == "object":
        return a.astype(object)
    if kind == "shape":
        return a[..., :-1] if len(shape) > 1 else a[:-1]
    if kind == "empty":
        return np.zeros((0,) + shape[1:])
    if kind == "nan":
        a.flat[0] = np.nan
        return a
    if kind == "scalar":
        return 1.0
    if kind in ("list", "readonly", "strided"):
        return _layout(a, kind)
    return a


@fuzz
@given(loss=st.sampled_from(["mse", "sce"]), y_kind=ARRAYS, t_kind=ARRAYS,
       lengths=st.sampled_from(["none", "good", "zero", "negative", "big", "float", "shape"]),
       batch_first=st.booleans(), seed=st.integers(0, 2**16))
def test_losses(loss, y_kind, t_kind, lengths, batch_first, seed):
    _count("losses")
    rng = np.random.default_rng(seed)
    T, B, C = 3, 2, 4
    y = _arr(y_kind, (T, B, C), rng)
    lens = _lengths(lengths, T, B, rng) if lengths != "zero" else np.zeros(B, int)
    if lengths == "big":
        lens = np.full(B, T + 1)
    if loss == "mse":
        target = _arr(t_kind, (T, B, C), rng)
        f = lambda: losses.mse(y, target, lengths=lens, batch_first=batch_first)  # noqa: E731
    else:
        target = rng.integers(0, C, (T, B))
        if t_kind == "int":
            target = target + C  # out of range
        elif t_kind in ("object", "nan"):
            target = target.astype(float)
        elif t_kind == "shape":
            target = target[:, :1]
        f = lambda: losses.softmax_cross_entropy(y, target, lengths=lens,  # noqa: E731
                                                 batch_first=batch_first)
    out, err = _call(f)
    if err is not None:
        return
    value, grad = out
    assert isinstance(value, float)
    assert np.shape(grad) == np.shape(y)
    if y_kind != "nan" and (loss == "sce" or t_kind != "nan"):
        assert np.isfinite(value) and np.all(np.isfinite(grad))


NUMBERS = st.sampled_from([1e-3, 0.0, -1.0, float("nan"), float("inf"), 1.0, "0.1", None,
                           True, np.float32(0.5)])


@fuzz
@given(opt=st.sampled_from(["SGD", "Adam", "AdamW"]), lr=NUMBERS, second=NUMBERS,
       betas=st.sampled_from([(0.9, 0.999), (1.0, 0.5), (0.5,), "ab", None, (-0.1, 0.9),
                              (float("nan"), 0.9)]),
       nesterov=st.booleans(), modules=st.sampled_from(["model", "list", "empty", "str",
                                                         "dict", "none"]))
def test_optimizer_constructors(opt, lr, second, betas, nesterov, modules):
    _count("optim")
    m = numlstm.LSTM(4, 8, seed=0)
    mods = {"model": m, "list": [m], "empty": [], "str": "m", "dict": {}, "none": None}[modules]
    cls = getattr(optim, opt)
    if opt == "SGD":
        f = lambda: cls(mods, lr, momentum=second, nesterov=nesterov)  # noqa: E731
    else:
        f = lambda: cls(mods, lr, betas=betas, eps=second, weight_decay=0.0)  # noqa: E731
    o, err = _call(f)
    if err is not None:
        return
    m(np.ones((2, 1, 4), np.float32), training=True)
    m.backward(np.ones((2, 1, 8), np.float32))
    o.step()
    assert all(np.all(np.isfinite(p)) for p in m.parameters().values())


# ---------------------------------------------------------------------------
# save / load paths
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["missing_dir", "folder", "empty", "nul", "int", "none", "bytes",
                                 "pathlib", "dotfile", "long_name", "not_a_model"])
def test_save_and_load_paths(tmp_path, how):
    _count("paths")
    m = numlstm.LSTM(3, 4, seed=0)
    path = {"missing_dir": str(tmp_path / "no" / "such" / "m.npz"), "folder": str(tmp_path),
            "empty": "", "nul": str(tmp_path / "a\0b"), "int": 12345, "none": None,
            "bytes": os.fsencode(tmp_path / "b.npz"), "pathlib": tmp_path / "p.npz",
            "dotfile": str(tmp_path / ".hidden"), "long_name": str(tmp_path / ("x" * 300)),
            "not_a_model": str(tmp_path / "m.npz")}[how]
    before = sorted(os.listdir(tmp_path))
    target = m if how != "not_a_model" else {"weights": 1}
    _, err = _call_os(lambda: numlstm.save(target, path))
    if err is None:
        loaded = numlstm.load(path)
        x = np.ones((2, 1, 3), np.float32)
        np.testing.assert_array_equal(loaded(x)[0], m(x)[0])
    else:
        assert sorted(os.listdir(tmp_path)) == before  # no temporary left behind
        _, err = _call_os(lambda: numlstm.load(path))
        assert err is not None


def _call_os(f):
    try:
        return f(), None
    except (*ALLOWED, OSError) as e:
        return None, e


def test_zz_cases_ran():
    """How many hypothesis cases ran in this module (run the file with -s to see)."""
    total = sum(CASES.values())
    print(f"\nfuzz cases run: {total} {CASES}")
    if _N is None and len(CASES) >= 10:  # the whole file ran under the ci profile
        assert total >= 150

"""Hostile but plausible API use: streams copied and pickled, constructor
flags given as strings, sizes that would never fit."""

import copy
import pickle

import numpy as np
import pytest

import numlstm


@pytest.fixture
def model():
    return numlstm.LSTM(3, 6, num_layers=2, proj_size=4, seed=0)


def _xs(T=6, B=2, I=3):
    return np.random.default_rng(1).standard_normal((T, B, I)).astype(np.float32)


def _run(stream, xs):
    return np.stack([stream.step(x).copy() for x in xs])


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_a_copied_stream_steps_reports_and_resets_its_own_state(model, how):
    xs = _xs()
    s = model.stream(2)
    s.step(xs[0])
    c = {"copy": copy.copy, "deepcopy": copy.deepcopy,
         "pickle": lambda s: pickle.loads(pickle.dumps(s))}[how](s)
    assert type(c) is type(s) and c.batch_size == 2
    assert (c.model is model) == (how == "copy")  # copy shares; deepcopy / pickle own one
    for a, b in zip(c.state, s.state, strict=True):
        np.testing.assert_array_equal(a, b)
    h0, c0 = s.state
    np.testing.assert_array_equal(_run(c, xs[1:]), _run(s, xs[1:]))  # same from the same state
    # state follows the steps of the copy, and only the copy's
    assert not np.array_equal(c.state[0], h0)
    s.reset()
    assert not np.array_equal(c.state[0], s.state[0])
    # reset() and reset(state) reach the buffers the copy actually steps
    c.reset()
    np.testing.assert_array_equal(_run(c, xs), _run(model.stream(2), xs))
    c.reset((h0, c0))
    np.testing.assert_array_equal(_run(c, xs), _run(model.stream(2, (h0, c0)), xs))


def test_a_deep_copied_stream_owns_its_model(model):
    xs = _xs()
    s = model.stream(2)
    c = copy.deepcopy(s)
    expected = _run(c, xs)
    c.reset()
    for p in model.parameters().values():  # the original's weights change ...
        p *= 0
    np.testing.assert_array_equal(_run(c, xs), expected)  # ... the copy's do not
    shared = copy.copy(s)
    assert not np.any(_run(shared, xs))  # a shallow copy reads the live weights


def test_streams_in_a_copied_container_keep_one_model():
    m = numlstm.LSTM(2, 3, seed=0)
    a, b = copy.deepcopy([m.stream(1), m.stream(1)])
    assert a.model is b.model and a.model is not m


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bias="false"), TypeError, r"bias must be a bool \(True or False\), got str 'false'"),
    (dict(batch_first="false"), TypeError, r"batch_first must be a bool .*got str 'false'"),
    (dict(bidirectional=1), TypeError, r"bidirectional must be a bool .*got int 1"),
    (dict(bias=None), TypeError, r"bias must be a bool .*got NoneType None"),
    (dict(num_layers=10**9), ValueError, r"num_layers must be <= 10000, got 1000000000"),
    (dict(hidden_size=2**31), ValueError, r"hidden_size must be <= 2147483647"),
    (dict(input_size=2**31), ValueError, r"input_size must be <= 2147483647"),
    (dict(hidden_size=2**20), ValueError, r"ask for 4,398,067,482,624 float32 parameters "
                                          r"\(16 TiB\); numlstm accepts at most 1 TiB"),
    (dict(hidden_size=2**17, num_layers=10_000, input_size=1), ValueError,
     r"numlstm accepts at most 1 TiB"),
])
def test_constructor_flags_are_bools_and_sizes_bounded(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        numlstm.LSTM(**args)


def test_numpy_bools_and_ints_are_accepted():
    m = numlstm.LSTM(np.int64(3), np.int32(4), num_layers=np.int16(2), bias=np.bool_(False),
                     batch_first=np.True_, bidirectional=np.False_)
    assert (m.bias, m.batch_first, m.bidirectional) == (False, True, False)
    assert all(type(v) is bool for v in (m.bias, m.batch_first, m.bidirectional))


@pytest.mark.parametrize("make,match", [
    (lambda m: numlstm.StreamPool(m, 2**62), r"capacity=4611686018427387904 asks a StreamPool"),
    (lambda m: m.stream_pool(2**40), r"capacity=1099511627776 asks a StreamPool"),
    (lambda m: m.stream(10**30), r"batch_size=10{30} asks a stream"),
    (lambda m: m.stream(np.int64(2**40)), r"batch_size=1099511627776 asks a stream"),
])
def test_stream_and_pool_sizes_are_bounded_by_name(model, make, match):
    # NumPy's "cannot reshape" / "Python int too large to convert to C long" before;
    # h and c of 2 layers of (4 + 6) float32 values are 80 bytes a row.
    with pytest.raises(ValueError, match=match + r" of this model for at least [\d,]+ bytes "
                                                  r"of state \(h and c of 2 layer\(s\), 80 "
                                                  r"bytes a row\); numlstm allocates at most "
                                                  r"1 TiB"):
        make(model)
    # Sizes the bound allows are made as before.
    assert model.stream(3).batch_size == 3 and numlstm.StreamPool(model, 5).capacity == 5

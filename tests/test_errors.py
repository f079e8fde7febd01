"""Bad input: each error names the argument, what was expected and what came."""

import numpy as np
import pytest
import scipy.sparse as sp

import numlstm


@pytest.fixture
def model():
    return numlstm.LSTM(4, 5, num_layers=2, seed=0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_size=0, hidden_size=5), ValueError, r"input_size must be >= 1, got 0"),
    (dict(input_size=4.0, hidden_size=5), TypeError, r"input_size must be an int, got float"),
    (dict(input_size=4, hidden_size=5, num_layers=0), ValueError, r"num_layers must be >= 1"),
    (dict(input_size=4, hidden_size=5, proj_size=5), ValueError,
     r"proj_size must be smaller than hidden_size=5, got 5"),
    (dict(input_size=4, hidden_size=5, dropout=1.0), ValueError, r"dropout must be .*got 1.0"),
    (dict(input_size=4, hidden_size=5, dtype=np.int32), TypeError,
     r"dtype must be float32 or float64, got int32"),
])
def test_constructor_arguments_are_checked(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        numlstm.LSTM(**kwargs)


@pytest.mark.parametrize("x,exc,match", [
    (np.zeros((3, 2)), ValueError, r"x must have shape \(T, 4\) or \(T, B, 4\).*got \(3, 2\)"),
    (np.zeros((3, 2, 5)), ValueError, r"x must have shape \(T, B, 4\) for input_size=4, "
                                      r"got \(3, 2, 5\)"),
    (np.zeros((3, 2, 4, 1)), ValueError, r"got \(3, 2, 4, 1\)"),
    (np.zeros((0, 2, 4)), ValueError, r"got \(0, 2, 4\)"),
    (np.zeros((3, 2, 4), np.int64), TypeError,
     r"x must be a floating-point array, got dtype int64"),
    (np.zeros((3, 2, 4), object), TypeError, r"got dtype object"),
    ([["a"]], TypeError, r"x must be a floating-point array"),
])
def test_bad_x(model, x, exc, match):
    with pytest.raises(exc, match=match):
        model(x)


def test_float64_input_into_float32_model_is_converted(model):
    x = np.random.default_rng(0).standard_normal((3, 2, 4))
    y64, _ = model(x)
    y32, _ = model(x.astype(np.float32))
    assert y64.dtype == np.float32
    np.testing.assert_array_equal(y64, y32)


def test_nan_input_poisons_only_its_own_sequence(model):
    """NaN/inf are not checked: they propagate as IEEE arithmetic does, and
    sequences in the same batch are independent, so only their own outputs go NaN."""
    x = np.zeros((3, 2, 4), np.float32)
    x[1, 0, 2] = np.nan
    y, (h, c) = model(x)
    assert np.all(np.isfinite(y[0])) and np.isnan(y[1:, 0]).all()
    assert np.all(np.isfinite(y[:, 1])) and np.all(np.isfinite(h[:, 1]))
    x[1, 0, 2] = np.inf
    y, _ = model(x)
    assert np.all(np.isfinite(y[:, 1]))


@pytest.mark.parametrize("lengths,exc,match", [
    (np.array([3, 4]), ValueError, r"lengths must lie in \[1, 3\] for T=3, got values in \[3, 4\]"),
    (np.array([0, 2]), ValueError, r"lengths must lie in \[1, 3\]"),
    (np.array([1, 2, 3]), ValueError, r"lengths must have shape \(2,\) for batch size 2, "
                                      r"got \(3,\)"),
    (np.array([1.0, 2.0]), TypeError, r"lengths must hold integers, got dtype float64"),
])
def test_bad_lengths(model, lengths, exc, match):
    with pytest.raises(exc, match=match):
        model(np.zeros((3, 2, 4)), lengths=lengths)


def test_lengths_order_does_not_matter(model):
    x = np.random.default_rng(0).standard_normal((4, 3, 4))
    y, (h, c) = model(x, lengths=[4, 1, 3])
    perm = [2, 0, 1]
    yp, (hp, cp) = model(x[:, perm], lengths=np.array([4, 1, 3])[perm])
    np.testing.assert_allclose(yp, y[:, perm], atol=1e-6)
    np.testing.assert_allclose(hp, h[:, perm], atol=1e-6)


@pytest.mark.parametrize("state,exc,match", [
    ((np.zeros((2, 2, 5)), np.zeros((1, 2, 5))), ValueError,
     r"state\[1\] \(c\) must have shape \(2, 2, 5\), got \(1, 2, 5\)"),
    ((np.zeros((2, 3, 5)), np.zeros((2, 2, 5))), ValueError,
     r"state\[0\] \(h\) must have shape \(2, 2, 5\), got \(2, 3, 5\)"),
    (np.zeros((2, 2, 5)), TypeError, r"state must be a tuple \(h, c\), got ndarray"),
    ((np.zeros((2, 2, 5), int), np.zeros((2, 2, 5))), TypeError, r"state\[0\] \(h\) must be a "
                                                                   r"floating-point array"),
])
def test_bad_state(model, state, exc, match):
    with pytest.raises(exc, match=match):
        model(np.zeros((3, 2, 4)), state)


def test_backward_needs_a_training_forward_once(model):
    with pytest.raises(RuntimeError, match="needs a preceding forward"):
        model.backward(np.zeros((3, 2, 5)))
    model(np.zeros((3, 2, 4)))  # inference records nothing
    with pytest.raises(RuntimeError, match="needs a preceding forward"):
        model.backward(np.zeros((3, 2, 5)))
    model(np.zeros((3, 2, 4)), training=True)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 2, 5\), got \(3, 2, 4\)"):
        model.backward(np.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match=r"dstate\[1\] \(c\) must have shape"):
        model.backward(np.zeros((3, 2, 5)), (np.zeros((2, 2, 5)), np.zeros((2, 2, 4))))
    model.backward(np.zeros((3, 2, 5)))
    with pytest.raises(RuntimeError, match="already called"):
        model.backward(np.zeros((3, 2, 5)))


def test_load_state_dict_names_the_bad_key(model):
    good = model.state_dict()
    missing = dict(good)
    del missing["bias_hh_l1"]
    with pytest.raises(KeyError, match=r"missing \['bias_hh_l1'\]"):
        model.load_state_dict(missing)
    with pytest.raises(KeyError, match=r"unexpected \['weight_hr_l0'\]"):
        model.load_state_dict({**good, "weight_hr_l0": np.zeros((2, 5))})
    cases = [
        ("weight_hh_l0", np.zeros((20, 4)), ValueError,
         r"weight_hh_l0 must have shape \(20, 5\), got \(20, 4\)"),
        ("weight_ih_l1", np.zeros((20, 5), np.int32), TypeError,
         r"weight_ih_l1 must be a floating-point array, got dtype int32"),
        ("bias_ih_l0", np.zeros(19), ValueError,
         r"bias_ih_l0 must have shape \(20,\), got \(19,\)"),
        ("weight_hh_l1", sp.csr_array(np.zeros((20, 6))), ValueError,
         r"weight_hh_l1 must have shape \(20, 5\), got \(20, 6\)"),
        ("weight_hh_l1", sp.csr_array(np.ones((20, 5), np.int64)), TypeError,
         r"weight_hh_l1 must hold floating-point values, got dtype int64"),
        ("weight_hh_l1", np.full((20, 5), np.nan), ValueError, r"weight_hh_l1 must be finite"),
        ("bias_hh_l1", np.full(20, np.inf), ValueError, r"bias_hh_l1 must be finite"),
    ]
    for key, value, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.load_state_dict({**good, key: value})
    with pytest.raises(TypeError, match="state must be a dict, got list"):
        model.load_state_dict([])
    # A failed load leaves the model as it was.
    assert model.state_dict().keys() == good.keys()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, good[key])


def test_stream_step_checks_its_input():
    s = numlstm.LSTM(4, 5).stream(2)
    with pytest.raises(ValueError, match=r"x_t must have shape \(2, 4\), got \(1, 4\)"):
        s.step(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match=r"x_t must be a floating-point array, got dtype int64"):
        s.step(np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"state\[0\] \(h\) must have shape \(1, 2, 5\)"):
        s.reset((np.zeros((1, 1, 5)), np.zeros((1, 2, 5))))

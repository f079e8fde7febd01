"""from_keras: the weights list against a NumPy reference of Keras' equations,
and (when Keras is installed) layers against Keras itself.

Keras 3 runs here on the torch backend (``KERAS_BACKEND=torch`` unless set:
its numpy backend imports jax); the Keras tests skip without Keras or torch.
"""

import os

import numpy as np
import pytest

from numlstm import convert

TOL = dict(rtol=1e-5, atol=1e-5)
# Keras 3.15's own variables trip NumPy 2's __array__(copy=...) deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def keras_reference(x, kernel, recurrent, bias, h0=None, c0=None):
    """Keras' LSTM in float64: x (B, T, I); gates i, f, c, o; one bias."""
    B, T, _ = x.shape
    U = recurrent.shape[0]
    h = np.zeros((B, U)) if h0 is None else h0.astype(np.float64)
    c = np.zeros((B, U)) if c0 is None else c0.astype(np.float64)
    ys = []
    for t in range(T):
        z = x[:, t] @ kernel + h @ recurrent + (0 if bias is None else bias)
        i, f, g, o = (z[:, k * U:(k + 1) * U] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys, axis=1), h, c


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_weights_list_matches_keras_equations(use_bias, with_state):
    rng = np.random.default_rng(int(use_bias) + 2 * int(with_state))
    I, U, B, T = 3, 5, 2, 6
    kernel = rng.standard_normal((I, 4 * U)).astype(np.float32) * 0.5
    recurrent = rng.standard_normal((U, 4 * U)).astype(np.float32) * 0.5
    bias = rng.standard_normal(4 * U).astype(np.float32) if use_bias else None
    weights = [kernel, recurrent] + ([bias] if use_bias else [])
    model = convert.from_keras(weights)
    assert (model.batch_first, model.bias, model.hidden_size) == (True, use_bias, U)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    h0 = rng.standard_normal((B, U)).astype(np.float32) if with_state else None
    c0 = rng.standard_normal((B, U)).astype(np.float32) if with_state else None
    y_ref, h_ref, c_ref = keras_reference(x, kernel, recurrent, bias, h0, c0)
    state = (h0[None], c0[None]) if with_state else None
    y, (h, c) = model(x, state)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(h[0], h_ref, **TOL)
    np.testing.assert_allclose(c[0], c_ref, **TOL)
    if use_bias:
        s = model.state_dict()
        np.testing.assert_array_equal(s["bias_ih_l0"], bias)
        np.testing.assert_array_equal(s["bias_hh_l0"], 0)


def test_cudnn_bias_of_8u_is_split():
    rng = np.random.default_rng(0)
    kernel, recurrent = rng.standard_normal((2, 12)), rng.standard_normal((3, 12))
    bias = rng.standard_normal(24)
    model = convert.from_keras([kernel, recurrent, bias], batch_first=False)
    assert model.batch_first is False and model.dtype == np.float32
    assert convert.from_keras([kernel, recurrent], dtype=np.float64).dtype == np.float64
    x = rng.standard_normal((4, 2, 2)).astype(np.float32)  # (T, B, I)
    y_ref, _, _ = keras_reference(x.transpose(1, 0, 2), kernel, recurrent,
                                  bias[:12] + bias[12:])
    np.testing.assert_allclose(model(x)[0], y_ref.transpose(1, 0, 2), **TOL)


@pytest.mark.parametrize("weights,exc,match", [
    ("w", TypeError, r"layer_or_weights must be a Keras LSTM layer or a weights list.*got str"),
    ([np.zeros((2, 8))], ValueError, r"must be a list \[kernel .* got list of length 1"),
    ([np.zeros((2, 8)), np.zeros((3, 8))], ValueError,
     r"layer_or_weights\[1\] \(recurrent_kernel\) must have shape \(U, 4U\), got \(3, 8\)"),
    ([np.zeros((2, 12)), np.zeros((3, 12))], ValueError, None),  # fine: no bias
    ([np.zeros((2, 8)), np.zeros((2, 8))], ValueError, None),
    ([np.zeros((2, 9)), np.zeros((2, 8))], ValueError,
     r"layer_or_weights\[0\] \(kernel\) must have shape \(I, 8\) for units=2, got \(2, 9\)"),
    ([np.zeros((2, 8)), np.zeros((2, 8)), np.zeros(7)], ValueError,
     r"layer_or_weights\[2\] \(bias\) must have shape \(8,\) for units=2, got \(7,\)"),
    ([np.zeros((2, 8), int), np.zeros((2, 8))], TypeError,
     r"layer_or_weights\[0\] must be a floating-point array, got dtype int64"),
])
def test_weights_list_errors(weights, exc, match):
    if match is None:
        convert.from_keras(weights)
        return
    with pytest.raises(exc, match=match):
        convert.from_keras(weights)


# ----------------------------------------------------------------------------- Keras itself


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("torch")
    return pytest.importorskip("keras")


def keras_run(layer, x):
    out = layer(x)
    return [np.asarray(o.detach().cpu() if hasattr(o, "detach") else o) for o in out]


@pytest.mark.parametrize("use_bias", [True, False])
def test_keras_lstm_layer_matches_keras(keras, use_bias):
    keras.utils.set_random_seed(0)
    layer = keras.layers.LSTM(5, use_bias=use_bias, return_sequences=True, return_state=True,
                              bias_initializer="random_normal")
    x = np.random.default_rng(0).standard_normal((2, 6, 3)).astype(np.float32)
    y_k, h_k, c_k = keras_run(layer, x)
    model = convert.from_keras(layer)
    assert model.batch_first and model.bias == use_bias
    y, (h, c) = model(x)
    np.testing.assert_allclose(y, y_k, **TOL)
    np.testing.assert_allclose(h[0], h_k, **TOL)
    np.testing.assert_allclose(c[0], c_k, **TOL)


def test_keras_bidirectional_concat_matches_keras(keras):
    keras.utils.set_random_seed(1)
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(4, return_sequences=True, return_state=True,
                          bias_initializer="random_normal"), merge_mode="concat")
    x = np.random.default_rng(1).standard_normal((3, 5, 2)).astype(np.float32)
    y_k, hf, cf, hb, cb = keras_run(layer, x)
    model = convert.from_keras(layer)
    assert model.bidirectional
    y, (h, c) = model(x)
    np.testing.assert_allclose(y, y_k, **TOL)
    np.testing.assert_allclose(h, np.stack([hf, hb]), **TOL)
    np.testing.assert_allclose(c, np.stack([cf, cb]), **TOL)


def test_keras_go_backwards_is_a_reverse_model(keras):
    """Keras returns a go_backwards layer's outputs in its own (reversed) order."""
    keras.utils.set_random_seed(2)
    layer = keras.layers.LSTM(3, go_backwards=True, return_sequences=True, return_state=True)
    x = np.random.default_rng(2).standard_normal((2, 4, 3)).astype(np.float32)
    y_k, h_k, c_k = keras_run(layer, x)
    model = convert.from_keras(layer)
    assert model.reverse
    y, (h, c) = model(x)
    np.testing.assert_allclose(y[:, ::-1], y_k, **TOL)
    np.testing.assert_allclose(h[0], h_k, **TOL)
    np.testing.assert_allclose(c[0], c_k, **TOL)


@pytest.mark.parametrize("kw", [
    dict(activation="relu"),
    dict(recurrent_activation="hard_sigmoid"),
    dict(activation="relu", recurrent_activation="hard_sigmoid", go_backwards=True),
    dict(activation="linear", recurrent_activation="sigmoid"),
])
def test_keras_activations_match_keras(keras, kw):
    keras.utils.set_random_seed(3)
    layer = keras.layers.LSTM(4, return_sequences=True, return_state=True,
                              bias_initializer="random_normal", **kw)
    x = np.random.default_rng(3).standard_normal((2, 5, 3)).astype(np.float32)
    y_k, h_k, c_k = keras_run(layer, x)
    model = convert.from_keras(layer)
    y, (h, c) = model(x)
    if kw.get("go_backwards"):
        y = y[:, ::-1]
    scale = max(1.0, float(np.abs(y_k).max()), float(np.abs(c_k).max()))
    tol = dict(rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(y, y_k, **tol)
    np.testing.assert_allclose(h[0], h_k, **tol)
    np.testing.assert_allclose(c[0], c_k, **tol)


def test_keras_bidirectional_with_other_activations(keras):
    keras.utils.set_random_seed(4)
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(3, activation="relu", return_sequences=True,
                          bias_initializer="random_normal"), merge_mode="concat")
    x = np.random.default_rng(4).standard_normal((2, 5, 2)).astype(np.float32)
    y_k = np.asarray(layer(x).detach().cpu())
    model = convert.from_keras(layer)
    np.testing.assert_allclose(model(x)[0], y_k, rtol=1e-5, atol=1e-5 * max(1, np.abs(y_k).max()))


def test_keras_rejects_what_changes_the_math(keras):
    def built(layer, I=3):
        layer(np.zeros((1, 2, I), np.float32))
        return layer

    with pytest.raises(ValueError, match=r"activation='gelu' is not supported"):
        convert.from_keras(built(keras.layers.LSTM(3, activation="gelu")))
    with pytest.raises(ValueError, match=r"recurrent_activation='softsign' is not supported"):
        convert.from_keras(built(keras.layers.LSTM(3, recurrent_activation="softsign")))
    with pytest.raises(ValueError, match=r"merge_mode must be 'concat' .* got 'sum'"):
        convert.from_keras(built(keras.layers.Bidirectional(keras.layers.LSTM(3),
                                                             merge_mode="sum")))
    with pytest.raises(TypeError, match=r"must be a Keras LSTM or Bidirectional\(LSTM\) "
                                        r"layer, got GRU"):
        convert.from_keras(built(keras.layers.GRU(3)))
    with pytest.raises(ValueError, match=r"the Keras LSTM layer has no weights yet"):
        convert.from_keras(keras.layers.LSTM(3))
    # Training-only and initialisation options are accepted.
    m = convert.from_keras(built(keras.layers.LSTM(3, dropout=0.5, recurrent_dropout=0.2,
                                                   unit_forget_bias=False, unroll=True)))
    assert m.hidden_size == 3 and m.dropout == 0.0

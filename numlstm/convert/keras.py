"""Keras -> numlstm: a Keras LSTM layer (or Bidirectional(LSTM)) or its weights.

Keras computes, with kernel (I, 4U), recurrent_kernel (U, 4U), bias (4U,),
its gates in the order i, f, c, o (c is PyTorch's g):

    z = x_t @ kernel + h_{t-1} @ recurrent_kernel + bias
    i, f, c, o = split(z, 4);  c_t = σ(f) c_{t-1} + σ(i) tanh(c);  h_t = σ(o) tanh(c_t)

which is numlstm's cell with ``weight_ih = kernel.T``, ``weight_hh =
recurrent_kernel.T``, ``bias_ih = bias`` and ``bias_hh = 0``. Keras itself is
never imported here: a layer is read through ``get_config()`` and
``get_weights()``.
"""

import sys

import numpy as np

from numlstm.convert._common import check_dtype

# Keras activation name -> numlstm spec. Keras 3's hard_sigmoid is
# relu6(x + 3) / 6 (slope 1/6); Keras 2's was 0.2 x + 0.5.
_KERAS_ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu",
                      "linear": ("affine", 1.0, 0.0)}


def _activation_name(value):
    """'tanh' for 'tanh', keras.activations.tanh, or a serialized dict."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        cfg = value.get("config", value)
        if isinstance(cfg, str):
            return cfg
        return cfg.get("name", value.get("class_name", repr(value)))
    return getattr(value, "__name__", repr(value))


def _keras_activation(value, key, where):
    """numlstm's spec of a Keras activation (a name, a function or its
    serialized form); ValueError for one numlstm's cell does not have."""
    name = _activation_name(value)
    if name == "hard_sigmoid":
        keras = sys.modules.get("keras")
        version = getattr(keras, "__version__", "3")
        return ("hard_sigmoid", 0.2 if version.split(".")[0] in ("1", "2") else 1 / 6, 0.5)
    if name not in _KERAS_ACTIVATIONS:
        raise ValueError(f"{where}: {key}={name!r} is not supported: numlstm's cells take "
                         f"{sorted(_KERAS_ACTIVATIONS) + ['hard_sigmoid']}")
    return _KERAS_ACTIVATIONS[name]


def _check_config(cfg, where):
    """The options that change the math, checked: (time_major, go_backwards,
    activations (f, g, h) for numlstm's cell)."""
    f = _keras_activation(cfg.get("recurrent_activation", "sigmoid"), "recurrent_activation",
                          where)
    g = _keras_activation(cfg.get("activation", "tanh"), "activation", where)
    return (bool(cfg.get("time_major", False)), bool(cfg.get("go_backwards", False)),
            (f, g, g))


def _convert_weights(weights, argname, dtype):
    """[kernel (I, 4U), recurrent_kernel (U, 4U), bias (4U,) or (8U,)] ->
    (I, U, params of one direction without suffix, has_bias)."""
    if not isinstance(weights, (list, tuple)) or len(weights) not in (2, 3):
        raise ValueError(f"{argname} must be a list [kernel (I, 4U), recurrent_kernel "
                         f"(U, 4U), bias (4U,)] (bias optional), got "
                         f"{type(weights).__name__}"
                         + (f" of length {len(weights)}" if hasattr(weights, "__len__") else ""))
    arrays = [np.asarray(w) for w in weights]
    for k, a in enumerate(arrays):
        if a.dtype.kind != "f":
            raise TypeError(f"{argname}[{k}] must be a floating-point array, got dtype "
                            f"{a.dtype}")
    kernel, recurrent = arrays[0], arrays[1]
    if recurrent.ndim != 2 or recurrent.shape[1] != 4 * recurrent.shape[0] \
            or recurrent.shape[0] == 0:
        raise ValueError(f"{argname}[1] (recurrent_kernel) must have shape (U, 4U), got "
                         f"{recurrent.shape}")
    U = recurrent.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 4 * U or kernel.shape[0] == 0:
        raise ValueError(f"{argname}[0] (kernel) must have shape (I, {4 * U}) for units={U}, "
                         f"got {kernel.shape}")
    params = {"weight_ih": kernel.T.astype(dtype), "weight_hh": recurrent.T.astype(dtype)}
    if len(arrays) == 3:
        bias = arrays[2]
        if bias.shape == (4 * U,):  # Keras: one bias
            params["bias_ih"] = bias.astype(dtype)
            params["bias_hh"] = np.zeros(4 * U, dtype)
        elif bias.shape == (8 * U,):  # CuDNNLSTM: input and recurrent biases
            params["bias_ih"] = bias[:4 * U].astype(dtype)
            params["bias_hh"] = bias[4 * U:].astype(dtype)
        else:
            raise ValueError(f"{argname}[2] (bias) must have shape ({4 * U},) for "
                             f"units={U}, got {bias.shape}")
    return kernel.shape[0], U, params, len(arrays) == 3


def from_keras(layer_or_weights, *, dtype=np.float32, batch_first=None):
    """A numlstm.LSTM with the weights of a Keras LSTM.

    Parameters
    ----------
    layer_or_weights : keras LSTM layer, keras Bidirectional(LSTM) layer, or list
        A built layer (anything with ``get_config()`` and ``get_weights()``:
        Keras 2 or 3, any backend), or the weights list ``[kernel (I, 4U),
        recurrent_kernel (U, 4U), bias (4U,)]`` (bias absent when
        ``use_bias=False``; an (8U,) bias, as CuDNNLSTM stores it, is split
        into ``bias_ih`` and ``bias_hh``).
    dtype : np.float32 or np.float64
    batch_first : bool, optional
        Default True: Keras takes (B, T, I) batches (False for a Keras 2
        layer with ``time_major=True``).

    What maps: ``units``; ``use_bias``; ``recurrent_activation`` (the i, f,
    o gates) and ``activation`` (the cell input and output): "sigmoid",
    "tanh", "relu", "hard_sigmoid" (Keras 3's relu6(x + 3) / 6, Keras 2's
    0.2 x + 0.5) and "linear", as numlstm's ``activations``;
    ``go_backwards=True`` -> ``reverse=True`` (Keras returns that layer's
    outputs in its own, reversed, order: its ``y[:, k]`` is numlstm's
    ``y[:, T - 1 - k]``; masked Keras inputs are not mapped);
    ``Bidirectional(LSTM(...), merge_mode='concat')`` -> ``bidirectional=True``.
    Options with nothing to map for converted weights are accepted and
    ignored: initializers (``unit_forget_bias`` included), regularizers,
    constraints, ``dropout`` / ``recurrent_dropout`` (training only),
    ``unroll``, ``implementation``, ``use_cudnn``, ``stateful`` (carry the
    state yourself: ``model(x, (h, c))``). ``return_sequences`` and
    ``return_state`` select outputs: numlstm returns them all
    (``y, (h_n, c_n)``; Keras' last output is ``h_n[-1]``).
    A Keras mask of right-padded sequences corresponds to ``lengths``
    (Keras' padded outputs repeat the last valid output unless
    ``zero_output_for_mask``; numlstm's are zero).

    Rejected (ValueError): other activations, Bidirectional merge modes other
    than 'concat' or whose two layers differ in activations, other layer
    types.
    """
    from numlstm.lstm import LSTM

    dtype = check_dtype(dtype)
    if isinstance(layer_or_weights, (list, tuple)):
        I, U, params, bias = _convert_weights(layer_or_weights, "layer_or_weights", dtype)
        state = {f"{k}_l0": v for k, v in params.items()}
        model = LSTM(I, U, bias=bias, batch_first=True if batch_first is None else batch_first,
                     dtype=dtype)
        model.load_state_dict(state)
        return model
    if not (hasattr(layer_or_weights, "get_config") and hasattr(layer_or_weights,
                                                                "get_weights")):
        raise TypeError("layer_or_weights must be a Keras LSTM layer or a weights list "
                        f"[kernel, recurrent_kernel, bias], got "
                        f"{type(layer_or_weights).__name__}")
    layer = layer_or_weights
    kind = type(layer).__name__
    if not layer.get_weights():
        raise ValueError(f"layer_or_weights: the Keras {kind} layer has no weights yet (not "
                         "built): call it on an input, or build() it, first")
    if kind == "Bidirectional":
        cfg = layer.get_config()
        if cfg.get("merge_mode", "concat") != "concat":
            raise ValueError("layer_or_weights: Bidirectional merge_mode must be 'concat' "
                             f"(numlstm concatenates the directions), got "
                             f"{cfg.get('merge_mode')!r}")
        fwd, bwd = layer.forward_layer, layer.backward_layer
        for sub in (fwd, bwd):
            if type(sub).__name__ != "LSTM":
                raise TypeError("layer_or_weights: Bidirectional must wrap LSTM layers, got "
                                f"{type(sub).__name__}")
        fcfg, bcfg = fwd.get_config(), dict(bwd.get_config())
        if not bcfg.get("go_backwards", False):
            raise ValueError("layer_or_weights: the Bidirectional backward layer must have "
                             "go_backwards=True")
        time_major, _, activations = _check_config(fcfg, "Bidirectional forward_layer")
        _, _, back_activations = _check_config(bcfg, "Bidirectional backward_layer")
        if back_activations != activations:
            raise ValueError("layer_or_weights: Bidirectional directions must use the same "
                             "activations (a numlstm model's cell options are shared by its "
                             f"directions), got {activations} and {back_activations}")
        reverse = False  # the backward layer is numlstm's reverse direction
        I, U, pf, bias = _convert_weights(fwd.get_weights(), "forward_layer.get_weights()",
                                          dtype)
        I2, U2, pb, bias2 = _convert_weights(bwd.get_weights(),
                                             "backward_layer.get_weights()", dtype)
        if (I2, U2, bias2) != (I, U, bias):
            raise ValueError("layer_or_weights: Bidirectional directions must have the same "
                             f"input size, units and use_bias, got {(I, U, bias)} and "
                             f"{(I2, U2, bias2)}")
        state = {f"{k}_l0": v for k, v in pf.items()}
        state.update({f"{k}_l0_reverse": v for k, v in pb.items()})
        bidirectional = True
    elif kind == "LSTM":
        time_major, reverse, activations = _check_config(layer.get_config(),
                                                         "layer_or_weights (Keras LSTM)")
        I, U, params, bias = _convert_weights(layer.get_weights(), "layer.get_weights()",
                                              dtype)
        state = {f"{k}_l0": v for k, v in params.items()}
        bidirectional = False
    else:
        raise TypeError("layer_or_weights must be a Keras LSTM or Bidirectional(LSTM) "
                        f"layer, got {kind}")
    if batch_first is None:
        batch_first = not time_major
    model = LSTM(I, U, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                 dtype=dtype, reverse=reverse, activations=activations)
    model.load_state_dict(state)
    return model

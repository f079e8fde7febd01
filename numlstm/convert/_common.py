"""Helpers shared by the converters (no framework imports)."""

import numpy as np
import scipy.sparse as sp


def check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def dense_state(model):
    """The model's state dict with every weight dense (sparse and quantized
    weights densified; ``state_dict`` already dequantizes)."""
    return {name: (np.asarray(v.toarray()) if sp.issparse(v) else np.asarray(v))
            for name, v in model.state_dict().items()}


def check_model(model, argname="model"):
    from numlstm.lstm import LSTM

    if not isinstance(model, LSTM):
        raise TypeError(f"{argname} must be a numlstm.LSTM, got {type(model).__name__}")
    return model


def config_from_state(state, argname):
    """Infer (input_size, hidden_size, num_layers, bias, bidirectional, proj_size)
    from PyTorch-named parameter shapes; raise naming what is missing."""
    def shape(key):
        return tuple(getattr(state[key], "shape", ()))

    if "weight_ih_l0" not in state or "weight_hh_l0" not in state:
        raise KeyError(f"{argname} must hold PyTorch LSTM parameters (weight_ih_l0, "
                       f"weight_hh_l0, ...), got keys {sorted(state)[:8]}")
    dims = shape("weight_ih_l0")
    if len(dims) != 2 or dims[0] % 4 or dims[0] == 0:
        raise ValueError(f"{argname}['weight_ih_l0'] must have shape (4*H, I), got {dims}")
    I, H = dims[1], dims[0] // 4
    L = 0
    while f"weight_ih_l{L}" in state:
        L += 1
    bidirectional = "weight_ih_l0_reverse" in state
    bias = "bias_ih_l0" in state
    P = 0
    if "weight_hr_l0" in state:
        dims = shape("weight_hr_l0")
        if len(dims) != 2:
            raise ValueError(f"{argname}['weight_hr_l0'] must have shape (P, H), got {dims}")
        P = dims[0]
    return I, H, L, bias, bidirectional, P

"""PyTorch <-> numlstm: torch.nn.LSTM, torch.nn.LSTMCell and their state dicts.

PyTorch's names, shapes and gate order (i, f, g, o) are numlstm's own, so the
weights copy across unchanged; only the tensors become NumPy arrays.
torch is imported inside the functions (an optional dependency).
"""

from collections.abc import Mapping

import numpy as np

from numlstm.convert._common import check_dtype, check_model, config_from_state, dense_state

_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _to_numpy(value, name):
    """A torch tensor, NumPy array or scipy sparse matrix -> NumPy / scipy."""
    import scipy.sparse as sp

    if sp.issparse(value) or isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        t = value.detach()
        if getattr(t, "is_meta", False):  # torch's own error ("Cannot copy out...") hides why
            raise ValueError(f"state[{name!r}] is a meta tensor, which holds no values: "
                             "save the state dict of a module whose weights are loaded, "
                             "not one built on the 'meta' device")
        torch = _torch()
        if t.layout != torch.strided:  # sparse tensors: densify
            t = t.to_dense()
        if t.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
            t = t.float()
        return t.cpu().numpy()
    raise TypeError(f"state[{name!r}] must be a torch tensor or NumPy array, "
                    f"got {type(value).__name__}")


def _torch():
    import torch

    return torch


def from_torch(obj, *, dtype=np.float32, batch_first=None, dropout=None):
    """A numlstm.LSTM with the weights of a PyTorch LSTM.

    Parameters
    ----------
    obj : torch.nn.LSTM, torch.nn.LSTMCell, or a state dict
        A module's configuration (``input_size``, ``hidden_size``,
        ``num_layers``, ``bias``, ``batch_first``, ``dropout``,
        ``bidirectional``, ``proj_size``) is copied. An ``LSTMCell`` becomes
        a one-layer LSTM (run it over a (1, B, I) sequence, or step it with
        ``model.stream``). A state dict (``module.state_dict()``: names to
        tensors or NumPy arrays, ``nn.LSTM``'s ``weight_ih_l0``... or
        ``nn.LSTMCell``'s ``weight_ih``...) gives the sizes, layer count,
        ``bias``, ``bidirectional`` and ``proj_size`` through its keys and
        shapes; ``batch_first`` and ``dropout`` are not in it and come from
        the keyword arguments (default False and 0.0).
    dtype : np.float32 or np.float64
        The model's dtype; the weights are cast to it.
    batch_first, dropout : optional
        Override the module's setting (or give it, for a state dict).

    Sparse torch tensors are not expected; one would be densified.
    """
    from numlstm.lstm import LSTM

    dtype = check_dtype(dtype)
    if isinstance(obj, Mapping):
        state = {k: _to_numpy(v, k) for k, v in obj.items()}
        module_cfg = {}
        argname = "obj (a state dict)"
    else:
        torch = _torch()
        if isinstance(obj, torch.nn.LSTMCell):
            state = {k: _to_numpy(v, k) for k, v in obj.state_dict().items()}
            module_cfg = {}
        elif isinstance(obj, torch.nn.LSTM):
            state = {k: _to_numpy(v, k) for k, v in obj.state_dict().items()}
            module_cfg = dict(batch_first=obj.batch_first, dropout=float(obj.dropout))
        else:
            raise TypeError("obj must be a torch.nn.LSTM, torch.nn.LSTMCell or a state "
                            f"dict of one, got {type(obj).__name__}")
        argname = f"obj ({type(obj).__name__})"
    if "weight_ih" in state:  # an LSTMCell's names: one layer, no suffix
        unexpected = sorted(set(state) - set(_CELL_KEYS))
        if unexpected:
            raise KeyError(f"{argname} has LSTMCell keys {list(_CELL_KEYS)} mixed with "
                           f"unexpected keys {unexpected}")
        state = {f"{k}_l0": v for k, v in state.items()}
    I, H, L, bias, bidirectional, P = config_from_state(state, argname)
    if batch_first is None:
        batch_first = module_cfg.get("batch_first", False)
    if dropout is None:
        dropout = module_cfg.get("dropout", 0.0)
    model = LSTM(I, H, L, bias=bias, batch_first=batch_first, dropout=dropout,
                 bidirectional=bidirectional, proj_size=P, dtype=dtype)
    model.load_state_dict(state)
    return model


def to_torch(model):
    """A torch.nn.LSTM with ``model``'s configuration and weights.

    Sparse (CSR, BSR) weights are densified and quantized ones dequantized;
    the module's dtype is the model's (float32 or float64).
    """
    torch = _torch()
    check_model(model)
    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    module = torch.nn.LSTM(model.input_size, model.hidden_size, model.num_layers,
                           bias=model.bias, batch_first=model.batch_first,
                           dropout=model.dropout, bidirectional=model.bidirectional,
                           proj_size=model.proj_size, dtype=dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=model.dtype))
             for k, v in dense_state(model).items()}
    module.load_state_dict(state)
    return module

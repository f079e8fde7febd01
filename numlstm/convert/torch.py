"""PyTorch <-> numlstm: torch.nn.LSTM, torch.nn.LSTMCell and their state dicts.

PyTorch's names, shapes and gate order (i, f, g, o) are numlstm's own, so the
weights copy across unchanged; only the tensors become NumPy arrays.
torch is imported inside the functions (an optional dependency).
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from numlstm.convert._common import check_dtype, check_model, config_from_state, dense_state

_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _SparseVector(NamedTuple):
    """A sparse torch vector's parts (a bias: dense in the model), densified only
    once its length is checked against the model's (``_dense_vector``)."""

    indices: np.ndarray  # (nnz,) int64
    values: np.ndarray  # (nnz,)
    shape: tuple  # (n,)


def _array(t):
    """A strided torch tensor as a NumPy array (half precisions as float32)."""
    torch = _torch()
    if t.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
        t = t.float()
    return t.cpu().numpy()


def _to_numpy(value, name):
    """A torch tensor, NumPy array or scipy sparse matrix -> NumPy / scipy.

    A sparse torch matrix becomes the scipy array of its layout (COO, CSR,
    CSC, BSR) built from its own index and value arrays, never densified:
    a file of a few KB can declare a sparse (4H, I) tensor of any size, and
    the model keeps it sparse (CSR, or BSR for BSR). torch checks no sparse
    invariants by default, so no torch operation runs on its indices; the
    model checks them (``weights.from_value``). A sparse vector (a bias)
    comes back as a ``_SparseVector``. ValueError naming the key for sparse
    layouts and shapes the model cannot hold.
    """
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
        if t.layout == torch.strided:
            return _array(t)
        return _sparse(t, name, torch, sp)
    raise TypeError(f"state[{name!r}] must be a torch tensor or NumPy array, "
                    f"got {type(value).__name__}")


def _sparse(t, name, torch, sp):
    """A sparse torch tensor as scipy sparse (a matrix) or a ``_SparseVector``."""
    shape = tuple(t.shape)
    layout = str(t.layout).removeprefix("torch.")
    if t.layout == torch.sparse_coo:
        if t.dense_dim() or t.sparse_dim() not in (1, 2):
            raise ValueError(f"state[{name!r}] is a sparse COO tensor of {t.sparse_dim()} "
                             f"sparse and {t.dense_dim()} dense dimensions, shape {shape}; "
                             "an LSTM parameter is a matrix or a vector")
        coords = [_array(i) for i in t._indices()]  # uncoalesced: duplicates are summed
        values = _array(t._values())
        if len(shape) == 1:
            return _SparseVector(coords[0], values, shape)
        return _scipy(sp.coo_array, (values, tuple(coords)), shape, name, layout)
    parts = {torch.sparse_csr: ("crow_indices", "col_indices", sp.csr_array),
             torch.sparse_csc: ("ccol_indices", "row_indices", sp.csc_array),
             torch.sparse_bsr: ("crow_indices", "col_indices", sp.bsr_array)}
    if t.layout not in parts or len(shape) != 2:
        raise ValueError(f"state[{name!r}] is a {layout} tensor of shape {shape}; sparse "
                         "parameters must be 2-D sparse_coo, sparse_csr, sparse_csc or "
                         "sparse_bsr (or dense)")
    ptr_name, idx_name, kind = parts[t.layout]
    values = _array(t.values())
    if values.ndim != (3 if t.layout == torch.sparse_bsr else 1):  # hybrid tensors
        raise ValueError(f"state[{name!r}] is a hybrid {layout} tensor (values of shape "
                         f"{values.shape}); an LSTM weight holds one number per entry")
    indptr, indices = _array(getattr(t, ptr_name)()), _array(getattr(t, idx_name)())
    return _scipy(kind, (values, indices, indptr), shape, name, layout)


def _scipy(kind, arrays, shape, name, layout):
    """``kind(arrays, shape=shape)``, its complaint about the arrays naming the key."""
    try:
        return kind(arrays, shape=shape)
    except ValueError as e:
        raise ValueError(f"state[{name!r}] is not a valid {layout} tensor: {e}") from None


def _dense_vector(v, name, shape):
    """A ``_SparseVector`` as a dense array, once its shape is the model's
    ``shape`` (so it costs what the model stores); ValueError naming the key."""
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"state[{name!r}] must have shape {tuple(shape)}, got a sparse "
                         f"tensor of shape {tuple(v.shape)}")
    if v.indices.size and (v.indices.min() < 0 or v.indices.max() >= shape[0]):
        raise ValueError(f"state[{name!r}]: sparse indices must lie in [0, {shape[0]}), got "
                         f"[{v.indices.min()}, {v.indices.max()}]")
    dense = np.zeros(shape, v.values.dtype)  # an integer one is refused like a dense one
    np.add.at(dense, v.indices, v.values)  # uncoalesced: duplicates are summed
    return dense


def _torch():
    from numlstm._optional import require

    # No extra installs torch (the bench extra pins a build): name the package.
    return require("torch", None, "numlstm.convert.from_torch / to_torch")


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

    Sparse torch weights (COO, CSR, CSC, BSR) stay sparse: the model stores
    them as CSR (BSR as BSR), and nothing of their dense size is allocated;
    sparse biases become dense once their shape is checked. The model is
    built without a random initialisation, so converting costs what the
    converted model holds.
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
    # Its parameters are the state's: a random initialisation would allocate every
    # weight dense, whatever the state holds.
    model = LSTM.without_params(input_size=I, hidden_size=H, num_layers=L, bias=bias,
                                batch_first=batch_first, dropout=dropout,
                                bidirectional=bidirectional, proj_size=P, dtype=dtype)
    shapes = model.param_shapes()
    for k, v in state.items():
        if isinstance(v, _SparseVector):
            if k not in shapes:  # reported with the other keys by load_state_dict
                continue
            state[k] = _dense_vector(v, k, shapes[k])
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

"""Input checks, written once for every backend (docs/design.md, Errors and files).

The public boundary validates; kernels trust their inputs. The model, the
engine, streams, ``tbptt``, ``memory`` and ``layers`` all call these, so
each message (argument, what was expected, what came) is written once.

Glossary: T time steps, B batch, I input features, H hidden, O = P or H,
L layers, D directions. ``model`` below is anything with the LSTM's
configuration attributes (``input_size``, ``hidden_size``, ``output_size``,
``num_layers``, ``num_directions``, ``batch_first``, ``bidirectional``,
``dtype``). This module imports nothing from numlstm but ``weights``'s array
check, and neither numba.cuda nor a GPU library.
"""

import math

import numpy as np

from numlstm.weights import check_float_array

# Bounds on a configuration, so that a typo or a forged file header fails at
# once with a clear message instead of looping or allocating without end.
# Sizes index int32 CSR columns; 1 TiB of parameters is beyond any machine
# this runs on.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 10_000
MAX_PARAM_BYTES = 2**40
# The same bound on the state buffers a stream (batch_size rows) or a stream
# pool (capacity slots) allocates when it is made: a size past it is refused
# by name before NumPy's shape arithmetic overflows int64 or a huge block is
# asked for.
MAX_BUFFER_BYTES = 2**40


def check_int(value, name, low, high=None):
    """``value`` as an int in [low, high]; TypeError for a non-int (bools
    included), ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return int(value)


def check_bool(value, name):
    """A bool (Python's or NumPy's): a truthy string such as "false" is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")
    return bool(value)


def is_device_array(a):
    """Whether ``a`` lives on a GPU: a numba device array (or the simulator's),
    or any object exposing ``__cuda_array_interface__``. Imports nothing."""
    if isinstance(a, np.ndarray):
        return False
    return bool(getattr(a, "__cuda_ndarray__", False)) or \
        hasattr(a, "__cuda_array_interface__")


def refuse_device_arrays(**args):
    """A CPU model refuses GPU arrays (numba's would silently copy to the host).
    ``x`` / ``dy`` are one array each; ``state`` / ``dstate`` a pair, or None."""
    for name, value in args.items():
        pair = name in ("state", "dstate") and isinstance(value, (tuple, list))
        for i, a in enumerate(value if pair else (value,)):
            if is_device_array(a):
                label = f"{name}[{i}]" if pair else name
                raise TypeError(f"{label} is a CUDA device array ({type(a).__name__}), but "
                                "the model is on the CPU: call model.to('cuda') first, or "
                                "pass a NumPy array")


def x_layout(model, width):
    """The batched layout of an input of ``width`` features, for messages."""
    return f"(B, T, {width})" if model.batch_first else f"(T, B, {width})"


def check_x_shape(model, shape):
    """Check an input's shape; return whether it is unbatched (T, I)."""
    I = model.input_size
    if len(shape) == 2:
        if shape[1] != I or shape[0] < 1:
            raise ValueError(f"x must have shape (T, {I}) or {x_layout(model, I)} for "
                             f"input_size={I}, got {tuple(shape)}")
        return True
    if len(shape) != 3 or shape[2] != I or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"x must have shape {x_layout(model, I)} for input_size={I}, "
                         f"got {tuple(shape)}")
    return False


def check_x(model, x):
    """A host input as time-major (T, B, I) (a view, not converted), and
    whether it was unbatched (T, I)."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"x must be a floating-point array, got dtype {arr.dtype}")
    if check_x_shape(model, arr.shape):
        return arr[:, None, :], True
    return (arr.transpose(1, 0, 2) if model.batch_first else arr), False


def state_shapes(model, B, unbatched):
    """Shapes of (h, c) as the caller passes them: (D*L, B, O), (D*L, B, H),
    or without the batch axis when unbatched."""
    DL = model.num_directions * model.num_layers
    if unbatched:
        return (DL, model.output_size), (DL, model.hidden_size)
    return (DL, B, model.output_size), (DL, B, model.hidden_size)


def check_state_pair(state, what):
    """``state`` must be a pair (h, c)."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{what} must be a tuple (h, c), got {type(state).__name__}")


def check_state(model, state, B, unbatched, what="state"):
    """A host state as contiguous (D*L, B, O), (D*L, B, H) arrays (zeros when
    None)."""
    DL, O, H = model.num_directions * model.num_layers, model.output_size, model.hidden_size
    if state is None:
        return np.zeros((DL, B, O), model.dtype), np.zeros((DL, B, H), model.dtype)
    check_state_pair(state, what)
    out = []
    for i, (arr, shape, label) in enumerate(zip(state, state_shapes(model, B, unbatched),
                                                ("h", "c"), strict=True)):
        arr = check_float_array(arr, f"{what}[{i}] ({label})", shape, model.dtype)
        out.append(arr.reshape(DL, B, shape[-1]))
    return out[0], out[1]


def check_lengths(lengths, T, B, unbatched):
    """Host ``lengths`` as int64 (B,) in [1, T] (all T when None)."""
    if lengths is None:
        return np.full(B, T, np.int64)
    if unbatched:
        raise ValueError("lengths needs batched input x of shape (T, B, I)")
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) for batch size {B}, got {arr.shape}")
    if arr.size and (arr.min() < 1 or arr.max() > T):
        raise ValueError(f"lengths must lie in [1, {T}] for T={T}, got values in "
                         f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def dy_shape(model, T, B, unbatched):
    """The shape ``backward`` expects of dy: like the forward's y."""
    DO = model.num_directions * model.output_size
    if unbatched:
        return (T, DO)
    return (B, T, DO) if model.batch_first else (T, B, DO)


def check_dy(model, dy, T, B, unbatched):
    """A host dy as a time-major (T, B, D*O) array (a view when batch_first)."""
    arr = check_float_array(dy, "dy", dy_shape(model, T, B, unbatched), model.dtype)
    if unbatched:
        return arr[:, None, :]
    return arr.transpose(1, 0, 2) if model.batch_first else arr


def check_checkpoint(checkpoint, T, training):
    """The checkpoint segment length (<= T) that ``checkpoint`` asks for, or None."""
    if checkpoint is None:
        return None
    msg = f'checkpoint must be None, "auto" or an int >= 1, got {checkpoint!r}'
    if isinstance(checkpoint, str):
        if checkpoint != "auto":
            raise ValueError(msg)
        k = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    elif isinstance(checkpoint, bool) or not isinstance(checkpoint, (int, np.integer)):
        raise TypeError(msg)
    elif checkpoint < 1:
        raise ValueError(msg)
    else:
        k = int(checkpoint)
    if not training:
        raise ValueError(f"checkpoint={checkpoint!r} needs training=True: it decides what "
                         "a training forward keeps for backward")
    return min(k, T)


def check_memory_budget(memory_budget, checkpoint, training):
    """``memory_budget`` as an int, when it may be used with these options."""
    budget = check_int(memory_budget, "memory_budget", 1)
    if not training:
        raise ValueError(f"memory_budget={budget} needs training=True: it decides what a "
                         "training forward keeps for backward")
    if checkpoint is not None:
        raise ValueError(f"pass checkpoint or memory_budget, not both: got "
                         f"checkpoint={checkpoint!r}, memory_budget={budget}")
    return budget


def check_out_array(out, shape, dtype):
    """Refuse an ``out`` that a step's output (``shape``, ``dtype``) cannot be
    written into: not a NumPy array, another shape or dtype, not C-contiguous,
    read-only. (Whether it overlaps the caller's own buffers is the caller's
    check.)"""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array of shape {shape} and dtype "
                        f"{dtype.name}, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype.name} like the model, got "
                        f"{out.dtype.name}")
    if not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous, got strides {out.strides}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")


def check_stream_args(model, batch_size):
    """The batch size a stream of ``model`` gets, as an int; ValueError for a
    bidirectional or reverse model or a batch size that is not a positive int."""
    if model.bidirectional or model.reverse:
        what = "bidirectional" if model.bidirectional else "reverse"
        raise ValueError(f"a {what} model cannot stream: its reverse direction "
                         "needs the whole sequence; use forward() instead")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return check_state_rows(model, int(batch_size), "batch_size", "a stream")


def check_state_rows(model, rows, name, what):
    """``rows`` (an int >= 1: a stream's batch size, a pool's capacity) when the
    h and c of every layer for that many rows fit ``MAX_BUFFER_BYTES``; else
    ValueError naming ``name``. Counted in exact Python ints; the states are
    a lower bound of what ``what`` allocates, so nothing that passes wraps."""
    row_bytes = model.num_layers * (model.output_size + model.hidden_size) \
        * np.dtype(model.dtype).itemsize
    nbytes = rows * row_bytes
    if nbytes > MAX_BUFFER_BYTES:
        raise ValueError(f"{name}={rows} asks {what} of this model for at least {nbytes:,} "
                         f"bytes of state (h and c of {model.num_layers} layer(s), "
                         f"{row_bytes:,} bytes a row); numlstm allocates at most "
                         f"{MAX_BUFFER_BYTES / 2**40:g} TiB for them")
    return rows

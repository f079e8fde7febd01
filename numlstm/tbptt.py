"""Truncated backpropagation through time: train on a series of any length.

The series is cut into chunks of ``chunk`` steps. Each chunk runs a training
forward from the state the previous chunk ended in, its loss gradient is
backpropagated through that chunk only (the carried state is detached: no
gradient flows into earlier chunks), and the optimizer steps. Memory is that
of one chunk: the series is only ever sliced (views), never copied whole, so a
``np.memmap`` of 10^6 steps trains in the memory of ``chunk`` steps.

Glossary as in ``lstm.py``: T time steps, B batch, I input features, O output
width, H hidden, D*L state rows.
"""

import inspect
from numbers import Real

import numpy as np

from numlstm import checks
from numlstm.checks import check_int
from numlstm.lstm import LSTM


def truncated_bptt(model, x, loss_grad, update, *, chunk, state=None, lengths=None,
                   checkpoint=None, memory_budget=None):
    """Train ``model`` on the series ``x``, ``chunk`` steps at a time.

    For each chunk covering steps ``[start, stop)`` (the last may be shorter):

    1. ``model.zero_grad()``;
    2. ``y, new_state = model.forward(x[start:stop], state, training=True)``,
       where ``state`` is the previous chunk's final state (or ``state``);
    3. ``loss, dy = loss_grad(y, start, stop)``;
    4. ``model.backward(dy)`` (no gradient reaches the previous chunk);
    5. ``update(model)``, which sees exactly this chunk's gradients in
       ``model.grad`` / ``model.grad_arrays()``.

    Forward values are those of one untruncated forward over the whole series:
    only the gradient is truncated.

    Parameters
    ----------
    model : numlstm.LSTM
        A unidirectional model (the reverse direction of a bidirectional one
        needs the whole series before its first output).
    x : array (T, B, I), or (B, T, I) when ``model.batch_first``, or (T, I)
        The series, floating point. Sliced per chunk, never copied whole
        (a ``np.memmap`` works); another float precision is converted one
        chunk at a time.
    loss_grad : callable ``(y, start, stop) -> (loss, dy)``
        ``y`` is the chunk's output, shaped like ``forward``'s (``(stop - start,
        B, O)``, batch-first or unbatched like ``x``); it returns the chunk's
        loss (a real number) and dloss/dy shaped like ``y``. ``y`` is the
        caller's to keep.
    update : callable ``(model) -> None``
        The optimizer step, e.g. ``for n, p in model.parameters().items():
        p -= lr * model.grad_arrays()[n]``.
    chunk : int >= 1
        Steps per chunk: the truncation length and the memory bound.
    state : tuple (h0 (D*L, B, O), c0 (D*L, B, H)), optional
        Initial state, zeros when omitted ((D*L, O), (D*L, H) for (T, I) x).
    lengths : array of int (B,), optional
        Each sequence's valid length in [1, T]. A sequence past its end emits
        zeros, keeps its final state in the carried state, and adds nothing
        to the gradient, exactly as in an untruncated ``forward``.
    checkpoint, memory_budget : optional
        Passed to ``model.forward`` when given (checkpointed BPTT within each
        chunk), for models whose ``forward`` accepts them.

    Returns
    -------
    losses : float64 array (number of chunks,)
        Each chunk's loss, in order.
    state : tuple (h_n, c_n)
        The state after the last step (each sequence's last valid step),
        shaped like ``forward``'s final state.
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    if model.bidirectional:
        raise ValueError("truncated_bptt needs a unidirectional model: the reverse direction "
                         "of a bidirectional LSTM needs the whole series; got "
                         "bidirectional=True")
    for fn, name, form in ((loss_grad, "loss_grad", "(y, start, stop) -> (loss, dy)"),
                           (update, "update", "(model) -> None")):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable {form}, got {type(fn).__name__}")
    chunk = check_int(chunk, "chunk", 1)
    series = np.asarray(x)  # a view of an ndarray (memmap included), never a copy of one
    xt, unbatched = checks.check_x(model, series)  # validates; xt is a time-major view
    T, B = xt.shape[0], xt.shape[1]
    lengths = None if lengths is None else checks.check_lengths(lengths, T, B, unbatched)
    state = checks.check_state(model, state, B, unbatched)  # (D*L, B, O), (D*L, B, H)
    kwargs = _forward_kwargs(model, checkpoint=checkpoint, memory_budget=memory_budget)

    axis = 1 if model.batch_first and not unbatched else 0  # the time axis of x
    starts = range(0, T, chunk)
    losses = np.empty(len(starts), np.float64)
    for j, start in enumerate(starts):
        stop = min(start + chunk, T)
        xc = series[start:stop] if axis == 0 else series[:, start:stop]
        model.zero_grad()
        if lengths is None:
            y, new_state = model.forward(xc, _as_given(state, unbatched), training=True,
                                         **kwargs)
            ended = None
        else:
            y, new_state, ended = _forward_with_lengths(model, xc, state, lengths, start,
                                                        stop, kwargs)
        out = loss_grad(y, start, stop)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"loss_grad must return a pair (loss, dy), got "
                            f"{_describe(out)} for the chunk [{start}, {stop})")
        loss, dy = out
        if isinstance(loss, np.ndarray) and loss.shape == ():
            loss = loss[()]
        if isinstance(loss, bool) or not isinstance(loss, Real):
            raise TypeError(f"loss_grad must return a real number as loss, got "
                            f"{_describe(loss)} for the chunk [{start}, {stop})")
        if ended is not None and ended.any():
            dy = _zero_ended(model, dy, ended, y.shape)
        model.backward(dy)
        losses[j] = float(loss)
        update(model)
        state = _batched(new_state, unbatched)
    return losses, _as_given(state, unbatched)


def _forward_kwargs(model, **options):
    given = {k: v for k, v in options.items() if v is not None}
    if given:
        accepted = inspect.signature(model.forward).parameters
        missing = [k for k in given if k not in accepted]
        if missing:
            raise TypeError(f"{', '.join(missing)} needs LSTM.forward(..., "
                            f"{', '.join(f'{k}=...' for k in missing)}), which this "
                            f"numlstm's forward does not accept; got "
                            + ", ".join(f"{k}={given[k]!r}" for k in missing))
    return given


def _batched(state, unbatched):
    h, c = state
    return (h[:, None], c[:, None]) if unbatched else (h, c)


def _as_given(state, unbatched):
    h, c = state
    return (h[:, 0], c[:, 0]) if unbatched else (h, c)


def _forward_with_lengths(model, xc, state, lengths, start, stop, kwargs):
    """One chunk's training forward under per-sequence lengths.

    A sequence that ended before ``start`` has no valid step here; it runs
    one step (forward needs lengths >= 1) whose output is zeroed, whose state
    is put back, and whose dy is zeroed before backward, so it contributes
    nothing: that is, exactly what the untruncated forward does.
    """
    n = stop - start
    left = np.clip(lengths - start, 0, n)  # valid steps of each sequence in this chunk
    ended = left == 0  # (B,)
    y, (h_n, c_n) = model.forward(xc, state, lengths=np.maximum(left, 1), training=True,
                                  **kwargs)
    if ended.any():
        h_n[:, ended], c_n[:, ended] = state[0][:, ended], state[1][:, ended]
        if model.batch_first:
            y[ended, 0] = 0
        else:
            y[0, ended] = 0
    return y, (h_n, c_n), ended


def _zero_ended(model, dy, ended, shape):
    """A copy of dy whose (ignored) first step of ended sequences is zero."""
    arr = np.asarray(dy)
    if arr.dtype.kind != "f" or arr.shape != shape:
        return dy  # let backward report the bad dy
    arr = arr.astype(model.dtype, copy=True)
    if model.batch_first:
        arr[ended, 0] = 0
    else:
        arr[0, ended] = 0
    return arr


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}"[:120]

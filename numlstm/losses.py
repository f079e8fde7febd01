"""Losses returning ``(loss, gradient)``, with ``lengths`` masks for padded batches.

Both average over the valid positions: with time-major (T, B, ...) inputs and
``lengths`` (B,), step t of sequence b counts iff t < lengths[b]; padded
positions get a zero gradient. ``batch_first=True`` reads (B, T, ...).
"""

import numpy as np


def _mask(shape, lengths, batch_first, name):
    """(T, B) or (B, T) float mask of valid positions, or None for all valid."""
    if lengths is None:
        return None
    if len(shape) < 3:
        raise ValueError(f"lengths needs {name} of shape (T, B, ...) (or (B, T, ...) with "
                         f"batch_first), got {shape}")
    T, B = (shape[1], shape[0]) if batch_first else (shape[0], shape[1])
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu" or lengths.shape != (B,):
        raise ValueError(f"lengths must be {B} integers, got {lengths.dtype} {lengths.shape}")
    if B and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"lengths must lie in [0, {T}], got [{lengths.min()}, {lengths.max()}]")
    valid = np.arange(T)[:, None] < lengths[None, :]  # (T, B)
    return valid.T if batch_first else valid


def _float(value, name):
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return arr


def mse(y, target, *, lengths=None, batch_first=False):
    """Mean squared error over every valid element.

    Parameters
    ----------
    y, target : arrays of one shape (T, B, F) (or any shape without lengths)
    lengths : (B,) ints, optional

    Returns
    -------
    loss : float
    dy : array shaped like y, d loss / d y
    """
    y = _float(y, "y")
    target = _float(target, "target")
    if y.shape != target.shape:
        raise ValueError(f"target must have the shape of y {y.shape}, got {target.shape}")
    diff = y - target
    mask = _mask(y.shape, lengths, batch_first, "y")
    if mask is not None:
        diff *= mask.reshape(mask.shape + (1,) * (y.ndim - 2))
        count = mask.sum() * int(np.prod(y.shape[2:]))
    else:
        count = y.size
    count = max(int(count), 1)
    loss = float(np.vdot(diff, diff)) / count
    return loss, (2 / count) * diff


def softmax_cross_entropy(logits, targets, *, lengths=None, batch_first=False):
    """Mean cross-entropy of integer targets under softmax(logits), fused.

    Parameters
    ----------
    logits : array (..., C), e.g. (T, B, C)
    targets : int array (...), class indices in [0, C)
    lengths : (B,) ints, optional (logits then (T, B, C) or (B, T, C))

    Returns
    -------
    loss : float, in nats
    dlogits : array shaped like logits: (softmax - onehot) / count, zero where masked
    """
    logits = _float(logits, "logits")
    targets = np.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} for logits "
                         f"{logits.shape}, got {targets.shape}")
    C = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= C):
        raise ValueError(f"targets must lie in [0, {C}), got [{targets.min()}, {targets.max()}]")
    z = logits.reshape(-1, C)
    t = targets.reshape(-1)
    shifted = z - z.max(axis=1, keepdims=True)  # no overflow in exp
    logsum = np.log(np.exp(shifted).sum(axis=1))
    nll = logsum - shifted[np.arange(t.size), t]  # (N,)
    mask = _mask(logits.shape, lengths, batch_first, "logits")
    weight = np.ones(t.size, logits.dtype) if mask is None else mask.reshape(-1).astype(
        logits.dtype)
    count = max(float(weight.sum()), 1.0)
    loss = float(np.dot(nll, weight)) / count
    grad = np.exp(shifted - logsum[:, None])
    grad[np.arange(t.size), t] -= 1
    grad *= (weight / count)[:, None]
    return loss, grad.reshape(logits.shape)

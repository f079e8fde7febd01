"""``fit``: a small training loop with validation, early stopping, hooks and progress.

The loop owns only the bookkeeping; the model code stays the caller's, in a
``step(batch) -> loss`` function that runs the forward pass with
``training=True`` and the backward pass. ``fit`` zeroes the gradients before
it, optionally clips them after it, steps the optimizer, then calls the
hooks (the pruning schedule plugs in here:
``hooks=[lambda step, loss: pruner.step()]``).
"""

import math
import sys
import time

from numlstm.optim import Optimizer, clip_grad_norm


class _Progress:
    """tqdm when installed; else one line rewritten in place; nothing when silent.

    Only a terminal gets updates in place (tqdm's or ``\\r``): into a pipe or
    a log file a ``\\r`` would pile every update onto one line, so there the
    progress is plain lines, at most one per ``PLAIN_EVERY`` seconds, and one
    when the epoch ends.
    """

    PLAIN_EVERY = 10.0  # seconds between plain lines: a log stays short

    def __init__(self, total, enabled, desc, stream=None):
        self.bar, self.enabled, self.total, self.desc = None, enabled, total, desc
        self.n, self.t0 = 0, time.perf_counter()
        # Looked up per epoch, not at import: a redirected sys.stderr is honoured.
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream)
        self.last = None  # when the last plain line was written
        self.loss = math.nan
        if enabled and self.tty:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, leave=False, file=self.stream)

    def _line(self, loss):
        total = f"/{self.total}" if self.total else ""
        return (f"{self.desc} {self.n}{total}  loss {loss:.4f}  "
                f"{time.perf_counter() - self.t0:.1f} s")

    def update(self, loss):
        self.n += 1
        self.loss = loss
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and self.tty:
            self.stream.write("\r" + self._line(loss))
            self.stream.flush()
        elif self.enabled:
            now = time.perf_counter()
            if self.last is None or now - self.last >= self.PLAIN_EVERY:
                self.last = now
                self.stream.write(self._line(loss) + "\n")
                self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")
        elif self.enabled and self.n:
            self.stream.write(self._line(self.loss) + "  (done)\n")
            self.stream.flush()


def _isatty(stream):
    """Whether ``stream`` is a terminal; False for anything that cannot say."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


def fit(step, optimizer, batches, *, epochs=1, validate=None, patience=None, min_delta=0.0,
        restore_best=True, clip=None, hooks=(), progress=True, log=None):
    """Train for ``epochs`` passes over ``batches``.

    Parameters
    ----------
    step : callable(batch) -> float
        Forward (``training=True``) and backward of one batch; returns its loss.
    optimizer : numlstm.optim.Optimizer
        Its modules are the ones zeroed, clipped, stepped and (early stopping)
        restored.
    batches : iterable, or callable() -> iterable
        The batches of one epoch; a callable is called once per epoch (for
        reshuffling), a plain iterable must be re-iterable (a list).
    epochs : int
    validate : callable() -> float, optional
        Validation loss, evaluated after every epoch.
    patience : int, optional
        Stop after this many epochs without a validation improvement larger
        than ``min_delta`` (needs ``validate``).
    restore_best : bool
        With ``validate``: reload the parameters of the best epoch at the end.
    clip : float, optional
        Global gradient-norm clipping before each optimizer step.
    hooks : iterable of callable(step_index, loss)
        Called after every optimizer step.
    progress : bool
        A progress bar on stderr: on a terminal, tqdm if installed, else one
        line rewritten in place; into a pipe or file, plain lines (one every
        10 s at most, and one at the end of each epoch).
    log : callable(str), optional
        Receives one summary line per epoch.

    Returns
    -------
    dict
        ``train_loss`` and ``valid_loss`` (per epoch), ``steps``,
        ``best_epoch``, ``stopped_early``.
    """
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a numlstm.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if patience is not None and (validate is None or isinstance(patience, bool)
                                 or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be an int >= 1 and needs validate, got {patience!r}")
    hooks = list(hooks)
    if not all(callable(h) for h in hooks):
        raise TypeError("hooks must be callables hook(step_index, loss)")
    history = {"train_loss": [], "valid_loss": [], "steps": 0, "best_epoch": None,
               "stopped_early": False}
    best, best_state, waited = math.inf, None, 0
    for epoch in range(epochs):
        epoch_batches = batches() if callable(batches) else batches
        total = len(epoch_batches) if hasattr(epoch_batches, "__len__") else None
        bar = _Progress(total, progress, f"epoch {epoch + 1}/{epochs}")
        losses = []
        try:
            for batch in epoch_batches:
                optimizer.zero_grad()
                loss = float(step(batch))
                if clip is not None:
                    clip_grad_norm(optimizer.modules, clip)
                optimizer.step()
                for hook in hooks:
                    hook(history["steps"], loss)
                history["steps"] += 1
                losses.append(loss)
                bar.update(loss)
        finally:
            bar.close()
        history["train_loss"].append(sum(losses) / max(len(losses), 1))
        line = f"epoch {epoch + 1}: train {history['train_loss'][-1]:.4f}"
        if validate is not None:
            v = float(validate())
            history["valid_loss"].append(v)
            line += f"  valid {v:.4f}"
            if v < best - min_delta:
                best, waited, history["best_epoch"] = v, 0, epoch
                if restore_best:
                    best_state = [m.state_dict() for m in optimizer.modules]
            else:
                waited += 1
        if log is not None:
            log(line)
        if patience is not None and waited >= patience:
            history["stopped_early"] = True
            break
    if best_state is not None:
        for m, state in zip(optimizer.modules, best_state, strict=True):
            m.load_state_dict(state)
    return history

"""Optimizers that update parameters in place: SGD (momentum, Nesterov), Adam, AdamW;
global-norm gradient clipping; learning-rate schedules.

An optimizer works on *modules*: anything with ``parameters()`` and
``grad_arrays()`` returning dicts of live arrays with the same keys and
shapes (``numlstm.LSTM``, ``numlstm.layers.Linear``, ``Embedding``). A CSR or
BSR weight contributes its stored values (``.data``), so the optimizer state
of a sparse weight is shaped like ``.data`` and only kept weights move.

The arrays are looked up again at every step, so a module whose weights were
re-stored (``load_state_dict``, pruning) is picked up; per-value state then
must follow the new pattern: pass the pruner's ``positions`` to ``remap``
(``GradualPruner(..., on_prune=optimizer.remap)`` does it), or call ``reset``.
The updates follow ``torch.optim`` exactly (same defaults and formulas).

Parameters on a GPU (a model after ``to("cuda")``: device arrays) are updated
there by the kernels of ``numlstm.kernels.cuda_optim``, same formulas, with
optimizer state allocated on the device; the choice is made per array.
"""

import math

import numpy as np


def _modules(modules):
    mods = list(modules) if isinstance(modules, (list, tuple)) else [modules]
    for m in mods:
        if not (callable(getattr(m, "parameters", None))
                and callable(getattr(m, "grad_arrays", None))):
            raise TypeError("modules must have parameters() and grad_arrays() (an LSTM, "
                            f"Linear or Embedding), got {type(m).__name__}")
    if not mods:
        raise ValueError("modules must not be empty")
    return mods


def _on_device(a):
    """Whether ``a`` is a GPU array (checked without importing numba.cuda)."""
    return not isinstance(a, np.ndarray) and (getattr(a, "__cuda_ndarray__", False)
                                              or hasattr(a, "__cuda_array_interface__"))


def _device_kernels():
    from numlstm.kernels import cuda_optim

    return cuda_optim


def _check_number(value, name, low=0.0, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or not value < high:
        bounds = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return float(value)


def clip_grad_norm(modules, max_norm):
    """Scale every gradient in place so that their global L2 norm is <= max_norm.

    Returns the norm before clipping (as ``torch.nn.utils.clip_grad_norm_``).
    """
    max_norm = _check_number(max_norm, "max_norm", low_open=True)
    grads = [g for m in _modules(modules) for g in m.grad_arrays().values()]
    norm = math.sqrt(sum(_device_kernels().sumsq(g) if _on_device(g) else float(np.vdot(g, g))
                         for g in grads))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            if _on_device(g):
                _device_kernels().scale(g, scale)
            else:
                g *= scale
    return norm


def cosine_schedule(lr, total_steps, *, warmup_steps=0, min_lr=0.0):
    """A learning rate per step: linear warm-up, then cosine decay to ``min_lr``.

    Returns a callable ``step -> lr`` to pass as an optimizer's ``lr``.
    """
    lr = _check_number(lr, "lr", low_open=True)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
            or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, {total_steps}), "
                         f"got {warmup_steps!r}")
    min_lr = _check_number(min_lr, "min_lr", high=lr + 1e-300)

    def schedule(step):
        """The learning rate at ``step`` (counted from 0)."""
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    return schedule


class Optimizer:
    """Base class: state per (module, parameter name), the step loop, remapping.

    Parameters
    ----------
    modules : module or list of modules
    lr : float or callable(step) -> float
        The learning rate, or a schedule evaluated at every step (step counts
        from 0).
    """

    slots = ()  # names of the per-value state arrays

    def __init__(self, modules, lr):
        self.modules = _modules(modules)
        if not callable(lr):
            _check_number(lr, "lr", low_open=True)
        self.lr = lr
        self.steps = 0
        self.state = {}  # (module index, name) -> {slot: array}

    def __repr__(self):
        lr = f"schedule {getattr(self.lr, '__name__', type(self.lr).__name__)}" \
            if callable(self.lr) else repr(self.lr)
        opts = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return (f"{type(self).__name__}({len(self.modules)} module(s), lr={lr}{opts}, "
                f"steps={self.steps})")

    def _options(self):
        """Hyperparameters other than lr, for ``repr``."""
        return {}

    def current_lr(self):
        """The learning rate the next ``step`` uses.

        Returns
        -------
        float
            ``lr``, or the schedule's value at the current step count.
        """
        return self.lr(self.steps) if callable(self.lr) else self.lr

    def zero_grad(self):
        """Zero the gradients of every module (call before each backward pass)."""
        for m in self.modules:
            m.zero_grad()

    def step(self):
        """Apply one update to every parameter, from its current gradient."""
        lr = self.current_lr()
        self.steps += 1
        for i, m in enumerate(self.modules):
            grads = m.grad_arrays()
            for name, p in m.parameters().items():
                g = grads[name]
                st = self.state.get((i, name))
                device = _on_device(p)
                if st is None:
                    zeros = _device_kernels().zeros_like if device else np.zeros_like
                    st = self.state[(i, name)] = {s: zeros(p) for s in self.slots}
                elif st and _on_device(next(iter(st.values()))) != device:
                    st = self.state[(i, name)] = _moved(st, device)  # model.to() since
                if any(a.shape != p.shape for a in st.values()):
                    raise ValueError(f"{name} changed its storage since the optimizer last "
                                     f"saw it (state {next(iter(st.values())).shape}, values "
                                     f"{p.shape}): pass the pruner's positions to "
                                     "optimizer.remap, or call optimizer.reset()")
                if device:
                    self._update_device(p, g, st, lr)
                else:
                    self._update(p, g, st, lr)

    def _update(self, p, g, st, lr):
        raise NotImplementedError

    def _update_device(self, p, g, st, lr):
        """``_update`` for device arrays (p, g and the state on the GPU)."""
        raise NotImplementedError(f"{type(self).__name__} has no device update")

    def remap(self, positions, module=None):
        """Carry per-value state over to re-stored weights.

        ``positions`` is what a ``numlstm.prune`` function returns (name ->
        index of every new value in the old values); ``module`` says whose
        weights they are (default: the first module with those names).
        """
        index = 0 if module is None else next(
            (i for i, m in enumerate(self.modules) if m is module), None)
        if index is None:
            raise ValueError("module is not one of this optimizer's modules")
        for name, pos in positions.items():
            st = self.state.get((index, name))
            if st is not None:
                self.state[(index, name)] = {slot: _remap(arr, pos) for slot, arr in st.items()}

    def reset(self):
        """Forget all per-value state (and the step count)."""
        self.state.clear()
        self.steps = 0

    @property
    def nbytes(self):
        """Bytes of per-value state held (the memory report's optimizer row)."""
        return sum(a.nbytes for st in self.state.values() for a in st.values())


def _moved(st, device):
    """Optimizer state carried to where its parameter now lives (``model.to``)."""
    if not device:
        return {slot: a.copy_to_host() for slot, a in st.items()}
    from numba import cuda

    return {slot: cuda.to_device(a) for slot, a in st.items()}


def _remap(arr, positions):
    from numlstm.prune import remap_values

    if not _on_device(arr):
        return remap_values(arr, positions)
    from numba import cuda  # a device array: remap on the host, once per pruning

    return cuda.to_device(remap_values(arr.copy_to_host(), positions))


class SGD(Optimizer):
    """SGD with optional momentum, Nesterov momentum and L2 weight decay
    (``torch.optim.SGD``: ``b = mu*b + g``; ``p -= lr * (g + mu*b if nesterov else b)``)."""

    def __init__(self, modules, lr=1e-2, *, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(modules, lr)
        self.momentum = _check_number(momentum, "momentum", high=1.0)
        self.weight_decay = _check_number(weight_decay, "weight_decay")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.slots = ("momentum",) if self.momentum else ()

    def _options(self):
        return {"momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _update(self, p, g, st, lr):
        d = g + self.weight_decay * p if self.weight_decay else g
        if self.momentum:
            buf = st["momentum"]
            if self.steps == 1:
                buf[...] = d  # torch starts the buffer at the first gradient
            else:
                buf *= self.momentum
                buf += d
            d = d + self.momentum * buf if self.nesterov else buf
        p -= lr * d

    def _update_device(self, p, g, st, lr):
        _device_kernels().sgd_step(p, g, st.get("momentum", p), lr, self.weight_decay,
                                   self.momentum, self.nesterov, self.steps == 1)


class Adam(Optimizer):
    """Adam (``torch.optim.Adam``, L2 ``weight_decay`` added to the gradient)."""

    slots = ("m", "v")
    decoupled = False

    def __init__(self, modules, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(modules, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.beta1 = _check_number(betas[0], "betas[0]", high=1.0)
        self.beta2 = _check_number(betas[1], "betas[1]", high=1.0)
        self.eps = _check_number(eps, "eps", low_open=True)
        self.weight_decay = _check_number(weight_decay, "weight_decay")


    def _options(self):
        return {"betas": (self.beta1, self.beta2), "eps": self.eps,
                "weight_decay": self.weight_decay}
    def _update(self, p, g, st, lr):
        if self.weight_decay and self.decoupled:
            p *= 1 - lr * self.weight_decay
        elif self.weight_decay:
            g = g + self.weight_decay * p
        m, v = st["m"], st["v"]
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        t = self.steps
        denom = np.sqrt(v) / math.sqrt(1 - self.beta2 ** t) + self.eps
        p -= (lr / (1 - self.beta1 ** t)) * m / denom

    def _update_device(self, p, g, st, lr):
        _device_kernels().adam_step(p, g, st["m"], st["v"], lr, self.beta1, self.beta2,
                                    self.eps, self.weight_decay, self.decoupled, self.steps)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``, default 0.01)."""

    decoupled = True

    def __init__(self, modules, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(modules, lr, betas=betas, eps=eps, weight_decay=weight_decay)

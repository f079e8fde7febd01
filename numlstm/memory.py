"""How many bytes a model call takes: predicted from the plan, optionally measured.

Glossary: T time steps (``seq_len``), B batch (``batch_size``), I input
features, H hidden, O = P or H, L layers, D directions.

``memory_report(model, seq_len, batch_size, ...)`` splits a call's memory into
rows:

- weight values / indices / indptr / scales / layout: the stored weight
  matrices, by part (each storage kind's ``nbytes_parts()``); with the biases
  they sum to ``model.weight_bytes()`` after the call. "weight layout"
  includes the per-step execution layouts the call builds on first use (a
  CPU call at batch < ``config.STEP_MAX_B`` reads those of W_hh and W_hr:
  ``numlstm.layouts``), sized without building them;
- biases; peepholes (a model with ``peepholes=True``);
- gradients (training only): one buffer per parameter, shaped like its stored
  values (a sparse weight's gradient lives on its pattern);
- optimizer state (training only): slots of the gradient's size, or the
  ``nbytes`` of an optimizer object;
- recorded activations: the tape a training forward keeps for backward (0 in
  inference);
- workspace: every other buffer of the call: the model's workspace block
  minus the tape (scratch, dx, checkpoint recompute buffers, alignment), the
  transposed patterns sparse weights build for backward, and the arrays the
  call returns (y and the final state; in training also dx and the initial
  state's gradient) with its small per-call index arrays; when the call
  builds layouts (before it carves its workspace), whatever their build
  holds beyond all that at its peak (``layouts.build_peak``'s bound);
- with ``pool``: stream pool states (every slot's h and c of every layer,
  a full step's input and output rows, the slot index) and stream pool
  workspace (one chunk's work rows), ``numlstm.pool.pool_memory``'s parts.

The prediction is the exact size of the plan ``LSTM.forward`` carves, so it
does not guess: what it cannot see are Python objects (views, tuples: a few
KiB) and NumPy temporaries of the caller. A stream (``model.stream``) is not
this report's subject: it holds only its per-step buffers (``Stream``), far
less than a ``seq_len=1`` forward counted here.
"""

import gc
import tracemalloc

import numpy as np

from numlstm import config
from numlstm.checks import check_int
from numlstm.lstm import LSTM
from numlstm.pool import StreamPool, pool_memory

OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2}

ROWS = ("weight values", "weight indices", "weight indptr", "weight scales",
        "weight layout", "biases", "peepholes",
        "gradients", "optimizer state", "recorded activations", "workspace")
POOL_ROWS = ("stream pool states", "stream pool workspace")  # with memory_report(pool=...)


def human(nbytes):
    """Bytes in binary units: ``'512 B'``, ``'1.50 KiB'``, ``'2.00 MiB'``, ..."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # pragma: no cover


class MemoryReport(dict):
    """Rows (name -> bytes, ``ROWS`` order, then ``"total"``) of a predicted call.

    Attributes
    ----------
    case : dict
        What was predicted: seq_len, batch_size, training, checkpoint,
        segment, and ``layouts``: the bytes of the execution layouts the call
        builds (counted in "weight layout"; 0 once built).
    measured : dict or None
        With ``measure=True``: ``predicted_call`` (recorded activations +
        workspace + the layouts it builds, the bytes the call itself
        allocates or holds),
        ``measured_call`` (tracemalloc peak of the call plus transposed
        patterns built before it), ``tracemalloc_peak``, ``held_transposed``,
        ``nrt_allocations`` and ``nrt_net`` (numba runtime allocations made
        inside kernels, and those not freed: counts, numba keeps no bytes),
        and ``ratio`` = measured / predicted.
    """

    def __init__(self, rows, case, measured=None):
        super().__init__(rows)
        self.case = case
        self.measured = measured

    def as_dict(self):
        """The rows as a plain dict."""
        return dict(self)

    def __str__(self):
        c = self.case
        mode = "training" if c["training"] else "inference"
        if c["segment"] is not None:
            mode += f", checkpoint={c['checkpoint']!r} (segment {c['segment']})"
        lines = [f"memory of {mode}: seq_len={c['seq_len']}, batch_size={c['batch_size']}"]
        width = max(len(k) for k in self)
        exact = max(len(f"{v:,}") for v in self.values())
        for name, value in self.items():
            if name == "total":
                lines.append("-" * (width + exact + 16))
            lines.append(f"{name:<{width}}  {value:>{exact},} B  {human(value):>10}")
        m = self.measured
        if m is not None:
            lines.append(f"measured call (activations + workspace): {m['measured_call']:,} B "
                         f"({human(m['measured_call'])}) against {m['predicted_call']:,} B "
                         f"predicted, ratio {m['ratio']:.3f}; numba allocations in kernels: "
                         f"{m['nrt_allocations']} ({m['nrt_net']} not freed)")
        return "\n".join(lines)

    __repr__ = __str__


def _optimizer_bytes(optimizer, grad_bytes, training):
    if optimizer is None:
        return 0
    if not training:
        raise ValueError(f"optimizer={optimizer!r} needs training=True: inference keeps no "
                         "optimizer state")
    if isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZER_SLOTS:
            raise ValueError(f"optimizer must be None, one of {sorted(OPTIMIZER_SLOTS)} or an "
                             f"object with an nbytes attribute, got {optimizer!r}")
        return OPTIMIZER_SLOTS[optimizer.lower()] * grad_bytes
    nbytes = getattr(optimizer, "nbytes", None)
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
        raise TypeError(f"optimizer must be None, one of {sorted(OPTIMIZER_SLOTS)} or an "
                        f"object with an int nbytes >= 0, got {type(optimizer).__name__} "
                        f"with nbytes={nbytes!r}")
    return int(nbytes)


def memory_report(model, seq_len, batch_size, training=False, checkpoint=None,
                  optimizer=None, measure=False, pool=None):
    """Bytes of a forward (and, in training, backward) call on (T, B) input.

    Parameters
    ----------
    model : numlstm.LSTM
    seq_len : int
        T, steps per sequence.
    batch_size : int
        B, sequences per call.
    training : bool
        Count a training step: forward with the tape, backward, gradients.
    checkpoint : None, "auto" or int >= 1
        As ``LSTM.forward``'s (training only).
    optimizer : None, str or object, optional
        Optimizer state: ``"sgd"`` keeps none, ``"momentum"`` / ``"nesterov"``
        one slot and ``"adam"`` / ``"adamw"`` two slots of the gradients'
        size; any object is asked for its ``nbytes``. Training only.
    measure : bool
        Also run the case (random input; in training, backward with a random
        dy) and measure its peak with tracemalloc (NumPy registers its
        buffers there) and numba's runtime allocation counts. The model's
        workspaces and any recorded tape are dropped first, and so are the
        execution layouts the unmeasured run built, so that the measurement
        starts from what the prediction assumes (the measured call rebuilds
        them); gradients and the dropout generator are restored.
    pool : numlstm.StreamPool or int, optional
        Also count a stream pool of this model: an open pool's own bytes, or
        those of a pool of that capacity (``numlstm.pool.pool_memory``), as
        the ``POOL_ROWS``.

    Returns
    -------
    MemoryReport
        A dict of rows (bytes) that prints as a table; see ``ROWS``.
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    T = check_int(seq_len, "seq_len", 1)
    B = check_int(batch_size, "batch_size", 1)
    for flag, name in ((training, "training"), (measure, "measure")):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    training = bool(training)
    if measure and model.device != "cpu":
        raise ValueError(f"measure=True measures host memory (tracemalloc and numba's CPU "
                         f"runtime), but the model is on {model.device!r}: predict only, or "
                         "measure a copy on the CPU")
    plan = model.memory_plan(T, B, training=training, checkpoint=checkpoint)

    rows = dict.fromkeys(ROWS, 0)
    for w in model.weights().values():
        for part, nbytes in w.nbytes_parts().items():
            rows[f"weight {part}"] += nbytes
    params = model.host_params.params
    rows["biases"] = sum(p.nbytes for name, p in params.items() if name.startswith("bias"))
    rows["peepholes"] = sum(p.nbytes for name, p in params.items()
                            if name.startswith("peephole"))
    grad_bytes = sum(g.nbytes for g in model.grad_arrays().values())
    rows["gradients"] = grad_bytes if training else 0
    rows["optimizer state"] = _optimizer_bytes(optimizer, grad_bytes, training)
    rows["recorded activations"] = plan["activations"]
    rows["workspace"] = plan["workspace"] + plan["transposed"] + plan["outputs"]
    # Layouts the call builds first, one weight after another, before it carves
    # its workspace: its peak is that build's or its buffers' with the layouts.
    built, build_peak = 0, 0
    for w in _step_weights(model, B):
        kept, peak = w.first_step()
        build_peak = max(build_peak, built + peak)
        built += kept
    rows["weight layout"] += built
    call = rows["recorded activations"] + rows["workspace"] + built
    rows["workspace"] += max(0, build_peak - call)
    if pool is not None:
        if isinstance(pool, StreamPool):
            if pool.model is not model:
                raise ValueError("pool must be a StreamPool of this model (or a capacity)")
            parts = pool.memory_parts()
        else:
            parts = pool_memory(model, pool)
        states, workspace = POOL_ROWS
        rows[states] = parts["states"] + parts["index"]
        rows[workspace] = parts["workspace"]
    rows["total"] = sum(rows.values())
    case = {"seq_len": T, "batch_size": B, "training": training, "checkpoint": checkpoint,
            "segment": plan["segment"], "layouts": built}
    measured = None
    if measure:
        measured = _measure(model, T, B, training, checkpoint)
        measured["predicted_call"] = rows["recorded activations"] + rows["workspace"] + built
        measured["ratio"] = measured["measured_call"] / measured["predicted_call"]
    return MemoryReport(rows, case, measured)


def _step_weights(model, B):
    """The weights whose per-step execution layouts a call over B rows reads
    (the CPU's ``Params.prepare`` builds them), in build order."""
    if model.device != "cpu" or B >= config.STEP_MAX_B:
        return []
    return model.host_params.recurrent_weights()


def _measure(model, T, B, training, checkpoint):
    """Run the case once and measure what the call allocates (see ``memory_report``)."""
    from numba.core.runtime import _nrt_python, rtsys

    rng = np.random.default_rng(0)
    I, DO = model.input_size, model.num_directions * model.output_size
    shape = (B, T) if model.batch_first else (T, B)
    x = rng.standard_normal(shape + (I,)).astype(model.dtype)
    dy = rng.standard_normal(shape + (DO,)).astype(model.dtype) if training else None
    saved = {k: g.copy() for k, g in model.grad_arrays().items()} if training else {}
    rng_state = model.rng.bit_generator.state
    kwargs = {"training": True, "checkpoint": checkpoint} if training else {}
    unbuilt = [w for w in _step_weights(model, B) if not w.step_built]
    try:  # once unmeasured: compiles what the case needs
        model(x, **kwargs)
        if training:
            model.backward(dy)
    finally:
        _restore(model, saved, rng_state)
    for w in unbuilt:  # the measured call builds them, as predicted
        w.drop_step()
    held = 0
    if training:  # transposed patterns built by an earlier backward stay with the weights
        held = sum(w.transposed_built() for w in model.weights().values())
    model.release_workspaces()
    gc.collect()
    _nrt_python.memsys_enable_stats()
    nrt_before = rtsys.get_allocation_stats()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        y, state = model(x, **kwargs)
        if training:
            dx, dstate = model.backward(dy)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
        _restore(model, saved, rng_state)
    nrt_after = rtsys.get_allocation_stats()
    return {"measured_call": peak + held, "tracemalloc_peak": peak, "held_transposed": held,
            "nrt_allocations": nrt_after.alloc - nrt_before.alloc,
            "nrt_net": (nrt_after.alloc - nrt_before.alloc) - (nrt_after.free - nrt_before.free)}


def _restore(model, saved_grads, rng_state):
    """Put back the gradients and the dropout generator a measuring run changed."""
    grads = model.grad_arrays()
    for k, g in saved_grads.items():
        grads[k][...] = g
    model.rng.bit_generator.state = rng_state

"""O(1)-memory, step-by-step inference: what a service runs per request.

A ``Stream`` owns the state (h, c) of every layer for a fixed batch and the
few buffers one step needs, all carved from one workspace block of the
model's backend when it is made. ``step`` then makes one call for all layers
and returns its output as a new array (the caller's to keep); ``step(x,
out=buf)`` writes it into the caller's buffer and allocates nothing. On the
CPU the call is one compiled call with the arguments bound
once in a ``numlstm.kernels.plan.StepPlan`` (docs/design.md, One call per
stream step), on two threads when a batch-1 step outgrows one core
(``numlstm.pair``); on the GPU one ``lstm_step`` launch per layer.
"""

import logging

import numpy as np

from numlstm import checks, pair
from numlstm.weights import check_float_array

log = logging.getLogger("numlstm")


class Stream:
    """Advance an LSTM one time step per call, carrying its state.

    Made by ``LSTM.stream(batch_size=1, state=None)``. The stream reads the
    model's live weights: in-place updates are seen at the next step, and a
    ``load_state_dict`` on the model rebinds the stream at its next step. A
    stream lives where the model was when it was made (its buffers are
    there): after ``model.to(...)`` it refuses to step; make a new one.

    Parameters
    ----------
    model : numlstm.LSTM
        A unidirectional model, on the CPU or (``to("cuda")``) the GPU.
    batch_size : int
        B, sequences advanced together.
    state : tuple (h (L, B, O), c (L, B, H)), optional
        Initial state (host arrays, or device arrays on the GPU); zeros when
        omitted.
    """

    def __init__(self, model, batch_size=1, state=None):
        self.model = model
        self.batch_size = B = checks.check_stream_args(model, batch_size)
        L, H, O, P = model.num_layers, model.hidden_size, model.output_size, model.proj_size
        self._be = be = model.engine.be
        self._host = not be.STAGED  # host arrays: the step's fast path below
        self._ws = be.Workspace(model.dtype)
        v = self._ws.carve([("h", (L, B, O)),  # state h_t of every layer
                            ("c", (L, B, H)),  # state c_t of every layer
                            ("gates", (3, B, 4 * H)),  # activations | recurrent | new c
                            ("r", (B if P else 0, H)),  # o * tanh(c), the projection's input
                            ("x", (B, model.input_size)),  # converted input, when needed
                            ("hprev", (O,))])  # h_{t-1} of a two-thread step's layer
        self._h, self._c, self._hprev = v["h"], v["c"], v["hprev"]
        self._pair = None
        # Per-layer views made once: creating a view inside step would allocate.
        self._h_layers = [v["h"][l] for l in range(L)]
        self._c_layers = [v["c"][l] for l in range(L)]
        self._gates, self._r, self._x = v["gates"], v["r"], v["x"]
        self._bind()
        self.reset(state)

    def __repr__(self):
        # The stream's device, not the model's: the model may have moved since.
        return f"Stream({self.model!r}, batch_size={self.batch_size}, device={self._be.NAME!r})"

    def _layer_args(self, x):
        """Every layer's ``lstm_step`` arguments, layer 0 reading ``x``."""
        m, B = self.model, self.batch_size
        params = m.kernel_params()
        layers = []
        for l in range(m.num_layers):
            x_l = x if l == 0 else self._h_layers[l - 1]
            layers.append((self._h_layers[l], self._c_layers[l], self._gates, self._r, x_l)
                          + params.step_args("ih", l, 0, B) + params.biases(l, 0)
                          + params.recurrent_args(l, 0, B) + (params.cell_args(l, 0),))
        return layers

    def _bind(self):
        """Bind every layer's kernel arguments (arrays, not copies) once.

        Layer 0 reads the stream's input buffer, layer l > 0 the state h of
        layer l - 1, which that layer has just updated. The backend's
        ``step_plan`` makes the call: on the CPU the tuples go into one
        ``StepPlan``, so that a step is one call of the compiled step that
        unboxes no array (no NRT allocation, and no dispatcher typing the
        argument each step). Sparse weights bind their per-step execution
        layout (batch below ``config.STEP_MAX_B``; see ``numlstm.layouts``).
        A batch-1 step large enough runs on two threads (``numlstm.pair``),
        from the first step after their kernels are compiled (in the
        background: ``numlstm.pair.stream_ready``).
        """
        m = self.model
        if m.engine.be is not self._be:
            where = {"cpu": "the CPU", "cuda": "the GPU"}
            raise RuntimeError(f"this stream was made on {where[self._be.NAME]}, but the model "
                               f"has been moved to {where[m.engine.be.NAME]}: make a new stream "
                               "with model.stream()")
        layers = self._layer_args(self._x)
        if self._pair is not None:
            self._pair.stop()
            self._pair = None
        self._version = m.version
        two = self._host and pair.worth_two(m, self.batch_size)
        if two and pair.stream_ready(layers, self._hprev, self):
            self._pair = pair.Pair(layers, self._hprev, self)
            self._run, self._plan = self._pair.run, self._pair.plan
        else:  # one thread (until the two-thread kernels are compiled, if they are to be)
            self._run, self._plan = self._be.step_plan(layers)
        log.debug("stream of batch %d: %s", self.batch_size,
                  "two threads" if self._pair is not None else
                  "one thread until the two-thread kernels are compiled" if two else
                  "one thread")

    def _rebind_soon(self):
        """Rebind at the next step (the two-thread kernels are ready); called
        from the thread that compiled them: one attribute store, which the
        step's version check reads."""
        self._version = None

    def reset(self, state=None):
        """Set the state to ``state`` (h (L, B, O), c (L, B, H)), or to zeros."""
        be = self._be
        if state is None:
            be.fill(self._h, 0)
            be.fill(self._c, 0)
            return
        h0, c0 = be.read_state(self.model, state, self.batch_size, False, self._h, self._c,
                               "state")
        if h0 is not self._h:
            be.copy(self._h, h0)
            be.copy(self._c, c0)

    @property
    def state(self):
        """Copies of the current state: h (L, B, O), c (L, B, H) (on the device
        for a device stream). The stream's own state is never handed out."""
        be = self._be
        h, c = be.empty(self._h.shape, self._h.dtype), be.empty(self._c.shape, self._c.dtype)
        be.copy(h, self._h)
        be.copy(c, self._c)
        return h, c

    _out_ok = None  # the last ``out`` found not to overlap the stream's buffers

    def step(self, x_t, *, to_host=False, out=None):
        """Advance every layer by one step.

        Parameters
        ----------
        x_t : array (B, I)
            Copied into the stream's input buffer: an array of the model's
            dtype costs no allocation; another float precision is converted.
            On the device, a device array of the model's dtype is read where
            it is.
        to_host : bool
            Device streams: return a NumPy array. Ignored on the CPU.
        out : array (B, O), optional
            Where to write the output: a C-contiguous, writeable array of the
            model's dtype that is not the stream's own memory (a NumPy array
            on the CPU or with ``to_host``, else a device array). Checked
            before the step (a bad one changes nothing). The zero-allocation
            path for loops that keep no output, or copy what they keep.

        Returns
        -------
        array (B, O)
            The top layer's output h_t: a new array, the caller's to keep
            and change (later steps never touch it); ``out`` itself when given.

        Raises
        ------
        TypeError, ValueError
            ``x_t`` not a float array of shape (B, I); ``out`` of another
            type, shape or dtype, not C-contiguous, read-only, or
            overlapping the stream's buffers.
        """
        m = self.model
        if self._version != m.version:
            self._bind()
        if self._host:
            if out is not None:
                self._check_out(out, to_host=True)
            if m.layouts_stale:
                m.refresh_layouts()
            x = self._x
            # The common case in ~0.3 us (dtype objects of one type are one
            # object; a dtype that is equal but not identical takes the
            # checked path). Slice assignment copies 3x faster than np.copyto
            # for a row this small.
            if x_t.__class__ is np.ndarray and x_t.dtype is x.dtype and x_t.shape == x.shape:
                x[...] = x_t
            else:
                x[...] = check_float_array(x_t, "x_t", x.shape, x.dtype)
            if self._run(self._plan):  # a two-thread step whose worker has left
                self._pair.wake()
            if out is None:
                return self._h_layers[-1].copy()
            out[...] = self._h_layers[-1]
            return out
        return self._device_step(x_t, to_host, out)

    def _check_out(self, out, to_host):
        """Refuse an ``out`` that ``step`` cannot write its output into."""
        be, h = self._be, self._h_layers[-1]
        shape, dtype = tuple(h.shape), np.dtype(h.dtype)
        if to_host or self._host:
            checks.check_out_array(out, shape, dtype)
            # An array's memory never changes: one that passed is not checked again.
            if self._host and out is not self._out_ok:
                if np.may_share_memory(out, self._ws._block):
                    raise ValueError("out overlaps the stream's own buffers (its state); "
                                     "pass an array of your own")
                self._out_ok = out
        else:
            if not checks.is_device_array(out):
                raise TypeError(f"out must be a device array of shape {shape} and dtype "
                                f"{dtype.name} (or a NumPy array with to_host=True), got "
                                f"{type(out).__name__}")
            dout = be.check_device(be.as_device(out), "out", shape, dtype)
            if _device_overlap(dout, self._ws._block):
                raise ValueError("out overlaps the stream's own buffers (its state); pass "
                                 "an array of your own")

    def _device_step(self, x_t, to_host, out):
        """``step`` for a stream whose buffers are on the device."""
        be, x, plan = self._be, self._x, self._plan
        if out is not None:
            self._check_out(out, to_host)
        if checks.is_device_array(x_t):  # read where it is: layer 0's x for this step
            a = be.check_device(be.as_device(x_t), "x_t", x.shape, x.dtype)
            plan = (plan[0][:4] + (a,) + plan[0][5:],) + plan[1:]
        else:
            be.upload(x, check_float_array(x_t, "x_t", tuple(x.shape), x.dtype))
        self._run(plan)
        h = self._h_layers[-1]
        if to_host:
            if out is None:
                return be.to_host(h)[0]
            out[...] = be.to_host(h)[0]
            return out
        if out is None:
            out = be.empty(h.shape, h.dtype)
        be.copy(be.as_device(out), h)
        return out

    def __reduce__(self):
        """Copy and pickle by rebuilding: a stream's buffers are views into one
        workspace block, and kernel argument tuples hold those views, so
        copying its attributes one by one would step arrays that ``state`` and
        ``reset`` no longer reach. A copy is a new stream of the same model,
        batch size and current state: ``copy.copy`` shares the model,
        ``copy.deepcopy`` and pickle carry a copy of it (a device model comes
        back on the CPU, as a pickled model does)."""
        return _rebuild_stream, (self.model, self.batch_size, self._be.to_host(*self.state))


def _device_overlap(a, b):
    """Whether device arrays ``a`` and ``b`` share any byte (their spans, by
    their ``__cuda_array_interface__`` pointers)."""
    if b is None:
        return False
    spans = []
    for arr in (a, b):
        # The simulator's device arrays are NumPy arrays underneath.
        face = getattr(arr, "__cuda_array_interface__", None) or arr.__array_interface__
        size = int(np.prod(face["shape"])) * np.dtype(face["typestr"]).itemsize
        spans.append((face["data"][0], face["data"][0] + size))
    (a0, a1), (b0, b1) = spans
    return a0 < b1 and b0 < a1


def _rebuild_stream(model, batch_size, state):
    """A stream of ``model`` with ``state``: what a copied or unpickled Stream is."""
    return model.stream(batch_size, state)

"""O(1)-memory, step-by-step inference: what a service runs per request.

A ``Stream`` owns the state (h, c) of every layer for a fixed batch and the
few buffers one step needs, all carved from one workspace block when it is
made. ``step`` then makes one compiled call for all layers (the arguments
bound once in a ``numlstm.kernels.plan.StepPlan``) and allocates nothing.
"""

import numpy as np

from numlstm import weights as W
from numlstm.kernels.plan import compiled_step, make_plan
from numlstm.workspace import Workspace


def _check_stream_args(model, batch_size):
    """The batch size a stream of ``model`` gets, as an int; ValueError for a
    bidirectional model or a batch size that is not a positive int."""
    if model.bidirectional:
        raise ValueError("a bidirectional model cannot stream: its reverse direction "
                         "needs the whole sequence; use forward() instead")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


class Stream:
    """Advance an LSTM one time step per call, carrying its state.

    Made by ``LSTM.stream(batch_size=1, state=None)``. The stream reads the
    model's live weights: in-place updates are seen at the next step, and a
    ``load_state_dict`` on the model rebinds the stream at its next step.

    Parameters
    ----------
    model : numlstm.LSTM
        A unidirectional model.
    batch_size : int
        B, sequences advanced together.
    state : tuple (h (L, B, O), c (L, B, H)), optional
        Initial state; zeros when omitted.
    """

    def __new__(cls, model=None, *args, **kwargs):
        # A model on the GPU (model.to("cuda")) streams there: numlstm.device.DeviceStream.
        if cls is Stream and getattr(model, "_device", None) is not None:
            from numlstm.device import DeviceStream

            cls = DeviceStream
        return super().__new__(cls)

    _workspace_type = Workspace  # DeviceStream's buffers live on the GPU

    def __init__(self, model, batch_size=1, state=None):
        self.model = model
        self.batch_size = B = _check_stream_args(model, batch_size)
        L, H, O, P = model.num_layers, model.hidden_size, model.output_size, model.proj_size
        self._ws = self._workspace_type(model.dtype)
        v = self._ws.carve([("h", (L, B, O)),  # state h_t of every layer
                            ("c", (L, B, H)),  # state c_t of every layer
                            ("gates", (3, B, 4 * H)),  # activations | recurrent | new c
                            ("r", (B if P else 0, H)),  # o * tanh(c), the projection's input
                            ("x", (B, model.input_size))])  # converted input, when needed
        self._h, self._c = v["h"], v["c"]
        # Per-layer views made once: creating a view inside step would allocate.
        self._h_layers = [v["h"][l] for l in range(L)]
        self._c_layers = [v["c"][l] for l in range(L)]
        self._gates, self._r, self._x = v["gates"], v["r"], v["x"]
        self._bind()
        self.reset(state)

    def _bind(self):
        """Bind every layer's kernel arguments (arrays, not copies) once.

        Layer 0 reads the stream's input buffer, layer l > 0 the state h of
        layer l - 1, which that layer has just updated. The tuples go into one
        ``StepPlan`` (``numlstm.kernels.plan``), so that a step is one call of
        the compiled step that unboxes no array: no NRT allocation, and no
        dispatcher typing the argument each step.
        Sparse weights bind their per-step execution layout (batch below
        ``config.STEP_MAX_B``; see ``numlstm.layouts``).
        """
        m, B = self.model, self.batch_size
        layers = []
        for l in range(m.num_layers):
            x = self._x if l == 0 else self._h_layers[l - 1]
            layers.append((self._h_layers[l], self._c_layers[l], self._gates, self._r, x)
                          + m._step_args("ih", l, 0, B) + m._biases(l, 0)
                          + m._recurrent_args(l, 0, B))
        plan = make_plan(tuple(layers))
        self._run = compiled_step(plan)
        self._plan = plan
        self._version = m.version

    def reset(self, state=None):
        """Set the state to ``state`` (h (L, B, O), c (L, B, H)), or to zeros."""
        if state is None:
            self._h.fill(0)
            self._c.fill(0)
            return
        h0, c0 = self.model._check_state(state, self.batch_size, False)
        self._h[...] = h0
        self._c[...] = c0

    @property
    def state(self):
        """Copies of the current state: h (L, B, O), c (L, B, H)."""
        return self._h.copy(), self._c.copy()

    def step(self, x_t):
        """Advance every layer by one step.

        Parameters
        ----------
        x_t : array (B, I)
            Copied into the stream's input buffer: an array of the model's
            dtype costs no allocation; another float precision is converted.

        Returns
        -------
        array (B, O)
            The top layer's output h_t: a view of the stream's state buffer,
            overwritten by the next step (copy it to keep it).
        """
        m = self.model
        if self._version != m.version:
            self._bind()
        if m._layouts_stale:
            m.refresh_layouts()
        x = self._x
        # The common case in ~0.3 us (dtype objects of one type are one object;
        # a dtype that is equal but not identical takes the checked path).
        # Slice assignment copies 3x faster than np.copyto for a row this small.
        if x_t.__class__ is np.ndarray and x_t.dtype is x.dtype and x_t.shape == x.shape:
            x[...] = x_t
        else:
            x[...] = W.check_float_array(x_t, "x_t", x.shape, x.dtype)
        self._run(self._plan)
        return self._h_layers[-1]

    def __reduce__(self):
        """Copy and pickle by rebuilding: a stream's buffers are views into one
        workspace block, and kernel argument tuples hold those views, so
        copying its attributes one by one would step arrays that ``state`` and
        ``reset`` no longer reach. A copy is a new stream of the same model,
        batch size and current state: ``copy.copy`` shares the model,
        ``copy.deepcopy`` and pickle carry a copy of it (a device model comes
        back on the CPU, as a pickled model does)."""
        h, c = self.state
        if not isinstance(h, np.ndarray):  # a DeviceStream's state: to the host
            h, c = h.copy_to_host(), c.copy_to_host()
        return _rebuild_stream, (self.model, self.batch_size, (h, c))


def _rebuild_stream(model, batch_size, state):
    """A stream of ``model`` with ``state``: what a copied or unpickled Stream is."""
    return model.stream(batch_size, state)

"""The LSTM model: its configuration, parameters and public calls.

Glossary: T time steps, B batch, I input features, H hidden, P projection
(0 = none), O = P or H, G = 4H, L layers, D directions, K a layer's input width
(I for layer 0, D*O above it), N = T*B.

Semantics are torch.nn.LSTM's: gate order i, f, g, o; PyTorch's parameter
names and shapes; time-major (T, B, F) data, with ``batch_first`` a view at
this boundary. The model holds its parameters on the host (``host_params``,
a ``numlstm.backends.cpu.Params``) and one ``numlstm.engine.Engine``, which
runs forward and backward on the CPU or, after ``to("cuda")``, on the GPU
(docs/design.md, CPU/GPU twins).
"""

import contextlib
import threading

import numpy as np

from numlstm import backends, checks
from numlstm import weights as weights_mod
from numlstm.backends import cpu as cpu_backend
from numlstm.cell import Cell
from numlstm.checks import MAX_LAYERS, MAX_PARAM_BYTES, MAX_SIZE, check_bool, check_int
from numlstm.engine import Engine
from numlstm.pool import CHUNK, StreamPool
from numlstm.stream import Stream

__all__ = ["LSTM", "MAX_LAYERS", "MAX_PARAM_BYTES", "MAX_SIZE"]


class LSTM:
    """A multi-layer LSTM with torch.nn.LSTM's semantics and parameter names.

    Parameters
    ----------
    input_size : int
        I, features per time step.
    hidden_size : int
        H, the cell state width.
    num_layers : int
        L, stacked layers (at most ``MAX_LAYERS`` = 10,000; sizes at most
        2**31 - 1, and all parameters at most ``MAX_PARAM_BYTES`` = 1 TiB).
    bias : bool
        Whether each layer has ``bias_ih`` and ``bias_hh``. This and the other
        flags must be bools (NumPy's too): a string such as ``"false"`` is a
        TypeError, not True.
    batch_first : bool
        Inputs and outputs are (B, T, F) instead of (T, B, F).
    dropout : float
        Dropout probability on the outputs of every layer but the last, applied
        only when ``forward(..., training=True)``.
    bidirectional : bool
        D = 2: each layer also runs backwards in time.
    proj_size : int
        P > 0 projects h_t = W_hr (o * tanh(c_t)) to width P.
    dtype : np.float32 or np.float64
        Parameter and computation dtype. Floating inputs of another precision
        are converted on the way in.
    seed : int or None
        Seeds the initialisation U(-1/sqrt(H), 1/sqrt(H)) and dropout masks.
    reverse : bool
        Every layer runs backwards in time (ONNX's ``direction="reverse"``,
        Keras's ``go_backwards``): from each sequence's last valid step down
        to t = 0; y[t] stays aligned with x[t]. Not with ``bidirectional``
        (which has both directions); cannot stream.
    peepholes, clip, input_forget, activations
        The cell options of ONNX's LSTM, off by default (PyTorch's cell):
        peephole connections (a trainable (3, H) ``peephole_l{k}`` parameter
        per layer and direction), a clip of the gate pre-activations,
        f = 1 - i, and other activations (f, g, h). See ``numlstm.cell.Cell``;
        ``model.cell`` holds them.

    Attributes
    ----------
    grad : dict[str, np.ndarray or scipy.sparse.csr_array]
        Parameter gradients, keyed like ``state_dict``; ``backward`` adds into
        them. A CSR weight's gradient is a CSR with exactly its pattern whose
        ``.data`` is the live gradient buffer.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 dtype=np.float32, seed=None, reverse=False, peepholes=False, clip=None,
                 input_forget=False, activations=None):
        self._configure(input_size, hidden_size, num_layers, bias=bias,
                        batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                        proj_size=proj_size, dtype=dtype, seed=seed, reverse=reverse,
                        peepholes=peepholes, clip=clip, input_forget=input_forget,
                        activations=activations)
        k = 1.0 / np.sqrt(self.hidden_size)
        params = {}
        for name, shape in self.param_shapes().items():
            params[name] = self._rng.uniform(-k, k, shape).astype(self.dtype)
        self._set_params(params)

    def __getstate__(self):
        """Pickle the configuration and parameters; the lock, the engine (its
        workspaces and any recorded tape) stay behind: a copy starts on the CPU
        with empty buffers and the current values (pulled from a device)."""
        self.engine.pull()
        state = dict(self.__dict__)
        del state["_busy"], state["engine"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._busy = threading.Lock()
        self.engine = Engine(self, cpu_backend, self._rng)
        self.layouts_stale = True

    @classmethod
    def without_params(cls, **config):
        """A validated configuration with no parameters yet (``install_params``
        them): what ``numlstm.load`` builds, so that a file's header cannot make
        it allocate a random initialisation of whatever size it declares."""
        model = cls.__new__(cls)
        model._configure(**config)
        return model

    def _configure(self, input_size, hidden_size, num_layers=1, *, bias=True,
                   batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                   dtype=np.float32, seed=None, reverse=False, peepholes=False, clip=None,
                   input_forget=False, activations=None):
        self.input_size = check_int(input_size, "input_size", 1, MAX_SIZE)
        self.hidden_size = check_int(hidden_size, "hidden_size", 1, MAX_SIZE)
        self.num_layers = check_int(num_layers, "num_layers", 1, MAX_LAYERS)
        self.proj_size = check_int(proj_size, "proj_size", 0, MAX_SIZE)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size}, "
                             f"got {proj_size}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.bias = check_bool(bias, "bias")
        self.batch_first = check_bool(batch_first, "batch_first")
        self.dropout = float(dropout)
        self.bidirectional = check_bool(bidirectional, "bidirectional")
        self.num_directions = 2 if bidirectional else 1
        self.reverse = check_bool(reverse, "reverse")
        if self.reverse and self.bidirectional:
            raise ValueError("reverse=True is a layer that runs only backwards in time; "
                             "bidirectional=True already has both directions: pass one")
        self.cell = Cell(peepholes=peepholes, clip=clip, input_forget=input_forget,
                         activations=activations)
        self.output_size = self.proj_size or self.hidden_size  # O
        self._check_param_bytes()
        self._rng = np.random.default_rng(seed)
        self.version = 0  # bumped when the parameters are replaced or moved
        self.layouts_stale = False  # whether refresh_layouts is due (parameters() was called)
        self._busy = threading.Lock()  # held by a running forward or backward
        self.engine = Engine(self, cpu_backend, self._rng)

    def _check_param_bytes(self):
        """Refuse a configuration whose parameters exceed ``MAX_PARAM_BYTES``
        (counted in closed form: no per-layer loop, no allocation)."""
        H, O, P, D = self.hidden_size, self.output_size, self.proj_size, self.num_directions
        extra = ((8 * H if self.bias else 0) + P * H + 4 * H * O  # biases, W_hr, W_hh
                 + (3 * H if self.cell.peepholes else 0))
        count = D * ((4 * H * self.input_size + extra)
                     + (self.num_layers - 1) * (4 * H * D * O + extra))
        nbytes = count * self.dtype.itemsize
        if nbytes > MAX_PARAM_BYTES:
            raise ValueError(
                f"input_size={self.input_size}, hidden_size={H}, num_layers="
                f"{self.num_layers}, proj_size={P}, bidirectional={self.bidirectional} "
                f"ask for {count:,} {self.dtype.name} parameters ({nbytes / 2**40:.3g} TiB); "
                f"numlstm accepts at most {MAX_PARAM_BYTES / 2**40:g} TiB")

    # ------------------------------------------------------------------
    # Device
    # ------------------------------------------------------------------

    @property
    def device(self):
        """Where the parameters live and the model runs: ``"cpu"`` or ``"cuda"``."""
        return self.engine.name

    def to(self, device):
        """Move the model to ``device`` (``"cuda"`` or ``"cpu"``), in place; returns it.

        ``to("cuda")`` copies every parameter to the GPU once (dense, CSR and
        BSR weights; quantized ones are refused) with zero gradients;
        ``forward``, ``backward``, ``stream``, ``parameters`` and
        ``grad_arrays`` (so the optimizers) then run on the device and return
        device arrays (``to_host=True`` asks for NumPy). While there, the
        device copies are the truth: ``to("cpu")``, ``state_dict()``,
        ``weights()`` (so ``sparsity``, pruning, quantizing, ``save``) and
        pickling copy them back into the host arrays first. Anything that
        replaces the parameters (``load_state_dict``, ``to_dense``, pruning)
        is uploaded at the next device call. See ``numlstm.backends.cuda``.
        """
        backend = backends.get(device)
        if backend.NAME == self.engine.name:
            return self
        self.engine.pull()
        engine = Engine(self, backend, self._rng)
        self.version += 1  # streams rebind (or refuse: their buffers stay where they were)
        try:
            engine.current()  # upload now: a quantized weight is refused here
        except Exception:
            self.version -= 1  # nothing moved: the model stays as it was
            raise
        self.engine = engine
        self.layouts_stale = True  # host values may have changed on the device
        return self

    # ------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------

    def param_shapes(self):
        """name -> shape of every parameter, PyTorch's names and shapes."""
        H, O, D, P = self.hidden_size, self.output_size, self.num_directions, self.proj_size
        shapes = {}
        for layer in range(self.num_layers):
            width = self.input_size if layer == 0 else D * O
            for d in range(D):
                sfx = "_reverse" if d else ""
                shapes[f"weight_ih_l{layer}{sfx}"] = (4 * H, width)
                shapes[f"weight_hh_l{layer}{sfx}"] = (4 * H, O)
                if self.bias:
                    shapes[f"bias_ih_l{layer}{sfx}"] = (4 * H,)
                    shapes[f"bias_hh_l{layer}{sfx}"] = (4 * H,)
                if P:
                    shapes[f"weight_hr_l{layer}{sfx}"] = (P, H)
                if self.cell.peepholes:  # rows p_i, p_f, p_o (numlstm.cell)
                    shapes[f"peephole_l{layer}{sfx}"] = (3, H)
        return shapes

    def _set_params(self, values):
        """Validate every value, then install them all with fresh zero gradients
        (a bad value leaves the model as it was)."""
        params = {}  # name -> a weights.Dense / CSR / BSR, or a bias / peephole array
        for name, shape in self.param_shapes().items():
            if not name.startswith("weight"):
                arr = weights_mod.check_float_array(values[name], name, shape, self.dtype)
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"{name} must be finite, got NaN or inf values")
                params[name] = arr.copy()
            else:
                params[name] = weights_mod.from_value(values[name], name, shape, self.dtype)
        self.install_params(params)

    def install_params(self, params):
        """Make ``params`` (name -> ``weights.Dense`` / ``CSR`` / ``BSR`` or a (G,)
        bias array; every name of ``param_shapes()``, already validated) the
        model's parameters, with fresh zero gradients; streams rebind, the tape
        is dropped, and a device engine uploads them at its next call. What
        pruning, quantizing and ``numlstm.load`` use; users call
        ``load_state_dict``, which validates."""
        self._params = params
        self._grad_buffers = {
            name: (p.new_grad() if name.startswith("weight") else np.zeros_like(p))
            for name, p in self._params.items()}
        self.grad = {}
        for name, g in self._grad_buffers.items():
            p = self._params[name]
            if name.startswith("weight") and p.format != "dense":
                view = p.public()  # a copy of the pattern ...
                view.data = g  # ... whose values are the live gradient buffer
                g = view
            self.grad[name] = g
        self.host_params = cpu_backend.Params(
            params, self._grad_buffers, hidden_size=self.hidden_size,
            proj_size=self.proj_size, bias=self.bias, dtype=self.dtype, cell=self.cell)
        self.version += 1  # streams rebind on change; the engine reloads
        self.engine.tape = None

    def state_dict(self):
        """Copies of every parameter: NumPy arrays, ``csr_array`` for CSR weights,
        ``bsr_array`` for block-sparse ones. Quantized values (float16, int8) come
        back dequantized to the model's dtype; compact index types as int32."""
        self.engine.pull()
        return {name: (p.public() if name.startswith("weight") else p.copy())
                for name, p in self._params.items()}

    def load_state_dict(self, state):
        """Replace every parameter from ``state`` (same keys as ``state_dict``).

        A scipy sparse value makes that weight CSR (a BSR value keeps its
        blocks; other sparse formats are converted to CSR), a NumPy array makes
        it dense. float64 values are
        converted to a float32 model's dtype. Gradients are reset to zero.
        Raises KeyError / ValueError / TypeError naming the offending key.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        expected = set(self.param_shapes())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state keys do not match the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        self._set_params(state)

    def parameters(self):
        """The live arrays kernels read: dense weights, CSR ``.data``, biases.

        Update them in place (an optimizer step); the dict's keys match
        ``grad``, whose arrays (``.data`` for CSR) have the same shapes.
        On the device: device arrays.
        """
        self.layouts_stale = True  # the caller may write: see refresh_layouts
        return self.engine.current().parameters()

    def grad_arrays(self):
        """The live gradient arrays, shaped like ``parameters()``'s values."""
        return self.engine.current().grad_arrays()

    def zero_grad(self):
        """Set every gradient to zero, in place."""
        self.engine.current().zero_grad()

    @property
    def rng(self):
        """The generator of the initialisation and the dropout masks."""
        return self._rng

    def weight_bytes(self):
        """Bytes of parameter storage used for inference (biases included), with
        the per-step execution layouts built so far (``numlstm.layouts``)."""
        return sum(p.nbytes for p in self._params.values())

    def weights(self):
        """name -> storage object (``weights.Dense`` / ``CSR`` / ``BSR``) of every
        weight matrix, biases excluded. On the device, the host objects with
        the current values copied back first (what pruning, quantizing,
        ``sparsity`` and ``save`` read)."""
        self.engine.pull()
        return dict(self.host_params.weights)

    def sparsity(self):
        """Fraction of zero weights, per weight matrix and ``"overall"``.

        A weight's zeros are the entries it does not store plus any stored
        exact zeros; biases are not counted.

        Returns
        -------
        dict[str, float]
            ``{"weight_ih_l0": 0.9, ..., "overall": 0.9}``
        """
        out, zeros, total = {}, 0, 0
        for name, w in self.weights().items():
            size = w.shape[0] * w.shape[1]
            nonzero = int(np.count_nonzero(w.values))
            out[name] = 1 - nonzero / size
            zeros += size - nonzero
            total += size
        out["overall"] = zeros / total
        return out

    def to_dense(self):
        """Store every weight densely (quantized values are dequantized), in place.

        Gradients are reset to zero and any recorded tape is dropped.
        Returns the model.
        """
        params = dict(self._params)
        for name, w in self.weights().items():
            params[name] = weights_mod.Dense(np.ascontiguousarray(w.to_array(), dtype=self.dtype))
        self.install_params(params)
        return self

    # ------------------------------------------------------------------
    # What a step-by-step runner reads (streams, pools)
    # ------------------------------------------------------------------

    def kernel_params(self):
        """The parameters as the current backend's kernels read them (a
        ``numlstm.backends.cpu.Params`` or ``.cuda.Params``): ``weight``,
        ``biases``, ``proj_args``, ``step_args``, ``recurrent_args``."""
        return self.engine.current()

    def step_args(self, kind, layer, d, B):
        """Kernel arguments of weight ``kind`` ("ih", "hh", "hr") for per-step
        products of B rows: its per-step execution layout (``numlstm.layouts``)
        for B < ``config.STEP_MAX_B`` on the CPU, else its stored arrays. No
        projection: the empty projection arguments."""
        return self.kernel_params().step_args(kind, layer, d, B)

    def recurrent_args(self, layer, d, B):
        """W_hh's and W_hr's arguments for a recurrence over B rows."""
        return self.kernel_params().recurrent_args(layer, d, B)

    def biases(self, layer, d):
        """(bias_ih, bias_hh) (G,) of a layer and direction; zeros without bias."""
        return self.kernel_params().biases(layer, d)

    def proj_args(self, layer, d, transposed=False):
        """W_hr's kernel arguments (of W_hr^T if ``transposed``); empty at P = 0."""
        return self.kernel_params().proj_args(layer, d, transposed)

    def check_state(self, state, B, unbatched=False, what="state"):
        """A host ``state`` (h, c) checked and shaped (D*L, B, O), (D*L, B, H)
        (zeros when None); see ``numlstm.checks.check_state``."""
        return checks.check_state(self, state, B, unbatched, what)

    def refresh_layouts(self):
        """Copy the current weight values into the per-step execution layouts.

        Sparse weights keep a copy of their values laid out for the per-step
        kernels (``numlstm.layouts``). ``forward`` refreshes it on every call
        that uses it (batch < ``config.STEP_MAX_B``). A stream refreshes it at
        its next step after ``parameters()`` was called (optimizers call it
        every step); after writing again into arrays obtained from an earlier
        ``parameters()`` call, call this before the next ``Stream.step``.
        """
        self.host_params.refresh_layouts()
        self.layouts_stale = False

    # ------------------------------------------------------------------
    # Forward and backward (numlstm.engine)
    # ------------------------------------------------------------------

    def forward(self, x, state=None, *, lengths=None, training=False, checkpoint=None,
                memory_budget=None, to_host=False):
        """Run the LSTM over a batch of sequences.

        Parameters
        ----------
        x : array (T, B, I), or (B, T, I) when ``batch_first``, or (T, I)
            Floating-point input; another float precision is converted. NaN or
            inf entries propagate to the outputs of their sequence, as IEEE
            arithmetic does; they are not checked for.
        state : tuple (h0 (D*L, B, O), c0 (D*L, B, H)), optional
            Initial state (zeros when omitted); (D*L, O), (D*L, H) for (T, I) x.
        lengths : array of int (B,), optional
            Each sequence's valid length in [1, T], in any order. Outputs past
            a sequence's end are zero, its final state is the state at its
            last valid step, and the reverse direction starts at its own end.
        training : bool
            Record what ``backward`` needs and apply dropout.
        checkpoint : None, "auto" or int >= 1
            Training only. None keeps the full tape: gates and states of every
            step, layer and direction, O(L*D*T*B*H) bytes. An int k keeps
            only the state entering every k-th step (plus the layer inputs
            and dropout masks, which backward needs anyway); ``backward`` then
            recomputes each segment's forward from its saved state, one
            segment at a time, last first: one extra forward pass of compute
            for O(L*D*(T/k)*B*H + k*B*H) bytes. ``"auto"`` takes
            k = ceil(sqrt(T)). Results equal the full tape's up to rounding.
        memory_budget : int, optional
            Training only, instead of ``checkpoint``: bytes the training
            workspace may take (the ``activations + workspace`` of
            ``memory_plan``, which is exactly what the workspace allocates;
            returned arrays, parameters, gradients and sparse weights'
            transposed patterns are outside it). The rule: the full tape if
            it fits (no recompute, fastest); else the checkpoint plan with the
            fewest segments that fits, i.e. segment length ceil(T/m) for the
            smallest m (every checkpoint plan recomputes each step once, and
            fewer segments make fewer, larger kernel calls). ValueError when
            even the smallest plan does not fit, with that plan's bytes. A
            workspace block left larger than the budget by an earlier call is
            released first (the workspace otherwise only grows).
        to_host : bool
            On the device (``to("cuda")``): return NumPy arrays instead of
            device arrays. Ignored on the CPU.

        Returns
        -------
        y : array (T, B, D*O) (or batch_first / unbatched like x)
        (h_n, c_n) : arrays (D*L, B, O), (D*L, B, H)

        Raises RuntimeError while another thread runs this model's forward
        or backward (they share the model's workspace and tape).
        """
        with self._exclusive():
            return self.engine.forward(x, state, lengths, training, checkpoint, memory_budget,
                                       to_host)

    __call__ = forward

    def backward(self, dy, dstate=None, *, to_host=False):
        """Backpropagate through the last ``forward(..., training=True)``.

        Parameters
        ----------
        dy : array shaped like that forward's y
            Gradient of the loss with respect to y (entries past a sequence's
            length are ignored: those outputs are constant zero).
        dstate : tuple (dh_n, dc_n) shaped like (h_n, c_n), optional
        to_host : bool
            On the device: return NumPy arrays instead of device arrays (the
            gradients stay on the device, in ``grad_arrays()``).

        Returns
        -------
        dx : array shaped like x
        (dh0, dc0) : arrays shaped like the initial state

        Every parameter gradient is ADDED into ``self.grad``; call
        ``zero_grad()`` between steps unless accumulating on purpose. After a
        checkpointed forward, each segment's forward is recomputed here.
        Raises RuntimeError while another thread runs this model's forward
        or backward.
        """
        with self._exclusive():
            return self.engine.backward(dy, dstate, to_host)

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the model for one forward or backward; refuse, never wait, when
        another thread holds it: the two would share its workspace and tape."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("model is busy in another thread: one model's forward and "
                               "backward share its workspace, so they cannot run from two "
                               "threads at once; use a model (or a stream) per thread")
        try:
            yield
        finally:
            self._busy.release()

    def memory_plan(self, T, B, *, training, checkpoint=None):
        """Predicted bytes of a call on (T, B) input on the current backend, from
        the plan ``forward`` carves (``numlstm.plans.memory_plan``): a dict with
        ``activations``, ``workspace``, ``transposed``, ``outputs``, ``segment``."""
        return self.engine.memory_plan(T, B, training=training, checkpoint=checkpoint)

    def release_workspaces(self):
        """Drop any recorded tape and the workspaces' memory; the next call
        allocates them anew (``memory_report(measure=True)`` starts from here)."""
        self.engine.release()

    # ------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------

    def stream(self, batch_size=1, state=None):
        """An O(1)-memory step-by-step runner; see ``numlstm.stream.Stream``."""
        return Stream(self, batch_size, state)

    def stream_pool(self, capacity, *, chunk=None):
        """Up to ``capacity`` independent sessions of this model, any subset
        stepped together in one batched call: a ``numlstm.StreamPool`` (CPU
        only; ``chunk`` rows per batched product, default
        ``numlstm.pool.CHUNK``)."""
        return StreamPool(self, capacity, chunk=CHUNK if chunk is None else chunk)

    def __repr__(self):
        kinds = sorted({weights_mod.describe(w) for w in self.weights().values()})
        return (f"LSTM({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, proj_size={self.proj_size}, "
                f"dtype={self.dtype.name}, weights={'+'.join(kinds)}"
                + (", reverse=True" if self.reverse else "")
                + "".join(f", {k}={v!r}" for k, v in self.cell.options().items()) + ")")

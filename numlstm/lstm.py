"""The LSTM model: parameters, forward, backward, and streams.

Glossary: T time steps, B batch, I input features, H hidden, P projection
(0 = none), O = P or H, G = 4H, L layers, D directions, K a layer's input width
(I for layer 0, D*O above it), N = T*B.

Semantics are torch.nn.LSTM's: gate order i, f, g, o; PyTorch's parameter
names and shapes; time-major (T, B, F) data, with ``batch_first`` a view at
this boundary. The reverse direction of a bidirectional layer runs on a copy
of its input reversed within each sequence's own length, so the kernels only
ever walk forward in time.
"""

import contextlib
import math
import threading

import numpy as np

from numlstm import config
from numlstm import weights as W
from numlstm.kernels import cpu as K
from numlstm.workspace import Workspace, plan_layout, plan_nbytes


def _check_int(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return int(value)


def _check_bool(value, name):
    """A bool (Python's or NumPy's): a truthy string such as "false" is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")
    return bool(value)


# Bounds on a configuration, so that a typo or a forged file header fails at
# once with a clear message instead of looping or allocating without end.
# Sizes index int32 CSR columns; 1 TiB of parameters is beyond any machine
# this runs on.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 10_000
MAX_PARAM_BYTES = 2**40


class _Tape:
    """What a training forward leaves for backward (views into the workspace)."""

    def __init__(self, views, T, B, lengths, rev_index, unbatched, segment=None,
                 seglens=None):
        self.views = views
        self.T, self.B = T, B
        self.lengths = lengths  # (B,) int64
        self.rev_index = rev_index  # (T*B,) int64, or None when D = 1
        self.unbatched = unbatched
        self.segment = segment  # checkpoint segment length, or None for the full tape
        self.seglens = seglens  # (nseg, B) int64 valid steps per segment, when checkpointed
        self.used = False


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

    Attributes
    ----------
    grad : dict[str, np.ndarray or scipy.sparse.csr_array]
        Parameter gradients, keyed like ``state_dict``; ``backward`` adds into
        them. A CSR weight's gradient is a CSR with exactly its pattern whose
        ``.data`` is the live gradient buffer.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 dtype=np.float32, seed=None):
        self._configure(input_size, hidden_size, num_layers, bias=bias,
                        batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                        proj_size=proj_size, dtype=dtype, seed=seed)
        k = 1.0 / np.sqrt(self.hidden_size)
        params = {}
        for name, shape in self._param_shapes().items():
            params[name] = self._rng.uniform(-k, k, shape).astype(self.dtype)
        self._set_params(params)

    def __getstate__(self):
        """Pickle the configuration and parameters; the lock, the workspaces and
        any recorded tape stay behind (a copy starts with empty buffers)."""
        if self._device is not None:  # a copy comes back on the CPU, with current values
            self._device.pull()
        state = dict(self.__dict__, _tape=None, _train_ws=Workspace(self.dtype),
                     _infer_ws=Workspace(self.dtype), _device=None)
        del state["_busy"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._busy = threading.Lock()

    @classmethod
    def _without_params(cls, **config):
        """A validated configuration with no parameters yet (``_install`` them):
        what ``numlstm.load`` builds, so that a file's header cannot make it
        allocate a random initialisation of whatever size it declares."""
        model = cls.__new__(cls)
        model._configure(**config)
        return model

    def _configure(self, input_size, hidden_size, num_layers=1, *, bias=True,
                   batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                   dtype=np.float32, seed=None):
        self.input_size = _check_int(input_size, "input_size", 1, MAX_SIZE)
        self.hidden_size = _check_int(hidden_size, "hidden_size", 1, MAX_SIZE)
        self.num_layers = _check_int(num_layers, "num_layers", 1, MAX_LAYERS)
        self.proj_size = _check_int(proj_size, "proj_size", 0, MAX_SIZE)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size}, "
                             f"got {proj_size}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.bias = _check_bool(bias, "bias")
        self.batch_first = _check_bool(batch_first, "batch_first")
        self.dropout = float(dropout)
        self.bidirectional = _check_bool(bidirectional, "bidirectional")
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.proj_size or self.hidden_size  # O
        self._check_param_bytes()
        self._rng = np.random.default_rng(seed)
        self._no_bias = np.zeros(4 * self.hidden_size, self.dtype)  # read-only zeros
        self._no_proj = W.Dense(np.zeros((0, 0), self.dtype)).kernel_args()  # P = 0
        self.version = 0
        self._busy = threading.Lock()  # held by a running forward or backward
        self._train_ws = Workspace(self.dtype)
        self._infer_ws = Workspace(self.dtype)

    def _check_param_bytes(self):
        """Refuse a configuration whose parameters exceed ``MAX_PARAM_BYTES``
        (counted in closed form: no per-layer loop, no allocation)."""
        H, O, P, D = self.hidden_size, self.output_size, self.proj_size, self.num_directions
        extra = (8 * H if self.bias else 0) + P * H + 4 * H * O  # biases, W_hr, W_hh
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

    _device = None  # numlstm.device.DeviceModel while the model lives on the GPU
    _layouts_stale = False  # whether refresh_layouts is due (parameters() was called)

    @property
    def device(self):
        """Where the parameters live and the model runs: ``"cpu"`` or ``"cuda"``."""
        return "cpu" if self._device is None else "cuda"

    def to(self, device):
        """Move the model to ``device`` (``"cuda"`` or ``"cpu"``), in place; returns it.

        ``to("cuda")`` copies every parameter to the GPU once (dense, CSR and
        BSR weights; quantized ones are refused) with zero gradients;
        ``forward``, ``backward``, ``stream``, ``parameters`` and
        ``grad_arrays`` (so the optimizers) then run on the device and return
        device arrays (``to_host=True`` asks for NumPy). ``to("cpu")`` copies
        parameters and gradients back. See ``numlstm.device``.
        """
        from numlstm.device import move

        return move(self, device)

    # ------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------

    def _param_shapes(self):
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
        return shapes

    def _set_params(self, values):
        """Validate every value, then install them all with fresh zero gradients
        (a bad value leaves the model as it was)."""
        params = {}  # name -> a weights.Dense / CSR / BSR, or a bias array
        for name, shape in self._param_shapes().items():
            if name.startswith("bias"):
                arr = W.check_float_array(values[name], name, shape, self.dtype)
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"{name} must be finite, got NaN or inf values")
                params[name] = arr.copy()
            else:
                params[name] = W.from_value(values[name], name, shape, self.dtype)
        self._install(params)

    def _install(self, params):
        """Make ``params`` (every name, already validated) the model's parameters,
        with fresh zero gradients; streams rebind and the tape is dropped."""
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
        self._tape = None
        self.version += 1  # streams rebind on change

    def state_dict(self):
        """Copies of every parameter: NumPy arrays, ``csr_array`` for CSR weights,
        ``bsr_array`` for block-sparse ones. Quantized values (float16, int8) come
        back dequantized to the model's dtype; compact index types as int32."""
        if self._device is not None:
            self._device.pull()
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
        expected = set(self._param_shapes())
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
        if self._device is not None:
            return self._device.parameters()
        self._layouts_stale = True  # the caller may write: see refresh_layouts
        return {name: (p.values if name.startswith("weight") else p)
                for name, p in self._params.items()}

    def grad_arrays(self):
        """The live gradient arrays, shaped like ``parameters()``'s values."""
        if self._device is not None:
            return self._device.grad_arrays()
        return dict(self._grad_buffers)

    def zero_grad(self):
        """Set every gradient to zero, in place."""
        if self._device is not None:
            return self._device.zero_grad()
        for g in self._grad_buffers.values():
            g.fill(0)

    def weight_bytes(self):
        """Bytes of parameter storage used for inference (biases included), with
        the per-step execution layouts built so far (``numlstm.layouts``)."""
        return sum(p.nbytes for p in self._params.values())

    def _weights(self):
        """name -> storage object of every weight matrix (biases excluded)."""
        if self._device is not None:  # readers (prune, quantize, sparsity) see current values
            self._device.pull()
        return {name: p for name, p in self._params.items() if name.startswith("weight")}

    def _check_trainable(self):
        for name, w in self._weights().items():
            if not w.trainable:
                raise TypeError(f"training needs float weights, but {name} is stored as "
                                f"{W.describe(w)} (quantized, inference only); train before "
                                "quantizing, or call to_dense() first")

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
        for name, w in self._weights().items():
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
        for name, w in self._weights().items():
            params[name] = W.Dense(np.ascontiguousarray(w.to_array(), dtype=self.dtype))
        self._install(params)
        return self

    def _weight(self, kind, layer, d):
        return self._params[f"weight_{kind}_l{layer}{'_reverse' if d else ''}"]

    def _biases(self, layer, d):
        """(bias_ih, bias_hh) of a layer and direction; zeros without bias."""
        if not self.bias:
            return self._no_bias, self._no_bias
        sfx = "_reverse" if d else ""
        return self._params[f"bias_ih_l{layer}{sfx}"], self._params[f"bias_hh_l{layer}{sfx}"]

    # ------------------------------------------------------------------
    # Input checks
    # ------------------------------------------------------------------

    def _check_x(self, x):
        """Return x as time-major (T, B, I), and whether it was unbatched (T, I)."""
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array, got dtype {arr.dtype}")
        I = self.input_size
        if arr.ndim == 2:
            if arr.shape[1] != I or arr.shape[0] < 1:
                raise ValueError(f"x must have shape (T, {I}) or {self._x_layout(I)} for "
                                 f"input_size={I}, got {arr.shape}")
            return arr[:, None, :], True
        if arr.ndim != 3 or arr.shape[2] != I or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"x must have shape {self._x_layout(I)} for input_size={I}, "
                             f"got {arr.shape}")
        return (arr.transpose(1, 0, 2) if self.batch_first else arr), False

    def _x_layout(self, width):
        return f"(B, T, {width})" if self.batch_first else f"(T, B, {width})"

    def _check_state(self, state, B, unbatched, what="state"):
        """Return (h0, c0) as contiguous (D*L, B, O), (D*L, B, H) arrays."""
        DL, O, H = self.num_directions * self.num_layers, self.output_size, self.hidden_size
        if state is None:
            return np.zeros((DL, B, O), self.dtype), np.zeros((DL, B, H), self.dtype)
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{what} must be a tuple (h, c), got {type(state).__name__}")
        out = []
        for arr, width, label in ((state[0], O, "h"), (state[1], H, "c")):
            shape = (DL, width) if unbatched else (DL, B, width)
            arr = W.check_float_array(arr, f"{what}[{'0' if label == 'h' else '1'}] ({label})",
                                      shape, self.dtype)
            out.append(arr.reshape(DL, B, width))
        return out[0], out[1]

    @staticmethod
    def _check_lengths(lengths, T, B, unbatched):
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

    # ------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------

    def _plan(self, T, B, training, segment=None):
        """The named buffers (and shapes) a forward, and in training its backward, needs."""
        return self._plan_parts(T, B, training, segment)[0]

    def _plan_parts(self, T, B, training, segment=None):
        """``(spec, kept)``: the buffers of a call and the names of the tape among them.

        ``spec`` lists ``(name, shape)`` for ``Workspace.carve``; ``kept`` names
        what a training forward leaves for backward (the recorded activations).
        ``segment`` (training only) is the checkpoint segment length S <= T:
        the tape then keeps, per layer and direction, only the state at each
        segment's first step, and the recurrence buffers hold one segment.
        """
        L, D, H, O, P = (self.num_layers, self.num_directions, self.hidden_size,
                         self.output_size, self.proj_size)
        G, I = 4 * H, self.input_size
        kmax = max(I, D * O)
        ckpt = training and segment is not None
        S = segment if ckpt else T  # steps the recurrence buffers hold
        R = S if D == 2 else 0  # rows of the buffers only the reverse direction needs
        spec = [("xrev", (R, B, kmax)),  # a layer's input, reversed per sequence
                ("odir", (R, B, O)),  # reverse direction's output, before un-reversal
                ("scratch", (B, G))]
        kept = []
        if ckpt:  # one set of segment buffers, recomputed in backward
            nseg = -(-T // S)
            spec += [("gates", (S, B, G)), ("hs", (S + 1, B, O)), ("cs", (S + 1, B, H)),
                     ("rs", (S if P else 0, B, H))]
            for l in range(L):
                for d in range(D):  # the state entering each segment
                    kept += [(f"hb{l}{d}", (nseg, B, O)), (f"cb{l}{d}", (nseg, B, H))]
        else:
            # Inference reuses one set of recurrence buffers for every layer and
            # direction; training keeps them all, as the tape.
            tapes = [(l, d) for l in range(L) for d in range(D)] if training else [(0, 0)]
            rec = kept if training else spec
            for l, d in tapes:
                rec += [(f"gates{l}{d}", (T, B, G)), (f"hs{l}{d}", (T + 1, B, O)),
                        (f"cs{l}{d}", (T + 1, B, H)), (f"rs{l}{d}", (T if P else 0, B, H))]
        if not training:  # layer inputs above layer 0, ping-pong
            spec += [(f"x{l}", (T, B, D * O)) for l in range(1, min(L, 3))]
            return spec, set()
        kept.append(("x0", (T, B, I)))  # every layer's input
        kept += [(f"x{l}", (T, B, D * O)) for l in range(1, L)]
        if self.dropout:
            kept += [(f"mask{l}", (T, B, D * O)) for l in range(L - 1)]
        amax = max(kmax, H)
        # dy of one direction in its own time order; with D = 1 the kernel reads
        # dy itself (full tape: unless batch_first left it strided).
        dyd = R if ckpt else (T if D == 2 or self.batch_first else 0)
        spec += [("dyd", (dyd, B, O)),
                 ("dytmp", (R, B, D * O if ckpt else O)),
                 ("dhs", (S if P else 0, B, O)),  # gradient reaching each h_t
                 ("dh", (B, O)), ("dc", (B, H)),  # carried state gradients
                 ("scratch_o", (B, O)), ("scratch_h", (B, H)),
                 # dx of layers 1, 3, ... and 2, 4, ...; layer 0's is the returned dx
                 ("dxa", (T if L > 1 else 0, B, D * O)),
                 ("dxb", (T if L > 2 else 0, B, D * O)),
                 ("dxd", (R, B, kmax)), ("dxg", (R, B, kmax)),  # the reverse direction's dx
                 ("gflat", (G * amax,))]  # dense weight-gradient scratch
        if any(w.format != "dense" for w in self._weights().values()):
            # dz^T (G, S*B) and a^T (K, S*B): the SDDMM reads contiguous rows
            spec += [("dz_t", (G * S * B,)), ("a_t", (amax * S * B,))]
        return spec + kept, {name for name, _ in kept}

    def _segment_length(self, T, checkpoint, training):
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

    def _budget_segment(self, T, B, budget):
        """The fastest plan whose workspace fits ``budget`` bytes: None for the full
        tape, else the checkpoint segment length (see ``forward``)."""
        def nbytes(segment):
            return plan_nbytes(self._plan_parts(T, B, True, segment)[0], self.dtype)

        smallest = full = nbytes(None)
        if full <= budget:
            return None
        # m segments need at least ceil(T/m) steps each; that length is the
        # smallest plan with m segments, so try m = 1, 2, ... in that form.
        for k in sorted({-(-T // m) for m in range(1, T + 1)}, reverse=True):
            size = nbytes(k)
            if size <= budget:
                return k
            smallest = min(smallest, size)
        raise ValueError(f"memory_budget={budget} bytes cannot hold a training step of "
                         f"T={T}, B={B}: the smallest plan needs {smallest} bytes")

    def _resolve_segment(self, T, B, training, checkpoint, memory_budget):
        if memory_budget is None:
            return self._segment_length(T, checkpoint, training)
        budget = _check_int(memory_budget, "memory_budget", 1)
        if not training:
            raise ValueError(f"memory_budget={budget} needs training=True: it decides what a "
                             "training forward keeps for backward")
        if checkpoint is not None:
            raise ValueError(f"pass checkpoint or memory_budget, not both: got "
                             f"checkpoint={checkpoint!r}, memory_budget={budget}")
        return self._budget_segment(T, B, budget)

    def _memory_plan(self, T, B, *, training, checkpoint=None):
        """Predicted bytes of a call on (T, B) input, from the plan ``forward`` carves.

        Returns a dict:

        - ``activations``: the tape, kept from forward to backward (0 for inference);
        - ``workspace``: every other workspace buffer (scratch, dx, recompute);
          ``activations + workspace`` is exactly the block an empty workspace
          allocates for the call (alignment included);
        - ``transposed``: training only, the transposed patterns (values,
          indices, indptr, perm) that sparse weights build for W^T products;
        - ``outputs``: the arrays the call returns (y, h_n, c_n; in training
          also backward's dx, dh0, dc0, and batch_first's transposed copies)
          plus its small per-call arrays (reverse index, segment
          lengths);
        - ``segment``: the checkpoint segment length used, or None.
        """
        T = _check_int(T, "T", 1)
        B = _check_int(B, "B", 1)
        segment = self._segment_length(T, checkpoint, training)
        spec, kept = self._plan_parts(T, B, training, segment)
        entries, _ = plan_layout(spec, self.dtype)
        item = self.dtype.itemsize
        activations = sum(padded for name, _, _, _, padded in entries if name in kept) * item
        L, D, O, H = self.num_layers, self.num_directions, self.output_size, self.hidden_size
        states = D * L * B * (O + H) * item
        ys = T * B * D * O * item
        outputs = ys + states  # y, (h_n, c_n)
        outputs += T * B * 8 if D == 2 else 0  # reverse index
        strided = self.batch_first and T > 1 and B > 1  # batch_first copies
        transposed = 0
        if not training:
            outputs += ys if strided else 0  # y and its transposed copy, both at once
        else:
            dxs = T * B * self.input_size * item
            outputs += dxs + states + B * 8 + (-(-T // segment) * B * 8 if segment else 0)
            if strided:  # dx's transposed copy, or before it, checkpoint's contiguous dy
                outputs += max(dxs, ys) if segment else dxs
            transposed = sum(_transposed_nbytes(w) for w in self._weights().values())
        return {"activations": activations,
                "workspace": plan_nbytes(spec, self.dtype) - activations,
                "transposed": transposed, "outputs": outputs, "segment": segment}

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
            ``_memory_plan``, which is exactly what the workspace allocates;
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
        if self._device is not None:
            with self._exclusive():
                return self._device.forward(x, state, lengths, training, checkpoint,
                                            memory_budget, to_host)
        _refuse_device_arrays(x=x, state=state)
        with self._exclusive():
            return self._forward(x, state, lengths, training, checkpoint, memory_budget)

    def _forward(self, x, state, lengths, training, checkpoint, memory_budget):
        xt, unbatched = self._check_x(x)
        if xt.shape[1] < config.STEP_MAX_B:
            # The recurrence will read the layouts' copies: refreshed on every
            # such call, so that values written in place in any way are seen.
            self.refresh_layouts()
        if training:
            self._check_trainable()
        T, B = xt.shape[0], xt.shape[1]
        lengths = self._check_lengths(lengths, T, B, unbatched)
        h0, c0 = self._check_state(state, B, unbatched)
        seg = self._resolve_segment(T, B, training, checkpoint, memory_budget)
        ws = self._train_ws if training else self._infer_ws
        if memory_budget is not None and ws.nbytes > memory_budget:
            self._tape = None
            ws.release()  # a block left by a bigger call would break the budget
        v = ws.carve(self._plan(T, B, training, seg))
        if training:
            np.copyto(v["x0"], xt, casting="same_kind")
            layer_in = v["x0"]
            self._tape = None  # the tape being overwritten is no longer valid
        else:
            layer_in = np.ascontiguousarray(xt, dtype=self.dtype)
        rev_index = self._reverse_index(T, B, lengths) if self.bidirectional else None
        seglens = None
        if seg is not None:  # (nseg, B): each sequence's valid steps within each segment
            starts = np.arange(0, T, seg)
            seglens = np.clip(lengths[None, :] - starts[:, None], 0,
                              np.minimum(seg, T - starts)[:, None]).astype(np.int64)

        L, D, O = self.num_layers, self.num_directions, self.output_size
        h_n = np.empty((D * L, B, O), self.dtype)
        c_n = np.empty((D * L, B, self.hidden_size), self.dtype)
        y = np.empty((T, B, D * O), self.dtype)  # the top layer writes the result directly
        for l in range(L):
            out = y if l == L - 1 else (v[f"x{l + 1}"] if training else v[f"x{1 + l % 2}"])
            for d in range(D):
                i = l * D + d
                if seg is not None:
                    h_n[i], c_n[i] = self._layer_forward_segments(
                        v, l, d, layer_in, out, h0[i], c0[i], lengths, seglens, rev_index, seg)
                    continue
                tag = f"{l}{d}" if training else "00"
                hs, cs = v[f"hs{tag}"], v[f"cs{tag}"]
                hs[0], cs[0] = h0[i], c0[i]
                self._layer_forward(v, tag, l, d, layer_in, lengths, rev_index)
                h_n[i], c_n[i] = hs[T], cs[T]
                # This direction's output, in time order, zero past each length.
                odir = hs[1:]
                if d:
                    K.gather_rows(v["odir"].reshape(T * B, O), odir.reshape(T * B, O), rev_index)
                    odir = v["odir"]
                np.copyto(out[:, :, d * O:(d + 1) * O], odir)
                _zero_padding(out[:, :, d * O:(d + 1) * O], lengths, 0)
            if training and self.dropout and l < L - 1:
                self._apply_dropout(v[f"mask{l}"], out)
            layer_in = out

        if training:
            self._tape = _Tape(v, T, B, lengths, rev_index, unbatched, seg, seglens)
        if unbatched:
            return y[:, 0], (h_n[:, 0], c_n[:, 0])
        if self.batch_first:
            y = np.ascontiguousarray(y.transpose(1, 0, 2))
        return y, (h_n, c_n)

    __call__ = forward

    def _apply_dropout(self, mask, out):
        """Draw a dropout mask (values 0 or 1/(1-p)) and apply it to ``out`` in place."""
        p = self.dropout
        self._rng.random(out=mask, dtype=self.dtype)  # u in [0, 1)
        # keep iff u >= p, i.e. floor(u + 1 - p) == 1; computed without a temporary.
        mask += 1 - p
        np.floor(mask, out=mask)
        mask *= 1 / (1 - p)
        out *= mask

    @staticmethod
    def _reverse_index(T, B, lengths):
        """Row index (T*B,) reversing each sequence within its own length.

        Row t*B + b maps to (len_b - 1 - t)*B + b for t < len_b and to itself
        on padding; the map is its own inverse.
        """
        t = np.arange(T)[:, None]
        src = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
        return (src * B + np.arange(B)[None, :]).reshape(-1).astype(np.int64)

    def _layer_forward(self, v, tag, l, d, layer_in, lengths, rev_index):
        T, B, width = layer_in.shape
        x2d = layer_in.reshape(T * B, width)
        if d:
            xr = _first(v["xrev"], T * B * width).reshape(T * B, width)
            K.gather_rows(xr, x2d, rev_index)
            x2d = xr
        gates = v[f"gates{tag}"]
        G = gates.shape[2]
        _matmul_batch(gates.reshape(T * B, G), x2d, self._weight("ih", l, d))
        # Arguments go as one prebuilt tuple: numba 0.68 leaks ~30 bytes per
        # array when positional and *-unpacked arguments are mixed in a call.
        args = ((v[f"hs{tag}"], v[f"cs{tag}"], gates, v[f"rs{tag}"], v["scratch"], lengths)
                + self._biases(l, d) + self._recurrent_args(l, d, B))
        K.lstm_seq_forward(*args)

    def _layer_forward_segments(self, v, l, d, layer_in, out, h0, c0, lengths, seglens,
                                rev_index, k):
        """Checkpointed forward of layer l, direction d, k steps at a time.

        Saves the state entering each segment in hb, cb (nseg, B, O / H),
        writes the direction's output into ``out`` (T, B, D*O) and returns the
        final (h, c) as views.
        """
        T, B = layer_in.shape[:2]
        O = self.output_size
        hs, cs = v["hs"], v["cs"]  # (k+1, B, O), (k+1, B, H)
        hb, cb = v[f"hb{l}{d}"], v[f"cb{l}{d}"]
        hs[0], cs[0] = h0, c0
        out2d = out.reshape(T * B, -1)
        for s in range(hb.shape[0]):
            t0 = s * k
            n = min(k, T - t0)
            hb[s], cb[s] = hs[0], cs[0]
            self._segment_forward(v, l, d, layer_in, t0, n, seglens[s], rev_index)
            if d:  # rows of the reversed sequence go back to their own time steps
                oseg = v["odir"][:n]
                np.copyto(oseg, hs[1:n + 1])
                _zero_padding(oseg, lengths, t0)
                out2d[rev_index[t0 * B:(t0 + n) * B], O:] = oseg.reshape(n * B, O)
            else:
                np.copyto(out[t0:t0 + n, :, :O], hs[1:n + 1])
                _zero_padding(out[t0:t0 + n, :, :O], lengths, t0)
            hs[0], cs[0] = hs[n], cs[n]
        return hs[0], cs[0]

    def _segment_forward(self, v, l, d, layer_in, t0, n, lens, rev_index):
        """Steps [t0, t0+n) of layer l, direction d (in its own time order) into the
        segment buffers gates, hs, cs, rs, from the state in hs[0], cs[0].

        ``lens`` (B,) counts each sequence's valid steps in the segment. Returns
        the segment's input rows (n*B, K).
        """
        T, B, width = layer_in.shape
        rows = n * B
        if d:
            xs = _first(v["xrev"], rows * width).reshape(rows, width)
            K.gather_rows(xs, layer_in.reshape(T * B, width), rev_index[t0 * B:t0 * B + rows])
        else:
            xs = layer_in[t0:t0 + n].reshape(rows, width)
        gates = v["gates"][:n]
        _matmul_batch(gates.reshape(rows, -1), xs, self._weight("ih", l, d))
        args = ((v["hs"][:n + 1], v["cs"][:n + 1], gates, v["rs"][:n], v["scratch"], lens)
                + self._biases(l, d) + self._recurrent_args(l, d, B))
        K.lstm_seq_forward(*args)
        return xs

    def _step_args(self, kind, l, d, B):
        """Kernel arguments of weight ``kind`` ("ih", "hh", "hr") for per-step
        products of B rows: its per-step execution layout (``numlstm.layouts``)
        for B < ``config.STEP_MAX_B``, else its stored arrays. No projection:
        the empty projection arguments."""
        if kind == "hr" and not self.proj_size:
            return self._no_proj
        w = self._weight(kind, l, d)
        return w.step_args() if B < config.STEP_MAX_B else w.kernel_args()

    def _recurrent_args(self, l, d, B):
        """W_hh's and W_hr's arguments for a recurrence over B rows."""
        return self._step_args("hh", l, d, B) + self._step_args("hr", l, d, B)

    def refresh_layouts(self):
        """Copy the current weight values into the per-step execution layouts.

        Sparse weights keep a copy of their values laid out for the per-step
        kernels (``numlstm.layouts``). ``forward`` refreshes it on every call
        that uses it (batch < ``config.STEP_MAX_B``). A stream refreshes it at
        its next step after ``parameters()`` was called (optimizers call it
        every step); after writing again into arrays obtained from an earlier
        ``parameters()`` call, call this before the next ``Stream.step``.
        """
        for w in self._weights().values():
            w.refresh_step()
        self._layouts_stale = False

    def _proj_args(self, l, d, transposed=False):
        if not self.proj_size:
            return self._no_proj
        w = self._weight("hr", l, d)
        return w.kernel_args_t() if transposed else w.kernel_args()

    # ------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------

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
        if self._device is not None:
            with self._exclusive():
                return self._device.backward(dy, dstate, to_host)
        _refuse_device_arrays(dy=dy, dstate=dstate)
        with self._exclusive():
            return self._backward(dy, dstate)

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

    def _backward(self, dy, dstate):
        tape = self._tape
        if tape is None:
            raise RuntimeError("backward needs a preceding forward(..., training=True); "
                               "none is recorded (load_state_dict also discards it)")
        if tape.used:
            raise RuntimeError("backward was already called for this forward; run "
                               "forward(..., training=True) again")
        T, B, v = tape.T, tape.B, tape.views
        L, D, O, H = self.num_layers, self.num_directions, self.output_size, self.hidden_size
        dyt = self._check_dy(dy, T, B, tape.unbatched)
        dh_n, dc_n = self._check_state(dstate, B, tape.unbatched, what="dstate")
        tape.used = True  # backward overwrites the tape's activations with dz

        dh0 = np.empty((D * L, B, O), self.dtype)
        dc0 = np.empty((D * L, B, H), self.dtype)
        dcur = dyt  # gradient of layer l's output (T, B, D*O)
        if tape.segment is not None and not _kernel_ready(dcur):
            dcur = np.array(dcur, order="C")  # batch_first: segments read rows of dy
        for l in range(L - 1, -1, -1):
            if l == 0:  # the returned dx, written directly
                dx_l = np.empty((T, B, self.input_size), self.dtype)
            else:
                dx_l = v["dxa" if l % 2 else "dxb"]  # (T, B, D*O)
            for d in range(D):
                i = l * D + d
                dh, dc = v["dh"], v["dc"]
                dh[...] = dh_n[i]
                dc[...] = dc_n[i]
                if tape.segment is None:
                    dyd = self._direction_dy(v, dcur, d, tape.rev_index)
                    self._layer_backward(v, tape, l, d, dyd, dx_l)
                else:
                    self._layer_backward_segments(v, tape, l, d, dcur, dx_l)
                dh0[i], dc0[i] = dh, dc
            if l > 0 and self.dropout:
                dx_l *= v[f"mask{l - 1}"]
            dcur = dx_l

        dx = dcur
        if tape.unbatched:
            return dx[:, 0], (dh0[:, 0], dc0[:, 0])
        if self.batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, (dh0, dc0)

    def _check_dy(self, dy, T, B, unbatched):
        DO = self.num_directions * self.output_size
        if unbatched:
            arr = W.check_float_array(dy, "dy", (T, DO), self.dtype)
            return arr[:, None, :]
        shape = (B, T, DO) if self.batch_first else (T, B, DO)
        arr = W.check_float_array(dy, "dy", shape, self.dtype)
        return arr.transpose(1, 0, 2) if self.batch_first else arr

    def _direction_dy(self, v, dcur, d, rev_index):
        """Full tape: direction d's part of dcur (T, B, D*O) as a contiguous
        (T, B, O) array in its own time order (dcur itself when D = 1)."""
        T, B = dcur.shape[:2]
        O = self.output_size
        dyd = v["dyd"]
        if self.num_directions == 1:
            if _kernel_ready(dcur):
                return dcur
            if dyd.shape[0] != T:  # a read-only dy: the plan has no buffer to copy it into
                return np.array(dcur, order="C")
            np.copyto(dyd, dcur)
        elif d:
            np.copyto(v["dytmp"], dcur[:, :, O:])
            K.gather_rows(dyd.reshape(T * B, O), v["dytmp"].reshape(T * B, O), rev_index)
        else:
            np.copyto(dyd, dcur[:, :, :O])
        return dyd

    def _segment_dy(self, v, dcur, d, t0, n, rev_index):
        """Checkpointed: direction d's dy over steps [t0, t0+n) of its own time
        order, (n, B, O) contiguous; dcur (T, B, D*O) is contiguous."""
        if self.num_directions == 1:
            return dcur[t0:t0 + n]
        T, B = dcur.shape[:2]
        O = self.output_size
        dys = v["dyd"][:n]
        if d:  # whole rows first: gathering from a strided view would copy all of it
            rows = _first(v["dytmp"], n * B * 2 * O).reshape(n * B, 2 * O)
            K.gather_rows(rows, dcur.reshape(T * B, 2 * O), rev_index[t0 * B:(t0 + n) * B])
            np.copyto(dys.reshape(n * B, O), rows[:, O:])
        else:
            np.copyto(dys, dcur[t0:t0 + n, :, :O])
        return dys

    def _layer_backward(self, v, tape, l, d, dyd, dx_l):
        """BPTT through layer l, direction d over the full tape; writes (d = 0) or
        adds (d = 1) its dx into dx_l."""
        T, B = tape.T, tape.B
        N = T * B
        tag = f"{l}{d}"
        gates, hs, rs = v[f"gates{tag}"], v[f"hs{tag}"], v[f"rs{tag}"]
        args = ((v["dh"], v["dc"], gates, v["dhs"], v["scratch_o"], v["scratch_h"],
                 dyd, hs, v[f"cs{tag}"], rs, tape.lengths)
                + self._weight("hh", l, d).kernel_args_t()
                + self._proj_args(l, d, transposed=True))
        K.lstm_seq_backward(*args)
        width = dx_l.shape[2]
        x2d = (v["x0"] if l == 0 else v[f"x{l}"]).reshape(N, width)
        if d:  # the reverse direction ran on its input reversed per sequence
            xr = _first(v["xrev"], N * width).reshape(N, width)
            K.gather_rows(xr, x2d, tape.rev_index)
            x2d = xr
        self._accumulate(v, l, d, gates.reshape(N, -1), x2d, hs[:T].reshape(N, -1),
                         v["dhs"], rs, dx_l, 0, tape.rev_index)

    def _layer_backward_segments(self, v, tape, l, d, dcur, dx_l):
        """Checkpointed BPTT through layer l, direction d: segments last to first,
        each recomputed from its saved state, dh and dc carried between them."""
        T, B, k = tape.T, tape.B, tape.segment
        hs, cs, gates, rs = v["hs"], v["cs"], v["gates"], v["rs"]
        hb, cb = v[f"hb{l}{d}"], v[f"cb{l}{d}"]
        layer_in = v["x0"] if l == 0 else v[f"x{l}"]
        wt = (self._weight("hh", l, d).kernel_args_t()
              + self._proj_args(l, d, transposed=True))
        for s in range(hb.shape[0] - 1, -1, -1):
            t0 = s * k
            n = min(k, T - t0)
            hs[0], cs[0] = hb[s], cb[s]
            xs = self._segment_forward(v, l, d, layer_in, t0, n, tape.seglens[s],
                                       tape.rev_index)
            dys = self._segment_dy(v, dcur, d, t0, n, tape.rev_index)
            args = ((v["dh"], v["dc"], gates[:n], v["dhs"][:n], v["scratch_o"],
                     v["scratch_h"], dys, hs[:n + 1], cs[:n + 1], rs[:n], tape.seglens[s])
                    + wt)
            K.lstm_seq_backward(*args)
            self._accumulate(v, l, d, gates[:n].reshape(n * B, -1), xs,
                             hs[:n].reshape(n * B, -1), v["dhs"][:n], rs[:n], dx_l, t0,
                             tape.rev_index)

    def _accumulate(self, v, l, d, dz, x2d, h2d, dhs, rs, dx_l, t0, rev_index):
        """Gradients of the rows dz (n*B, G) of steps [t0, t0+n) of layer l,
        direction d: add into the weight and bias gradients, and write (d = 0)
        or add (d = 1, rows in reversed order) the dx of those steps into dx_l."""
        rows = dz.shape[0]
        sfx = "_reverse" if d else ""
        g = self._grad_buffers
        w_ih = self._weight("ih", l, d)
        self._weight_grad(g[f"weight_ih_l{l}{sfx}"], dz, x2d, w_ih, v)
        # A sparse W_ih left dz^T in the workspace: W_hh's SDDMM reuses it.
        self._weight_grad(g[f"weight_hh_l{l}{sfx}"], dz, h2d, self._weight("hh", l, d), v,
                          dz_ready=not isinstance(w_ih, W.Dense))
        if self.proj_size:
            self._weight_grad(g[f"weight_hr_l{l}{sfx}"], dhs.reshape(rows, -1),
                              rs.reshape(rows, -1), self._weight("hr", l, d), v)
        if self.bias:
            db = v["scratch"][0]
            np.sum(dz, axis=0, out=db)
            g[f"bias_ih_l{l}{sfx}"] += db
            g[f"bias_hh_l{l}{sfx}"] += db
        T, B, width = dx_l.shape
        dx2d = dx_l.reshape(T * B, width)
        r0 = t0 * B
        if not d:  # the forward direction comes first: its dx goes straight in
            _matmul_batch(dx2d[r0:r0 + rows], dz, w_ih, transposed=True)
            return
        dxd = _first(v["dxd"], rows * width).reshape(rows, width)
        _matmul_batch(dxd, dz, w_ih, transposed=True)
        dxg = _first(v["dxg"], rows * width).reshape(rows, width)
        if rows == T * B:  # all rows: the reverse index is a permutation of them
            K.gather_rows(dxg, dxd, rev_index)
            dx2d += dxg
        else:
            index = rev_index[r0:r0 + rows]
            K.gather_rows(dxg, dx2d, index)
            dxg += dxd
            dx2d[index] = dxg

    def _weight_grad(self, grad, dz, a, weight, v, dz_ready=False):
        """grad += dz^T a on the weight's storage: dense (BLAS) or its sparse
        pattern (SDDMM of dz^T and a^T, transposed into the workspace; with
        ``dz_ready`` its dz_t view already holds this dz^T)."""
        R, C = weight.shape
        N = dz.shape[0]
        if isinstance(weight, W.Dense):
            tmp = _first(v["gflat"], R * C).reshape(R, C)
            K.dense_grad_acc(grad, tmp, np.ascontiguousarray(dz), np.ascontiguousarray(a))
            return
        dz_t = _first(v["dz_t"], R * N).reshape(R, N)
        a_t = _first(v["a_t"], C * N).reshape(C, N)
        transpose = K.transpose_parallel if R * N >= config.PARALLEL_MIN_WORK else K.transpose
        if not dz_ready:
            transpose(dz_t, np.ascontiguousarray(dz))
        transpose(a_t, np.ascontiguousarray(a))
        _sddmm_acc(grad, dz_t, a_t, weight)

    # ------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------

    def stream(self, batch_size=1, state=None):
        """An O(1)-memory step-by-step runner; see ``numlstm.stream.Stream``
        (``numlstm.device.DeviceStream`` on the device)."""
        from numlstm.stream import Stream

        return Stream(self, batch_size, state)

    def __repr__(self):
        kinds = sorted({W.describe(w) for w in self._weights().values()})
        return (f"LSTM({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, proj_size={self.proj_size}, "
                f"dtype={self.dtype.name}, weights={'+'.join(kinds)})")


def _refuse_device_arrays(**args):
    """A CPU model refuses GPU arrays (numba's would silently copy to the host).
    ``x`` / ``dy`` are one array each; ``state`` / ``dstate`` a pair, or None."""
    for name, value in args.items():
        pair = name in ("state", "dstate") and isinstance(value, (tuple, list))
        for i, a in enumerate(value if pair else (value,)):
            if not isinstance(a, np.ndarray) and (getattr(a, "__cuda_ndarray__", False)
                                                  or hasattr(a, "__cuda_array_interface__")):
                label = f"{name}[{i}]" if pair else name
                raise TypeError(f"{label} is a CUDA device array ({type(a).__name__}), but "
                                "the model is on the CPU: call model.to('cuda') first, or "
                                "pass a NumPy array")


def _zero_padding(out, lengths, t0):
    """Zero the padding in ``out`` (n, B, F), which holds steps t0 .. t0+n-1 (in
    either direction's time order): the rows of steps t >= lengths[b]. (A
    multiply by a broadcast mask would cost NumPy a 32-64 KiB buffer.)"""
    for b in np.flatnonzero(lengths < t0 + out.shape[0]):
        out[max(lengths[b] - t0, 0):, b] = 0


def _kernel_ready(a):
    """Whether a kernel can take ``a`` as it is (C-contiguous and writeable, the
    array type every kernel is compiled for)."""
    return a.flags.c_contiguous and a.flags.writeable


def _transposed_nbytes(weight):
    """Bytes of the W^T pattern (values, indices, indptr, perm) that a sparse
    weight builds for backward; 0 for dense."""
    if weight.format == "dense":
        return 0
    built = getattr(weight, "_transposed", None)
    if built is not None:
        return sum(a.nbytes for a in built)
    C = weight.shape[1]
    if weight.format == "bsr":
        blocks, bc = weight.data.shape[0], weight.blocksize[1]
        return weight.data.nbytes + blocks * (4 + 8) + (C // bc + 1) * 4
    return weight.nnz * (weight.dtype.itemsize + 4 + 8) + (C + 1) * 4


def _first(buf, n):
    """The first n elements of a workspace view, flat (contiguous, no copy)."""
    return buf.reshape(-1)[:n]


def _sddmm_acc(grad, dz_t, a_t, weight):
    """grad += (dz_t a_t^T) on a sparse weight's stored values (CSR or BSR), with
    dz_t (R, N) and a_t (K, N); threads only where the work outweighs them."""
    parallel = weight.nnz * dz_t.shape[1] >= config.PARALLEL_MIN_WORK
    if weight.format == "bsr":
        kernel = K.bsr_sddmm_acc_parallel if parallel else K.bsr_sddmm_acc
    else:
        kernel = K.sddmm_acc_parallel if parallel else K.sddmm_acc
    kernel(grad, dz_t, a_t, weight.indices, weight.indptr)


def _matmul_batch(out, x, weight, transposed=False):
    """out (N, R) = x (N, K) @ W^T over all rows at once (W^T's pattern if transposed)."""
    x = np.ascontiguousarray(x)
    args = (out, x) + (weight.kernel_args_t() if transposed else weight.kernel_args())
    if isinstance(weight, W.Dense):  # numba's BLAS: see kernels.cpu.dense_grad_acc
        (K.matmul_t if transposed else K.matmul)(*args)
        return
    kernel = K.sparse_matmul_parallel if weight.nnz * x.shape[0] >= config.PARALLEL_MIN_WORK \
        else K.sparse_matmul
    kernel(*args)

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

import numpy as np

from numlstm import config
from numlstm import weights as W
from numlstm.kernels import cpu as K
from numlstm.workspace import Workspace


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


class _Tape:
    """What a training forward leaves for backward (views into the workspace)."""

    def __init__(self, views, T, B, lengths, rev_index, unbatched):
        self.views = views
        self.T, self.B = T, B
        self.lengths = lengths  # (B,) int64
        self.rev_index = rev_index  # (T*B,) int64, or None when D = 1
        self.unbatched = unbatched
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
        L, stacked layers.
    bias : bool
        Whether each layer has ``bias_ih`` and ``bias_hh``.
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
        self.input_size = _check_int(input_size, "input_size", 1)
        self.hidden_size = _check_int(hidden_size, "hidden_size", 1)
        self.num_layers = _check_int(num_layers, "num_layers", 1)
        self.proj_size = _check_int(proj_size, "proj_size", 0)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size}, "
                             f"got {proj_size}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.proj_size or self.hidden_size  # O
        self._rng = np.random.default_rng(seed)

        k = 1.0 / np.sqrt(self.hidden_size)
        params = {}
        for name, shape in self._param_shapes().items():
            params[name] = self._rng.uniform(-k, k, shape).astype(self.dtype)
        self._no_bias = np.zeros(4 * self.hidden_size, self.dtype)  # read-only zeros
        self._no_proj = W.Dense(np.zeros((0, 0), self.dtype)).kernel_args()  # P = 0
        self.version = 0
        self._train_ws = Workspace(self.dtype)
        self._infer_ws = Workspace(self.dtype)
        self._set_params(params)

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
        params = {}  # name -> weights.Dense / weights.CSR, or a bias array
        for name, shape in self._param_shapes().items():
            if name.startswith("bias"):
                arr = W.check_float_array(values[name], name, shape, self.dtype)
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"{name} must be finite, got NaN or inf values")
                params[name] = arr.copy()
            else:
                params[name] = W.from_value(values[name], name, shape, self.dtype)
        self._params = params
        self._grad_buffers = {
            name: (p.new_grad() if name.startswith("weight") else np.zeros_like(p))
            for name, p in self._params.items()}
        self.grad = {}
        for name, g in self._grad_buffers.items():
            if isinstance(self._params[name], W.CSR):
                view = self._params[name].public()  # a copy of the pattern ...
                view.data = g  # ... whose values are the live gradient buffer
                g = view
            self.grad[name] = g
        self._tape = None
        self.version += 1  # streams rebind on change

    def state_dict(self):
        """Copies of every parameter: NumPy arrays, or ``csr_array`` for CSR weights."""
        return {name: (p.public() if isinstance(p, (W.Dense, W.CSR)) else p.copy())
                for name, p in self._params.items()}

    def load_state_dict(self, state):
        """Replace every parameter from ``state`` (same keys as ``state_dict``).

        A scipy sparse value makes that weight CSR (other sparse formats are
        converted to CSR), a NumPy array makes it dense. float64 values are
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
        """
        return {name: (p.values if isinstance(p, (W.Dense, W.CSR)) else p)
                for name, p in self._params.items()}

    def grad_arrays(self):
        """The live gradient arrays, shaped like ``parameters()``'s values."""
        return dict(self._grad_buffers)

    def zero_grad(self):
        """Set every gradient to zero, in place."""
        for g in self._grad_buffers.values():
            g.fill(0)

    def weight_bytes(self):
        """Bytes of parameter storage used for inference (biases included)."""
        return sum(p.nbytes for p in self._params.values())

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

    def _plan(self, T, B, training):
        """The named buffers (and shapes) a forward, and in training its backward, needs."""
        L, D, H, O, P = (self.num_layers, self.num_directions, self.hidden_size,
                         self.output_size, self.proj_size)
        G, N = 4 * H, T * B
        kmax = max(self.input_size, D * O)
        rev = T if D == 2 else 0  # buffers only the reverse direction needs
        spec = [("y", (T, B, D * O)),  # top layer output
                ("xrev", (rev, B, kmax)),  # a layer's input, reversed per sequence
                ("odir", (rev, B, O)),  # reverse direction's output, before un-reversal
                ("scratch", (B, G))]
        # Inference reuses one set of recurrence buffers for every layer and
        # direction; training keeps them all, as the tape.
        tapes = [(l, d) for l in range(L) for d in range(D)] if training else [(0, 0)]
        for l, d in tapes:
            spec += [(f"gates{l}{d}", (T, B, G)), (f"hs{l}{d}", (T + 1, B, O)),
                     (f"cs{l}{d}", (T + 1, B, H)), (f"rs{l}{d}", (T if P else 0, B, H))]
        layers_in = range(1, L) if training else range(1, min(L, 3))
        for l in layers_in:  # layer inputs above layer 0 (inference: ping-pong)
            spec.append((f"x{l}", (T, B, D * O)))
        if training:
            spec.append(("x0", (T, B, self.input_size)))
            if self.dropout:
                spec += [(f"mask{l}", (T, B, D * O)) for l in range(L - 1)]
            amax = max(kmax, H)
            spec += [("dyd", (T, B, O)),  # dy of one direction, in its time order
                     ("dytmp", (rev, B, O)),
                     ("dhs", (T if P else 0, B, O)),  # gradient reaching each h_t
                     ("dh", (B, O)), ("dc", (B, H)),  # carried state gradients
                     ("scratch_o", (B, O)), ("scratch_h", (B, H)),
                     ("dxb", (T, B, kmax)),  # dx of layers 0, 2, ...
                     ("dxa", (T if L > 1 else 0, B, kmax)),  # dx of layers 1, 3, ...
                     ("dxd", (T, B, kmax)), ("dxg", (rev, B, kmax)),  # one direction's dx
                     ("gflat", (G * amax,))]  # dense weight-gradient scratch
            if any(isinstance(p, W.CSR) for p in self._params.values()):
                # dz^T (G, N) and a^T (K, N): the SDDMM reads contiguous rows
                spec += [("dz_t", (G * N,)), ("a_t", (amax * N,))]
        return spec

    def forward(self, x, state=None, *, lengths=None, training=False):
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

        Returns
        -------
        y : array (T, B, D*O) (or batch_first / unbatched like x)
        (h_n, c_n) : arrays (D*L, B, O), (D*L, B, H)
        """
        xt, unbatched = self._check_x(x)
        T, B = xt.shape[0], xt.shape[1]
        lengths = self._check_lengths(lengths, T, B, unbatched)
        h0, c0 = self._check_state(state, B, unbatched)
        ws = self._train_ws if training else self._infer_ws
        v = ws.carve(self._plan(T, B, training))
        if training:
            np.copyto(v["x0"], xt, casting="same_kind")
            layer_in = v["x0"]
            self._tape = None  # the tape being overwritten is no longer valid
        else:
            layer_in = np.ascontiguousarray(xt, dtype=self.dtype)
        rev_index = self._reverse_index(T, B, lengths) if self.bidirectional else None
        valid = (np.arange(T)[:, None] < lengths[None, :]).astype(self.dtype)[:, :, None]

        L, D, O = self.num_layers, self.num_directions, self.output_size
        h_n = np.empty((D * L, B, O), self.dtype)
        c_n = np.empty((D * L, B, self.hidden_size), self.dtype)
        for l in range(L):
            out = v["y"] if l == L - 1 else (v[f"x{l + 1}"] if training else v[f"x{1 + l % 2}"])
            for d in range(D):
                tag = f"{l}{d}" if training else "00"
                hs, cs = v[f"hs{tag}"], v[f"cs{tag}"]
                hs[0], cs[0] = h0[l * D + d], c0[l * D + d]
                self._layer_forward(v, tag, l, d, layer_in, lengths, rev_index)
                h_n[l * D + d], c_n[l * D + d] = hs[T], cs[T]
                # This direction's output, in time order, zero past each length.
                odir = hs[1:]
                if d:
                    K.gather_rows(v["odir"].reshape(T * B, O), odir.reshape(T * B, O), rev_index)
                    odir = v["odir"]
                np.multiply(odir, valid, out=out[:, :, d * O:(d + 1) * O])
            if training and self.dropout and l < L - 1:
                self._apply_dropout(v[f"mask{l}"], out)
            layer_in = out

        if training:
            self._tape = _Tape(v, T, B, lengths, rev_index, unbatched)
        y = v["y"].copy()
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
                + self._biases(l, d) + self._weight("hh", l, d).kernel_args()
                + self._proj_args(l, d))
        K.lstm_seq_forward(*args)

    def _proj_args(self, l, d, transposed=False):
        if not self.proj_size:
            return self._no_proj
        w = self._weight("hr", l, d)
        return w.kernel_args_t() if transposed else w.kernel_args()

    # ------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------

    def backward(self, dy, dstate=None):
        """Backpropagate through the last ``forward(..., training=True)``.

        Parameters
        ----------
        dy : array shaped like that forward's y
            Gradient of the loss with respect to y (entries past a sequence's
            length are ignored: those outputs are constant zero).
        dstate : tuple (dh_n, dc_n) shaped like (h_n, c_n), optional

        Returns
        -------
        dx : array shaped like x
        (dh0, dc0) : arrays shaped like the initial state

        Every parameter gradient is ADDED into ``self.grad``; call
        ``zero_grad()`` between steps unless accumulating on purpose.
        """
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
        for l in range(L - 1, -1, -1):
            width = self.input_size if l == 0 else D * O
            dx_l = _first(v["dxa" if l % 2 else "dxb"], T * B * width).reshape(T, B, width)
            for d in range(D):
                dyd = v["dyd"]
                if d:
                    np.copyto(v["dytmp"], dcur[:, :, O:])
                    K.gather_rows(dyd.reshape(T * B, O), v["dytmp"].reshape(T * B, O),
                                  tape.rev_index)
                else:
                    np.copyto(dyd, dcur[:, :, :O])
                dh, dc = v["dh"], v["dc"]
                dh[...] = dh_n[l * D + d]
                dc[...] = dc_n[l * D + d]
                self._layer_backward(v, tape, l, d, dx_l, d == 0)
                dh0[l * D + d], dc0[l * D + d] = dh, dc
            if l > 0 and self.dropout:
                dx_l *= v[f"mask{l - 1}"]
            dcur = dx_l

        dx = dcur.copy()
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

    def _layer_backward(self, v, tape, l, d, dx_l, first):
        """BPTT through layer l, direction d; writes (first) or adds its dx into dx_l."""
        T, B = tape.T, tape.B
        N = T * B
        tag = f"{l}{d}"
        gates, hs, rs = v[f"gates{tag}"], v[f"hs{tag}"], v[f"rs{tag}"]
        args = ((v["dh"], v["dc"], gates, v["dhs"], v["scratch_o"], v["scratch_h"],
                 v["dyd"], hs, v[f"cs{tag}"], rs, tape.lengths)
                + self._weight("hh", l, d).kernel_args_t()
                + self._proj_args(l, d, transposed=True))
        K.lstm_seq_backward(*args)
        G, width = gates.shape[2], dx_l.shape[2]
        dz = gates.reshape(N, G)
        x2d = (v["x0"] if l == 0 else v[f"x{l}"]).reshape(N, width)
        if d:  # the reverse direction ran on its input reversed per sequence
            xr = _first(v["xrev"], N * width).reshape(N, width)
            K.gather_rows(xr, x2d, tape.rev_index)
            x2d = xr
        sfx = "_reverse" if d else ""
        g = self._grad_buffers
        self._weight_grad(g[f"weight_ih_l{l}{sfx}"], dz, x2d, self._weight("ih", l, d), v)
        self._weight_grad(g[f"weight_hh_l{l}{sfx}"], dz, hs[:T].reshape(N, -1),
                          self._weight("hh", l, d), v)
        if self.proj_size:
            self._weight_grad(g[f"weight_hr_l{l}{sfx}"], v["dhs"].reshape(N, -1),
                              rs.reshape(N, -1), self._weight("hr", l, d), v)
        if self.bias:
            db = v["scratch"][0]
            np.sum(dz, axis=0, out=db)
            g[f"bias_ih_l{l}{sfx}"] += db
            g[f"bias_hh_l{l}{sfx}"] += db
        # dx of this direction, in its own (reversed) time order, then in time order.
        dxd = _first(v["dxd"], N * width).reshape(N, width)
        _matmul_batch(dxd, dz, self._weight("ih", l, d), transposed=True)
        if d:
            dxg = _first(v["dxg"], N * width).reshape(N, width)
            K.gather_rows(dxg, dxd, tape.rev_index)
            dxd = dxg
        dx2d = dx_l.reshape(N, width)
        if first:
            dx2d[...] = dxd
        else:
            dx2d += dxd

    def _weight_grad(self, grad, dz, a, weight, v):
        """grad += dz^T a on the weight's storage: dense (BLAS) or its CSR pattern."""
        R, C = weight.shape
        N = dz.shape[0]
        if isinstance(weight, W.Dense):
            tmp = _first(v["gflat"], R * C).reshape(R, C)
            np.matmul(dz.T, a, out=tmp)
            grad += tmp
            return
        dz_t = _first(v["dz_t"], R * N).reshape(R, N)
        a_t = _first(v["a_t"], C * N).reshape(C, N)
        np.copyto(dz_t, dz.T)
        np.copyto(a_t, a.T)
        kernel = K.sddmm_acc_parallel if weight.nnz * N >= config.PARALLEL_MIN_WORK \
            else K.sddmm_acc
        kernel(grad, dz_t, a_t, weight.indices, weight.indptr)

    # ------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------

    def stream(self, batch_size=1, state=None):
        """An O(1)-memory step-by-step runner; see ``numlstm.stream.Stream``."""
        from numlstm.stream import Stream

        return Stream(self, batch_size, state)

    def __repr__(self):
        kinds = sorted({p.kind for p in self._params.values() if hasattr(p, "kind")})
        return (f"LSTM({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, proj_size={self.proj_size}, "
                f"dtype={self.dtype.name}, weights={'+'.join(kinds)})")


def _first(buf, n):
    """The first n elements of a workspace view, flat (contiguous, no copy)."""
    return buf.reshape(-1)[:n]


def _matmul_batch(out, x, weight, transposed=False):
    """out (N, R) = x (N, K) @ W^T over all rows at once (W^T's pattern if transposed)."""
    if isinstance(weight, W.Dense):
        np.matmul(x, weight.array if transposed else weight.array.T, out=out)
        return
    args = (out, x) + (weight.kernel_args_t() if transposed else weight.kernel_args())[1:]
    kernel = K.csr_matmul_parallel if weight.nnz * x.shape[0] >= config.PARALLEL_MIN_WORK \
        else K.csr_matmul
    kernel(*args)

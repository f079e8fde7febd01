"""Device-resident models: the GPU driver behind ``LSTM.to("cuda")``.

``model.to("cuda")`` copies every parameter to the GPU once (dense weights,
CSR and BSR values with their index patterns, int32 or compact uint16;
biases) with zero gradients
beside them, and from then on ``forward``, ``backward``, ``stream()``,
``parameters()`` / ``grad_arrays()`` (hence the optimizers of
``numlstm.optim``) run on the device. ``model.to("cpu")`` copies the
parameters and gradients back into the model's host arrays and returns it to
the CPU path, which is untouched by all of this.

The orchestration mirrors ``numlstm.lstm`` step for step and calls the
kernels of ``numlstm.kernels.cuda`` by the names the CPU path uses in
``numlstm.kernels.cpu`` (same argument order, plus ``stream=``); the glue
NumPy does on the CPU (fills, slices, transposes, bias sums) is in
``numlstm.kernels.cuda_optim``. Every buffer comes from a device workspace
carved once per (T, B) capacity (``_DeviceWorkspace``, the twin of
``numlstm.workspace.Workspace``); a call on the same or a smaller shape
allocates only the arrays it returns.

Inputs. NumPy arrays (and anything ``np.asarray`` takes) are checked as on
the CPU and copied in. Objects with ``__cuda_array_interface__`` (numba
device arrays, CuPy arrays, torch CUDA tensors) are used where they are,
without a copy: they must then already have the model's dtype, their shape,
and be C-contiguous (a ``batch_first`` input is transposed on the device
into a workspace buffer; a training forward copies ``x`` device-to-device
into its tape, as the CPU copies it into its own). Anything else is refused
with an error naming the argument, what was expected and what came.

Outputs are device arrays (numba ``DeviceNDArray``: ``copy_to_host()``,
``__cuda_array_interface__``); ``forward(..., to_host=True)``,
``backward(..., to_host=True)`` and ``Stream.step(x, to_host=True)`` return
NumPy arrays instead.

While the model is on the device the device copies are the truth: its host
arrays are refreshed from them by ``to("cpu")``, ``state_dict()``, and
whatever reads ``model._weights()`` (``sparsity``, ``prune``, ``quantize``,
``repr``); ``model.grad`` (host) is refreshed by ``to("cpu")``.
Anything that replaces the parameters (``load_state_dict``, ``to_dense``,
pruning) bumps ``model.version``, and the next device call uploads the new
parameters (so pruning a device model works by a round trip through the
host). Quantized weights (float16 / int8 values) do not run on the device:
``to("cuda")`` refuses them, and a device model quantized in place refuses
its next device call until it is moved back with ``to("cpu")``.

Not on the device (NotImplementedError): ``checkpoint=`` and
``memory_budget=`` (use the full tape, or train on the CPU). A stream made
on the device stays there (after ``to("cpu")`` make a new one); a model
pickled or deep-copied from the device comes back on the CPU with current
values; optimizers carry their state to wherever the parameters moved.

numba.cuda is imported here, on the first ``to("cuda")``: ``import numlstm``
neither needs nor loads CUDA.
"""

import numpy as np

from numlstm import weights as W
from numlstm.stream import Stream
from numlstm.workspace import plan_layout

_cuda = None  # numba.cuda
_KC = None  # numlstm.kernels.cuda: the LSTM kernels
_KO = None  # numlstm.kernels.cuda_optim: glue and optimizer kernels

DEVICES = ("cpu", "cuda")

# The forward recurrence as one persistent launch per layer and direction
# (``kernels.cuda.lstm_seq_forward_persistent``, a grid barrier per step)
# instead of a few launches per step. Off by default until it has been run on
# real GPUs: tested here only under the simulator, which runs one block.
PERSISTENT_FORWARD = False


def _load():
    """Import numba.cuda and the device kernels, once; RuntimeError without a GPU."""
    global _cuda, _KC, _KO
    if _KO is None:
        from numba import cuda

        if not cuda.is_available():
            raise RuntimeError("no CUDA device is available (numba.cuda.is_available() is "
                               "False): model.to('cuda') needs an NVIDIA GPU with its driver, "
                               "or NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
        from numlstm.kernels import cuda as kc
        from numlstm.kernels import cuda_optim as ko

        _cuda, _KC, _KO = cuda, kc, ko
    return _cuda, _KC, _KO


# ----------------------------------------------------------------------------
# Device arrays: recognising, wrapping, checking, allocating
# ----------------------------------------------------------------------------

def is_device_array(a):
    """Whether ``a`` lives on a GPU: a numba device array (or the simulator's),
    or any object exposing ``__cuda_array_interface__``. Imports nothing."""
    if isinstance(a, np.ndarray):
        return False
    return bool(getattr(a, "__cuda_ndarray__", False)) or \
        hasattr(a, "__cuda_array_interface__")


class _HostInterface:
    """Under the simulator "device" memory is host memory: a foreign
    ``__cuda_array_interface__`` is read through NumPy's array interface."""

    def __init__(self, desc):
        self.__array_interface__ = dict(desc, version=3)


def as_device(a):
    """``a`` as a numba device array sharing its memory (no copy)."""
    if getattr(a, "__cuda_ndarray__", False):  # numba's own (or the simulator's)
        return a
    from numba import config

    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.asarray(_HostInterface(a.__cuda_array_interface__)))
    return _cuda.as_cuda_array(a)


def _c_contiguous(a):
    return a.is_c_contiguous()


def _check_device(a, name, shape, dtype):
    """Check a device array used as it is: shape, dtype (no conversion on the
    device) and C-contiguity."""
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    _check_device_dtype(a, name, dtype)
    return a


def _check_device_dtype(a, name, dtype):
    if np.dtype(a.dtype) != dtype:
        raise TypeError(f"{name} must have dtype {dtype.name} like the model (a device array "
                        f"is used as it is, not converted), got {np.dtype(a.dtype).name}")
    if not _c_contiguous(a):
        raise ValueError(f"{name} must be C-contiguous on the device, got strides "
                         f"{tuple(a.strides)} for shape {tuple(a.shape)}")


def _empty(shape, dtype):
    return _cuda.device_array(shape, np.dtype(dtype))


def _upload(host):
    return _cuda.to_device(np.ascontiguousarray(host))


def _h2d(dst, host, stream):
    """Copy a C-contiguous host array into the device array ``dst``. A
    zero stride (a size-1 axis made by ``None`` indexing) reads as a broadcast
    axis to numba's copy, so such an array is copied to canonical strides."""
    if 0 in host.strides:
        host = host.copy()
    dst.copy_to_device(host, stream=stream)


def _first(buf, n):
    """The first n elements of a device workspace view, flat (no copy)."""
    return buf.reshape(buf.size)[:n]


class _DeviceWorkspace:
    """``numlstm.workspace.Workspace`` on the device: one block, named views,
    grown (never shrunk) when a plan needs more than it holds."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._block = None
        self._empties = {}  # shape -> a zero-size array (no memory behind it)
        self.views = {}
        self.allocations = 0

    @property
    def nbytes(self):
        return 0 if self._block is None else self._block.size * self.dtype.itemsize

    def carve(self, spec):
        entries, total = plan_layout(spec, self.dtype)
        if total and (self._block is None or total > self._block.size):
            self._block = _empty(total, self.dtype)  # device memory is 256-byte aligned
            self.allocations += 1
        views = {}
        for name, shape, off, size, _ in entries:
            if size:
                views[name] = self._block[off:off + size].reshape(shape)
            else:
                e = self._empties.get(shape)
                if e is None:
                    e = self._empties[shape] = _cuda.device_array(shape, self.dtype)
                views[name] = e
        self.views = views
        return views


# ----------------------------------------------------------------------------
# Weights on the device
# ----------------------------------------------------------------------------

class _DeviceWeight:
    """A weight's kernel arrays on the device, in the four slots of
    ``kernels.cpu`` (``args``), and for backward the transposed pattern
    (``args_t``, values refreshed from ``values`` by ``refresh_t``)."""

    def __init__(self, w, name, empties):
        self.host = w
        self.format = w.format
        self.shape = w.shape
        self.nnz = w.nnz
        e_w0, e_data, e_idx = empties
        if w.format == "dense":
            self.values = _upload(w.array)
            self.args = (self.values, e_data, e_idx, e_idx)
            self._t = None
            return
        if not w.trainable:
            raise TypeError(f"{name} is stored as {W.describe(w)} (quantized, inference only), "
                            "which does not run on the device; keep quantized models on the "
                            "CPU, or call to_dense() first")
        self.values = _upload(w.data)
        self.indices = _upload(w.indices)  # int32, or uint16 for a compact pattern
        self.indptr = _upload(w.indptr)
        self.args = (e_w0, self.values, self.indices, self.indptr)
        self._e_w0 = e_w0
        self._t = None  # (data_t, indices_t, indptr_t, perm), made on first backward

    def args_t(self, stream):
        """The arguments of W^T products, values refreshed from ``values``."""
        if self.format == "dense":
            return self.args
        if self._t is None:
            w = self.host
            if self.format == "bsr":
                data_t, indices_t, indptr_t, perm = W._transpose_blocks(
                    w.data, w.indices, w.indptr, w.shape)
            else:
                indices_t, indptr_t, perm = W._transpose_pattern(w.indices, w.indptr, w.shape)
                data_t = w.data
            self._t = (_empty(data_t.shape, data_t.dtype), _upload(indices_t),
                       _upload(indptr_t), _upload(perm))
        data_t, indices_t, indptr_t, perm = self._t
        if self.format == "bsr":
            _KC.gather_blocks_t(data_t, self.values, perm, stream=stream)
        else:
            _KO.gather1d(data_t, self.values, perm, stream=stream)
        return (self._e_w0, data_t, indices_t, indptr_t)


class _Tape:
    def __init__(self, views, T, B, lengths, lengths_d, rev_d, unbatched):
        self.views = views
        self.T, self.B = T, B
        self.lengths = lengths  # (B,) int64, host
        self.lengths_d = lengths_d  # (B,) int64, device
        self.rev_d = rev_d  # (T*B,) int64 device, or None when D = 1
        self.unbatched = unbatched
        self.used = False


def move(model, device):
    """``model.to(device)``: see ``LSTM.to``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        if model._device is None:
            _load()
            model._device = DeviceModel(model)
            model._tape = None  # a CPU tape cannot be backpropagated on the device
    elif model._device is not None:
        model._device.pull()
        model._device = None
    return model


class DeviceModel:
    """The device half of an ``LSTM`` after ``to("cuda")`` (``model._device``)."""

    def __init__(self, model):
        self.model = model
        self.stream = 0  # every launch and copy on one stream: calls stay ordered
        self._train_ws = _DeviceWorkspace(model.dtype)
        self._infer_ws = _DeviceWorkspace(model.dtype)
        self._train_iws = _DeviceWorkspace(np.int64)  # lengths, reverse index
        self._infer_iws = _DeviceWorkspace(np.int64)
        dt = model.dtype
        self._empties = (_cuda.device_array((0, 0), dt), _cuda.device_array(0, dt),
                         _cuda.device_array(0, np.int32))
        self._no_bias = _upload(np.zeros(4 * model.hidden_size, dt))
        self._no_proj = (self._empties[0], self._empties[1], self._empties[2],
                         self._empties[2])
        self._tape = None
        self._install()

    # ------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------

    def _install(self):
        """Upload every parameter of the model (and zero gradients)."""
        m = self.model
        weights, biases = {}, {}
        for name, p in m._params.items():
            if name.startswith("weight"):
                weights[name] = _DeviceWeight(p, name, self._empties)
            else:
                biases[name] = _upload(p)
        self._w, self._b = weights, biases
        self._g = {}
        for name in m._params:
            vals = weights[name].values if name in weights else biases[name]
            g = _empty(vals.shape, vals.dtype)
            _KO.fill(g, 0, stream=self.stream)
            self._g[name] = g
        self._tape = None
        self.version = m.version

    def current(self):
        """Re-upload when the host parameters were replaced since (version)."""
        if self.model.version != self.version:
            self._install()
        return self

    def pull(self):
        """Copy the device parameters and gradients into the model's host arrays
        (in place), unless the host ones were replaced since the upload."""
        m = self.model
        if m.version != self.version:
            return
        for name, p in m._params.items():
            host = p.values if name in self._w else p
            src = self._w[name].values if name in self._w else self._b[name]
            src.copy_to_host(host, stream=self.stream)
            self._g[name].copy_to_host(m._grad_buffers[name], stream=self.stream)
        _synchronize(self.stream)

    def parameters(self):
        self.current()
        return {name: (self._w[name].values if name in self._w else self._b[name])
                for name in self.model._params}

    def grad_arrays(self):
        self.current()
        return dict(self._g)

    def zero_grad(self):
        self.current()
        for g in self._g.values():
            _KO.fill(g, 0, stream=self.stream)

    def _weight(self, kind, l, d):
        return self._w[f"weight_{kind}_l{l}{'_reverse' if d else ''}"]

    def _biases(self, l, d):
        if not self.model.bias:
            return self._no_bias, self._no_bias
        sfx = "_reverse" if d else ""
        return self._b[f"bias_ih_l{l}{sfx}"], self._b[f"bias_hh_l{l}{sfx}"]

    def _proj(self, l, d, transposed=False):
        if not self.model.proj_size:
            return self._no_proj
        w = self._weight("hr", l, d)
        return w.args_t(self.stream) if transposed else w.args

    # ------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------

    def _x(self, x):
        """(arr, unbatched, on_device): the input, time-major when on the host
        (a contiguous array of the model's dtype), as given when on the device."""
        m = self.model
        if not is_device_array(x):
            xt, unbatched = m._check_x(x)
            if xt.dtype.kind != "f":  # pragma: no cover - _check_x refuses it
                raise TypeError(f"x must be a floating-point array, got dtype {xt.dtype}")
            return np.ascontiguousarray(xt, dtype=m.dtype), unbatched, False
        a = as_device(x)
        I = m.input_size
        layout = m._x_layout(I)
        if a.ndim == 2:
            if a.shape[1] != I or a.shape[0] < 1:
                raise ValueError(f"x must have shape (T, {I}) or {layout} for input_size={I}, "
                                 f"got {tuple(a.shape)}")
        elif a.ndim != 3 or a.shape[2] != I or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"x must have shape {layout} for input_size={I}, "
                             f"got {tuple(a.shape)}")
        _check_device_dtype(a, "x", m.dtype)
        return a, a.ndim == 2, True

    def _state(self, state, B, unbatched, h0, c0, what):
        """(h0, c0) as device arrays (D*L, B, O), (D*L, B, H): zeros or a host
        state copied into the given buffers, or the caller's device arrays."""
        m = self.model
        DL, O, H = m.num_directions * m.num_layers, m.output_size, m.hidden_size
        s = self.stream
        if state is None:
            _KO.fill(h0, 0, stream=s)
            _KO.fill(c0, 0, stream=s)
            return h0, c0
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{what} must be a tuple (h, c), got {type(state).__name__}")
        if not any(is_device_array(a) for a in state):
            hh, cc = m._check_state(state, B, unbatched, what=what)
            _h2d(h0, hh, s)
            _h2d(c0, cc, s)
            return h0, c0
        out = []
        for arr, width, label, i in ((state[0], O, "h", 0), (state[1], H, "c", 1)):
            name = f"{what}[{i}] ({label})"
            if not is_device_array(arr):
                raise TypeError(f"{name} must be a device array like {what}[{1 - i}], got "
                                f"{type(arr).__name__}: pass both on the device or both on "
                                "the host")
            a = as_device(arr)
            shape = (DL, width) if unbatched else (DL, B, width)
            _check_device(a, name, shape, m.dtype)
            out.append(a.reshape(DL, B, width))
        return out[0], out[1]

    @staticmethod
    def _host_lengths(lengths):
        if lengths is not None and is_device_array(lengths):
            return as_device(lengths).copy_to_host()
        return lengths

    # ------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------

    def _plan(self, T, B, training, batch_first, x_copy):
        m = self.model
        L, D, H, O, P = (m.num_layers, m.num_directions, m.hidden_size, m.output_size,
                         m.proj_size)
        G, I, DL = 4 * H, m.input_size, D * m.num_layers
        kmax = max(I, D * O)
        R = T if D == 2 else 0
        spec = [("xrev", (R, B, kmax)),  # a layer's input, reversed per sequence
                ("odir", (R, B, O)),  # reverse direction's output, before un-reversal
                ("scratch", (B, G)),
                ("h0", (DL, B, O)), ("c0", (DL, B, H)),  # zero or copied-in state
                ("ytm", (T if batch_first else 0, B, D * O))]  # y before batch_first
        tapes = [(l, d) for l in range(L) for d in range(D)] if training else [(0, 0)]
        for l, d in tapes:
            spec += [(f"gates{l}{d}", (T, B, G)), (f"hs{l}{d}", (T + 1, B, O)),
                     (f"cs{l}{d}", (T + 1, B, H)), (f"rs{l}{d}", (T if P else 0, B, H))]
        if not training:
            spec += [("xin", (T if x_copy else 0, B, I))]
            spec += [(f"x{l}", (T, B, D * O)) for l in range(1, min(L, 3))]
            return spec
        spec.append(("x0", (T, B, I)))
        spec += [(f"x{l}", (T, B, D * O)) for l in range(1, L)]
        if m.dropout:
            spec += [(f"mask{l}", (T, B, D * O)) for l in range(L - 1)]
        amax = max(kmax, H)
        N = T * B
        spec += [("dytm", (T, B, D * O)),  # dy, time-major and contiguous
                 ("dyd", (R, B, O)), ("dytmp", (R, B, O)),
                 ("dhs", (T if P else 0, B, O)),
                 ("dh", (B, O)), ("dc", (B, H)), ("dhn", (DL, B, O)), ("dcn", (DL, B, H)),
                 ("scratch_o", (B, O)), ("scratch_h", (B, H)),
                 ("dxa", (T if L > 1 else 0, B, D * O)),
                 ("dxb", (T if L > 2 else 0, B, D * O)),
                 ("dxtm", (T if batch_first else 0, B, I)),
                 ("dxd", (R, B, kmax)), ("dxg", (R, B, kmax)),
                 ("gflat", (G * amax,))]
        if any(w.format != "dense" for w in self._w.values()):
            spec += [("dz_t", (G * N,)), ("a_t", (amax * N,))]
        return spec

    def forward(self, x, state, lengths, training, checkpoint, memory_budget, to_host):
        self.current()
        m = self.model
        if checkpoint is not None or memory_budget is not None:
            raise NotImplementedError("checkpoint= and memory_budget= do not run on the "
                                      "device yet: use the full tape there, or train on the "
                                      "CPU (model.to('cpu'))")
        KC, KO, s = _KC, _KO, self.stream
        xa, unbatched, on_device = self._x(x)
        if unbatched and on_device:  # (T, I): a host x came back as (T, 1, I) already
            xa = xa.reshape(xa.shape[0], 1, xa.shape[1])
        bf = m.batch_first and not unbatched
        # A host x is time-major already (_check_x); a device one is as given.
        T, B = (xa.shape[1], xa.shape[0]) if (bf and on_device) else xa.shape[:2]
        lengths = m._check_lengths(self._host_lengths(lengths), T, B, unbatched)
        L, D, O, H = m.num_layers, m.num_directions, m.output_size, m.hidden_size
        x_copy = not training and (not on_device or bf)
        ws = self._train_ws if training else self._infer_ws
        iws = self._train_iws if training else self._infer_iws
        if training:
            self._tape = None  # the tape being overwritten is no longer valid
        v = ws.carve(self._plan(T, B, training, bf, x_copy))
        iv = iws.carve([("lengths", (B,)), ("rev", (T * B if D == 2 else 0,))])
        lengths_d = iv["lengths"]
        _h2d(lengths_d, lengths, s)
        rev_d = None
        if D == 2:
            rev_d = iv["rev"]
            _h2d(rev_d, m._reverse_index(T, B, lengths), s)
        h0, c0 = self._state(state, B, unbatched, v["h0"], v["c0"], "state")

        # The layer-0 input, time-major and contiguous on the device.
        dst = v["x0"] if training else v["xin"]
        if not on_device:
            _h2d(dst, xa, s)
            layer_in = dst
        elif bf:
            KO.swap01(dst, xa, stream=s)
            layer_in = dst
        elif training:
            dst.copy_to_device(xa, stream=s)
            layer_in = dst
        else:
            layer_in = xa

        h_n = _empty((D * L, B, O), m.dtype)
        c_n = _empty((D * L, B, H), m.dtype)
        y = _empty((B, T, D * O) if m.batch_first and not unbatched else (T, B, D * O),
                   m.dtype)
        ytop = v["ytm"] if m.batch_first and not unbatched else y
        for l in range(L):
            out = ytop if l == L - 1 else (v[f"x{l + 1}"] if training else v[f"x{1 + l % 2}"])
            for d in range(D):
                i = l * D + d
                tag = f"{l}{d}" if training else "00"
                hs, cs = v[f"hs{tag}"], v[f"cs{tag}"]
                hs[0].copy_to_device(h0[i], stream=s)
                cs[0].copy_to_device(c0[i], stream=s)
                self._layer_forward(v, tag, l, d, layer_in, lengths_d, rev_d)
                h_n[i].copy_to_device(hs[T], stream=s)
                c_n[i].copy_to_device(cs[T], stream=s)
                odir = hs[1:]
                if d:
                    KC.gather_rows(v["odir"].reshape(T * B, O), odir.reshape(T * B, O), rev_d,
                                   stream=s)
                    odir = v["odir"]
                KO.put_cols(out, odir, lengths_d, d * O, stream=s)
            if training and m.dropout and l < L - 1:
                mask = v[f"mask{l}"]
                _h2d(mask, self._dropout_mask(mask.shape), s)
                KO.mul(out, mask, stream=s)
            layer_in = out
        if ytop is not y:
            KO.swap01(y, ytop, stream=s)
        if training:
            self._tape = _Tape(v, T, B, lengths, lengths_d, rev_d, unbatched)
        if unbatched:
            y, h_n, c_n = y.reshape(T, D * O), h_n.reshape(D * L, O), c_n.reshape(D * L, H)
        if to_host:
            out = (y.copy_to_host(stream=s), (h_n.copy_to_host(stream=s),
                                              c_n.copy_to_host(stream=s)))
            _synchronize(s)
            return out
        return y, (h_n, c_n)

    def _dropout_mask(self, shape):
        """A mask of 0 and 1/(1-p) drawn from the model's generator exactly as the
        CPU path draws it (the same seed gives the same masks on both)."""
        m = self.model
        p = m.dropout
        mask = np.empty(shape, m.dtype)
        m._rng.random(out=mask, dtype=m.dtype)
        mask += 1 - p
        np.floor(mask, out=mask)
        mask *= 1 / (1 - p)
        return mask

    def _layer_forward(self, v, tag, l, d, layer_in, lengths_d, rev_d):
        KC, s = _KC, self.stream
        T, B, width = layer_in.shape
        x2d = layer_in.reshape(T * B, width)
        if d:
            xr = _first(v["xrev"], T * B * width).reshape(T * B, width)
            KC.gather_rows(xr, x2d, rev_d, stream=s)
            x2d = xr
        gates = v[f"gates{tag}"]
        G = gates.shape[2]
        KC.matmul(*((gates.reshape(T * B, G), x2d) + self._weight("ih", l, d).args), stream=s)
        args = ((v[f"hs{tag}"], v[f"cs{tag}"], gates, v[f"rs{tag}"], v["scratch"], lengths_d)
                + self._biases(l, d) + self._weight("hh", l, d).args + self._proj(l, d))
        persistent = PERSISTENT_FORWARD and hasattr(KC, "lstm_seq_forward_persistent")
        (KC.lstm_seq_forward_persistent if persistent else KC.lstm_seq_forward)(*args, stream=s)

    # ------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------

    def backward(self, dy, dstate, to_host):
        self.current()
        tape = self._tape
        if tape is None:
            raise RuntimeError("backward needs a preceding forward(..., training=True) on the "
                               "device; none is recorded (load_state_dict and to() also "
                               "discard it)")
        if tape.used:
            raise RuntimeError("backward was already called for this forward; run "
                               "forward(..., training=True) again")
        m = self.model
        KC, KO, s = _KC, _KO, self.stream
        T, B, v = tape.T, tape.B, tape.views
        L, D, O, H, I = (m.num_layers, m.num_directions, m.output_size, m.hidden_size,
                         m.input_size)
        bf = m.batch_first and not tape.unbatched
        dyt = self._dy(dy, T, B, tape.unbatched, v["dytm"])
        dh_n, dc_n = self._state(dstate, B, tape.unbatched, v["dhn"], v["dcn"], "dstate")
        tape.used = True

        dh0 = _empty((D * L, B, O), m.dtype)
        dc0 = _empty((D * L, B, H), m.dtype)
        dx = _empty((B, T, I) if bf else (T, B, I), m.dtype)
        dcur = dyt
        for l in range(L - 1, -1, -1):
            if l == 0:
                dx_l = v["dxtm"] if bf else dx
            else:
                dx_l = v["dxa" if l % 2 else "dxb"]
            for d in range(D):
                i = l * D + d
                v["dh"].copy_to_device(dh_n[i], stream=s)
                v["dc"].copy_to_device(dc_n[i], stream=s)
                if D == 1:
                    dyd = dcur
                elif d:
                    KO.take_cols(v["dytmp"], dcur, O, stream=s)
                    KC.gather_rows(v["dyd"].reshape(T * B, O), v["dytmp"].reshape(T * B, O),
                                   tape.rev_d, stream=s)
                    dyd = v["dyd"]
                else:
                    KO.take_cols(v["dyd"], dcur, 0, stream=s)
                    dyd = v["dyd"]
                self._layer_backward(v, tape, l, d, dyd, dx_l)
                dh0[i].copy_to_device(v["dh"], stream=s)
                dc0[i].copy_to_device(v["dc"], stream=s)
            if l > 0 and m.dropout:
                KO.mul(dx_l, v[f"mask{l - 1}"], stream=s)
            dcur = dx_l
        if bf:
            KO.swap01(dx, v["dxtm"], stream=s)
        if tape.unbatched:
            dx, dh0, dc0 = dx.reshape(T, I), dh0.reshape(D * L, O), dc0.reshape(D * L, H)
        if to_host:
            out = (dx.copy_to_host(stream=s), (dh0.copy_to_host(stream=s),
                                               dc0.copy_to_host(stream=s)))
            _synchronize(s)
            return out
        return dx, (dh0, dc0)

    def _dy(self, dy, T, B, unbatched, buf):
        """dy as a time-major contiguous (T, B, D*O) device array."""
        m = self.model
        DO = m.num_directions * m.output_size
        bf = m.batch_first and not unbatched
        if unbatched:
            shape = (T, DO)
        else:
            shape = (B, T, DO) if bf else (T, B, DO)
        if not is_device_array(dy):
            arr = W.check_float_array(dy, "dy", shape, m.dtype)
            if bf:
                arr = np.ascontiguousarray(arr.transpose(1, 0, 2))
            _h2d(buf, arr.reshape(T, B, DO), self.stream)
            return buf
        a = _check_device(as_device(dy), "dy", shape, m.dtype)
        if bf:
            _KO.swap01(buf, a, stream=self.stream)
            return buf
        return a.reshape(T, B, DO)

    def _layer_backward(self, v, tape, l, d, dyd, dx_l):
        KC, s = _KC, self.stream
        T, B = tape.T, tape.B
        N = T * B
        tag = f"{l}{d}"
        gates, hs, rs = v[f"gates{tag}"], v[f"hs{tag}"], v[f"rs{tag}"]
        args = ((v["dh"], v["dc"], gates, v["dhs"], v["scratch_o"], v["scratch_h"],
                 dyd, hs, v[f"cs{tag}"], rs, tape.lengths_d)
                + self._weight("hh", l, d).args_t(s) + self._proj(l, d, transposed=True))
        KC.lstm_seq_backward(*args, stream=s)
        width = dx_l.shape[2]
        x2d = (v["x0"] if l == 0 else v[f"x{l}"]).reshape(N, width)
        if d:
            xr = _first(v["xrev"], N * width).reshape(N, width)
            KC.gather_rows(xr, x2d, tape.rev_d, stream=s)
            x2d = xr
        self._accumulate(v, l, d, gates.reshape(N, gates.shape[2]), x2d,
                         hs[:T].reshape(N, hs.shape[2]), v["dhs"], rs, dx_l, tape.rev_d)

    def _accumulate(self, v, l, d, dz, x2d, h2d, dhs, rs, dx_l, rev_d):
        KC, KO, s = _KC, _KO, self.stream
        rows = dz.shape[0]
        sfx = "_reverse" if d else ""
        g = self._g
        w_ih = self._weight("ih", l, d)
        self._weight_grad(g[f"weight_ih_l{l}{sfx}"], dz, x2d, w_ih, v)
        self._weight_grad(g[f"weight_hh_l{l}{sfx}"], dz, h2d, self._weight("hh", l, d), v)
        if self.model.proj_size:
            self._weight_grad(g[f"weight_hr_l{l}{sfx}"], dhs.reshape(rows, dhs.shape[2]),
                              rs.reshape(rows, rs.shape[2]), self._weight("hr", l, d), v)
        if self.model.bias:
            KO.bias_grad_acc(g[f"bias_ih_l{l}{sfx}"], g[f"bias_hh_l{l}{sfx}"], dz, stream=s)
        T, B, width = dx_l.shape
        dx2d = dx_l.reshape(T * B, width)
        wt = w_ih.args_t(s)
        if not d:
            KC.matmul_t(*((dx2d, dz) + wt), stream=s)
            return
        dxd = _first(v["dxd"], rows * width).reshape(rows, width)
        KC.matmul_t(*((dxd, dz) + wt), stream=s)
        dxg = _first(v["dxg"], rows * width).reshape(rows, width)
        KC.gather_rows(dxg, dxd, rev_d, stream=s)
        KO.add(dx2d, dxg, stream=s)

    def _weight_grad(self, grad, dz, a, weight, v):
        """grad += dz^T a on the weight's storage: dense, or its sparse pattern."""
        KC, s = _KC, self.stream
        R, C = weight.shape
        N = dz.shape[0]
        if weight.format == "dense":
            tmp = _first(v["gflat"], R * C).reshape(R, C)
            KC.dense_grad_acc(grad, tmp, dz, a, stream=s)
            return
        dz_t = _first(v["dz_t"], R * N).reshape(R, N)
        a_t = _first(v["a_t"], C * N).reshape(C, N)
        KC.transpose(dz_t, dz, stream=s)
        KC.transpose(a_t, a, stream=s)
        kernel = KC.bsr_sddmm_acc if weight.format == "bsr" else KC.sddmm_acc
        kernel(grad, dz_t, a_t, weight.indices, weight.indptr, stream=s)


def _synchronize(stream):
    if stream:
        stream.synchronize()
    else:
        _cuda.synchronize()


class DeviceStream(Stream):
    """``numlstm.Stream`` for a model on the device: state and buffers in one
    device workspace carved at construction; ``step`` launches one
    ``lstm_step`` per layer and allocates nothing.

    ``step(x_t)`` takes a NumPy array (copied into the stream's input buffer)
    or a device array of shape (B, I) and the model's dtype (read where it
    is); it returns the top layer's h_t as a device view of the stream's
    state, overwritten by the next step, or a NumPy copy with
    ``to_host=True``. ``state`` returns device copies of (h, c).
    """

    _workspace_type = _DeviceWorkspace  # Stream.__init__ carves its buffers on the GPU

    def _bind(self):
        dm = self.model._device
        if dm is None:
            raise RuntimeError("this stream was made on the device, but the model has been "
                               "moved to the CPU: make a new stream with model.stream()")
        dm.current()
        self._dm = dm
        self._calls = []
        for l in range(self.model.num_layers):
            x = self._x if l == 0 else self._h_layers[l - 1]
            self._calls.append((self._h_layers[l], self._c_layers[l], self._gates, self._r, x)
                               + dm._weight("ih", l, 0).args + dm._biases(l, 0)
                               + dm._weight("hh", l, 0).args + dm._proj(l, 0))
        self._version = self.model.version

    def reset(self, state=None):
        """Set the state to ``state`` (h (L, B, O), c (L, B, H), on the host or
        the device), or to zeros."""
        s = self._dm.stream
        if state is None:
            _KO.fill(self._h, 0, stream=s)
            _KO.fill(self._c, 0, stream=s)
            return
        h0, c0 = self._dm._state(state, self.batch_size, False, self._h, self._c, "state")
        if h0 is not self._h:
            self._h.copy_to_device(h0, stream=s)
            self._c.copy_to_device(c0, stream=s)

    @property
    def state(self):
        """Device copies of the current state: h (L, B, O), c (L, B, H)."""
        s = self._dm.stream
        h, c = _empty(self._h.shape, self._h.dtype), _empty(self._c.shape, self._c.dtype)
        h.copy_to_device(self._h, stream=s)
        c.copy_to_device(self._c, stream=s)
        return h, c

    def step(self, x_t, *, to_host=False):
        """Advance every layer by one step; see the class docstring."""
        if self._version != self.model.version or self.model._device is not self._dm:
            self._bind()
        s = self._dm.stream
        calls = self._calls
        x = self._x
        if is_device_array(x_t):
            a = _check_device(as_device(x_t), "x_t", x.shape, x.dtype)
            first = calls[0]
            calls = [first[:4] + (a,) + first[5:]] + calls[1:]
        elif type(x_t) is np.ndarray and x_t.dtype == x.dtype and x_t.shape == tuple(x.shape) \
                and x_t.flags.c_contiguous:
            _h2d(x, x_t, s)
        else:
            _h2d(x, W.check_float_array(x_t, "x_t", tuple(x.shape), x.dtype), s)
        for args in calls:
            _KC.lstm_step(*args, stream=s)
        out = self._h_layers[-1]
        if to_host:
            host = out.copy_to_host(stream=s)
            _synchronize(s)
            return host
        return out

"""The CUDA backend: numba device arrays, ``numlstm.kernels.cuda``, a device workspace.

The GPU half of every pair in ``numlstm.backends.cpu`` (docs/design.md,
CPU/GPU twins): same names, same arguments; the engine calls them without
knowing which backend it holds. Every launch and copy goes on one CUDA
stream (``CUDA_STREAM``, the default stream), so calls stay ordered.

Inputs. NumPy arrays (and anything ``np.asarray`` takes) are checked as on
the CPU and copied in. Objects with ``__cuda_array_interface__`` (numba
device arrays, CuPy arrays, torch CUDA tensors) are used where they are,
without a copy: they must then already have the model's dtype, their shape,
and be C-contiguous (a ``batch_first`` input is transposed on the device
into a workspace buffer; a training forward copies ``x`` device-to-device
into its tape, as the CPU copies it into its own). Anything else is refused
with an error naming the argument, what was expected and what came. The
call's boundary arrays (initial state, dy, batch_first copies) are staged
in the workspace (``STAGED = True``), so a call on the same or a smaller
shape allocates only the arrays it returns.

Outputs are device arrays (numba ``DeviceNDArray``); ``to_host`` copies them.
Quantized weights (float16 / int8 values) do not run on the device.

Imports numba.cuda: imported only by ``numlstm.backends.get("cuda")``.
"""

import numpy as np
from numba import config as numba_config
from numba import cuda

from numlstm import checks
from numlstm import weights as weights_mod
from numlstm.backends.base import ParamLookups
from numlstm.kernels import cuda as cuda_kernels
from numlstm.kernels import cuda_optim
from numlstm.workspace import plan_layout, plan_nbytes

NAME = "cuda"
STAGED = True
CUDA_STREAM = 0  # every launch and copy on the default stream: calls stay ordered

# The forward recurrence as one persistent launch per layer and direction
# (``kernels.cuda.lstm_seq_forward_persistent``, a grid barrier per step)
# instead of a few launches per step. Off by default until it has been run on
# real GPUs: tested here only under the simulator, which runs one block.
PERSISTENT_FORWARD = False


def load():
    """RuntimeError unless a GPU (or the simulator) is there."""
    if not cuda.is_available():
        raise RuntimeError("no CUDA device is available (numba.cuda.is_available() is "
                           "False): model.to('cuda') needs an NVIDIA GPU with its driver, "
                           "or NUMBA_ENABLE_CUDASIM=1 set before numba is imported")


# ----------------------------------------------------------------------------
# Device arrays: wrapping, checking, allocating
# ----------------------------------------------------------------------------

class _HostInterface:
    """Under the simulator "device" memory is host memory: a foreign
    ``__cuda_array_interface__`` is read through NumPy's array interface."""

    def __init__(self, desc):
        self.__array_interface__ = dict(desc, version=3)


def as_device(a):
    """``a`` (any ``__cuda_array_interface__`` object) as a numba device array
    sharing its memory (no copy)."""
    if getattr(a, "__cuda_ndarray__", False):  # numba's own (or the simulator's)
        return a
    if numba_config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.asarray(_HostInterface(a.__cuda_array_interface__)))
    return cuda.as_cuda_array(a)


def check_device(a, name, shape, dtype):
    """Check a device array used as it is: shape, dtype (no conversion on the
    device) and C-contiguity."""
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    check_device_dtype(a, name, dtype)
    return a


def check_device_dtype(a, name, dtype):
    if np.dtype(a.dtype) != dtype:
        raise TypeError(f"{name} must have dtype {dtype.name} like the model (a device array "
                        f"is used as it is, not converted), got {np.dtype(a.dtype).name}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous on the device, got strides "
                         f"{tuple(a.strides)} for shape {tuple(a.shape)}")


def empty(shape, dtype):
    return cuda.device_array(shape, np.dtype(dtype))


def _upload_new(host):
    return cuda.to_device(np.ascontiguousarray(host))


def upload(dst, host):
    """Copy a C-contiguous host array into the device array ``dst``. A zero
    stride (a size-1 axis made by ``None`` indexing) reads as a broadcast axis
    to numba's copy, so such an array is copied to canonical strides."""
    if 0 in host.strides:
        host = host.copy()
    dst.copy_to_device(host, stream=CUDA_STREAM)


def host_buffer(a):
    """A host array to compute ``a``'s contents in, then ``upload``."""
    return np.empty(a.shape, a.dtype)


def synchronize():
    if CUDA_STREAM:
        CUDA_STREAM.synchronize()
    else:
        cuda.synchronize()


def to_host(*arrays):
    out = tuple(a.copy_to_host(stream=CUDA_STREAM) for a in arrays)
    synchronize()
    return out


def copy(dst, src):
    dst.copy_to_device(src, stream=CUDA_STREAM)


def fill(a, value):
    cuda_optim.fill(a, value, stream=CUDA_STREAM)


def add(out, a):
    cuda_optim.add(out, a, stream=CUDA_STREAM)


def mul(out, a):
    cuda_optim.mul(out, a, stream=CUDA_STREAM)


def ready(a, buf=None):
    """Device arrays reach the engine contiguous (``read_dy`` stages them)."""
    return a


def take_cols(out, src, col0):
    cuda_optim.take_cols(out, src, col0, stream=CUDA_STREAM)


def put_cols(out, src, lengths, col0):
    cuda_optim.put_cols(out, src, lengths, col0, stream=CUDA_STREAM)


def scatter_cols(out, src, index, col0):
    cuda_optim.scatter_cols(out, src, index, col0, stream=CUDA_STREAM)


def add_rows_at(out, src, index, scratch):
    """out (N, F)[index[r]] += src (n, F)[r] for distinct indices (no scratch needed)."""
    cuda_optim.add_rows_at(out, src, index, stream=CUDA_STREAM)


def gather_rows(out, x, index):
    cuda_kernels.gather_rows(out, x, index, stream=CUDA_STREAM)


def matmul_batch(out, x, weight, transposed=False):
    if transposed:
        cuda_kernels.matmul_t(*((out, x) + weight.kernel_args_t()), stream=CUDA_STREAM)
    else:
        cuda_kernels.matmul(*((out, x) + weight.kernel_args()), stream=CUDA_STREAM)


def transpose_pair(dz_t, dz, a_t, a, dz_ready):
    if not dz_ready:
        cuda_kernels.transpose(dz_t, dz, stream=CUDA_STREAM)
    cuda_kernels.transpose(a_t, a, stream=CUDA_STREAM)


def dense_grad_acc(grad, dz, a, v):
    """grad (R, C) += dz^T a; the tiled product accumulates in place, so the
    CPU's scratch argument is not passed (and not planned)."""
    cuda_kernels.dense_grad_acc(grad, None, dz, a, stream=CUDA_STREAM)


def sddmm_acc(grad, dz_t, a_t, weight):
    kernel = cuda_kernels.bsr_sddmm_acc if weight.format == "bsr" else cuda_kernels.sddmm_acc
    kernel(grad, dz_t, a_t, weight.indices, weight.indptr, stream=CUDA_STREAM)


def bias_grad_acc(g_ih, g_hh, dz, v):
    cuda_optim.bias_grad_acc(g_ih, g_hh, dz, stream=CUDA_STREAM)


def seq_forward(args, cell, two=False):
    # (``two``: a CPU choice; Params.two_threads is always False here)
    if PERSISTENT_FORWARD:
        cuda_kernels.lstm_seq_forward_persistent(*args, cell, stream=CUDA_STREAM)
    else:
        cuda_kernels.lstm_seq_forward(*args, cell, stream=CUDA_STREAM)


def seq_backward(args, cell):
    cuda_kernels.lstm_seq_backward(*args, cell, stream=CUDA_STREAM)


def _step_layers(layers):
    for args in layers:
        cuda_kernels.lstm_step(*args, stream=CUDA_STREAM)


def step_plan(layers):
    """(run, plan) for a stream: ``run(plan)`` launches ``lstm_step`` per layer."""
    return _step_layers, tuple(layers)


# ----------------------------------------------------------------------------
# Buffers
# ----------------------------------------------------------------------------

class Workspace:
    """``numlstm.workspace.Workspace`` on the device: one block, named views,
    grown (never shrunk but by ``release``) when a plan needs more. The block
    is sized as the host one (``plan_nbytes``), so ``memory_report``'s
    prediction is exact on both."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._block = None
        self._empties = {}  # shape -> a zero-size array (no memory behind it)
        self.views = {}
        self.allocations = 0

    @property
    def nbytes(self):
        return 0 if self._block is None else self._block.size * self.dtype.itemsize

    def release(self):
        self._block = None
        self.views = {}

    def carve(self, spec):
        entries, total = plan_layout(spec, self.dtype)
        size = plan_nbytes(spec, self.dtype) // self.dtype.itemsize
        if total and (self._block is None or size > self._block.size):
            self._block = empty(size, self.dtype)  # device memory is 256-byte aligned
            self.allocations += 1
        views = {}
        for name, shape, off, n, _ in entries:
            if n:
                views[name] = self._block[off:off + n].reshape(shape)
            else:
                e = self._empties.get(shape)
                if e is None:
                    e = self._empties[shape] = empty(shape, self.dtype)
                views[name] = e
        self.views = views
        return views


class IndexWorkspace(Workspace):
    """The per-call int64 index arrays (lengths, reverse index, segment
    lengths), uploaded into one device block."""

    def __init__(self):
        super().__init__(np.int64)


def indices(iws, lengths, rev_index, seglens):
    """Upload the per-call index arrays into ``iws``; returns them on the device."""
    nseg = 0 if seglens is None else seglens.shape[0]
    T_B = 0 if rev_index is None else rev_index.shape[0]
    iv = iws.carve([("lengths", lengths.shape), ("rev", (T_B,)),
                    ("seglens", (nseg, lengths.shape[0]))])
    upload(iv["lengths"], lengths)
    rev = seg = None
    if rev_index is not None:
        rev = iv["rev"]
        upload(rev, rev_index)
    if seglens is not None:
        seg = iv["seglens"]
        upload(seg, seglens)
    return iv["lengths"], rev, seg


# ----------------------------------------------------------------------------
# Parameters on the device
# ----------------------------------------------------------------------------

class Weight:
    """A weight's kernel arrays on the device, in the four slots of
    ``kernels.cpu`` (``kernel_args``), and for backward the transposed pattern
    (``kernel_args_t``, values refreshed from ``values``)."""

    def __init__(self, w, name, empties):
        self.host = w
        self.format = w.format
        self.shape = w.shape
        self.nnz = w.nnz
        self._t = None  # (data_t, indices_t, indptr_t, perm), made on first backward
        e_w0, e_data, e_idx = empties
        if not w.trainable:
            raise TypeError(f"{name} is stored as {weights_mod.describe(w)} (quantized, "
                            "inference only), which does not run on the device; keep "
                            "quantized models on the CPU, or call to_dense() first")
        if w.format == "dense":
            self.values = _upload_new(w.array)
            self._args = (self.values, e_data, e_idx, e_idx)
            return
        self.values = _upload_new(w.data)
        self.indices = _upload_new(w.indices)  # int32, or uint16 for a compact pattern
        self.indptr = _upload_new(w.indptr)
        self._args = (e_w0, self.values, self.indices, self.indptr)
        self._e_w0 = e_w0

    def kernel_args(self):
        return self._args

    def kernel_args_t(self):
        """The arguments of W^T products, values refreshed from ``values``."""
        if self.format == "dense":
            return self._args
        if self._t is None:
            w = self.host
            if self.format == "bsr":
                data_t, indices_t, indptr_t, perm = weights_mod.transpose_blocks(
                    w.data, w.indices, w.indptr, w.shape)
            else:
                indices_t, indptr_t, perm = weights_mod.transpose_pattern(
                    w.indices, w.indptr, w.shape)
                data_t = w.data
            self._t = (empty(data_t.shape, data_t.dtype), _upload_new(indices_t),
                       _upload_new(indptr_t), _upload_new(perm))
        data_t, indices_t, indptr_t, perm = self._t
        if self.format == "bsr":
            cuda_kernels.gather_blocks_t(data_t, self.values, perm, stream=CUDA_STREAM)
        else:
            cuda_optim.gather1d(data_t, self.values, perm, stream=CUDA_STREAM)
        return (self._e_w0, data_t, indices_t, indptr_t)

    def transposed_nbytes(self):
        return self.host.transposed_nbytes() if self._t is None else \
            sum(a.nbytes for a in self._t)


class Params(ParamLookups):
    """The model's parameters uploaded from its host ``Params`` (dense, CSR and
    BSR weights, biases) with zero gradients beside them; the interface of
    ``numlstm.backends.cpu.Params``. While the model is on the device these
    are the truth; ``pull`` copies them back into the host arrays."""

    def __init__(self, host):
        self.host = host
        dtype = host.no_bias.dtype
        empties = (empty((0, 0), dtype), empty(0, dtype), empty(0, np.int32))
        self.has_bias, self.proj_size, self.cell = host.has_bias, host.proj_size, host.cell
        self.no_bias = _upload_new(host.no_bias)
        self.no_peep = empty(host.no_peep.shape, dtype)
        self._cells = {}
        self.no_proj = (empties[0], empties[1], empties[2], empties[2])
        self.weights = {name: Weight(w, name, empties) for name, w in host.weights.items()}
        self.sparse = host.sparse
        self.params = {name: (self.weights[name] if name in self.weights else _upload_new(p))
                       for name, p in host.params.items()}
        self.grads = {}
        for name, vals in self.parameters().items():
            g = empty(vals.shape, vals.dtype)
            fill(g, 0)
            self.grads[name] = g

    @staticmethod
    def to_backend(a):
        """A small host array (a variant cell's codes and constants) uploaded."""
        return _upload_new(a)

    def _step_args(self, w, B):
        """Device weights keep their stored form for per-step products too."""
        return w.kernel_args()

    def prepare(self, B):
        """Device weights have no per-step layouts to refresh."""

    def refresh_layouts(self):
        pass

    def check_trainable(self):
        """Quantized weights were refused when uploaded."""

    def zero_grad(self):
        for g in self.grads.values():
            fill(g, 0)

    def pull(self):
        """Copy the device parameters and gradients into the host arrays, in place."""
        host = self.host.parameters()
        for name, values in self.parameters().items():
            values.copy_to_host(host[name], stream=CUDA_STREAM)
            self.grads[name].copy_to_host(self.host.grads[name], stream=CUDA_STREAM)
        synchronize()


def load_params(host):
    """Upload the host parameters (TypeError for a quantized weight)."""
    return Params(host)


# ----------------------------------------------------------------------------
# The boundary: inputs in, results out
# ----------------------------------------------------------------------------

class Input:
    """A checked input: ``arr`` a host x, time-major and contiguous (T, B, I),
    or a device x as given ((B, T, I) when batch_first); ``copy`` whether an
    inference plan stages x in ``xin`` (a host x, or a batch_first device x
    transposed there)."""

    def __init__(self, arr, unbatched, T, B, on_device, batch_first):
        self.arr, self.unbatched, self.T, self.B = arr, unbatched, T, B
        self.on_device, self.batch_first = on_device, batch_first
        self.copy = not on_device or batch_first


def check_x(model, x):
    if not checks.is_device_array(x):
        xt, unbatched = checks.check_x(model, x)
        arr = np.ascontiguousarray(xt, dtype=model.dtype)
        return Input(arr, unbatched, arr.shape[0], arr.shape[1], False, False)
    a = as_device(x)
    unbatched = checks.check_x_shape(model, a.shape)
    check_device_dtype(a, "x", model.dtype)
    if unbatched:
        a = a.reshape(a.shape[0], 1, a.shape[1])
    bf = model.batch_first and not unbatched
    T, B = (a.shape[1], a.shape[0]) if bf else a.shape[:2]
    return Input(a, unbatched, T, B, True, bf)


def place_x(xin, v, training, dtype):
    """The layer-0 input, time-major and contiguous on the device: in the tape
    (training), in ``xin`` (a host x, or a batch_first device x), or the
    caller's device array itself."""
    dst = v["x0"] if training else v["xin"]
    if not xin.on_device:
        upload(dst, xin.arr)
    elif xin.batch_first:
        cuda_optim.swap01(dst, xin.arr, stream=CUDA_STREAM)
    elif training:
        copy(dst, xin.arr)
    else:
        return xin.arr
    return dst


def read_state(model, state, B, unbatched, h_buf, c_buf, what):
    """(h0, c0) as device arrays (D*L, B, O), (D*L, B, H): zeros or a host
    state copied into the given buffers, or the caller's device arrays."""
    if state is None:
        fill(h_buf, 0)
        fill(c_buf, 0)
        return h_buf, c_buf
    checks.check_state_pair(state, what)
    if not any(checks.is_device_array(a) for a in state):
        hh, cc = checks.check_state(model, state, B, unbatched, what)
        upload(h_buf, hh)
        upload(c_buf, cc)
        return h_buf, c_buf
    out = []
    for i, (arr, shape, label) in enumerate(zip(state, checks.state_shapes(model, B, unbatched),
                                                ("h", "c"), strict=True)):
        name = f"{what}[{i}] ({label})"
        if not checks.is_device_array(arr):
            raise TypeError(f"{name} must be a device array like {what}[{1 - i}], got "
                            f"{type(arr).__name__}: pass both on the device or both on "
                            "the host")
        a = check_device(as_device(arr), name, shape, model.dtype)
        out.append(a.reshape(h_buf.shape[0], B, shape[-1]))
    return out[0], out[1]


def read_dy(model, dy, T, B, unbatched, buf):
    """dy as a time-major contiguous (T, B, D*O) device array (``buf`` stages a
    host dy, or a batch_first device one)."""
    DO = model.num_directions * model.output_size
    bf = model.batch_first and not unbatched
    shape = checks.dy_shape(model, T, B, unbatched)
    if not checks.is_device_array(dy):
        arr = checks.check_dy(model, dy, T, B, unbatched)
        upload(buf, np.ascontiguousarray(arr))
        return buf
    a = check_device(as_device(dy), "dy", shape, model.dtype)
    if bf:
        cuda_optim.swap01(buf, a, stream=CUDA_STREAM)
        return buf
    return a.reshape(T, B, DO)


def host_lengths(lengths):
    if lengths is not None and checks.is_device_array(lengths):
        return as_device(lengths).copy_to_host()
    return lengths


def new_output(v, name, shape, batch_first, dtype):
    """(result, top): the layers write ``top`` (T, B, F), time-major; with
    batch_first that is the workspace's ``name`` and the result a new (B, T, F)
    device array that ``finish_output`` transposes it into."""
    if not batch_first:
        out = empty(shape, dtype)
        return out, out
    return empty((shape[1], shape[0], shape[2]), dtype), v[name]


def finish_output(result, top):
    cuda_optim.swap01(result, top, stream=CUDA_STREAM)
    return result

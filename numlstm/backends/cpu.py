"""The CPU backend: NumPy arrays, ``numlstm.kernels.cpu``, the host workspace.

Every function here is the CPU half of a pair whose GPU half has the same
name in ``numlstm.backends.cuda`` (docs/design.md, CPU/GPU twins); the
engine calls them without knowing which backend it holds. Host arrays need no
staging, so the boundary functions mostly pass arrays through, and the plan
flags say so (``STAGED = False``).
"""

import numpy as np

from numlstm import checks, config, ops, pair
from numlstm import weights as weights_mod
from numlstm.backends.base import ParamLookups
from numlstm.kernels import cpu as cpu_kernels
from numlstm.kernels.plan import compiled_step, make_plan
from numlstm.workspace import Workspace

NAME = "cpu"
# The call's boundary arrays (initial state, dy, batch_first copies) stay
# outside the workspace: host inputs are read where they are.
STAGED = False
Workspace = Workspace


class IndexWorkspace:
    """No staging on the host: the engine's index arrays are used where they are."""

    nbytes = 0

    def release(self):
        pass


class Params(ParamLookups):
    """The model's parameters on the host, as the CPU kernels read them.

    Parameters
    ----------
    params : dict[str, weights.Dense | weights.CSR | weights.BSR | np.ndarray]
        Every parameter by PyTorch's name; biases are (G,) arrays.
    grads : dict[str, np.ndarray]
        One gradient buffer per parameter, shaped like its ``values``.
    hidden_size, proj_size : int
        H and P of the model; ``bias`` whether it has biases.
    cell : numlstm.cell.Cell
        The cell options (``cell_args`` hands them to the kernels).
    """

    def __init__(self, params, grads, *, hidden_size, proj_size, bias, dtype, cell):
        self.params, self.grads = params, grads
        self.weights = {n: p for n, p in params.items() if n.startswith("weight")}
        self.has_bias, self.proj_size, self.cell = bias, proj_size, cell
        self.hidden_size = hidden_size
        self.no_bias = np.zeros(4 * hidden_size, dtype)  # read-only zeros
        self.no_proj = weights_mod.Dense(np.zeros((0, 0), dtype)).kernel_args()  # P = 0
        self.no_peep = np.zeros((0, hidden_size), dtype)
        self._cells = {}
        self.sparse = any(w.format != "dense" for w in self.weights.values())

    @staticmethod
    def to_backend(a):
        """A small host array as this backend's kernels read it: itself."""
        return a

    def _step_args(self, w, B):
        """Below ``config.STEP_MAX_B`` rows, the per-step execution layout
        (docs/design.md, CSR execution layout); else the stored arrays."""
        return w.step_args() if B < config.STEP_MAX_B else w.kernel_args()

    def recurrent_weights(self):
        """W_hh and W_hr of every layer and direction, in ``weights`` order: what
        a recurrence reads through ``step_args``."""
        return [w for n, w in self.weights.items() if n.startswith(("weight_hh", "weight_hr"))]

    def prepare(self, B):
        """Before a forward over B rows: below ``config.STEP_MAX_B`` the
        recurrence reads the per-step execution layouts of W_hh and W_hr. They
        are built here on first use, before the call carves its workspace, so
        that a build's temporaries never stack on the workspace (what
        ``memory_report`` predicts), and refreshed on every such call (values
        written in place in any way are then seen)."""
        if B < config.STEP_MAX_B:
            for w in self.recurrent_weights():
                w.step_args()
            self.refresh_layouts()

    def two_threads(self, layer, d, T, B):
        return pair.worth_two_seq(self.weight("hh", layer, d), self.hidden_size,
                                  self.proj_size, T, B)

    def refresh_layouts(self):
        """Copy the current weight values into the per-step execution layouts."""
        for w in self.weights.values():
            w.refresh_step()

    def check_trainable(self):
        """TypeError naming the first quantized (inference-only) weight."""
        for name, w in self.weights.items():
            if not w.trainable:
                raise TypeError(f"training needs float weights, but {name} is stored as "
                                f"{weights_mod.describe(w)} (quantized, inference only); "
                                "train before quantizing, or call to_dense() first")

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0)

    def pull(self):
        """The host copies are the truth on the CPU: nothing to copy back."""


def load_params(host):
    """The parameters the CPU kernels read: the host ones themselves."""
    return host


# ----------------------------------------------------------------------------
# Arrays and glue
# ----------------------------------------------------------------------------

def empty(shape, dtype):
    return np.empty(shape, dtype)


def copy(dst, src):
    dst[...] = src


def fill(a, value):
    a.fill(value)


def add(out, a):
    out += a


def mul(out, a):
    out *= a


def host_buffer(a):
    """A host array to compute ``a``'s contents in: ``a`` itself."""
    return a


def upload(dst, host):
    if host is not dst:
        np.copyto(dst, host)


def to_host(*arrays):
    return arrays


def ready(a, buf=None):
    """``a`` as a kernel takes it (C-contiguous, writeable): itself, else copied
    into ``buf`` when its shape fits, else into a new array."""
    if ops.kernel_ready(a):
        return a
    if buf is not None and buf.shape == a.shape:
        np.copyto(buf, a)
        return buf
    return np.array(a, order="C")


def take_cols(out, src, col0):
    """out (n, B, O) = src (n, B, F)[:, :, col0:col0+O]."""
    np.copyto(out, src[:, :, col0:col0 + out.shape[2]])


def put_cols(out, src, lengths, col0):
    """out (n, B, F)[:, :, col0:col0+O] = src (n, B, O), then zero the rows of
    steps t >= lengths[b] (``lengths`` counted from the first row)."""
    dst = out[:, :, col0:col0 + src.shape[2]]
    np.copyto(dst, src)
    ops.zero_padding(dst, lengths)


def scatter_cols(out, src, index, col0):
    """out (N, F)[index[r], col0:col0+O] = src (n, O)[r]."""
    out[index, col0:col0 + src.shape[1]] = src


def add_rows_at(out, src, index, scratch):
    """out (N, F)[index[r]] += src (n, F)[r] for distinct indices, through
    ``scratch`` (n, F). All rows (the reverse index is then a permutation, its
    own inverse): gather src into order and add; else gather, add, scatter."""
    if src.shape[0] == out.shape[0]:
        cpu_kernels.gather_rows(scratch, src, index)
        out += scratch
    else:
        cpu_kernels.gather_rows(scratch, out, index)
        scratch += src
        out[index] = scratch


gather_rows = cpu_kernels.gather_rows
matmul_batch = ops.matmul_batch
sddmm_acc = ops.sddmm_acc


def transpose_pair(dz_t, dz, a_t, a, dz_ready):
    """dz_t = dz^T (unless ``dz_ready``) and a_t = a^T, both threaded or both
    serial, by the size of dz^T."""
    kernel = cpu_kernels.transpose_parallel if dz_t.size >= config.PARALLEL_MIN_WORK \
        else cpu_kernels.transpose
    if not dz_ready:
        kernel(dz_t, np.ascontiguousarray(dz))
    kernel(a_t, np.ascontiguousarray(a))


def dense_grad_acc(grad, dz, a, v):
    """grad (R, C) += dz^T a, through the plan's ``gflat`` scratch (numba's BLAS
    writes the product there before the add)."""
    R, C = grad.shape
    tmp = ops.first(v["gflat"], R * C).reshape(R, C)
    cpu_kernels.dense_grad_acc(grad, tmp, np.ascontiguousarray(dz), np.ascontiguousarray(a))


def bias_grad_acc(g_ih, g_hh, dz, v):
    """Both bias gradients += the column sums of dz (n, G), via ``scratch``."""
    db = v["scratch"][0]
    np.sum(dz, axis=0, out=db)
    g_ih += db
    g_hh += db


def _parts(gates, w0, data, blas_above):
    """``ops.batch_parts`` for a recurrence over ``gates`` (T, B, G) with W_hh
    given as (w0, data, ...): dense (float w0, through BLAS above
    ``blas_above`` rows; float16 bits, never), or sparse."""
    dense = w0.shape[0] > 0 and data.size == 0
    stored = w0.size if dense else data.size
    blas = dense and w0.dtype.kind == "f"
    return ops.batch_parts(gates.shape[1], gates.shape[0] * gates.shape[1] * stored,
                           blas_above if blas else None)


def seq_forward(args, cell, two=False):
    # The arguments cross into numba as one tuple and the cell (docs/design.md,
    # Kernels: "Calls from Python pass one prebuilt tuple"). Batches of whole
    # panels share the recurrence between threads by rows; with ``two``
    # (``Params.two_threads``) a batch-1 one shares each step by unit halves.
    if two and pair.forward_sequence(args, cell):
        return
    bounds = _parts(args[2], args[8], args[9], cpu_kernels.DENSE_ROWS_MAX_N)
    if bounds is None:
        cpu_kernels.lstm_seq_forward_packed(args, cell)
    else:
        cpu_kernels.lstm_seq_forward_split(bounds, args, cell)


def seq_backward(args, cell):
    # The backward's dense products (with W, not W^T) go to BLAS at any
    # size; parts of one panel call it per part (two threads, each BLAS call
    # small), larger batches leave the threading to BLAS. Parts of 16 rows
    # calling BLAS each measured 1.1-1.3x slower in case c (B=32, H=512).
    bounds = _parts(args[2], args[11], args[12], ops.PART_ROWS)
    if bounds is None or (cell and cell[2].shape[0] > 0):  # peepholes: see the kernel
        cpu_kernels.lstm_seq_backward_packed(args, cell)
    else:
        cpu_kernels.lstm_seq_backward_split(bounds, args, cell)


def step_plan(layers):
    """(run, plan) for a stream: ``run(plan)`` steps every layer in one
    compiled call (``numlstm.kernels.plan``: no array crosses into numba per
    step, so a step allocates nothing)."""
    plan = make_plan(tuple(layers))
    return compiled_step(plan), plan


# ----------------------------------------------------------------------------
# The boundary: inputs in, results out
# ----------------------------------------------------------------------------

class Input:
    """A checked input: ``arr`` time-major (T, B, I) (a view of the caller's x),
    ``unbatched``, and ``copy`` (whether the plan stages x: never here)."""

    copy = False

    def __init__(self, arr, unbatched):
        self.arr, self.unbatched = arr, unbatched
        self.T, self.B = arr.shape[0], arr.shape[1]


def check_x(model, x):
    checks.refuse_device_arrays(x=x)
    return Input(*checks.check_x(model, x))


def place_x(xin, v, training, dtype):
    """The layer-0 input, time-major and contiguous: a training forward copies
    it into its tape, inference reads it where it is (converted if needed)."""
    if training:
        np.copyto(v["x0"], xin.arr, casting="same_kind")
        return v["x0"]
    return np.ascontiguousarray(xin.arr, dtype=dtype)


def read_state(model, state, B, unbatched, h_buf, c_buf, what):
    """(h, c) as (D*L, B, O), (D*L, B, H) arrays; the buffers are not needed."""
    checks.refuse_device_arrays(**{what: state})
    return checks.check_state(model, state, B, unbatched, what)


def read_dy(model, dy, T, B, unbatched, buf):
    """dy as time-major (T, B, D*O) (a view of the caller's when batch_first)."""
    checks.refuse_device_arrays(dy=dy)
    return checks.check_dy(model, dy, T, B, unbatched)


def host_lengths(lengths):
    return lengths


def indices(iws, lengths, rev_index, seglens):
    """The per-call index arrays as the kernels read them: host arrays as they are."""
    return lengths, rev_index, seglens


def new_output(v, name, shape, batch_first, dtype):
    """(result, top): ``top`` (T, B, F) is what the layers write; the result is
    made from it by ``finish_output`` (a transposed copy when batch_first)."""
    top = np.empty(shape, dtype)
    return (None if batch_first else top), top


def finish_output(result, top):
    """The batch_first result: a contiguous (B, T, F) copy of ``top``."""
    return np.ascontiguousarray(top.transpose(1, 0, 2))

"""Small @cuda.jit kernels for the device driver and the optimizers.

``numlstm.kernels.cuda`` holds the LSTM kernels (twins of ``kernels.cpu``);
this module holds what only the device side needs: the element-wise glue that
NumPy does on the CPU (fills, adds, column slices, batch_first transposes,
bias sums, a 1-D gather, row scatters)
and the optimizer updates (SGD, Adam/AdamW, gradient-norm clipping) with
``torch.optim``'s formulas, exactly as ``numlstm.optim`` writes them for NumPy.

Conventions as in ``kernels.cpu``: outputs first, then inputs; every host
function takes device arrays (C-contiguous unless said otherwise) and an
optional keyword-only ``stream=`` (as ``kernels.cuda``); nothing here
allocates, except ``zeros_like`` and the norm's one-element accumulator (made
once per dtype).

Launch geometry: ``config.CUDA_THREADS_PER_BLOCK`` threads per block (tests
patch it small: the simulator costs ~0.3 ms per thread); element-wise kernels
use grid-stride loops over at most ``config.CUDA_MAX_BLOCKS`` blocks.

Imports numba.cuda: import this module only when a device is in use.
"""

import math

import numpy as np
from numba import cuda

from numlstm import config


def _on(kernel, n, stream):
    """``kernel`` configured for n independent items on ``stream``: one thread
    per item, grid-stride beyond the block cap."""
    tpb = int(getattr(config, "CUDA_THREADS_PER_BLOCK", 256))
    cap = int(getattr(config, "CUDA_MAX_BLOCKS", 4096))
    return kernel[max(1, min(-(-n // tpb), cap)), tpb, stream]


def _flat(a):
    return a.reshape(a.size)


def _scalar(a, value):
    """``value`` as a scalar of ``a``'s dtype, so that kernels compute in it
    (as NumPy does with a Python float and a float32 array)."""
    return a.dtype.type(value)


# ----------------------------------------------------------------------------
# Element-wise glue
# ----------------------------------------------------------------------------

@cuda.jit
def _fill(out, value):
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] = value


def fill(out, value, *, stream=0):
    """out[...] = value."""
    if out.size:
        flat = _flat(out)
        _on(_fill, flat.shape[0], stream)(flat, _scalar(out, value))


def zeros_like(a, *, stream=0):
    """A new zeroed device array shaped like ``a`` (optimizer state)."""
    out = cuda.device_array(a.shape, a.dtype, stream=stream)
    fill(out, 0, stream=stream)
    return out


@cuda.jit
def _add(out, a):
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] += a[k]


def add(out, a, *, stream=0):
    """out += a (same shape)."""
    if out.size:
        flat = _flat(out)
        _on(_add, flat.shape[0], stream)(flat, _flat(a))


@cuda.jit
def _mul(out, a):
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] *= a[k]


def mul(out, a, *, stream=0):
    """out *= a (same shape): a dropout mask."""
    if out.size:
        flat = _flat(out)
        _on(_mul, flat.shape[0], stream)(flat, _flat(a))


@cuda.jit
def _scale(out, s):
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] *= s


def scale(out, s, *, stream=0):
    """out *= s for a scalar s."""
    if out.size:
        flat = _flat(out)
        _on(_scale, flat.shape[0], stream)(flat, _scalar(out, s))


@cuda.jit
def _put_cols(out, src, lengths, col0):
    T, B, O = src.shape
    for k in range(cuda.grid(1), T * B * O, cuda.gridsize(1)):
        t = k // (B * O)
        b = (k // O) % B
        j = k % O
        out[t, b, col0 + j] = src[t, b, j] if t < lengths[b] else 0


def put_cols(out, src, lengths, col0, *, stream=0):
    """out (T, B, F)[:, :, col0:col0+O] = src (T, B, O), zero at the padding
    steps t >= lengths[b]: one direction's output into a layer's output."""
    if src.size:
        _on(_put_cols, src.size, stream)(out, src, lengths, col0)


@cuda.jit
def _take_cols(out, src, col0):
    T, B, O = out.shape
    for k in range(cuda.grid(1), T * B * O, cuda.gridsize(1)):
        t = k // (B * O)
        b = (k // O) % B
        j = k % O
        out[t, b, j] = src[t, b, col0 + j]


def take_cols(out, src, col0, *, stream=0):
    """out (T, B, O) = src (T, B, F)[:, :, col0:col0+O]."""
    if out.size:
        _on(_take_cols, out.size, stream)(out, src, col0)


@cuda.jit
def _swap01(out, a):
    T, B, F = a.shape
    for k in range(cuda.grid(1), T * B * F, cuda.gridsize(1)):
        t = k // (B * F)
        b = (k // F) % B
        f = k % F
        out[b, t, f] = a[t, b, f]


def swap01(out, a, *, stream=0):
    """out (B, T, F) = a (T, B, F) with the first two axes swapped (batch_first)."""
    if a.size:
        _on(_swap01, a.size, stream)(out, a)


@cuda.jit
def _scatter_cols(out, src, index, col0):
    n, O = src.shape
    for k in range(cuda.grid(1), n * O, cuda.gridsize(1)):
        r = k // O
        j = k % O
        out[index[r], col0 + j] = src[r, j]


def scatter_cols(out, src, index, col0, *, stream=0):
    """out (N, F)[index[r], col0:col0+O] = src (n, O)[r]: a checkpoint segment
    of the reverse direction back to its own time steps (distinct indices)."""
    if src.size:
        _on(_scatter_cols, src.size, stream)(out, src, index, col0)


@cuda.jit
def _add_rows_at(out, src, index):
    n, F = src.shape
    for k in range(cuda.grid(1), n * F, cuda.gridsize(1)):
        r = k // F
        j = k % F
        out[index[r], j] += src[r, j]


def add_rows_at(out, src, index, *, stream=0):
    """out (N, F)[index[r]] += src (n, F)[r] for distinct indices (one thread
    per element, so no two threads write one value): the reverse direction's
    dx back into time order."""
    if src.size:
        _on(_add_rows_at, src.size, stream)(out, src, index)


@cuda.jit
def _gather1d(out, src, perm):
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] = src[perm[k]]


def gather1d(out, src, perm, *, stream=0):
    """out[k] = src[perm[k]]: refreshes a CSR weight's transposed values."""
    if out.size:
        _on(_gather1d, out.shape[0], stream)(out, src, perm)


@cuda.jit
def _bias_grad_acc(g_ih, g_hh, dz, zero):
    N, G = dz.shape
    for q in range(cuda.grid(1), G, cuda.gridsize(1)):
        acc = zero
        for n in range(N):
            acc += dz[n, q]
        g_ih[q] += acc
        g_hh[q] += acc


def bias_grad_acc(g_ih, g_hh, dz, *, stream=0):
    """g_ih, g_hh (G,) += the column sums of dz (N, G); one thread per column,
    so no two threads write one value."""
    if dz.shape[0] and dz.shape[1]:
        _on(_bias_grad_acc, dz.shape[1], stream)(g_ih, g_hh, dz, _scalar(dz, 0))


# ----------------------------------------------------------------------------
# Optimizers (numlstm.optim's formulas, element by element)
# ----------------------------------------------------------------------------

@cuda.jit
def _sgd(p, g, buf, lr, wd, mu, nesterov, first):
    for k in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        d = g[k] + wd * p[k] if wd != 0 else g[k]
        if mu != 0:
            if first:
                b = d
            else:
                b = buf[k] * mu + d
            buf[k] = b
            d = d + mu * b if nesterov else b
        p[k] -= lr * d


def sgd_step(p, g, buf, lr, weight_decay, momentum, nesterov, first, *, stream=0):
    """``optim.SGD``'s update of one parameter; ``buf`` is its momentum buffer
    (any array of p's shape when momentum is 0); ``first`` at step 1."""
    if not p.size:
        return
    pf = _flat(p)
    bf = _flat(buf) if momentum else pf
    _on(_sgd, pf.shape[0], stream)(pf, _flat(g), bf, _scalar(p, lr),
                                     _scalar(p, weight_decay), _scalar(p, momentum),
                                     bool(nesterov), bool(first))


@cuda.jit
def _adam(p, g, m, v, lr_t, b1, one_b1, b2, one_b2, eps, bc2, wd, decay):
    for k in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pk = p[k]
        gk = g[k]
        if decay != 0:  # decoupled (AdamW): p *= 1 - lr * wd
            pk *= decay
        elif wd != 0:  # L2 (Adam): g = g + wd * p
            gk = gk + wd * pk
        mk = m[k] * b1
        mk += one_b1 * gk
        vk = v[k] * b2
        vk += one_b2 * gk * gk
        m[k] = mk
        v[k] = vk
        denom = math.sqrt(vk) / bc2 + eps
        p[k] = pk - lr_t * mk / denom


def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, t, *, stream=0):
    """``optim.Adam`` / ``AdamW``'s update of one parameter at step t (from 1)."""
    if not p.size:
        return
    decay = 1 - lr * weight_decay if (decoupled and weight_decay) else 0.0
    pf = _flat(p)
    _on(_adam, pf.shape[0], stream)(
        pf, _flat(g), _flat(m), _flat(v), _scalar(p, lr / (1 - beta1 ** t)),
        _scalar(p, beta1), _scalar(p, 1 - beta1), _scalar(p, beta2), _scalar(p, 1 - beta2),
        _scalar(p, eps), _scalar(p, math.sqrt(1 - beta2 ** t)),
        _scalar(p, 0.0 if decoupled else weight_decay), _scalar(p, decay))


@cuda.jit
def _sumsq(out, a):
    acc = 0.0
    for k in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        x = np.float64(a[k])
        acc += x * x
    cuda.atomic.add(out, 0, acc)


_ACC = {}  # stream -> (1,) float64 accumulator, made once


def sumsq(a, *, stream=0):
    """sum(a * a) as a Python float (accumulated in float64; synchronises)."""
    if not a.size:
        return 0.0
    key = id(stream) if stream else 0
    acc = _ACC.get(key)
    if acc is None:
        acc = _ACC[key] = cuda.device_array(1, np.float64)
    fill(acc, 0.0, stream=stream)
    flat = _flat(a)
    _on(_sumsq, flat.shape[0], stream)(acc, flat)
    host = np.empty(1, np.float64)
    acc.copy_to_host(host, stream=stream)
    if stream:
        stream.synchronize()
    return float(host[0])

"""CUDA twins of :mod:`numlstm.kernels.cpu`: same names, same argument order.

Glossary: T time steps, B batch, I input features, H hidden, P projection
(0 = none), O = P or H, G = 4H gate rows (order i, f, g, o), N = T*B rows.

Every public function here is a *host* function with the signature of its CPU
twin plus a keyword ``stream=0``. It takes numba device arrays (or any object
with ``__cuda_array_interface__``, wrapped without a copy; under the simulator,
NumPy arrays), decides on the host which kernel fits the weight kind (dense,
CSR or BSR, read off the array shapes and dtypes exactly as on the CPU), picks
the launch geometry from :mod:`numlstm.config` and launches private
``@cuda.jit`` kernels (``_csr_matmul_kernel``, ...). Nothing here allocates
device memory, except two tiny cached arrays made once (an empty ``lengths``
for the streaming step, and the persistent kernel's barrier counter when the
caller passes none).

Weights cross in the four slots ``(w0, data, indices, indptr)`` of the CPU
table (see :mod:`numlstm.kernels.cpu`). Supported here: dense, CSR and BSR with
float32 or float64 values, int32 or uint16 indices. Quantized CSR values
(float16 bits, int8 with scales) raise a TypeError naming the kind: dequantize
such a weight before moving it to the GPU.

Why some choices:

* Kernels are built per dtype by a factory (``_build``): shared-memory arrays
  and register accumulators need their element type at compile time, and a
  float32 kernel must never compute in float64 (1/2 to 1/64 the throughput).
* Cooperating threads reduce through shared memory and ``syncthreads``, not
  warp shuffles: the CUDA simulator that runs these kernels in CI has no
  shuffles, and one code path is the one that gets tested. Every loop that
  contains a ``syncthreads`` is block-uniform (its trip count depends only on
  the block index), so no thread skips a barrier.
* Shared memory is dynamic (sized at launch) so that one compiled kernel serves
  every threads-per-block and tile size, including the tiny ones tests patch in.
* Sigmoid and tanh use libdevice's ``tanh``/``exp`` in the CPU's formulation
  (``0.5 + 0.5 tanh(z/2)`` in float32, the two-branch exact form in float64):
  no overflow for any |z|, NaN propagates.
"""

import math

import numba
import numpy as np
from numba import cuda, float32, float64, int32, int64, uint16

from numlstm import config

_SIM = bool(numba.config.ENABLE_CUDASIM)

# Device functions. numba-cuda compiles a device function for the *current
# device's* compute capability while typing the kernel that calls it, which
# opens a CUDA context: on a machine without a driver, compiling these kernels
# to PTX therefore needs ``get_current_device`` answered with the target
# (tests/test_cuda_ptx.py does that); the kernels need nothing else of a device.
_device = cuda.jit(device=True)


# ----------------------------------------------------------------------------
# Kernels, built once per dtype
# ----------------------------------------------------------------------------

def _build(ft):
    """All kernels for element type ``ft`` (numba.float32 or numba.float64)."""
    zero, one, half = ft(0), ft(1), ft(0.5)
    words = ft.bitwidth // 32  # int32 slots per element of ft

    if ft == float32:
        @_device
        def sigmoid(z):
            # One transcendental, no branch, saturates cleanly: never overflows.
            return half + half * math.tanh(half * z)
    else:
        @_device
        def sigmoid(z):
            # exp of a non-positive number never overflows (CPU's _sigmoid_exact).
            if z >= zero:
                return one / (one + math.exp(-z))
            e = math.exp(z)
            return e / (one + e)

    @_device
    def group_sum(sh, off, tid, lanes, v):
        """Sum of ``v`` over the aligned group of ``lanes`` threads (a power of
        two) that holds ``tid``, through sh[off:off + blockDim]; the total is
        valid in the group's first thread. Synchronises the block: every
        thread of the block must call it. No barrier is needed before the
        next call: a slot is only ever written by its own thread, and every
        read of another thread's slot happened before the last barrier."""
        sh[off + tid] = v
        cuda.syncthreads()
        s = lanes // 2
        while s > 0:
            if (tid & (lanes - 1)) < s:
                sh[off + tid] += sh[off + tid + s]
            cuda.syncthreads()
            s //= 2
        return sh[off + tid]

    @_device
    def row_of(indptr, k):
        """The (block) row whose slice of the pattern holds position k
        (binary search; empty rows are skipped correctly)."""
        lo = 0
        hi = indptr.shape[0] - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if indptr[mid] <= k:
                lo = mid
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------
    # Products
    # ------------------------------------------------------------------

    @cuda.jit
    def _gemm_kernel(out, a, b, trans_a, trans_b, accumulate):
        """out (M, Nc) (+)= op(a) @ op(b), op(a) (M, Kd), op(b) (Kd, Nc).

        op(a) = a.T when trans_a, op(b) = b.T when trans_b. Classic tiled
        product: a (tile, tile) block stages one tile of each operand in shared
        memory (rows padded by one so the transposed stores hit distinct
        banks), every global read is coalesced along threadIdx.x.
        """
        sh = cuda.shared.array(0, ft)
        tile = cuda.blockDim.x
        ld = tile + 1
        sb = tile * ld  # offset of the op(b) tile
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        M = out.shape[0]
        Nc = out.shape[1]
        Kd = a.shape[0] if trans_a else a.shape[1]
        # Grid-stride over output tiles: block-uniform, so syncthreads is safe.
        for i0 in range(cuda.blockIdx.y * tile, M, cuda.gridDim.y * tile):
            for j0 in range(cuda.blockIdx.x * tile, Nc, cuda.gridDim.x * tile):
                acc = zero
                for k0 in range(0, Kd, tile):
                    if trans_a:  # op(a)[i, k] = a[k, i]
                        v = a[k0 + ty, i0 + tx] if k0 + ty < Kd and i0 + tx < M else zero
                        sh[tx * ld + ty] = v
                    else:
                        v = a[i0 + ty, k0 + tx] if i0 + ty < M and k0 + tx < Kd else zero
                        sh[ty * ld + tx] = v
                    if trans_b:  # op(b)[k, j] = b[j, k]
                        v = b[j0 + ty, k0 + tx] if j0 + ty < Nc and k0 + tx < Kd else zero
                        sh[sb + tx * ld + ty] = v
                    else:
                        v = b[k0 + ty, j0 + tx] if k0 + ty < Kd and j0 + tx < Nc else zero
                        sh[sb + ty * ld + tx] = v
                    cuda.syncthreads()
                    for kk in range(tile):  # padded entries are zero
                        acc += sh[ty * ld + kk] * sh[sb + kk * ld + tx]
                    cuda.syncthreads()
                if i0 + ty < M and j0 + tx < Nc:
                    if accumulate:
                        out[i0 + ty, j0 + tx] += acc
                    else:
                        out[i0 + ty, j0 + tx] = acc

    @cuda.jit
    def _csr_matmul_kernel(out, x, data, indices, indptr, lanes):
        """out (N, R) = x (N, K) @ W^T for CSR W (R, K).

        A group of ``lanes`` threads per output element (n, r) strides over the
        stored values of row r and reduces. Consecutive groups take consecutive
        rows r of the same n, so the block shares x[n] through the cache.
        """
        red = cuda.shared.array(0, ft)
        tid = cuda.threadIdx.x
        groups = cuda.blockDim.x // lanes
        lane = tid & (lanes - 1)
        R = out.shape[1]
        total = out.shape[0] * R
        for base in range(cuda.blockIdx.x * groups, total, cuda.gridDim.x * groups):
            item = base + tid // lanes
            n = item // R
            r = item - n * R
            acc = zero
            if item < total:
                for k in range(indptr[r] + lane, indptr[r + 1], lanes):
                    acc += data[k] * x[n, indices[k]]
            acc = group_sum(red, 0, tid, lanes, acc)
            if lane == 0 and item < total:
                out[n, r] = acc

    @cuda.jit
    def _bsr_matmul_kernel(out, x, data, indices, indptr, lanes):
        """out (N, R) = x (N, K) @ W^T for BSR W: data (nblocks, br, bc).

        A group per output element (n, r), r = rb*br + i: its lanes stride
        over the blocks of block row rb, each summing row i of a block."""
        red = cuda.shared.array(0, ft)
        tid = cuda.threadIdx.x
        groups = cuda.blockDim.x // lanes
        lane = tid & (lanes - 1)
        br = data.shape[1]
        bc = data.shape[2]
        R = out.shape[1]
        total = out.shape[0] * R
        for base in range(cuda.blockIdx.x * groups, total, cuda.gridDim.x * groups):
            item = base + tid // lanes
            n = item // R
            r = item - n * R
            rb = r // br
            i = r - rb * br
            acc = zero
            if item < total:
                for k in range(indptr[rb] + lane, indptr[rb + 1], lanes):
                    c0 = indices[k] * bc
                    for j in range(bc):
                        acc += data[k, i, j] * x[n, c0 + j]
            acc = group_sum(red, 0, tid, lanes, acc)
            if lane == 0 and item < total:
                out[n, r] = acc

    @cuda.jit
    def _sddmm_kernel(gflat, dz_t, a_t, indices, indptr, br, bc, lanes):
        """Weight gradient on a stored pattern: CSR (br = bc = 1) or BSR.

        gflat is the gradient's values flattened ((nnz,) for CSR, the
        (nblocks*br*bc,) C-order view for BSR). For stored scalar e of block k,
        entry (i, j): ``gflat[e] += sum_n dz_t[r, n] * a_t[c, n]`` with
        r = rb*br + i, c = indices[k]*bc + j. One group per stored scalar, its
        lanes striding over n (contiguous in both transposed operands), so no
        two groups write the same value and no atomics are needed.
        """
        red = cuda.shared.array(0, ft)
        tid = cuda.threadIdx.x
        groups = cuda.blockDim.x // lanes
        lane = tid & (lanes - 1)
        bsz = br * bc
        N = dz_t.shape[1]
        total = gflat.shape[0]
        for base in range(cuda.blockIdx.x * groups, total, cuda.gridDim.x * groups):
            e = base + tid // lanes
            acc = zero
            if e < total:
                k = e // bsz
                rem = e - k * bsz
                i = rem // bc
                r = row_of(indptr, k) * br + i
                c = indices[k] * bc + (rem - i * bc)
                for n in range(lane, N, lanes):
                    acc += dz_t[r, n] * a_t[c, n]
            acc = group_sum(red, 0, tid, lanes, acc)
            if lane == 0 and e < total:
                gflat[e] += acc

    # ------------------------------------------------------------------
    # Fused pointwise steps: one thread per (b, j)
    # ------------------------------------------------------------------

    @_device
    def pad_step(act, c_out, h_out, c_prev, h_prev, b, j, carry_h):
        """A padded step of (b, j): activations zero, c carried, h_out carried
        from h_prev when ``carry_h`` (no projection) else zero."""
        H = c_out.shape[1]
        act[b, j] = zero
        act[b, H + j] = zero
        act[b, 2 * H + j] = zero
        act[b, 3 * H + j] = zero
        c_out[b, j] = c_prev[b, j]
        h_out[b, j] = h_prev[b, j] if carry_h else zero

    @cuda.jit
    def _cell_forward_kernel(c_out, h_out, act, c_prev, h_prev, rec, bias_ih, bias_hh,
                             lengths, t, carry_h):
        """Gates and cell update of one step, for every (b, j) of (B, H).

        act (B, G) holds x_t W_ih^T on entry and i, f, g, o on exit; rec (B, G)
        = h_{t-1} W_hh^T; c_out (B, H) = f*c_prev + i*g (may alias c_prev: each
        thread reads its element before writing it); h_out (B, H) = o*tanh(c).
        Rows with t >= lengths[b] are padding (an empty ``lengths`` means every
        row is valid): activations zero, c carried, h_out carried from h_prev
        when ``carry_h`` (no projection) else zero (the projection's input).
        """
        e = cuda.grid(1)
        H = c_out.shape[1]
        if e >= c_out.shape[0] * H:
            return
        b = e // H
        j = e - b * H
        if lengths.shape[0] == 0 or t < lengths[b]:
            zi = act[b, j] + rec[b, j] + bias_ih[j] + bias_hh[j]
            zf = act[b, H + j] + rec[b, H + j] + bias_ih[H + j] + bias_hh[H + j]
            zg = act[b, 2 * H + j] + rec[b, 2 * H + j] + bias_ih[2 * H + j] + bias_hh[2 * H + j]
            zo = act[b, 3 * H + j] + rec[b, 3 * H + j] + bias_ih[3 * H + j] + bias_hh[3 * H + j]
            i = sigmoid(zi)
            f = sigmoid(zf)
            g = math.tanh(zg)
            o = sigmoid(zo)
            act[b, j] = i
            act[b, H + j] = f
            act[b, 2 * H + j] = g
            act[b, 3 * H + j] = o
            c = f * c_prev[b, j] + i * g
            c_out[b, j] = c
            h_out[b, j] = o * math.tanh(c)
        else:
            pad_step(act, c_out, h_out, c_prev, h_prev, b, j, carry_h)

    @cuda.jit
    def _cell_backward_kernel(act, dc, dr, c, c_prev, lengths, t):
        """Backward of the cell for every valid (b, j): act (B, G) holds i, f,
        g, o on entry and dz on exit; dc (B, H) the gradient reaching c_t on
        entry, c_{t-1} on exit; dr (B, H) the gradient reaching o*tanh(c_t);
        c, c_prev (B, H). Padded rows are left alone (act is already zero and
        dc passes through)."""
        e = cuda.grid(1)
        H = dc.shape[1]
        if e >= dc.shape[0] * H:
            return
        b = e // H
        j = e - b * H
        if t >= lengths[b]:
            return
        i = act[b, j]
        f = act[b, H + j]
        g = act[b, 2 * H + j]
        o = act[b, 3 * H + j]
        tc = math.tanh(c[b, j])
        dcc = dc[b, j] + dr[b, j] * o * (one - tc * tc)
        act[b, j] = dcc * g * i * (one - i)
        act[b, H + j] = dcc * c_prev[b, j] * f * (one - f)
        act[b, 2 * H + j] = dcc * i * (one - g * g)
        act[b, 3 * H + j] = dr[b, j] * tc * o * (one - o)
        dc[b, j] = dcc * f

    # A variant cell (kernels/cpu.py, "The cell options"): the same two steps
    # with ONNX's peepholes, clip, coupled input-forget gate and activations.
    # Their own kernels, chosen by the host: the plain kernels above keep no
    # branch for them.

    @_device
    def activate(kind, a, b, z):
        """Activation ``kind`` (kernels/cpu.py's codes) with parameters a, b at z."""
        if kind == 0:
            return sigmoid(z)
        if kind == 1:
            return math.tanh(z)
        if kind == 2:
            return z if z > zero else zero
        if kind == 3:
            y = a * z + b
            return zero if y < zero else (one if y > one else y)
        return a * z + b

    @_device
    def activate_grad(kind, a, b, z):
        """Derivative of activation ``kind`` at z."""
        if kind == 0:
            s = sigmoid(z)
            return s * (one - s)
        if kind == 1:
            th = math.tanh(z)
            return one - th * th
        if kind == 2:
            return one if z > zero else zero
        if kind == 3:
            y = a * z + b
            return a if zero < y < one else zero
        return a

    @_device
    def clip_to(z, clip):
        return -clip if z < -clip else (clip if z > clip else z)

    @cuda.jit
    def _variant_forward_kernel(c_out, h_out, act, c_prev, h_prev, rec, bias_ih, bias_hh,
                                lengths, t, carry_h, kinds, params, peep):
        """``_cell_forward_kernel`` of a variant cell: act (B, G) keeps the raw
        pre-activations (bias and peephole terms in, before the clip); kinds
        (3,), params (8,), peep (3, H) or (0, H) as the CPU's ``cell``."""
        e = cuda.grid(1)
        H = c_out.shape[1]
        if e >= c_out.shape[0] * H:
            return
        b = e // H
        j = e - b * H
        if lengths.shape[0] == 0 or t < lengths[b]:
            kf, kg, kh = kinds[0], kinds[1], kinds[2]
            clip = params[6]
            cp = c_prev[b, j]
            zi = act[b, j] + rec[b, j] + bias_ih[j] + bias_hh[j]
            zf = act[b, H + j] + rec[b, H + j] + bias_ih[H + j] + bias_hh[H + j]
            zg = act[b, 2 * H + j] + rec[b, 2 * H + j] + bias_ih[2 * H + j] + bias_hh[2 * H + j]
            zo = act[b, 3 * H + j] + rec[b, 3 * H + j] + bias_ih[3 * H + j] + bias_hh[3 * H + j]
            if peep.shape[0] > 0:
                zi += peep[0, j] * cp
                zf += peep[1, j] * cp
            i = activate(kf, params[0], params[1], clip_to(zi, clip))
            g = activate(kg, params[2], params[3], clip_to(zg, clip))
            if params[7] != zero:
                f = one - i
            else:
                f = activate(kf, params[0], params[1], clip_to(zf, clip))
            c = f * cp + i * g
            if peep.shape[0] > 0:
                zo += peep[2, j] * c
            o = activate(kf, params[0], params[1], clip_to(zo, clip))
            act[b, j] = zi
            act[b, H + j] = zf
            act[b, 2 * H + j] = zg
            act[b, 3 * H + j] = zo
            c_out[b, j] = c
            h_out[b, j] = o * activate(kh, params[4], params[5], c)
        else:
            pad_step(act, c_out, h_out, c_prev, h_prev, b, j, carry_h)

    @cuda.jit
    def _variant_backward_kernel(act, dc, dr, c, c_prev, lengths, t, kinds, params, peep,
                                 dpeep):
        """``_cell_backward_kernel`` of a variant cell: act (B, G) holds the raw
        pre-activations on entry and dz on exit; the peepholes' gradient is
        added to dpeep (3, H) (atomically: the batch rows share it)."""
        e = cuda.grid(1)
        H = dc.shape[1]
        if e >= dc.shape[0] * H:
            return
        b = e // H
        j = e - b * H
        if t >= lengths[b]:
            return
        kf, kg, kh = kinds[0], kinds[1], kinds[2]
        af, bf, clip = params[0], params[1], params[6]
        zi, zf, zg, zo = act[b, j], act[b, H + j], act[b, 2 * H + j], act[b, 3 * H + j]
        # The clip passes no gradient where it bites.
        mi = one if abs(zi) <= clip else zero
        mf = one if abs(zf) <= clip else zero
        mg = one if abs(zg) <= clip else zero
        mo = one if abs(zo) <= clip else zero
        zi, zf, zg, zo = clip_to(zi, clip), clip_to(zf, clip), clip_to(zg, clip), clip_to(zo, clip)
        i = activate(kf, af, bf, zi)
        g = activate(kg, params[2], params[3], zg)
        coupled = params[7] != zero
        f = one - i if coupled else activate(kf, af, bf, zf)
        o = activate(kf, af, bf, zo)
        cj = c[b, j]
        drj = dr[b, j]
        dzo = drj * activate(kh, params[4], params[5], cj) * activate_grad(kf, af, bf, zo) * mo
        dcc = dc[b, j] + drj * o * activate_grad(kh, params[4], params[5], cj)
        peeped = peep.shape[0] > 0
        if peeped:
            dcc += dzo * peep[2, j]
        di = dcc * g
        df = dcc * c_prev[b, j]
        if coupled:  # f = 1 - i
            di -= df
            df = zero
        dzi = di * activate_grad(kf, af, bf, zi) * mi
        dzf = df * activate_grad(kf, af, bf, zf) * mf
        act[b, j] = dzi
        act[b, H + j] = dzf
        act[b, 2 * H + j] = dcc * i * activate_grad(kg, params[2], params[3], zg) * mg
        act[b, 3 * H + j] = dzo
        dcj = dcc * f
        if peeped:
            dcj += dzi * peep[0, j] + dzf * peep[1, j]
            cuda.atomic.add(dpeep, (0, j), dzi * c_prev[b, j])
            cuda.atomic.add(dpeep, (1, j), dzf * c_prev[b, j])
            cuda.atomic.add(dpeep, (2, j), dzo * cj)
        dc[b, j] = dcj

    @cuda.jit
    def _dcur_kernel(dcur, dh, dy_t, lengths, t):
        """dcur (B, O) = dh + dy_t on valid rows, 0 on padded rows."""
        e = cuda.grid(1)
        O = dcur.shape[1]
        if e >= dcur.shape[0] * O:
            return
        b = e // O
        j = e - b * O
        dcur[b, j] = dh[b, j] + dy_t[b, j] if t < lengths[b] else zero

    @cuda.jit
    def _copy_rows_kernel(dst, src, lengths, t, valid_rows):
        """dst[b] = src[b] for the rows b that are valid at t (valid_rows=1)
        or padded at t (valid_rows=0); dst, src (B, F)."""
        e = cuda.grid(1)
        F = dst.shape[1]
        if e >= dst.shape[0] * F:
            return
        b = e // F
        if (t < lengths[b]) == (valid_rows != 0):
            dst[b, e - b * F] = src[b, e - b * F]

    @cuda.jit
    def _gather_blocks_t_kernel(out, data, perm):
        """out[k] = data[perm[k]].T; out (nb, bc, br), data (nb, br, bc)."""
        e = cuda.grid(1)
        s1 = out.shape[1]
        s2 = out.shape[2]
        if e >= out.shape[0] * s1 * s2:
            return
        k = e // (s1 * s2)
        rem = e - k * s1 * s2
        i = rem // s2
        j = rem - i * s2
        out[k, i, j] = data[perm[k], j, i]

    @cuda.jit
    def _gather_rows_kernel(out, x, index):
        """out[n] = x[index[n]] for 2-D out, x."""
        e = cuda.grid(1)
        F = out.shape[1]
        if e >= index.shape[0] * F:
            return
        n = e // F
        out[n, e - n * F] = x[index[n], e - n * F]

    @cuda.jit
    def _transpose_kernel(out, x):
        """out[c, n] = x[n, c] for 2-D x (N, C), one element per thread
        (consecutive threads read consecutive x; for the SDDMM operands)."""
        e = cuda.grid(1)
        C = x.shape[1]
        if e >= x.shape[0] * C:
            return
        n = e // C
        out[e - n * C, n] = x[n, e - n * C]

    # ------------------------------------------------------------------
    # Persistent forward: the whole sequence in one launch
    # ------------------------------------------------------------------

    @_device
    def grid_barrier(bar, target):
        """Wait until every block of the grid has arrived ``target/nblocks``
        times in total (a monotonic counter: no reset, no sense reversal).

        The pattern of cooperative_groups' grid.sync(): the block finishes its
        phase, its leader publishes the block's writes with a device-wide
        fence, arrives with an atomic add and spins on the counter, then fences
        again so the block's later loads see every other block's writes.
        Correct only when every block of the grid is resident at once (the host
        sizes the grid for that): a block that waits for an unscheduled block
        would spin forever.
        """
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            cuda.threadfence()
            cuda.atomic.add(bar, 0, 1)
            while cuda.atomic.add(bar, 0, 0) < target:
                pass
            cuda.threadfence()
        cuda.syncthreads()

    @cuda.jit
    def _persistent_forward_kernel(hs, cs, gates, rs, lengths, bias_ih, bias_hh,
                                   whh, whh_data, whh_indices, whh_indptr,
                                   whr, whr_data, whr_indices, whr_indptr,
                                   bar, units, punits, lanes, resident):
        """``lstm_seq_forward`` in one launch (see the host function).

        Block ``blk`` owns hidden units [blk*units, (blk+1)*units) (its 4*units
        gate rows of W_hh) and projection rows [blk*punits, ...). Dynamic shared
        memory, in elements of ft: vb (B*H) holds h_{t-1} (then r_t for the
        projection), red (blockDim) the group sums, then, when ``resident``,
        the block's W_hh rows: dense (4*units*O values) or CSR (values, then
        after them the int32 region with 4 segment starts and the indices).
        """
        sh = cuda.shared.array(0, ft)
        shi = cuda.shared.array(0, int32)
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        blk = cuda.blockIdx.x
        nblocks = cuda.gridDim.x
        T = gates.shape[0]
        B = gates.shape[1]
        H = cs.shape[2]
        O = hs.shape[2]
        projected = rs.shape[0] > 0
        dense = whh.shape[0] > 0
        groups = nthr // lanes
        lane = tid & (lanes - 1)
        j0 = blk * units
        nj = min(units, H - j0) if j0 < H else 0  # this block's hidden units
        red = B * H  # offsets into sh
        wres = red + nthr
        # CSR residency: the block's rows of gate g are one contiguous slice
        # [indptr[g*H + j0], indptr[g*H + j0 + nj]) of the pattern; they are
        # packed one after another; seg (int32 offsets) says where each starts.
        nnz_res = 0
        if resident and not dense and nj > 0:
            for g in range(4):
                nnz_res += whh_indptr[g * H + j0 + nj] - whh_indptr[g * H + j0]
        # The int32 region starts after the values: 4 segment starts, then indices.
        seg = (wres + nnz_res) * words
        ioff = seg + 4

        # Stage the resident weights once: they are read T times.
        if resident and nj > 0:
            if dense:
                for e in range(tid, 4 * nj * O, nthr):
                    row = e // O
                    g = row // nj
                    sh[wres + e] = whh[g * H + j0 + row - g * nj, e - row * O]
            else:
                pos = 0
                for g in range(4):
                    start = whh_indptr[g * H + j0]
                    count = whh_indptr[g * H + j0 + nj] - start
                    if tid == 0:
                        shi[seg + g] = pos
                    for e in range(tid, count, nthr):
                        sh[wres + pos + e] = whh_data[start + e]
                        shi[ioff + pos + e] = whh_indices[start + e]
                    pos += count
        cuda.syncthreads()

        gen = 0
        nitems = B * 4 * nj
        for t in range(T):
            # h_{t-1} into shared memory: every gate row of the block reads it.
            for e in range(tid, B * O, nthr):
                b = e // O
                sh[e] = hs[t, b, e - b * O]
            cuda.syncthreads()
            # Gate pre-activations: a group per (b, gate row), reduced.
            for base in range(0, nitems, groups):
                item = base + tid // lanes
                b = item // (4 * nj) if nj > 0 else 0
                rem = item - b * 4 * nj
                g = rem // nj if nj > 0 else 0
                q = g * H + j0 + rem - g * nj  # the gate row of W_hh
                acc = zero
                if item < nitems:
                    vo = b * O
                    if dense and resident:
                        wo = wres + rem * O
                        for k in range(lane, O, lanes):
                            acc += sh[wo + k] * sh[vo + k]
                    elif dense:
                        for k in range(lane, O, lanes):
                            acc += whh[q, k] * sh[vo + k]
                    elif resident:
                        shift = shi[seg + g] - whh_indptr[g * H + j0]
                        for k in range(whh_indptr[q] + shift + lane, whh_indptr[q + 1] + shift,
                                       lanes):
                            acc += sh[wres + k] * sh[vo + shi[ioff + k]]
                    else:
                        for k in range(whh_indptr[q] + lane, whh_indptr[q + 1], lanes):
                            acc += whh_data[k] * sh[vo + whh_indices[k]]
                acc = group_sum(sh, red, tid, lanes, acc)
                if lane == 0 and item < nitems:
                    gates[t, b, q] += acc + bias_ih[q] + bias_hh[q]
            cuda.syncthreads()  # the block's own global writes are now visible to it
            # Cell update of the block's units.
            for e in range(tid, B * nj, nthr):
                b = e // nj
                j = j0 + e - b * nj
                if t < lengths[b]:
                    i = sigmoid(gates[t, b, j])
                    f = sigmoid(gates[t, b, H + j])
                    gg = math.tanh(gates[t, b, 2 * H + j])
                    o = sigmoid(gates[t, b, 3 * H + j])
                    gates[t, b, j] = i
                    gates[t, b, H + j] = f
                    gates[t, b, 2 * H + j] = gg
                    gates[t, b, 3 * H + j] = o
                    c = f * cs[t, b, j] + i * gg
                    cs[t + 1, b, j] = c
                    m = o * math.tanh(c)
                    if projected:
                        rs[t, b, j] = m
                    else:
                        hs[t + 1, b, j] = m
                else:
                    gates[t, b, j] = zero
                    gates[t, b, H + j] = zero
                    gates[t, b, 2 * H + j] = zero
                    gates[t, b, 3 * H + j] = zero
                    cs[t + 1, b, j] = cs[t, b, j]
                    if projected:
                        rs[t, b, j] = zero
                    else:
                        hs[t + 1, b, j] = hs[t, b, j]
            gen += 1
            grid_barrier(bar, gen * nblocks)
            if projected:
                # h_t = W_hr r_t: r_t into shared memory, a group per (b, p).
                for e in range(tid, B * H, nthr):
                    b = e // H
                    sh[e] = rs[t, b, e - b * H]
                cuda.syncthreads()
                p0 = blk * punits
                npp = min(punits, O - p0) if p0 < O else 0
                pitems = B * npp
                for base in range(0, pitems, groups):
                    item = base + tid // lanes
                    b = item // npp if npp > 0 else 0
                    p = p0 + item - b * npp
                    acc = zero
                    if item < pitems:
                        vo = b * H
                        if whr.shape[0] > 0:
                            for k in range(lane, H, lanes):
                                acc += whr[p, k] * sh[vo + k]
                        else:
                            for k in range(whr_indptr[p] + lane, whr_indptr[p + 1], lanes):
                                acc += whr_data[k] * sh[vo + whr_indices[k]]
                    acc = group_sum(sh, red, tid, lanes, acc)
                    if lane == 0 and item < pitems:
                        hs[t + 1, b, p] = acc if t < lengths[b] else hs[t, b, p]
                gen += 1
                grid_barrier(bar, gen * nblocks)

    @cuda.jit
    def _zero_kernel(bar):
        if cuda.grid(1) < bar.shape[0]:
            bar[cuda.grid(1)] = 0

    return dict(
        _gemm_kernel=_gemm_kernel,
        _csr_matmul_kernel=_csr_matmul_kernel,
        _bsr_matmul_kernel=_bsr_matmul_kernel,
        _sddmm_kernel=_sddmm_kernel,
        _cell_forward_kernel=_cell_forward_kernel,
        _cell_backward_kernel=_cell_backward_kernel,
        _variant_forward_kernel=_variant_forward_kernel,
        _variant_backward_kernel=_variant_backward_kernel,
        _dcur_kernel=_dcur_kernel,
        _copy_rows_kernel=_copy_rows_kernel,
        _gather_blocks_t_kernel=_gather_blocks_t_kernel,
        _gather_rows_kernel=_gather_rows_kernel,
        _transpose_kernel=_transpose_kernel,
        _persistent_forward_kernel=_persistent_forward_kernel,
        _zero_kernel=_zero_kernel,
    )


_KERNELS_BY_DTYPE = {np.dtype(np.float32): _build(float32),
                     np.dtype(np.float64): _build(float64)}


# ----------------------------------------------------------------------------
# Host side: argument handling and launch geometry
# ----------------------------------------------------------------------------

def _kernels(dtype):
    try:
        return _KERNELS_BY_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"the CUDA kernels take float32 or float64 arrays, got {dtype}") from None


def _dev(a):
    """``a`` as something a kernel launch takes, without a copy: numba device
    arrays and NumPy arrays (the simulator's currency) pass through, other
    ``__cuda_array_interface__`` objects (CuPy, PyTorch, ...) are wrapped."""
    if isinstance(a, np.ndarray) or hasattr(a, "copy_to_host"):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)
    return a


def _host(a):
    """A NumPy copy of a (small) device array, e.g. an indptr read on the host."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _weight_kind(dtype, w0, data, indices):
    """'dense', 'csr' or 'bsr' from the four weight slots, as the CPU kernels
    decide it; TypeError for the kinds the CUDA kernels do not take."""
    if data.ndim == 3:
        kind = "bsr"
    elif w0.shape[0] > 0 and np.dtype(data.dtype).kind == "f":
        if np.dtype(w0.dtype) != np.dtype(dtype):
            raise TypeError(f"a dense weight must be {np.dtype(dtype)} like the activations, "
                            f"got {np.dtype(w0.dtype)}")
        return "dense"
    else:
        kind = "csr"
    vt = np.dtype(data.dtype)
    if vt == np.uint16 or vt == np.int8:
        name = "float16 (uint16 bits)" if vt == np.uint16 else "int8"
        raise TypeError(f"the CUDA kernels do not take quantized CSR weights ({name} values); "
                        f"dequantize the weight before moving it to the GPU")
    if vt != np.dtype(dtype):
        raise TypeError(f"{kind} weight values must be {np.dtype(dtype)} like the activations, "
                        f"got {vt}")
    it = np.dtype(indices.dtype)
    if it not in (np.dtype(np.int32), np.dtype(np.uint16)):
        raise TypeError(f"{kind} weight indices must be int32 or uint16, got {it}")
    return kind


def _pow2_at_least(x):
    p = 1
    while p < x:
        p *= 2
    return p


def _lanes_for(length):
    """Threads per group for dot products of about ``length`` terms: enough to
    cover them, at most CUDA_LANES and the block."""
    cap = min(config.CUDA_LANES, config.CUDA_THREADS_PER_BLOCK)
    return max(1, min(cap, _pow2_at_least(math.ceil(length))))


def _launch_1d(kernel, n, args, stream):
    """One thread per element of n (the pointwise kernels)."""
    if n <= 0:
        return
    tpb = config.CUDA_THREADS_PER_BLOCK
    kernel[(n + tpb - 1) // tpb, tpb, stream](*args)


def _launch_groups(kernel, total, lanes, itemsize, args, stream):
    """A group of ``lanes`` threads per item, grid-stride over ``total`` items;
    shared memory holds one reduction slot per thread."""
    if total <= 0:
        return
    tpb = config.CUDA_THREADS_PER_BLOCK
    groups = tpb // lanes
    blocks = min((total + groups - 1) // groups, config.CUDA_MAX_BLOCKS)
    kernel[blocks, tpb, stream, tpb * itemsize](*args, lanes)


def _gemm(out, a, b, trans_a, trans_b, accumulate, stream):
    M, Nc = out.shape
    if M == 0 or Nc == 0:
        return
    tile = config.CUDA_TILE
    grid = (min((Nc + tile - 1) // tile, config.CUDA_MAX_BLOCKS),
            min((M + tile - 1) // tile, config.CUDA_MAX_BLOCKS))
    shared = 2 * tile * (tile + 1) * np.dtype(out.dtype).itemsize
    _kernels(out.dtype)["_gemm_kernel"][grid, (tile, tile), stream, shared](
        out, a, b, int(trans_a), int(trans_b), int(accumulate))


def _product(out, x, w0, data, indices, indptr, transposed, stream):
    """out = x @ W^T (x @ W through W^T's pattern when ``transposed``)."""
    out, x, w0, data, indices, indptr = map(_dev, (out, x, w0, data, indices, indptr))
    kind = _weight_kind(out.dtype, w0, data, indices)
    if kind == "dense":
        _gemm(out, x, w0, False, not transposed, False, stream)
        return
    ks = _kernels(out.dtype)
    itemsize = np.dtype(out.dtype).itemsize
    rows = max(indptr.shape[0] - 1, 1)
    total = out.shape[0] * out.shape[1]
    if kind == "csr":
        _launch_groups(ks["_csr_matmul_kernel"], total, _lanes_for(data.shape[0] / rows),
                       itemsize, (out, x, data, indices, indptr), stream)
    else:
        _launch_groups(ks["_bsr_matmul_kernel"], total, _lanes_for(data.shape[0] / rows),
                       itemsize, (out, x, data, indices, indptr), stream)


_EMPTY = {}


def _no_lengths():
    """An empty int64 lengths array (every row valid), made once."""
    if "lengths" not in _EMPTY:
        _EMPTY["lengths"] = (np.zeros(0, np.int64) if _SIM
                             else cuda.device_array(0, np.int64))
    return _EMPTY["lengths"]


# ----------------------------------------------------------------------------
# Public host functions: the CPU kernels' names and argument order
# ----------------------------------------------------------------------------

def matmul(out, x, w0, data, indices, indptr, *, stream=0):
    """out (N, R) = x (N, K) @ W^T for W (R, K) in any of the four-slot kinds.

    Dense W: the tiled shared-memory product; CSR: a group of threads per
    output element; BSR: the same over whole blocks. Overwrites ``out``.

    Parameters
    ----------
    out : device array (N, R), float32 or float64
    x : device array (N, K), same dtype
    w0, data, indices, indptr : the weight's four slots (see the module doc)
    stream : numba stream or 0
    """
    _product(out, x, w0, data, indices, indptr, False, stream)


def sparse_matmul(out, x, w0, data, indices, indptr, *, stream=0):
    """``matmul`` for a sparse W (CSR or BSR), as the CPU's batched product;
    there is no separate parallel variant: every launch fills the device."""
    if np.dtype(data.dtype).kind == "f" and data.ndim == 1 and w0.shape[0] > 0:
        raise TypeError("sparse_matmul takes a CSR or BSR weight, got a dense one")
    _product(out, x, w0, data, indices, indptr, False, stream)


def matmul_t(out, x, w0, data_t, indices_t, indptr_t, *, stream=0):
    """out (N, K) = x (N, R) @ W for W (R, K): dense W, or the CSR/BSR
    pattern of W^T (``kernel_args_t()``) in the last three slots."""
    _product(out, x, w0, data_t, indices_t, indptr_t, True, stream)


def dense_grad_acc(grad, tmp, dz, a, *, stream=0):
    """grad (R, C) += dz^T a for dz (N, R), a (N, C).

    The tiled product accumulates straight into ``grad``; ``tmp`` (R, C), the
    CPU's scratch, is accepted for the same argument order and not touched.
    """
    grad, dz, a = _dev(grad), _dev(dz), _dev(a)
    _gemm(grad, dz, a, True, False, True, stream)


def sddmm_acc(gdata, dz_t, a_t, indices, indptr, *, stream=0):
    """gdata (nnz,) += for each stored (r, c): sum_n dz_t[r, n] * a_t[c, n].

    dz_t (R, N) and a_t (K, N) are transposed so that each group of threads
    reads two contiguous rows; indices (nnz,), indptr (R + 1,).
    """
    gdata, dz_t, a_t, indices, indptr = map(_dev, (gdata, dz_t, a_t, indices, indptr))
    _launch_groups(_kernels(gdata.dtype)["_sddmm_kernel"], gdata.shape[0],
                   _lanes_for(dz_t.shape[1]), np.dtype(gdata.dtype).itemsize,
                   (gdata, dz_t, a_t, indices, indptr, 1, 1), stream)


def bsr_sddmm_acc(gdata, dz_t, a_t, indices, indptr, *, stream=0):
    """``sddmm_acc`` for BSR: gdata (nblocks, br, bc), C-contiguous, over the
    stored blocks; indices (nblocks,) block columns, indptr over block rows."""
    gdata, dz_t, a_t, indices, indptr = map(_dev, (gdata, dz_t, a_t, indices, indptr))
    nb, br, bc = gdata.shape
    flat = gdata.reshape(nb * br * bc)
    _launch_groups(_kernels(gdata.dtype)["_sddmm_kernel"], nb * br * bc,
                   _lanes_for(dz_t.shape[1]), np.dtype(gdata.dtype).itemsize,
                   (flat, dz_t, a_t, indices, indptr, br, bc), stream)


def _cell_kernel(dtype, which, cell):
    """(kernel, extra arguments) of the cell step ``which`` ("forward" or
    "backward") for ``cell``: the plain kernel for (), else the variant's with
    kinds, params, peep (and dpeep for the backward) appended."""
    ks = _kernels(dtype)
    if len(cell) == 0:
        return ks[f"_cell_{which}_kernel"], ()
    kinds, params, peep, dpeep = map(_dev, cell)
    extra = (kinds, params, peep) + ((dpeep,) if which == "backward" else ())
    return ks[f"_variant_{which}_kernel"], extra


def lstm_step(h, c, gates, r, x,
              wih, wih_data, wih_indices, wih_indptr, bias_ih, bias_hh,
              whh, whh_data, whh_indices, whh_indptr,
              whr, whr_data, whr_indices, whr_indptr, cell, *, stream=0):
    """One LSTM step for a whole batch, state updated in place (streaming).

    Shapes and ``cell`` as the CPU's ``lstm_step``: h (B, O), c (B, H) read as h_{t-1},
    c_{t-1} and overwritten with h_t, c_t; gates (3, B, G): [0] receives the
    activations, [1] the recurrent product, [2] is unused here (the fused cell
    kernel updates c in place); r (B, H) or (0, H) without projection; x (B, K).
    Launches: two products, the fused cell kernel, and the projection.
    """
    h, c, gates, r = _dev(h), _dev(c), _dev(gates), _dev(r)
    act, rec = gates[0], gates[1]
    matmul(act, x, wih, wih_data, wih_indices, wih_indptr, stream=stream)
    matmul(rec, h, whh, whh_data, whh_indices, whh_indptr, stream=stream)
    projected = r.shape[0] > 0
    B, H = c.shape
    kernel, extra = _cell_kernel(c.dtype, "forward", cell)
    _launch_1d(kernel, B * H,
               (c, r if projected else h, act, c, h, rec, _dev(bias_ih), _dev(bias_hh),
                _no_lengths(), 0, 0) + extra, stream)
    if projected:
        matmul(h, r, whr, whr_data, whr_indices, whr_indptr, stream=stream)


def lstm_seq_forward(hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                     whh, whh_data, whh_indices, whh_indptr,
                     whr, whr_data, whr_indices, whr_indptr, cell, *, stream=0):
    """Forward recurrence of one layer and direction, one launch per kernel
    per step (see ``lstm_seq_forward_persistent`` for the one-launch form).

    Shapes and ``cell`` as the CPU's: hs (T+1, B, O), cs (T+1, B, H) with hs[0], cs[0] =
    h0, c0 on entry; gates (T, B, G) holds x_t W_ih^T on entry and i, f, g, o
    on exit; rs (T, B, H) (or (0, B, H) without projection); scratch (B, G);
    lengths (B,) int64 in [0, T] (steps t >= lengths[b] carry row b's state
    and zero its activations); bias_ih, bias_hh (G,).
    """
    hs, cs, gates, rs, scratch, lengths = map(_dev, (hs, cs, gates, rs, scratch, lengths))
    bias_ih, bias_hh = _dev(bias_ih), _dev(bias_hh)
    ks = _kernels(gates.dtype)
    T, B = gates.shape[0], gates.shape[1]
    H, O = cs.shape[2], hs.shape[2]
    projected = rs.shape[0] > 0
    cell_kernel, extra = _cell_kernel(gates.dtype, "forward", cell)
    for t in range(T):
        matmul(scratch, hs[t], whh, whh_data, whh_indices, whh_indptr, stream=stream)
        _launch_1d(cell_kernel, B * H,
                   (cs[t + 1], rs[t] if projected else hs[t + 1], gates[t], cs[t], hs[t],
                    scratch, bias_ih, bias_hh, lengths, t, 0 if projected else 1) + extra,
                   stream)
        if projected:
            matmul(hs[t + 1], rs[t], whr, whr_data, whr_indices, whr_indptr, stream=stream)
            _launch_1d(ks["_copy_rows_kernel"], B * O, (hs[t + 1], hs[t], lengths, t, 0),
                       stream)


def lstm_seq_backward(dh, dc, gates, dhs, scratch_o, scratch_h,
                      dy, hs, cs, rs, lengths,
                      whh, whh_data_t, whh_indices_t, whh_indptr_t,
                      whr, whr_data_t, whr_indices_t, whr_indptr_t, cell, *, stream=0):
    """Backward recurrence (BPTT) of one layer and direction.

    Shapes and ``cell`` as the CPU's: dh (B, O), dc (B, H) hold dh_n, dc_n on entry and
    dh0, dc0 on exit; gates (T, B, G) holds the activations on entry and dz on
    exit; dhs (T, B, O) (or (0, B, O) without projection) receives the
    gradient reaching each h_t; scratch_o (B, O), scratch_h (B, H); dy
    (T, B, O); hs, cs, rs, lengths as left by the forward. W_hh and W_hr come
    dense or as their transposed sparse pattern.
    """
    dh, dc, gates, dhs, scratch_o, scratch_h, dy, cs, lengths = map(
        _dev, (dh, dc, gates, dhs, scratch_o, scratch_h, dy, cs, lengths))
    ks = _kernels(gates.dtype)
    T, B = gates.shape[0], gates.shape[1]
    H, O = dc.shape[1], dh.shape[1]
    projected = _dev(rs).shape[0] > 0
    cell_kernel, extra = _cell_kernel(gates.dtype, "backward", cell)
    for t in range(T - 1, -1, -1):
        act = gates[t]
        dcur = dhs[t] if projected else scratch_o  # gradient reaching h_t
        _launch_1d(ks["_dcur_kernel"], B * O, (dcur, dh, dy[t], lengths, t), stream)
        if projected:
            matmul_t(scratch_h, dcur, whr, whr_data_t, whr_indices_t, whr_indptr_t,
                     stream=stream)
            dr = scratch_h
        else:
            dr = dcur
        _launch_1d(cell_kernel, B * H, (act, dc, dr, cs[t + 1], cs[t], lengths, t) + extra,
                   stream)
        matmul_t(scratch_o, act, whh, whh_data_t, whh_indices_t, whh_indptr_t, stream=stream)
        _launch_1d(ks["_copy_rows_kernel"], B * O, (dh, scratch_o, lengths, t, 1), stream)


def gather_blocks_t(out, data, perm, *, stream=0):
    """out[k] = data[perm[k]].T: out (nb, bc, br), data (nb, br, bc), perm (nb,)."""
    out, data, perm = _dev(out), _dev(data), _dev(perm)
    _launch_1d(_kernels(out.dtype)["_gather_blocks_t_kernel"],
               out.shape[0] * out.shape[1] * out.shape[2], (out, data, perm), stream)


def gather_rows(out, x, index, *, stream=0):
    """out[n] = x[index[n]] for 2-D out (M, F), x (N, F), index (M,)."""
    out, x, index = _dev(out), _dev(x), _dev(index)
    _launch_1d(_kernels(out.dtype)["_gather_rows_kernel"], index.shape[0] * out.shape[1],
               (out, x, index), stream)


def transpose(out, x, *, stream=0):
    """out (C, N) = x (N, C)^T."""
    out, x = _dev(out), _dev(x)
    _launch_1d(_kernels(out.dtype)["_transpose_kernel"], x.shape[0] * x.shape[1], (out, x),
               stream)


# ----------------------------------------------------------------------------
# The whole sequence in one launch
# ----------------------------------------------------------------------------

def _resident_blocks(kernel, args, threads, shared):
    """How many blocks of ``kernel`` can be resident at once on this device.

    The persistent kernel's grid barrier needs every block resident at once,
    so its grid must not exceed this. Asked of the driver (occupancy for this
    kernel's registers and ``shared`` bytes, times the SM count); one block
    under the simulator, which runs blocks one after another.
    """
    if _SIM:
        return 1
    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    return max(1, compiled.max_cooperative_grid_blocks(threads, shared))


_BARRIER = {}


def lstm_seq_forward_persistent(hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                                whh, whh_data, whh_indices, whh_indptr,
                                whr, whr_data, whr_indices, whr_indptr, cell,
                                *, barrier=None, stream=0):
    """``lstm_seq_forward`` in a single launch: a persistent kernel walks all T
    steps, the blocks meeting at a grid barrier after each step (and after the
    projection), so that small-batch long sequences do not pay a launch per
    kernel per step.

    Arguments and results are those of ``lstm_seq_forward`` (``scratch`` is
    not used). W_hh and W_hr may be dense or CSR (int32 or uint16 indices);
    other kinds, a variant ``cell``, or a batch whose state does not fit in
    shared memory, fall back to ``lstm_seq_forward`` with the same results.

    Grid and residency. Block k owns ceil(H / blocks) hidden units, i.e. their
    four gate rows of W_hh; a group of threads reduces each (row, batch) dot
    product against h_{t-1}, staged in shared memory at every step. The
    block's W_hh rows are copied into shared memory once, before step 0, when
    they fit in ``config.CUDA_SHARED_BYTES`` together with the staged state
    (dense: 4 * units * O values; CSR: the rows' values and int32 indices);
    otherwise they are read from global memory (and L2) at every step.
    The barrier is hand-written (a threadfence, then an atomic counter that
    block leaders spin on) rather than ``cuda.cg.this_grid().sync()``, which
    needs a CUDA driver even to compile, so this kernel could not be checked by
    the PTX test on machines without a GPU. A spin barrier requires every block
    of the grid to be resident at once: the grid is therefore
    min(H, SM count, ``config.CUDA_PERSISTENT_BLOCKS`` when set, and the
    driver's occupancy figure for this kernel), one block under the simulator.

    Parameters
    ----------
    hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh, whh..., whr..., cell
        As ``lstm_seq_forward``.
    barrier : device array (1,) int32, optional
        The barrier counter, zeroed here on ``stream``; by default one counter
        shared by every call (pass your own to run several persistent
        launches concurrently on different streams).
    stream : numba stream or 0

    Returns
    -------
    dict
        ``persistent`` (False on a fall-back), ``blocks``, ``units`` (hidden
        units per block), ``lanes`` (threads per dot product), ``resident``
        (W_hh in shared memory) and ``shared`` (dynamic shared bytes).
    """
    args = [_dev(a) for a in (hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
                              whh, whh_data, whh_indices, whh_indptr,
                              whr, whr_data, whr_indices, whr_indptr)]
    hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh = args[:8]
    dtype = np.dtype(gates.dtype)
    itemsize = dtype.itemsize
    B, H, O = gates.shape[1], cs.shape[2], hs.shape[2]
    projected = rs.shape[0] > 0
    threads = config.CUDA_PERSISTENT_THREADS
    kinds = [_weight_kind(dtype, args[8], args[9], args[10])]
    if projected:
        kinds.append(_weight_kind(dtype, args[12], args[13], args[14]))
    state_bytes = (B * H + threads) * itemsize
    if "bsr" in kinds or state_bytes > config.CUDA_SHARED_BYTES or gates.shape[0] == 0 \
            or len(cell) > 0:
        lstm_seq_forward(*args, cell, stream=stream)
        return dict(persistent=False, blocks=0, units=0, punits=0, lanes=0, resident=False,
                    shared=0)
    dense = kinds[0] == "dense"

    kernel = _kernels(dtype)["_persistent_forward_kernel"]
    if barrier is None:
        if "counter" not in _BARRIER:
            _BARRIER["counter"] = (np.zeros(1, np.int32) if _SIM
                                   else cuda.device_array(1, np.int32))
        barrier = _BARRIER["counter"]
    barrier = _dev(barrier)

    blocks = min(H, config.CUDA_PERSISTENT_BLOCKS or H)
    if not _SIM:
        blocks = min(blocks, cuda.get_current_device().MULTIPROCESSOR_COUNT)
        # Occupancy at the largest shared size this call may ask for: a safe bound.
        launch_args = args[:4] + args[5:] + [barrier, 1, 1, 1, 1]
        blocks = min(blocks, _resident_blocks(kernel, launch_args, threads,
                                              config.CUDA_SHARED_BYTES))
    else:
        blocks = 1  # see _resident_blocks
    plan = _persistent_plan(B, H, O, projected, dense, args[9], args[11], itemsize, blocks)
    _kernels(dtype)["_zero_kernel"][1, 32, stream](barrier)
    kernel[plan["blocks"], threads, stream, plan["shared"]](
        hs, cs, gates, rs, lengths, bias_ih, bias_hh, *args[8:16], barrier,
        plan["units"], plan["punits"], plan["lanes"], int(plan["resident"]))
    return dict(persistent=True, **plan)


def _persistent_plan(B, H, O, projected, dense, whh_data, whh_indptr, itemsize, blocks):
    """Geometry of the persistent kernel for at most ``blocks`` blocks: dict of
    ``blocks``, ``units`` (hidden units per block), ``punits`` (projection rows
    per block), ``lanes``, ``resident`` and ``shared`` (dynamic bytes)."""
    threads = config.CUDA_PERSISTENT_THREADS
    units = -(-H // blocks)
    blocks = -(-H // units)  # no block without units
    punits = -(-O // blocks) if projected else 0
    state_bytes = (B * H + threads) * itemsize

    # Residency: the largest slice of W_hh a block owns.
    if dense:
        wbytes = 4 * units * O * itemsize
    else:
        indptr = _host(whh_indptr).astype(np.int64)
        starts = np.arange(blocks) * units
        ends = np.minimum(starts + units, H)
        nnz = sum(indptr[g * H + ends] - indptr[g * H + starts] for g in range(4))
        wbytes = int(nnz.max()) * (itemsize + 4) + 4 * 4  # values, 4 starts, indices
    resident = state_bytes + wbytes <= config.CUDA_SHARED_BYTES

    # Threads per dot product: spread a block's B * 4 * units rows over its
    # threads, no more lanes than a row has terms.
    row_len = O if dense else max(1.0, whh_data.shape[0] / max(4 * H, 1))
    per_item = max(1, threads // max(1, B * 4 * units))
    lanes = 1
    while lanes * 2 <= min(per_item, config.CUDA_LANES, _pow2_at_least(row_len)):
        lanes *= 2
    return dict(blocks=blocks, units=units, punits=punits, lanes=lanes, resident=resident,
                shared=state_bytes + (wbytes if resident else 0))


# ----------------------------------------------------------------------------
# Introspection: every kernel with an example signature (for the PTX test)
# ----------------------------------------------------------------------------

def _signature(name, ft, index=int32):
    """Argument types of kernel ``name`` as the host functions launch it with
    C-contiguous arrays of element type ``ft`` and ``index`` sparse indices."""
    a1, a2, a3 = ft[::1], ft[:, ::1], ft[:, :, ::1]
    i1, l1, n = index[::1], int64[::1], int64
    return {
        "_gemm_kernel": (a2, a2, a2, n, n, n),
        "_csr_matmul_kernel": (a2, a2, a1, i1, i1, n),
        "_bsr_matmul_kernel": (a2, a2, a3, i1, i1, n),
        "_sddmm_kernel": (a1, a2, a2, i1, i1, n, n, n),
        "_cell_forward_kernel": (a2, a2, a2, a2, a2, a2, a1, a1, l1, n, n),
        "_cell_backward_kernel": (a2, a2, a2, a2, a2, l1, n),
        "_variant_forward_kernel": (a2, a2, a2, a2, a2, a2, a1, a1, l1, n, n, l1, a1, a2),
        "_variant_backward_kernel": (a2, a2, a2, a2, a2, l1, n, l1, a1, a2, a2),
        "_dcur_kernel": (a2, a2, a2, l1, n),
        "_copy_rows_kernel": (a2, a2, l1, n, n),
        "_gather_blocks_t_kernel": (a3, a3, l1),
        "_gather_rows_kernel": (a2, a2, l1),
        "_transpose_kernel": (a2, a2),
        "_persistent_forward_kernel": (a3, a3, a3, a3, l1, a1, a1, a2, a1, i1, i1,
                                       a2, a1, i1, i1, int32[::1], n, n, n, n),
        "_zero_kernel": (int32[::1],),
    }[name]


# Kernels whose speed matters: the PTX test requires them not to spill.
HOT = ("_gemm_kernel", "_csr_matmul_kernel", "_bsr_matmul_kernel", "_sddmm_kernel",
       "_cell_forward_kernel", "_cell_backward_kernel", "_persistent_forward_kernel",
       "_variant_forward_kernel", "_variant_backward_kernel")

# (name, dtype, index dtype, kernel, argument types) for every real kernel,
# float32 and float64, with uint16 indices too where a kernel takes indices.
KERNELS = []
for _dt, _ft in ((np.dtype(np.float32), float32), (np.dtype(np.float64), float64)):
    for _name, _kernel in _KERNELS_BY_DTYPE[_dt].items():
        _indexed = _name in ("_csr_matmul_kernel", "_bsr_matmul_kernel", "_sddmm_kernel",
                             "_persistent_forward_kernel")
        for _it in ((np.dtype(np.int32), int32), (np.dtype(np.uint16), uint16))[:1 + _indexed]:
            KERNELS.append((_name, _dt, _it[0], _kernel, _signature(_name, _ft, _it[1])))
del _dt, _ft, _name, _kernel, _indexed, _it

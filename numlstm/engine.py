"""The BPTT orchestration, written once over a backend (docs/design.md, CPU/GPU twins).

An ``Engine`` runs one model's forward and backward on one backend
(``numlstm.backends.cpu`` or ``.cuda``): which buffers exist (the plan,
``numlstm.plans``), the order of the kernel calls, the tape, checkpointed
segments, dropout, lengths and the reverse direction. Every array operation
is the backend's, so the same lines drive NumPy arrays and ``@njit``
kernels, or device arrays and ``@cuda.jit`` kernels. The model
(``numlstm.lstm.LSTM``) holds one engine and replaces it on ``to()``.

Glossary: T steps, B batch, I input features, H hidden, O = P or H, G = 4H,
L layers, D directions, N = T*B. Semantics are torch.nn.LSTM's; the reverse
direction of a bidirectional layer (and the one direction of a ``reverse``
model) runs on a copy of its input reversed within each sequence's own
length, so the kernels only walk forward in time.
"""

import numpy as np

from numlstm import checks, plans
from numlstm.ops import first


class Tape:
    """What a training forward leaves for backward (views into the workspace).

    ``lengths`` (B,), ``rev_index`` (T*B,) (None when D = 1) and ``seglens``
    (nseg, B) (None without checkpointing) are int64 arrays in the backend's
    memory; ``segment`` is the checkpoint segment length or None.
    """

    def __init__(self, views, T, B, lengths, rev_index, unbatched, segment=None,
                 seglens=None):
        self.views = views
        self.T, self.B = T, B
        self.lengths = lengths
        self.rev_index = rev_index
        self.unbatched = unbatched
        self.segment = segment
        self.seglens = seglens
        self.used = False


def reverse_index(T, B, lengths):
    """Row index (T*B,) reversing each sequence within its own length.

    Row t*B + b maps to (len_b - 1 - t)*B + b for t < len_b and to itself
    on padding; the map is its own inverse.
    """
    t = np.arange(T)[:, None]
    src = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    return (src * B + np.arange(B)[None, :]).reshape(-1).astype(np.int64)


def segment_lengths(lengths, T, segment):
    """(nseg, B) int64: each sequence's valid steps within each segment."""
    starts = np.arange(0, T, segment)
    return np.clip(lengths[None, :] - starts[:, None], 0,
                   np.minimum(segment, T - starts)[:, None]).astype(np.int64)


def draw_dropout(rng, p, mask):
    """Fill ``mask`` (a host array) with 0 and 1/(1-p), keeping each entry with
    probability 1 - p; the same generator state gives the same mask on every
    backend."""
    rng.random(out=mask, dtype=mask.dtype)  # u in [0, 1)
    # keep iff u >= p, i.e. floor(u + 1 - p) == 1; computed without a temporary.
    mask += 1 - p
    np.floor(mask, out=mask)
    mask *= 1 / (1 - p)


class Engine:
    """Forward and backward of ``model`` on ``backend``.

    Parameters
    ----------
    model : numlstm.LSTM
        Read for its configuration, its ``host_params`` (what the backend
        loads) and its ``version`` (a change reloads them).
    backend : module
        ``numlstm.backends.cpu`` or ``numlstm.backends.cuda``.
    rng : np.random.Generator
        The model's generator (dropout masks).

    Attributes
    ----------
    train_ws, infer_ws : backend Workspace
        Training (tape and backward's scratch) and inference buffers.
    tape : Tape or None
        What the last training forward recorded.
    """

    def __init__(self, model, backend, rng):
        self.model, self.be, self.rng = model, backend, rng
        self.train_ws = backend.Workspace(model.dtype)
        self.infer_ws = backend.Workspace(model.dtype)
        self.train_iws = backend.IndexWorkspace()
        self.infer_iws = backend.IndexWorkspace()
        self.tape = None
        self.params = None
        self.version = None

    @property
    def name(self):
        """The backend's name: "cpu" or "cuda"."""
        return self.be.NAME

    def reversed(self, d):
        """Whether direction d runs backwards in time: the second direction of a
        bidirectional layer, or the only one of a ``reverse`` model."""
        return d == 1 or self.model.reverse

    def current(self):
        """The parameters as this backend's kernels read them, (re)loaded from
        the host when the model's version changed since (the tape goes too)."""
        if self.version != self.model.version:
            self.params = self.be.load_params(self.model.host_params)
            self.version = self.model.version
            self.tape = None
        return self.params

    def pull(self):
        """Copy the backend's parameters and gradients into the host arrays (on
        the GPU; nothing on the CPU), unless the host ones were replaced since."""
        if self.params is not None and self.version == self.model.version:
            self.params.pull()

    def release(self):
        """Drop the tape and the workspaces' blocks (the next call rebuilds them)."""
        self.tape = None
        for ws in (self.train_ws, self.infer_ws, self.train_iws, self.infer_iws):
            ws.release()

    # ------------------------------------------------------------------
    # Plans
    # ------------------------------------------------------------------

    def plan(self, T, B, training, segment=None, *, batch_first=None, x_copy=True):
        """``(spec, kept)`` of a call on this backend (``plans.buffer_plan``);
        ``batch_first`` defaults to the model's (batched input)."""
        m = self.model
        return plans.buffer_plan(
            m, T, B, training, segment, sparse=self.current().sparse, staged=self.be.STAGED,
            batch_first=m.batch_first if batch_first is None else batch_first, x_copy=x_copy)

    def plan_nbytes(self, T, B, training, segment=None, **kw):
        """Bytes an empty workspace allocates for that plan."""
        return plans.plan_nbytes(self.plan(T, B, training, segment, **kw)[0], self.model.dtype)

    def memory_plan(self, T, B, *, training, checkpoint=None):
        """Predicted bytes of a call on (T, B) input (``plans.memory_plan``)."""
        T = checks.check_int(T, "T", 1)
        B = checks.check_int(B, "B", 1)
        segment = checks.check_checkpoint(checkpoint, T, training)
        spec, kept = self.plan(T, B, training, segment)
        return plans.memory_plan(self.model, spec, kept, T, B, training=training,
                                 segment=segment, staged=self.be.STAGED,
                                 transposed=self.current().transposed_nbytes())

    # ------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------

    def forward(self, x, state, lengths, training, checkpoint, memory_budget, to_host):
        """``LSTM.forward`` (arguments checked here, once for every backend)."""
        m, be = self.model, self.be
        params = self.current()
        xin = be.check_x(m, x)
        T, B, unbatched = xin.T, xin.B, xin.unbatched
        params.prepare(B)
        if training:
            params.check_trainable()
        lengths = checks.check_lengths(be.host_lengths(lengths), T, B, unbatched)
        bf = m.batch_first and not unbatched

        def nbytes(seg):
            return self.plan_nbytes(T, B, True, seg, batch_first=bf)

        seg = plans.resolve_segment(nbytes, T, B, training, checkpoint, memory_budget)
        ws = self.train_ws if training else self.infer_ws
        if memory_budget is not None and ws.nbytes > memory_budget:
            self.tape = None
            ws.release()  # a block left by a bigger call would break the budget
        if training:
            self.tape = None  # the tape being overwritten is no longer valid
        v = ws.carve(self.plan(T, B, training, seg, batch_first=bf, x_copy=xin.copy)[0])
        D, L, O = m.num_directions, m.num_layers, m.output_size
        rev = reverse_index(T, B, lengths) if D == 2 or m.reverse else None
        seglens = segment_lengths(lengths, T, seg) if seg is not None else None
        lengths, rev, seglens = be.indices(self.train_iws if training else self.infer_iws,
                                           lengths, rev, seglens)
        h0, c0 = be.read_state(m, state, B, unbatched, v.get("h0"), v.get("c0"), "state")
        layer_in = be.place_x(xin, v, training, m.dtype)

        h_n = be.empty((D * L, B, O), m.dtype)
        c_n = be.empty((D * L, B, m.hidden_size), m.dtype)
        y, ytop = be.new_output(v, "ytm", (T, B, D * O), bf, m.dtype)
        for l in range(L):
            out = ytop if l == L - 1 else (v[f"x{l + 1}"] if training else v[f"x{1 + l % 2}"])
            for d in range(D):
                i = l * D + d
                if seg is not None:
                    self._layer_forward_segments(v, l, d, layer_in, out, h0[i], c0[i],
                                                 h_n[i], c_n[i], seglens, rev, seg)
                    continue
                tag = f"{l}{d}" if training else "00"
                hs, cs = v[f"hs{tag}"], v[f"cs{tag}"]
                be.copy(hs[0], h0[i])
                be.copy(cs[0], c0[i])
                self._layer_forward(v, tag, l, d, layer_in, lengths, rev)
                be.copy(h_n[i], hs[T])
                be.copy(c_n[i], cs[T])
                # This direction's output, in time order, zero past each length.
                odir = hs[1:]
                if self.reversed(d):
                    be.gather_rows(v["odir"].reshape(T * B, O), odir.reshape(T * B, O), rev)
                    odir = v["odir"]
                be.put_cols(out, odir, lengths, d * O)
            if training and m.dropout and l < L - 1:
                self._apply_dropout(v[f"mask{l}"], out)
            layer_in = out

        if training:
            self.tape = Tape(v, T, B, lengths, rev, unbatched, seg, seglens)
        return self._results(y, ytop, h_n, c_n, unbatched, bf, to_host)

    def _results(self, y, top, h, c, unbatched, batch_first, to_host):
        """What forward and backward return: (y, (h, c)) shaped like the call's
        input (unbatched, batch_first), on the host when ``to_host``."""
        if unbatched:
            y = top.reshape(top.shape[0], top.shape[2])
            h, c = h.reshape(h.shape[0], h.shape[2]), c.reshape(c.shape[0], c.shape[2])
        elif batch_first:
            y = self.be.finish_output(y, top)
        if to_host:
            y, h, c = self.be.to_host(y, h, c)
        return y, (h, c)

    def _apply_dropout(self, mask, out):
        """Draw a dropout mask (values 0 or 1/(1-p)) on the host and apply it to
        ``out`` in place."""
        be = self.be
        host = be.host_buffer(mask)
        draw_dropout(self.rng, self.model.dropout, host)
        be.upload(mask, host)
        be.mul(out, mask)

    def _layer_forward(self, v, tag, l, d, layer_in, lengths, rev_index):
        """Layer l, direction d over all T steps into the recurrence buffers ``tag``."""
        be, params = self.be, self.params
        T, B, width = layer_in.shape
        x2d = layer_in.reshape(T * B, width)
        if self.reversed(d):
            xr = first(v["xrev"], T * B * width).reshape(T * B, width)
            be.gather_rows(xr, x2d, rev_index)
            x2d = xr
        gates = v[f"gates{tag}"]
        be.matmul_batch(gates.reshape(T * B, gates.shape[2]), x2d, params.weight("ih", l, d))
        be.seq_forward((v[f"hs{tag}"], v[f"cs{tag}"], gates, v[f"rs{tag}"], v["scratch"],
                        lengths) + params.biases(l, d) + params.recurrent_args(l, d, B),
                       params.cell_args(l, d), params.two_threads(l, d, T, B))

    def _layer_forward_segments(self, v, l, d, layer_in, out, h0, c0, h_n, c_n, seglens,
                                rev_index, k):
        """Checkpointed forward of layer l, direction d, k steps at a time.

        Saves the state entering each segment in hb, cb (nseg, B, O / H),
        writes the direction's output into ``out`` (T, B, D*O) and the final
        state into ``h_n``, ``c_n``.
        """
        be = self.be
        T, B = layer_in.shape[:2]
        O = self.model.output_size
        hs, cs = v["hs"], v["cs"]  # (k+1, B, O), (k+1, B, H)
        hb, cb = v[f"hb{l}{d}"], v[f"cb{l}{d}"]
        be.copy(hs[0], h0)
        be.copy(cs[0], c0)
        out2d = out.reshape(T * B, out.shape[2])
        for s in range(hb.shape[0]):
            t0 = s * k
            n = min(k, T - t0)
            be.copy(hb[s], hs[0])
            be.copy(cb[s], cs[0])
            self._segment_forward(v, l, d, layer_in, t0, n, seglens[s], rev_index)
            if self.reversed(d):  # rows of the reversed sequence go back to their own time steps
                oseg = v["odir"][:n]
                be.put_cols(oseg, hs[1:n + 1], seglens[s], 0)
                be.scatter_cols(out2d, oseg.reshape(n * B, O),
                                rev_index[t0 * B:(t0 + n) * B], d * O)
            else:
                be.put_cols(out[t0:t0 + n], hs[1:n + 1], seglens[s], 0)
            be.copy(hs[0], hs[n])
            be.copy(cs[0], cs[n])
        be.copy(h_n, hs[0])
        be.copy(c_n, cs[0])

    def _segment_forward(self, v, l, d, layer_in, t0, n, lens, rev_index):
        """Steps [t0, t0+n) of layer l, direction d (in its own time order) into the
        segment buffers gates, hs, cs, rs, from the state in hs[0], cs[0].

        ``lens`` (B,) counts each sequence's valid steps in the segment. Returns
        the segment's input rows (n*B, K).
        """
        be, params = self.be, self.params
        T, B, width = layer_in.shape
        rows = n * B
        if self.reversed(d):
            xs = first(v["xrev"], rows * width).reshape(rows, width)
            be.gather_rows(xs, layer_in.reshape(T * B, width),
                           rev_index[t0 * B:t0 * B + rows])
        else:
            xs = layer_in[t0:t0 + n].reshape(rows, width)
        gates = v["gates"][:n]
        be.matmul_batch(gates.reshape(rows, gates.shape[2]), xs, params.weight("ih", l, d))
        be.seq_forward((v["hs"][:n + 1], v["cs"][:n + 1], gates, v["rs"][:n], v["scratch"],
                        lens) + params.biases(l, d) + params.recurrent_args(l, d, B),
                       params.cell_args(l, d), params.two_threads(l, d, n, B))
        return xs

    # ------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------

    def backward(self, dy, dstate, to_host):
        """``LSTM.backward``: BPTT through the recorded tape."""
        m, be = self.model, self.be
        self.current()
        tape = self.tape
        if tape is None:
            raise RuntimeError("backward needs a preceding forward(..., training=True); "
                               "none is recorded (load_state_dict and to() also discard it)")
        if tape.used:
            raise RuntimeError("backward was already called for this forward; run "
                               "forward(..., training=True) again")
        T, B, v = tape.T, tape.B, tape.views
        L, D, O, H = m.num_layers, m.num_directions, m.output_size, m.hidden_size
        bf = m.batch_first and not tape.unbatched
        dcur = be.read_dy(m, dy, T, B, tape.unbatched, v.get("dytm"))  # (T, B, D*O)
        dh_n, dc_n = be.read_state(m, dstate, B, tape.unbatched, v.get("dhn"), v.get("dcn"),
                                   "dstate")
        tape.used = True  # backward overwrites the tape's activations with dz

        dh0 = be.empty((D * L, B, O), m.dtype)
        dc0 = be.empty((D * L, B, H), m.dtype)
        dx, dxtop = be.new_output(v, "dxtm", (T, B, m.input_size), bf, m.dtype)
        if tape.segment is not None:
            dcur = be.ready(dcur)  # batch_first: segments read rows of dy
        for l in range(L - 1, -1, -1):
            dx_l = dxtop if l == 0 else v["dxa" if l % 2 else "dxb"]  # (T, B, D*O) above 0
            if m.reverse:  # its dx is added in, row by row: nothing wrote it first
                be.fill(dx_l, 0)
            for d in range(D):
                i = l * D + d
                be.copy(v["dh"], dh_n[i])
                be.copy(v["dc"], dc_n[i])
                if tape.segment is None:
                    dyd = self._direction_dy(v, dcur, d, tape.rev_index)
                    self._layer_backward(v, tape, l, d, dyd, dx_l)
                else:
                    self._layer_backward_segments(v, tape, l, d, dcur, dx_l)
                be.copy(dh0[i], v["dh"])
                be.copy(dc0[i], v["dc"])
            if l > 0 and m.dropout:
                be.mul(dx_l, v[f"mask{l - 1}"])
            dcur = dx_l
        return self._results(dx, dxtop, dh0, dc0, tape.unbatched, bf, to_host)

    def _direction_dy(self, v, dcur, d, rev_index):
        """Full tape: direction d's part of dcur (T, B, D*O) as a contiguous
        (T, B, O) array in its own time order (dcur itself when D = 1 and
        it is kernel-ready)."""
        be = self.be
        T, B = dcur.shape[:2]
        O = self.model.output_size
        dyd = v["dyd"]
        if self.model.num_directions == 1 and not self.model.reverse:
            return be.ready(dcur, dyd)
        if self.model.num_directions == 1:  # a reverse layer: dy in its own time order
            be.gather_rows(dyd.reshape(T * B, O), be.ready(dcur, v["dytmp"]).reshape(T * B, O),
                           rev_index)
        elif d:
            be.take_cols(v["dytmp"], dcur, O)
            be.gather_rows(dyd.reshape(T * B, O), v["dytmp"].reshape(T * B, O), rev_index)
        else:
            be.take_cols(dyd, dcur, 0)
        return dyd

    def _segment_dy(self, v, dcur, d, t0, n, rev_index):
        """Checkpointed: direction d's dy over steps [t0, t0+n) of its own time
        order, (n, B, O) contiguous; dcur (T, B, D*O) is contiguous."""
        if self.model.num_directions == 1 and not self.model.reverse:
            return dcur[t0:t0 + n]
        be = self.be
        T, B = dcur.shape[:2]
        O = self.model.output_size
        dys = v["dyd"][:n]
        if self.model.num_directions == 1:  # a reverse layer: rows in its own time order
            be.gather_rows(dys.reshape(n * B, O), dcur.reshape(T * B, O),
                           rev_index[t0 * B:(t0 + n) * B])
        elif d:  # whole rows first: gathering from a strided view would copy all of it
            rows = first(v["dytmp"], n * B * 2 * O).reshape(n * B, 2 * O)
            be.gather_rows(rows, dcur.reshape(T * B, 2 * O), rev_index[t0 * B:(t0 + n) * B])
            be.take_cols(dys, rows.reshape(n, B, 2 * O), O)
        else:
            be.take_cols(dys, dcur[t0:t0 + n], 0)
        return dys

    def _layer_backward(self, v, tape, l, d, dyd, dx_l):
        """BPTT through layer l, direction d over the full tape; writes (d = 0) or
        adds (d = 1) its dx into dx_l."""
        be, params = self.be, self.params
        T, B = tape.T, tape.B
        N = T * B
        tag = f"{l}{d}"
        gates, hs, rs = v[f"gates{tag}"], v[f"hs{tag}"], v[f"rs{tag}"]
        be.seq_backward((v["dh"], v["dc"], gates, v["dhs"], v["scratch_o"], v["scratch_h"],
                         dyd, hs, v[f"cs{tag}"], rs, tape.lengths)
                        + params.weight("hh", l, d).kernel_args_t()
                        + params.proj_args(l, d, transposed=True), params.cell_args(l, d))
        width = dx_l.shape[2]
        x2d = (v["x0"] if l == 0 else v[f"x{l}"]).reshape(N, width)
        if self.reversed(d):  # the reverse direction ran on its input reversed per sequence
            xr = first(v["xrev"], N * width).reshape(N, width)
            be.gather_rows(xr, x2d, tape.rev_index)
            x2d = xr
        self._accumulate(v, l, d, gates.reshape(N, gates.shape[2]), x2d,
                         hs[:T].reshape(N, hs.shape[2]), v["dhs"], rs, dx_l, 0,
                         tape.rev_index)

    def _layer_backward_segments(self, v, tape, l, d, dcur, dx_l):
        """Checkpointed BPTT through layer l, direction d: segments last to first,
        each recomputed from its saved state, dh and dc carried between them."""
        be, params = self.be, self.params
        T, B, k = tape.T, tape.B, tape.segment
        hs, cs, gates, rs = v["hs"], v["cs"], v["gates"], v["rs"]
        hb, cb = v[f"hb{l}{d}"], v[f"cb{l}{d}"]
        layer_in = v["x0"] if l == 0 else v[f"x{l}"]
        wt = (params.weight("hh", l, d).kernel_args_t()
              + params.proj_args(l, d, transposed=True))
        cell = params.cell_args(l, d)
        for s in range(hb.shape[0] - 1, -1, -1):
            t0 = s * k
            n = min(k, T - t0)
            be.copy(hs[0], hb[s])
            be.copy(cs[0], cb[s])
            xs = self._segment_forward(v, l, d, layer_in, t0, n, tape.seglens[s],
                                       tape.rev_index)
            dys = self._segment_dy(v, dcur, d, t0, n, tape.rev_index)
            be.seq_backward((v["dh"], v["dc"], gates[:n], v["dhs"][:n], v["scratch_o"],
                             v["scratch_h"], dys, hs[:n + 1], cs[:n + 1], rs[:n],
                             tape.seglens[s]) + wt, cell)
            self._accumulate(v, l, d, gates[:n].reshape(n * B, gates.shape[2]), xs,
                             hs[:n].reshape(n * B, hs.shape[2]), v["dhs"][:n], rs[:n], dx_l,
                             t0, tape.rev_index)

    def _accumulate(self, v, l, d, dz, x2d, h2d, dhs, rs, dx_l, t0, rev_index):
        """Gradients of the rows dz (n*B, G) of steps [t0, t0+n) of layer l,
        direction d: add into the weight and bias gradients, and write (d = 0)
        or add (d = 1, rows in reversed order) the dx of those steps into dx_l."""
        be, params = self.be, self.params
        rows = dz.shape[0]
        sfx = "_reverse" if d else ""
        g = params.grads
        w_ih = params.weight("ih", l, d)
        self._weight_grad(g[f"weight_ih_l{l}{sfx}"], dz, x2d, w_ih, v)
        # A sparse W_ih left dz^T in the workspace: W_hh's SDDMM reuses it.
        self._weight_grad(g[f"weight_hh_l{l}{sfx}"], dz, h2d, params.weight("hh", l, d), v,
                          dz_ready=w_ih.format != "dense")
        if self.model.proj_size:
            self._weight_grad(g[f"weight_hr_l{l}{sfx}"], dhs.reshape(rows, dhs.shape[2]),
                              rs.reshape(rows, rs.shape[2]), params.weight("hr", l, d), v)
        if self.model.bias:
            be.bias_grad_acc(g[f"bias_ih_l{l}{sfx}"], g[f"bias_hh_l{l}{sfx}"], dz, v)
        T, B, width = dx_l.shape
        dx2d = dx_l.reshape(T * B, width)
        r0 = t0 * B
        if not self.reversed(d):  # the forward direction comes first: its dx goes straight in
            be.matmul_batch(dx2d[r0:r0 + rows], dz, w_ih, transposed=True)
            return
        dxd = first(v["dxd"], rows * width).reshape(rows, width)
        be.matmul_batch(dxd, dz, w_ih, transposed=True)
        dxg = first(v["dxg"], rows * width).reshape(rows, width)
        be.add_rows_at(dx2d, dxd, rev_index[r0:r0 + rows], dxg)

    def _weight_grad(self, grad, dz, a, weight, v, dz_ready=False):
        """grad += dz^T a on the weight's storage: dense, or its sparse pattern
        (SDDMM of dz^T and a^T, transposed into the workspace; with ``dz_ready``
        its dz_t view already holds this dz^T)."""
        be = self.be
        if weight.format == "dense":
            be.dense_grad_acc(grad, dz, a, v)
            return
        R, C = weight.shape
        N = dz.shape[0]
        dz_t = first(v["dz_t"], R * N).reshape(R, N)
        a_t = first(v["a_t"], C * N).reshape(C, N)
        be.transpose_pair(dz_t, dz, a_t, a, dz_ready)
        be.sddmm_acc(grad, dz_t, a_t, weight)

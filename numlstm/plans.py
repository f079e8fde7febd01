"""Buffer plans: which workspace buffers a call needs, and what they cost.

``buffer_plan`` is the one place that says which buffers a forward (and in
training its backward) uses and their shapes (docs/design.md, Workspace).
The engine carves it; ``memory_report`` and ``memory_budget=`` price it with
``workspace.plan_nbytes``, so their predictions are the workspace to the
byte, on either backend.

Glossary: T steps, B batch, I input features, H hidden, P projection, O = P
or H, G = 4H, L layers, D directions, S the checkpoint segment length.
"""

from numlstm import checks
from numlstm.workspace import plan_layout, plan_nbytes


def buffer_plan(model, T, B, training, segment=None, *, sparse=False, staged=False,
                batch_first=False, x_copy=False):
    """``(spec, kept)``: the buffers of a call and the names of the tape among them.

    Parameters
    ----------
    model : numlstm.LSTM
        Its configuration (sizes, dropout) decides the shapes.
    T, B : int
        Steps and batch of the call.
    training : bool
        Whether backward follows: the tape and backward's buffers are planned.
    segment : int or None
        Training only: the checkpoint segment length S <= T. The tape then
        keeps, per layer and direction, only the state at each segment's first
        step, and the recurrence buffers hold one segment.
    sparse : bool
        Whether some weight is sparse: the SDDMM's transposed operands.
    staged : bool
        The backend stages the call's boundary arrays in the workspace (the
        GPU: initial state, time-major copies of a batch_first y and dx, dy,
        the state gradients), and needs no dense weight-gradient scratch.
    batch_first : bool
        The call's input is batch_first (staged backends transpose it here).
    x_copy : bool
        Inference on a staged backend copies x into the workspace.

    Returns
    -------
    spec : list of (name, shape)
        For ``Workspace.carve``.
    kept : set of str
        What a training forward leaves for backward (the recorded activations).
    """
    L, D, H, O, P = (model.num_layers, model.num_directions, model.hidden_size,
                     model.output_size, model.proj_size)
    G, I, DL = 4 * H, model.input_size, D * model.num_layers
    kmax = max(I, D * O)
    ckpt = training and segment is not None
    S = segment if ckpt else T  # steps the recurrence buffers hold
    backwards = D == 2 or model.reverse  # a direction runs backwards in time
    R = S if backwards else 0  # rows of the buffers only a reversed direction needs
    bf = T if staged and batch_first else 0  # rows of the batch_first staging buffers
    spec = [("xrev", (R, B, kmax)),  # a layer's input, reversed per sequence
            ("odir", (R, B, O)),  # reverse direction's output, before un-reversal
            ("scratch", (B, G))]
    if staged:
        spec += [("h0", (DL, B, O)), ("c0", (DL, B, H)),  # zero or copied-in state
                 ("ytm", (bf, B, D * O))]  # y, time-major, before batch_first
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
        if staged:
            spec.append(("xin", (T if x_copy else 0, B, I)))
        spec += [(f"x{l}", (T, B, D * O)) for l in range(1, min(L, 3))]
        return spec, set()
    kept.append(("x0", (T, B, I)))  # every layer's input
    kept += [(f"x{l}", (T, B, D * O)) for l in range(1, L)]
    if model.dropout:
        kept += [(f"mask{l}", (T, B, D * O)) for l in range(L - 1)]
    amax = max(kmax, H)
    # dy of one direction in its own time order. With D = 1 the kernel reads
    # dy itself: staged, or on the host unless batch_first left it strided.
    dyd = R if ckpt or staged else (T if backwards or model.batch_first else 0)
    spec += [("dyd", (dyd, B, O)),
             ("dytmp", (R, B, D * O if ckpt else O)),
             ("dhs", (S if P else 0, B, O)),  # gradient reaching each h_t
             ("dh", (B, O)), ("dc", (B, H)),  # carried state gradients
             ("scratch_o", (B, O)), ("scratch_h", (B, H)),
             # dx of layers 1, 3, ... and 2, 4, ...; layer 0's is the returned dx
             ("dxa", (T if L > 1 else 0, B, D * O)),
             ("dxb", (T if L > 2 else 0, B, D * O)),
             ("dxd", (R, B, kmax)), ("dxg", (R, B, kmax))]  # the reverse direction's dx
    if staged:
        spec += [("dytm", (T, B, D * O)),  # dy, time-major and contiguous
                 ("dhn", (DL, B, O)), ("dcn", (DL, B, H)),  # the state's gradient
                 ("dxtm", (bf, B, I))]  # dx, time-major, before batch_first
    else:
        spec.append(("gflat", (G * amax,)))  # dense weight-gradient scratch (numba's BLAS)
    if sparse:
        # dz^T (G, S*B) and a^T (K, S*B): the SDDMM reads contiguous rows
        spec += [("dz_t", (G * S * B,)), ("a_t", (amax * S * B,))]
    return spec + kept, {name for name, _ in kept}


def budget_segment(nbytes, T, B, budget):
    """The fastest plan whose workspace fits ``budget`` bytes: None for the full
    tape, else the checkpoint segment length; ``nbytes(segment)`` prices a
    training plan. ValueError when even the smallest plan does not fit."""
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


def resolve_segment(nbytes, T, B, training, checkpoint, memory_budget):
    """The checkpoint segment length a call runs with (None: the full tape),
    from ``checkpoint`` or ``memory_budget`` (see ``LSTM.forward``)."""
    if memory_budget is None:
        return checks.check_checkpoint(checkpoint, T, training)
    budget = checks.check_memory_budget(memory_budget, checkpoint, training)
    return budget_segment(nbytes, T, B, budget)


def memory_plan(model, spec, kept, T, B, *, training, segment, staged, transposed):
    """Predicted bytes of a call on (T, B) input that carves ``spec``.

    Returns a dict:

    - ``activations``: the tape, kept from forward to backward (0 for inference);
    - ``workspace``: every other workspace buffer (scratch, dx, recompute, and
      on a staged backend the staged boundary arrays);
      ``activations + workspace`` is exactly the block an empty workspace
      allocates for the call (alignment included);
    - ``transposed``: training only, the transposed patterns (values,
      indices, indptr, perm) that sparse weights build for W^T products
      (``transposed`` bytes, given);
    - ``outputs``: the arrays the call returns (y, h_n, c_n; in training
      also backward's dx, dh0, dc0, and on the host batch_first's transposed
      copies) plus its small per-call arrays (lengths, reverse index,
      segment lengths: on a staged backend the block that holds them);
    - ``segment``: the checkpoint segment length used, or None.
    """
    dtype = model.dtype
    entries, _ = plan_layout(spec, dtype)
    item = dtype.itemsize
    activations = sum(padded for name, _, _, _, padded in entries if name in kept) * item
    L, D, O, H = model.num_layers, model.num_directions, model.output_size, model.hidden_size
    states = D * L * B * (O + H) * item
    ys = T * B * D * O * item
    dxs = T * B * model.input_size * item
    workspace = plan_nbytes(spec, dtype) - activations
    outputs = ys + states + ((dxs + states) if training else 0)  # y, (h_n, c_n); dx, ...
    nseg = -(-T // segment) if segment else 0
    backwards = D == 2 or model.reverse
    if staged:  # the per-call index arrays, in the backend's own small block
        index = [("lengths", (B,)), ("rev", (T * B if backwards else 0,)),
                 ("seglens", (nseg, B))]
        outputs += plan_nbytes(index, "int64")
    else:
        outputs += T * B * 8 if backwards else 0  # reverse index
        strided = model.batch_first and T > 1 and B > 1  # batch_first copies
        if not training:
            outputs += ys if strided else 0  # y and its transposed copy, both at once
        else:
            outputs += B * 8 + nseg * B * 8
            if strided:  # dx's transposed copy, or before it, checkpoint's contiguous dy
                outputs += max(dxs, ys) if segment else dxs
    return {"activations": activations, "workspace": workspace,
            "transposed": transposed if training else 0, "outputs": outputs,
            "segment": segment}

"""One kernel call per stream-pool step: check the ids, gather, step every layer, scatter.

A ``numlstm.pool.StreamPool`` keeps the state of ``capacity`` sessions in
``(L, capacity, ...)`` arrays and advances any n of them at once. Everything a
step touches is bound once into a ``PoolPlan`` (a ``StepPlanType`` StructRef,
as a stream's plan in ``numlstm.kernels.plan``, with more fields), so that a
step passes only the plan and n across the Python/numba boundary: no array is
unboxed, so no NRT allocation.

``pool_step(plan, n)`` reads the session ids from ``plan.sids[:n]`` and the
inputs from ``plan.x[:n]``; it first checks every id (in range, open, named
once) and returns an error code without touching any state if one is not;
then, in chunks of at most R rows (R = the work buffers' rows), it gathers
the chunk's states into the work rows, runs ``lstm_step`` for every layer on
them (a batched product: BLAS or the sparse panels from 4 rows up, with the
arguments a stream of that batch binds, so a chunk of m rows computes
exactly what ``Stream(B=m)`` does on those states), and
scatters the new states back and the top layer's outputs into ``plan.out``
in the order of the ids. Rows are independent, so chunking changes nothing
but the sizes of the products.

Shapes (glossary of docs/design.md): hs (L, S, O), cs (L, S, H) the pool's
states for S = capacity slots; wh (L, R, O), wc (L, R, H) the work rows;
x (S, I) inputs, xw (R, I) a chunk's inputs; out (S, O) outputs; sids (S,)
int64; live (S,) uint8, 1 for an open slot; mark (S,) int64 and tick (1,)
int64, the duplicate check (a slot seen in this call carries this call's
tick, so nothing needs clearing between calls). Each layer tuple is
``(gates_flat (3*R*G,), r (R, H) or (0, H), w_ih..., b_ih, b_hh, w_hh...,
w_hr...[, more])``: ``lstm_step``'s arguments less h, c and x (anything after
the weights is passed on as bound), which are views of the
work rows made per chunk (slicing the first axis of a C array keeps it C
contiguous, and a flat buffer's prefix reshapes to (3, m, G) without a copy:
neither allocates).
"""

from numba import literal_unroll, njit, typeof
from numba.experimental import structref
from numba.extending import overload

from numlstm.kernels.cpu import _OPTS, lstm_step
from numlstm.kernels.plan import StepPlanType

# Error codes returned by pool_step: kind + 4 * index of the offending id.
OK, OUT_OF_RANGE, CLOSED, DUPLICATE = 0, 1, 2, 3


def _new_pool_plan(hs, cs, wh, wc, x, xw, out, sids, live, mark, tick, small_below,
                   small, large):
    """A PoolPlan holding these arrays (jit code only)."""


@overload(_new_pool_plan, jit_options=_OPTS)
def _new_pool_plan_overload(hs, cs, wh, wc, x, xw, out, sids, live, mark, tick, small_below,
                            small, large):
    plan_type = StepPlanType([
        ("hs", hs), ("cs", cs), ("wh", wh), ("wc", wc), ("x", x), ("xw", xw), ("out", out),
        ("sids", sids), ("live", live), ("mark", mark), ("tick", tick),
        ("small_below", small_below), ("small", small), ("large", large)])

    def impl(hs, cs, wh, wc, x, xw, out, sids, live, mark, tick, small_below, small, large):
        plan = structref.new(plan_type)
        plan.hs = hs
        plan.cs = cs
        plan.wh = wh
        plan.wc = wc
        plan.x = x
        plan.xw = xw
        plan.out = out
        plan.sids = sids
        plan.live = live
        plan.mark = mark
        plan.tick = tick
        plan.small_below = small_below
        plan.small = small
        plan.large = large
        return plan
    return impl


@njit(**_OPTS)
def make_pool_plan(hs, cs, wh, wc, x, xw, out, sids, live, mark, tick, small_below,
                   small, large):
    """Bind a pool's arrays and its two sets of layer tuples into one plan
    (see the module docstring); the arrays are shared, not copied.

    ``small`` binds the weights' per-step execution layouts, used for a chunk
    of fewer than ``small_below`` rows (``config.STEP_MAX_B``), ``large``
    their stored arrays, used from there on: the choice ``LSTM.step_args``
    makes for a stream of that batch, so a chunk of m rows computes exactly
    what ``Stream(B=m)`` computes.
    """
    return _new_pool_plan(hs, cs, wh, wc, x, xw, out, sids, live, mark, tick, small_below,
                          small, large)


@njit(**_OPTS)
def _check_ids(sids, live, mark, tick, n):
    """0 when ``sids[:n]`` are n distinct open slots, else kind + 4 * index
    of the first bad one (kinds: OUT_OF_RANGE, CLOSED, DUPLICATE)."""
    tick[0] += 1
    t = tick[0]
    S = live.shape[0]
    for k in range(n):
        s = sids[k]
        if s < 0 or s >= S:
            return OUT_OF_RANGE + 4 * k
        if live[s] == 0:
            return CLOSED + 4 * k
        if mark[s] == t:
            return DUPLICATE + 4 * k
        mark[s] = t
    return OK


@njit(**_OPTS)
def _run_layers(layers, wh, wc, xw, m):
    """``lstm_step`` of every layer, bottom first, on the first m work rows.

    One ``literal_unroll`` loop per function: the two argument sets (small,
    large) get a function each."""
    G = 4 * wc.shape[2]
    l = 0
    for layer in literal_unroll(layers):
        gates = layer[0][:3 * m * G].reshape((3, m, G))
        layer_in = xw[:m] if l == 0 else wh[l - 1, :m]
        # The rest of the tuple as bound (weights, biases, and whatever else
        # lstm_step takes after them), so that it follows lstm_step's signature.
        lstm_step(wh[l, :m], wc[l, :m], gates, layer[1][:m], layer_in, *layer[2:])
        l += 1


@njit(**_OPTS)
def pool_step(plan, n):
    """Advance the n sessions ``plan.sids[:n]`` by one step on ``plan.x[:n]``.

    Returns 0 and leaves their top-layer outputs in ``plan.out[:n]`` (in the
    order of the ids), or returns an error code (kind + 4 * index) and
    changes no state.
    """
    sids, hs, cs, wh, wc, xw = plan.sids, plan.hs, plan.cs, plan.wh, plan.wc, plan.xw
    code = _check_ids(sids, plan.live, plan.mark, plan.tick, n)
    if code != OK:
        return code
    L, R = wh.shape[0], wh.shape[1]
    x, out = plan.x, plan.out
    for start in range(0, n, R):
        m = min(R, n - start)
        for k in range(m):  # gather
            s = sids[start + k]
            for l in range(L):
                wh[l, k, :] = hs[l, s, :]
                wc[l, k, :] = cs[l, s, :]
            xw[k, :] = x[start + k, :]
        if m < plan.small_below:
            _run_layers(plan.small, wh, wc, xw, m)
        else:
            _run_layers(plan.large, wh, wc, xw, m)
        for k in range(m):  # scatter
            s = sids[start + k]
            for l in range(L):
                hs[l, s, :] = wh[l, k, :]
                cs[l, s, :] = wc[l, k, :]
            out[start + k, :] = wh[L - 1, k, :]
    return OK


def compiled_pool_step(plan):
    """``pool_step`` compiled for this plan's type, as a callable ``(plan, n)``
    that skips the dispatcher (which would type the StructRef in Python on
    every call; see ``numlstm.kernels.plan.compiled_step``)."""
    from numba import types

    key = (typeof(plan), types.int64)
    if key not in pool_step.overloads:
        pool_step.compile(key)
    return pool_step.overloads[key].entry_point

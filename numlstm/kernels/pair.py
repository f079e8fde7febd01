"""A batch-1 stream step (or sequence step) on two cores: each thread owns half
the hidden units.

Thread 0 (the caller's) and thread 1 (a worker, ``numlstm.pair``) each
compute the gate rows of their half of the hidden units, i, f, g and o of
units j < H/2 or j >= H/2, and that half's cell update, so a layer's step
needs one handoff: the caller publishes the layer, both compute, the caller
waits for the worker's half. Both products read h_{t-1} from a copy
(``hprev``) the caller takes before it publishes, so neither thread's cell
update can overwrite what the other is still reading.

Load-robust by construction (docs/design.md, Two cores at batch 1): the
worker's half is claimed with a compare-and-swap, by the worker when it sees
the layer published, or by the caller itself when it has finished its own
half and the worker has not claimed it (asleep, descheduled on a loaded
machine, or gone). A step therefore never waits for a worker that has not
started; it waits only for a half the worker is computing. And the caller
measures both ways now and then and steps alone while that is faster
(``PROBE``, ``RUN``): on a loaded machine, where the worker shares a core.

A whole-sequence forward at B = 1 (``pair_seq_forward``) makes each time
step such a job: hs[t] is read-only during step t, so it needs no copy.

Rows of each half: for the execution layouts (SELL kinds) the slices of
that half (the layout orders rows by half: ``numlstm.layouts.halved``); for
dense, CSR and BSR arrays the four row ranges g*H + [u0, u1).
"""

import numpy as np
from numba import literal_unroll, njit, typeof
from numba import types as nbtypes
from numba.experimental import structref
from numba.extending import overload

from numlstm.kernels import atomics
from numlstm.kernels import vector_ir as vir
from numlstm.kernels.cpu import (
    _OPTS,
    _cell_units,
    _dense_rows,
    _half_to_float,
    _seq_step_rows,
    _sparse_row,
)
from numlstm.kernels.plan import StepPlanType

# Words of the shared sync array (int64), one cache line apart: the caller
# writes GO and LAYER, both CLAIM, the worker DONE; STATE is the worker's
# (RUNNING while it serves, ASLEEP once it has left), STOP the owner's.
# The last line is the caller's alone: its choice between two threads and
# one (PHASE, LEFT, the cycles its probes of each took, SUM, and when its
# last step began, LAST).
GO, LAYER, CLAIM, DONE, STATE, STOP, PHASE, LEFT, SUM, LAST = 0, 8, 16, 24, 32, 40, 48, 49, 50, 52
SYNC_WORDS = 56
ASLEEP, RUNNING = 0, 1
# Whether two threads pay is measured, not assumed: for PROBE steps the
# caller alternates blocks of BLOCK steps on two threads and alone (the first
# step of each block not counted: the switch), so that both ways see the
# same load; then it runs the faster way for RUN steps (two only when at
# least 5% faster), and probes again. On a loaded machine the worker shares
# a core with other work and two threads can lose; then the caller steps
# alone (the worker, given nothing, leaves) until a probe says otherwise.
# Phases: 0 probing, 2 running on two threads, 3 running alone.
PROBE, BLOCK, RUN = 256, 16, 8192


def _part_product(on, xn, w0, data, indices, indptr, part):
    """The rows of hidden-unit half ``part`` of on (G,) = W xn (K,)."""


@overload(_part_product, jit_options=_OPTS)
def _part_product_overload(on, xn, w0, data, indices, indptr, part):
    if data.ndim == 2:  # a SELL layout, rows ordered by half: each half its slices
        windowed = indices.dtype == nbtypes.uint8
        scaled = data.dtype == nbtypes.int8 and not windowed  # w0: row scales (R, 1)

        def sell(on, xn, w0, data, indices, indptr, part):
            S = indptr.shape[0]
            s0, s1 = part * (S // 2), S // 2 + part * (S - S // 2)
            if windowed:  # w0: the int8 kind's lane scales (nslices, C), or (0, 0)
                vir.sell_windows(on, xn, data, indices, indptr[s0:s1],
                                 w0[s0:s1] if w0.shape[0] > 0 else w0)
                return
            vir.sell_rows(on, xn, data, indices, indptr[s0:s1])
            if scaled:
                Q = on.shape[0] // 4
                for g in range(4):
                    for r in range(g * Q + part * (Q // 2), g * Q + (part + 1) * (Q // 2)):
                        on[r] *= _half_to_float(w0[r, 0])
        return sell

    dense = w0.mutable and data.ndim == 1 and isinstance(data.dtype, nbtypes.Float)

    def ranges(on, xn, w0, data, indices, indptr, part):
        R, K = on.shape[0], xn.shape[0]
        Q = R // 4
        for g in range(4):
            r0 = g * Q + part * (Q // 2)
            r1 = r0 + Q // 2
            if dense:
                _dense_rows(on.reshape((1, R))[:, r0:r1], xn.reshape((1, K)), w0[r0:r1])
            elif data.ndim == 3:  # BSR: block rows of br rows
                br = data.shape[1]
                _sparse_row(on[r0:r1], xn, w0, data, indices, indptr[r0 // br:r1 // br + 1])
            else:  # CSR arrays (int8: w0 the row scales (R, 1))
                _sparse_row(on[r0:r1], xn, w0[r0:r1] if w0.shape[0] == R else w0, data,
                            indices, indptr[r0:r1 + 1])
    return ranges


@njit(**_OPTS)
def _part_step(part, hprev, h, c, gates, r, x,
               wih, wih_data, wih_indices, wih_indptr, bias_ih, bias_hh,
               whh, whh_data, whh_indices, whh_indptr,
               whr, whr_data, whr_indices, whr_indptr, cell):
    """Half ``part`` of one layer's ``lstm_step`` at B = 1 without projection:
    its gate rows from x and hprev (h_{t-1}, a copy), then its cell update,
    writing h and c of its units only."""
    act, rec, c_new = gates[0, 0], gates[1, 0], gates[2, 0]
    H = c.shape[1]
    u0, u1 = part * (H // 2), H // 2 + part * (H - H // 2)
    _part_product(act, x[0], wih, wih_data, wih_indices, wih_indptr, part)
    _part_product(rec, hprev, whh, whh_data, whh_indices, whh_indptr, part)
    _cell_units(cell, c_new, act, h[0], c[0], rec, bias_ih, bias_hh, u0, u1)
    for j in range(u0, u1):
        c[0, j] = c_new[j]


@njit(**_OPTS)
def _layer_part(layers, l, part, hprev):
    """``_part_step`` of layer l of ``layers``."""
    k = 0
    for layer in literal_unroll(layers):
        if k == l:
            _part_step(part, hprev, *layer)
        k += 1


# A plan's arrays are taken out of it once per kernel call, as its "job":
# every read of a StructRef field takes a reference to each array in it
# (an atomic add on the array's reference count, and another to drop it);
# read per half by both threads, those counts' cache lines would cross
# between the cores twice per array per step. (Not timed apart from the
# other changes of that commit.)

def _job(plan):
    """A plan's arrays as ``_half`` takes them: (layers, hprev) of a stream
    plan (``make_pair_plan``), (seq,) of a sequence plan (``make_seq_plan``)."""


@overload(_job, jit_options=_OPTS)
def _job_overload(plan):
    if "layers" in plan.field_dict:
        return lambda plan: (plan.layers, plan.hprev)
    return lambda plan: (plan.seq,)


def _half(job, word, part):
    """Half ``part`` of job ``word``: layer ``word``'s step of a stream, time
    step ``word`` of a sequence (``job`` from ``_job``)."""


@overload(_half, jit_options=_OPTS)
def _half_overload(job, word, part):
    if len(job) == 2:
        return lambda job, word, part: _layer_part(job[0], word, part, job[1])
    return lambda job, word, part: _seq_part(part, word, *job[0])


def _whole(job, word):
    """Job ``word`` on this thread alone: a stream layer's two halves; a
    sequence's time step as one thread runs it (no cost for the split)."""


@overload(_whole, jit_options=_OPTS)
def _whole_overload(job, word):
    if len(job) == 2:
        def both(job, word):
            _half(job, word, 0)
            _half(job, word, 1)
        return both
    return lambda job, word: _seq_step_rows(word, 0, 1, *job[0])


@njit(**_OPTS)
def _together(sync, job, word, solo):
    """Job ``word``: published, half 0 here, then half 1 here too if the
    worker has not claimed it, or the wait for the worker's; all of it here
    when ``solo``."""
    if solo:
        _whole(job, word)
        return
    g = atomics.load(sync, GO) + 1
    atomics.store(sync, LAYER, word)
    atomics.store(sync, GO, g)  # published: the worker may claim half 1 now
    _half(job, word, 0)
    if atomics.cas(sync, CLAIM, g - 1, g):
        _half(job, word, 1)
        return
    while atomics.load(sync, DONE) != g:
        atomics.pause()


@njit(**_OPTS)
def pair_step(plan):
    """One stream step of every layer, the worker's half claimed by whoever
    comes first (see the module docstring). Returns 1 when the worker has
    left (the owner restarts it: ``numlstm.pair.Pair.wake``), else 0.

    plan: a ``make_pair_plan`` StepPlan, whose ``sync`` (SYNC_WORDS,) int64
    holds the shared words and ``hprev`` (O,) h_{t-1} of the layer in flight.
    """
    sync, job = plan.sync, _job(plan)
    phase = sync[PHASE]
    solo = _alone(phase, sync[LEFT]) == 1
    t0 = atomics.cycles()
    l = 0
    for layer in literal_unroll(job[0]):  # (no loop in this body: numba unrolls it)
        _pair_layer(sync, job, l, layer[0], solo)
        l += 1
    # A step's cost: the time since the previous step began (its kernel and
    # the caller's own work between: a worker spinning on a loaded machine
    # slows both), or this kernel's time alone after a pause between steps.
    kernel = atomics.cycles() - t0
    since = t0 - sync[LAST]
    sync[LAST] = t0
    return _account(sync, phase, since if 0 < since < 8 * kernel else kernel)


@njit(**_OPTS)
def _alone(phase, left):
    """1 when the step with ``left`` steps to go in ``phase`` runs alone."""
    if phase == 0:
        return ((PROBE - left) // BLOCK) % 2
    return 1 if phase == 3 else 0


@njit(**_OPTS)
def _account(sync, phase, cycles):
    """Count a step of ``cycles`` in ``phase`` and move to the next phase
    when this one is over; returns ``pair_step``'s result."""
    left = sync[LEFT]
    if phase == 0 and (PROBE - left) % BLOCK != 0:
        sync[SUM + _alone(phase, left)] += cycles
    left -= 1
    if left <= 0:
        if phase == 0:
            phase, left = (2 if 20 * sync[SUM] < 19 * sync[SUM + 1] else 3), RUN
        else:
            phase, left = 0, PROBE
            sync[SUM] = sync[SUM + 1] = 0
        sync[PHASE] = phase
    sync[LEFT] = left
    return 1 if _alone(phase, left) == 0 and atomics.load(sync, STATE) == ASLEEP else 0


@njit(**_OPTS)
def _pair_layer(sync, job, l, h, solo):
    """Layer l's step: copy h_{t-1} (h (1, O)) to hprev, then both halves."""
    hprev = job[1]
    for j in range(h.shape[1]):
        hprev[j] = h[0, j]
    _together(sync, job, l, solo)


@njit(**_OPTS)
def serve(plan, spins, yields, wanted, patience):
    """The worker's loop: claim and run half 1 of each published job (a
    stream's layer, a sequence's time step).

    Waits by spinning ``spins`` rounds of ``pause``, then ``yields`` calls
    of ``sched_yield`` (on a loaded core, other threads run then), then
    leaves: sets STATE to ASLEEP and returns, so an idle stream holds no
    spinning thread. Also leaves when STOP is set, and after ``patience``
    idle rounds when ``wanted[0]`` is set (another stream waits for a worker
    slot: its owner has stopped stepping, while a stream stepping without
    pause keeps its worker, since its gaps are shorter than that).
    """
    sync, job = plan.sync, _job(plan)
    # The last phase claimed, not published: a layer published before this
    # thread got going may still be unclaimed (the caller is on its half 0).
    last = atomics.load(sync, CLAIM)
    idle = 0
    while atomics.load(sync, STOP) == 0:
        g = atomics.load(sync, GO)
        if g != last:
            last = g
            idle = 0
            if atomics.cas(sync, CLAIM, g - 1, g):
                _half(job, atomics.load(sync, LAYER), 1)
                atomics.store(sync, DONE, g)
            continue
        idle += 1
        if idle > patience and atomics.load(wanted, 0) != 0:
            break
        if idle <= spins:
            atomics.pause()
        elif idle <= spins + yields:
            atomics.yield_cpu()
        else:
            break
    atomics.store(sync, STATE, ASLEEP)
    return 0


@njit(**_OPTS)
def _seq_part(part, t, hs, cs, gates, rs, scratch, lengths, bias_ih, bias_hh,
              whh, whh_data, whh_indices, whh_indptr,
              whr, whr_data, whr_indices, whr_indptr, cell):
    """Half ``part`` of step t of ``cpu.lstm_seq_forward`` at B = 1 without
    projection (its arguments): the gate rows of that half's units from
    hs[t] (read only during step t, so neither half can overwrite what the
    other reads), then their cell update into cs[t+1], hs[t+1] and gates[t];
    at a padding step (t >= lengths[0]) the half's state carried."""
    H = cs.shape[2]
    u0, u1 = part * (H // 2), H // 2 + part * (H - H // 2)
    act = gates[t, 0]
    if t < lengths[0]:
        _part_product(scratch[0], hs[t, 0], whh, whh_data, whh_indices, whh_indptr, part)
        _cell_units(cell, cs[t + 1, 0], act, hs[t + 1, 0], cs[t, 0], scratch[0], bias_ih,
                    bias_hh, u0, u1)
        return
    for g in range(4):
        for j in range(g * H + u0, g * H + u1):
            act[j] = 0
    for j in range(u0, u1):
        cs[t + 1, 0, j] = cs[t, 0, j]
        hs[t + 1, 0, j] = hs[t, 0, j]


@njit(**_OPTS)
def pair_seq_forward(plan):
    """``cpu.lstm_seq_forward`` at B = 1 on two threads: each time step a job
    of two halves (as a stream step's layer), with the same probes of two
    threads against one. Sets STOP at the end: the worker leaves.

    plan: a ``make_seq_plan`` StepPlan (its ``seq``: the kernel's arguments
    and the cell; its ``sync``: fresh words, ``new_sync``).
    """
    sync, job = plan.sync, _job(plan)
    for t in range(job[0][2].shape[0]):
        phase = sync[PHASE]
        t0 = atomics.cycles()
        _together(sync, job, t, _alone(phase, sync[LEFT]) == 1)
        _account(sync, phase, atomics.cycles() - t0)
    atomics.store(sync, STOP, 1)
    return 0


def _new_seq_plan(seq, sync):
    """A StepPlan holding ``seq`` and ``sync`` (jit code only)."""


@overload(_new_seq_plan, jit_options=_OPTS)
def _new_seq_plan_overload(seq, sync):
    plan_type = StepPlanType([("seq", seq), ("sync", sync)])

    def impl(seq, sync):
        plan = structref.new(plan_type)
        plan.seq = seq
        plan.sync = sync
        return plan
    return impl


@njit(**_OPTS)
def make_seq_plan(seq, sync):
    """Bind ``seq`` (``cpu.lstm_seq_forward``'s arguments, the cell last) and
    fresh sync words into a StepPlan for ``pair_seq_forward``."""
    return _new_seq_plan(seq, sync)


def _new_pair_plan(layers, sync, hprev):
    """A StepPlan holding ``layers``, ``sync`` and ``hprev`` (jit code only)."""


@overload(_new_pair_plan, jit_options=_OPTS)
def _new_pair_plan_overload(layers, sync, hprev):
    plan_type = StepPlanType([("layers", layers), ("sync", sync), ("hprev", hprev)])

    def impl(layers, sync, hprev):
        plan = structref.new(plan_type)
        plan.layers = layers
        plan.sync = sync
        plan.hprev = hprev
        return plan
    return impl


@njit(**_OPTS)
def make_pair_plan(layers, sync, hprev):
    """Bind ``layers`` (``lstm_step`` argument tuples, bottom layer first),
    the sync words (a zeroed (SYNC_WORDS,) int64 array: nothing published,
    the worker asleep) and hprev (O,) into a StepPlan for ``pair_step``."""
    return _new_pair_plan(layers, sync, hprev)


def compiled_pair_step(plan):
    """``pair_step`` for this plan's type as its entry point (as
    ``numlstm.kernels.plan.compiled_step``)."""
    key = (typeof(plan),)
    if key not in pair_step.overloads:
        pair_step.compile(key)
    return pair_step.overloads[key].entry_point


def new_sync():
    """Fresh sync words: nothing published, the worker asleep, a probe of
    two threads to begin with."""
    sync = np.zeros(SYNC_WORDS, np.int64)
    sync[LEFT] = PROBE
    return sync

"""Two cores for a batch-1 stream whose step outgrows one: when, and the worker.

``Stream`` asks ``worth_two`` whether its steps run on two threads
(``numlstm.kernels.pair`` has the kernels and the protocol). A ``Pair``
owns the worker thread of one stream: started at the stream's first step,
it leaves by itself after about 10 ms without work (an idle stream holds no
spinning thread), or after ~50 us when another stream wants its slot, and
is started again by the next step. At most one worker per core beside the
first runs in the process at once (one on a 2-core machine): a stream that
finds none free runs its steps alone, as it does whenever its worker is
late. docs/design.md, Two cores at batch 1.
"""

import atexit
import logging
import os
import threading
import time
import weakref

import numpy as np
from numba import int64, typeof

from numlstm import config, layouts
from numlstm.kernels import compile_log
from numlstm.kernels import pair as kernels
from numlstm.weights import BSR, CSR, Dense

log = logging.getLogger("numlstm")

# The worker's wait before it leaves: spins of ``pause`` (~40 ns each on a
# current x86 core, so ~2 ms), then ``sched_yield`` calls (~8 ms on an idle
# core; at once given away on a loaded one).
SPINS = 50_000
YIELDS = 10_000
# Idle spins (~50 us) after which a worker leaves when another stream wants
# its slot (``_WANTED``): longer than the gap between two steps of a stream
# stepped in a loop, far shorter than the ~10 ms it would otherwise wait.
PATIENCE = 1_250


def _cores():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _threads():
    """Threads a step may use: ``config.STEP_THREADS`` ("auto": this
    process's cores, at most 2), an int >= 1."""
    want = config.STEP_THREADS
    if want == "auto":
        return min(_cores(), 2)
    try:
        n = int(want)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"config.STEP_THREADS (NUMLSTM_STEP_THREADS) must be 'auto' or an "
                         f"integer >= 1, got {want!r}")
    return n


_SLOTS = None  # BoundedSemaphore: free worker threads in this process
_SLOTS_LOCK = threading.Lock()
_WANTED = np.zeros(1, np.int64)  # [0] != 0: a stream found no free slot


def _slots():
    global _SLOTS
    with _SLOTS_LOCK:
        if _SLOTS is None:  # one worker per core beside the first
            _SLOTS = threading.BoundedSemaphore(max(_cores() - 1, 1))
        return _SLOTS


def _splits(weight, H):
    """Whether ``weight``'s per-step product splits into the two hidden-unit
    halves of a layer of H units (``kernels._part_product``)."""
    if isinstance(weight, CSR):
        layout = weight.step_layout()
        if isinstance(layout, layouts.SELL_KINDS):
            return layout.halves
        return True  # the CSR arrays or a dense copy: row ranges
    if isinstance(weight, BSR):
        return (H // 2) % weight.blocksize[0] == 0
    return isinstance(weight, Dense)


def step_cost(weight):
    """Estimated ns of the per-step product of ``weight`` with one row of x
    (``numlstm.layouts.cost``; a BSR weight at one SELL lane per stored value)."""
    if isinstance(weight, CSR):
        layout = weight.step_layout()
        return layouts.cost(weight, None if layout is weight else layout)
    if isinstance(weight, BSR):
        return weight.nnz * layouts.step_costs()["window_lane"]
    return layouts.dense_cost(weight.shape, weight.values.dtype.itemsize)


def worth_two(model, batch_size):
    """Whether ``model``'s stream steps at ``batch_size`` run on two threads:
    CPU, B = 1, no projection, two threads allowed (``config.STEP_THREADS``),
    H even in halves of whole cache lines (H % 32 == 0), every layer's
    per-step products split by half, and an estimated step of at least
    ``config.PAIR_MIN_NS`` (below it the handoffs cost about what half the
    work saves: measured in benchmarks/results/pair.md). Even then the
    stream's probes keep two threads only while they are faster
    (``numlstm.kernels.pair``)."""
    H = model.hidden_size
    if (batch_size != 1 or model.proj_size or model.engine.be.STAGED or H % 32
            or _threads() < 2):
        return False
    weights = model.host_params.weights
    names = [f"weight_{k}_l{l}" for l in range(model.num_layers) for k in ("ih", "hh")]
    if not all(_splits(weights[n], H) for n in names):
        return False
    return sum(step_cost(weights[n]) for n in names) >= config.PAIR_MIN_NS


def worth_two_seq(weight, H, P, T, B):
    """Whether a whole-sequence forward recurrence over W_hh ``weight`` (T
    steps, B rows, H units, projection P) runs on two threads, each time
    step split by hidden-unit halves (``kernels.pair_seq_forward``): CPU
    only (the caller's), B = 1 (larger batches split by rows instead:
    ``ops.batch_parts``), no projection, H % 32 == 0, a weight that splits
    by half, a step of at least ``config.PAIR_SEQ_MIN_NS`` and a sequence
    long enough to repay starting the worker (``PAIR_SEQ_MIN_TOTAL_NS``).
    Even then the probes keep two threads only while they are faster."""
    if B != 1 or P or H % 32 or _threads() < 2 or not _splits(weight, H):
        return False
    cost = step_cost(weight)
    return cost >= config.PAIR_SEQ_MIN_NS and T * cost >= config.PAIR_SEQ_MIN_TOTAL_NS


# ----------------------------------------------------------------------------
# Compiling the two-thread kernels off the caller's path
# ----------------------------------------------------------------------------
# A two-thread kernel for a new type takes seconds to compile (the stream
# step of a dense H=256 model: ~11 s on a 2-core Zen 3), several times what
# the one-thread step takes. So unless it is compiled already (in this
# process, or ``config.PAIR_COMPILE == "now"``), a stream or sequence that
# would use two threads runs on one, and a background thread compiles the
# two-thread kernels for that type (loaded from the kernel cache when warm)
# once the process has compiled nothing for ``config.PAIR_COMPILE_DELAY``
# seconds: a short script never pays for them, and the first calls of others
# are not held up behind them. When they are ready, each waiting stream
# is told to rebind (``Stream._bind``), and takes two threads from its next
# step. At exit, a compile under way is waited for (an LLVM call still
# running on another thread while the process tears down is not safe); one
# not yet started is not started.

_AHEAD_LOCK = threading.Lock()
_AHEAD = {}  # type key -> [waiting callbacks] while pending; None once compiled
_EXITING = threading.Event()
_RUNNING = []  # compile threads past the delay, joined at exit


def _ahead(key, build, notify=None):
    """Whether the two-thread kernels of type ``key`` are compiled.

    True when they are; with ``config.PAIR_COMPILE == "now"`` they are
    compiled here first (``build()``). Otherwise False: with "off" (the
    one-thread pass of ``numlstm.compile``) nothing more; with "background"
    a background thread runs ``build()`` (once per key) after a pause of
    ``config.PAIR_COMPILE_DELAY`` seconds in compiling, then calls
    ``notify()`` (and every other waiter's).
    """
    if config.PAIR_COMPILE not in ("now", "background", "off"):
        raise ValueError("config.PAIR_COMPILE (NUMLSTM_PAIR_COMPILE) must be 'now' or "
                         f"'background', got {config.PAIR_COMPILE!r}")
    if config.PAIR_COMPILE == "off":
        return False
    with _AHEAD_LOCK:
        entry = _AHEAD.get(key, ())
        if entry is None:
            return True
        if config.PAIR_COMPILE == "now":
            pass  # compiled below, on this thread
        elif entry == ():
            _AHEAD[key] = [notify] if notify else []
            threading.Thread(target=_compile_ahead, args=(key, build),
                             name="numlstm-compile", daemon=True).start()
            return False
        else:
            if notify:
                entry.append(notify)
            return False
    build()
    _done(key)
    return True


def _compile_ahead(key, build):
    # Wait for a pause in the process's own compiling: the compiler holds one
    # lock, and a first forward or training step compiled meanwhile would
    # wait the seconds this takes.
    while (quiet := compile_log.quiet_for()) < config.PAIR_COMPILE_DELAY:
        if _EXITING.wait(config.PAIR_COMPILE_DELAY - quiet):
            return
    with _AHEAD_LOCK:
        if _EXITING.is_set():
            return
        _RUNNING.append(threading.current_thread())
    t0 = time.perf_counter()
    try:
        build()
    except Exception:  # the one-thread path keeps serving; say why once
        log.warning("compiling the two-thread kernels failed; streams and sequences of "
                    "this type stay on one thread", exc_info=True)
        return
    log.info("two-thread kernels ready after %.1f s (compiled in the background)",
             time.perf_counter() - t0)
    _done(key)


def _done(key):
    with _AHEAD_LOCK:
        waiting = _AHEAD.get(key) or []
        _AHEAD[key] = None
    for notify in waiting:
        notify()


@atexit.register
def _join_compiles():
    _EXITING.set()
    with _AHEAD_LOCK:
        running = list(_RUNNING)
    for t in running:
        t.join()


def _stream_key(layers):
    """The type of a stream's bound layers: its two-thread kernels' key."""
    return ("step", typeof(tuple(layers)))


def stream_ready(layers, hprev, stream):
    """Whether ``stream`` (its bound ``layers``) may step on two threads now:
    its kernels compiled (see ``_ahead``); if not, they are compiled in the
    background and the stream is told to rebind when they are ready."""
    ref = weakref.ref(stream)

    def build():
        plan = kernels.make_pair_plan(tuple(layers), kernels.new_sync(), hprev)
        kernels.compiled_pair_step(plan)
        _compile_serve(plan)

    def notify():
        s = ref()
        if s is not None:
            s._rebind_soon()
    return _ahead(_stream_key(layers), build, notify)


def forward_sequence(args, cell):
    """``cpu.lstm_seq_forward(*args, cell)`` at B = 1 on this thread and a
    worker (started here, stopped at the end); False (nothing done) when no
    worker slot is free or the two-thread kernels are not compiled yet (then
    they are compiled in the background: ``_ahead``), and the caller runs it
    alone."""
    seq = tuple(args) + (cell,)

    def build():
        plan = kernels.make_seq_plan(seq, kernels.new_sync())
        key = (typeof(plan),)
        if key not in kernels.pair_seq_forward.overloads:
            kernels.pair_seq_forward.compile(key)
        _compile_serve(plan)
    if not _ahead(("seq", typeof(seq)), build):
        return False
    slots = _take_slot()
    if slots is None:
        return False
    try:
        sync = kernels.new_sync()
        plan = kernels.make_seq_plan(seq, sync)
        _compile_serve(plan)
        sync[kernels.STATE] = kernels.RUNNING
        worker = threading.Thread(target=_serve, args=(plan, sync, slots),
                                  name="numlstm-pair-seq", daemon=True)
    except BaseException:
        slots.release()
        raise
    worker.start()  # from here on _serve releases the slot
    try:
        kernels.pair_seq_forward(plan)
    finally:
        sync[kernels.STOP] = 1
        worker.join()
    return True


_LIVE = weakref.WeakSet()  # every Pair, for the fork handler


def _after_fork():
    """In a forked child no worker runs: mark every Pair's worker as gone and
    free the slots, so that the child's steps start workers of its own. No
    background compile runs either: forget the pending ones (their waiters
    are the parent's), so that the child's streams ask again."""
    global _SLOTS, _AHEAD_LOCK
    _SLOTS = None
    for p in list(_LIVE):
        p.sync[kernels.STATE] = kernels.ASLEEP
        p._thread = None
    _AHEAD_LOCK = threading.Lock()  # another thread may have held it at the fork
    for key in [k for k, v in _AHEAD.items() if v is not None]:
        del _AHEAD[key]
    _RUNNING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _take_slot():
    """The worker slots, one of them taken; None when none is free (then an
    idle worker of another stream leaves for the next asker: ``_WANTED``)."""
    slots = _slots()
    if not slots.acquire(blocking=False):
        _WANTED[0] = 1
        return None
    _WANTED[0] = 0
    return slots


def _compile_serve(plan):
    """Compile ``kernels.serve`` for this plan's type here, not in the
    worker's first seconds."""
    key = (typeof(plan), int64, int64, typeof(_WANTED), int64)
    if key not in kernels.serve.overloads:
        kernels.serve.compile(key)


def _serve(plan, sync, slots):
    """The worker thread: serve until idle or stopped, then free the slot."""
    try:
        kernels.serve(plan, SPINS, YIELDS, _WANTED, PATIENCE)
    finally:
        sync[kernels.STATE] = kernels.ASLEEP
        slots.release()


class Pair:
    """The worker of one two-thread stream.

    Parameters
    ----------
    layers : tuple
        Every layer's ``lstm_step`` arguments (as ``Stream`` binds them).
    hprev : array (O,)
        Scratch for h_{t-1} of the layer in flight (of the model's dtype).
    owner : object
        The stream: when it is collected, the worker stops.

    Attributes
    ----------
    run : callable
        ``run(plan)`` makes one step (``kernels.pair_step``); it returns 1
        when the worker has left, and the caller then calls ``wake``.
    plan : StepPlan
        The bound layers, sync words and hprev.
    """

    def __init__(self, layers, hprev, owner):
        self.sync = sync = kernels.new_sync()
        self.plan = kernels.make_pair_plan(tuple(layers), sync, hprev)
        self.run = kernels.compiled_pair_step(self.plan)
        _compile_serve(self.plan)
        self._thread = None
        weakref.finalize(owner, _stop, sync)  # also at exit: the worker leaves
        _LIVE.add(self)

    def wake(self):
        """Start the worker if it has left and a worker slot is free."""
        if self._thread is not None:
            self._thread.join()  # it has set STATE: it is on its way out
            self._thread = None
        slots = _take_slot()
        if slots is None:
            return
        self.sync[kernels.STATE] = kernels.RUNNING
        self._thread = threading.Thread(target=_serve, args=(self.plan, self.sync, slots),
                                        name="numlstm-pair", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the worker (the stream is rebound or gone)."""
        _stop(self.sync)
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _stop(sync):
    sync[kernels.STOP] = 1

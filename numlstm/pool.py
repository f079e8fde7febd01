"""Many independent sessions of one model, advanced together by one batched step.

A service that keeps one ``Stream`` per session makes one batch-1 kernel call
per request: a matrix-vector pass over every weight for each session. A
``StreamPool`` keeps the state of up to ``capacity`` sessions in
preallocated ``(L, capacity, ...)`` arrays, and ``step(sids, x)`` advances any
n of them in one compiled call (``numlstm.kernels.pool``): it gathers their
states by index, runs every layer at batch n (a matrix-matrix product: one
pass over the weights for all n), and scatters the new states back. It
returns the outputs as a new array; ``step(sids, x, out=buf)`` writes them
into the caller's buffer, and a warm step then allocates nothing.

``numlstm.serve.Batcher`` puts a micro-batching front on a pool for threads
that each submit one session's steps.
"""

import threading

import numpy as np

from numlstm import checks
from numlstm import weights as weights_mod
from numlstm.kernels.pool import CLOSED, DUPLICATE, compiled_pool_step, make_pool_plan
from numlstm.workspace import Workspace, plan_nbytes

_INT64 = np.dtype(np.int64)
CHUNK = 256  # rows per batched product: past ~256 rows a GEMM is at its rate, and
# the work buffers (gates alone are 3 * 4H values a row) stay bounded for any capacity

_INDEX_BYTES = 8 + 8 + 8 + 8 + 1  # per slot: the slots buffer, the duplicate marks, the
# free stack, the session id it holds (int64 each) and the open flag (uint8)


def _check_capacity(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _state_spec(model, capacity):
    L, H, O = model.num_layers, model.hidden_size, model.output_size
    return [("h", (L, capacity, O)),  # every session's h of every layer
            ("c", (L, capacity, H)),  # every session's c of every layer
            ("x", (capacity, model.input_size)),  # the inputs of a step, in the order of sids
            ("out", (capacity, model.output_size))]  # the outputs of a step, same order


def _work_spec(model, rows):
    L, H, O, P = model.num_layers, model.hidden_size, model.output_size, model.proj_size
    return [("wh", (L, rows, O)),  # the states of a chunk's sessions, gathered
            ("wc", (L, rows, H)),
            ("xw", (rows, model.input_size)),  # the chunk's inputs
            ("gates", (L, 3 * rows * 4 * H)),  # per layer: activations | recurrent | new c
            ("r", (L, rows if P else 0, H))]  # o * tanh(c), the projection's input


def pool_memory(model, capacity, chunk=CHUNK):
    """Bytes a ``StreamPool(model, capacity, chunk=chunk)`` holds, by part.

    Returns
    -------
    dict
        ``states`` (h and c of every layer for every slot, with the input and
        output rows of a full step), ``workspace`` (the work rows of one
        chunk: min(capacity, chunk) rows of states, inputs, gates and
        projection inputs), ``index`` (per-slot ids, marks, free stack and flags) and
        ``total``. The weights are the model's, not counted here. Exact to
        the byte: the pool carves these very specs.
    """
    capacity = _check_capacity(capacity, "capacity")
    rows = min(capacity, _check_capacity(chunk, "chunk"))
    parts = {"states": plan_nbytes(_state_spec(model, capacity), model.dtype),
             "workspace": plan_nbytes(_work_spec(model, rows), model.dtype),
             "index": capacity * _INDEX_BYTES + 8}
    parts["total"] = sum(parts.values())
    return parts


class StreamPool:
    """Up to ``capacity`` independent sessions of one model, stepped in batches.

    Each session is a stream of batch 1 (its own state ``h`` (L, O), ``c``
    (L, H)); ``step`` advances any subset of them by one step in one compiled
    call, and returns their outputs exactly as ``Stream(B=n)`` would for
    those states stacked (n up to ``chunk``; a larger step runs in chunks,
    each exactly as a stream of its rows). The pool reads the model's live weights, as a
    ``Stream`` does (in-place updates are seen at the next step; a
    ``load_state_dict`` rebinds at the next step). Every method is
    thread-safe (one lock; a step holds it for its one kernel call).

    Parameters
    ----------
    model : numlstm.LSTM
        A unidirectional model on the CPU. Every storage kind works (dense,
        CSR, compact or quantized CSR, BSR) with or without projection.
    capacity : int
        S, the most sessions open at once. States and the input/output rows
        of a full step are allocated here, once.
    chunk : int, optional
        R, rows per batched product: a step of n > R sessions runs in chunks
        of R inside its one call, and the work buffers hold min(S, R) rows.

    Raises
    ------
    ValueError
        A bidirectional or reverse model (its reverse direction needs the
        whole sequence) or a capacity/chunk that is not a positive int.
    TypeError
        A model on the GPU: the pool runs on the CPU only (move it with
        ``model.to("cpu")``, or give each session a ``model.stream()`` on
        the device).

    Notes
    -----
    Memory: ``nbytes`` / ``memory_parts()``, predicted before making the
    pool by ``pool_memory(model, capacity, chunk)``.
    """

    def __init__(self, model, capacity, *, chunk=CHUNK):
        if model.device != "cpu":
            raise TypeError("a StreamPool runs on the CPU, but the model is on the GPU "
                            '(model.to("cuda")); call model.to("cpu") first, or step each '
                            "session with its own model.stream() on the device")
        checks.check_stream_args(model, 1)  # refuses a bidirectional or reverse model
        self.model = model
        self.capacity = S = checks.check_state_rows(
            model, _check_capacity(capacity, "capacity"), "capacity", "a StreamPool")
        self.chunk = _check_capacity(chunk, "chunk")
        rows = min(S, self.chunk)
        self._states_ws = Workspace(model.dtype)
        v = self._states_ws.carve(_state_spec(model, S))
        self._h, self._c, self._x, self._out = v["h"], v["c"], v["x"], v["out"]
        self._h.fill(0)
        self._c.fill(0)
        self._work_ws = Workspace(model.dtype)
        w = self._work_ws.carve(_work_spec(model, rows))
        self._wh, self._wc, self._xw, self._gates, self._r = (
            w["wh"], w["wc"], w["xw"], w["gates"], w["r"])
        self._sids = np.zeros(S, np.int64)  # a step's slots, in the order of its ids
        self._mark = np.zeros(S, np.int64)
        self._live = np.zeros(S, np.uint8)
        # The id of the session each slot holds (or last held): slot + S * the
        # number of sessions it held before, so that an id is never given twice
        # and a stale one (kept by a client, queued, retried) names no session.
        self._handle = np.arange(-S, 0, dtype=np.int64)
        self._tick = np.zeros(1, np.int64)
        # Free slots as a stack in an array (a Python list of ints would cost ~36
        # bytes a slot): the lowest free slot is opened next.
        self._free = np.arange(S - 1, -1, -1, dtype=np.int64)
        self._nfree = S
        self._lock = threading.Lock()
        self._bind()

    # ------------------------------------------------------------------
    # Binding
    # ------------------------------------------------------------------

    def _bind(self):
        """Bind every layer's kernel arguments, twice, into the pool's plan:
        ``small`` for chunks of fewer than ``config.STEP_MAX_B`` rows (the
        per-step execution layouts of sparse weights, as a batch-1 stream
        uses) and ``large`` for the rest (the stored arrays, which batched
        products read). The model decides which arguments a batch gets
        (``step_args``), so a chunk of m rows multiplies exactly as a
        ``Stream`` of batch m does."""
        from numlstm import config

        m = self.model
        if m.device != "cpu":  # moved after the pool was made: its states stay on the host
            raise TypeError("the model was moved to the GPU after this StreamPool was made; "
                            'a pool runs on the CPU: call model.to("cpu") to step it again')
        sets = []
        params = m.kernel_params()
        for B in (1, config.STEP_MAX_B):
            sets.append(tuple((self._gates[l], self._r[l]) + params.step_args("ih", l, 0, B)
                              + params.biases(l, 0) + params.recurrent_args(l, 0, B)
                              + (params.cell_args(l, 0),)
                              for l in range(m.num_layers)))
        self._plan = make_pool_plan(self._h, self._c, self._wh, self._wc, self._x, self._xw,
                                    self._out, self._sids, self._live, self._mark, self._tick,
                                    int(config.STEP_MAX_B), sets[0], sets[1])
        self._run = compiled_pool_step(self._plan)
        self._version = m.version

    # ------------------------------------------------------------------
    # Sessions
    # ------------------------------------------------------------------

    def __len__(self):
        """The number of open sessions."""
        return self.capacity - self._nfree

    @property
    def dtype(self):
        """The model's dtype: of states, inputs and outputs."""
        return self.model.dtype

    def _slot(self, sid):
        """The slot of open session ``sid``, or -1 (call with the lock held
        where the answer must stay true)."""
        if sid < 0:
            return -1
        slot = sid % self.capacity
        return slot if self._live[slot] and self._handle[slot] == sid else -1

    def _check_sid(self, sid):
        """The slot of open session ``sid``; TypeError or KeyError otherwise."""
        if isinstance(sid, bool) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"sid must be an int session id, got {type(sid).__name__}")
        sid = int(sid)
        slot = self._slot(sid)
        if slot < 0:
            raise KeyError(f"sid {sid} is not an open session of this pool (closed, or "
                           f"never opened here; {len(self)} of {self.capacity} open)")
        return slot

    def _check_one_state(self, state):
        """``state`` (h (L, O), c (L, H)) as arrays of the model's dtype."""
        m = self.model
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a tuple (h, c), got {type(state).__name__}")
        h = weights_mod.check_float_array(state[0], "state[0] (h)", (m.num_layers, m.output_size),
                                m.dtype)
        c = weights_mod.check_float_array(state[1], "state[1] (c)", (m.num_layers, m.hidden_size),
                                m.dtype)
        return h, c

    def open(self, state=None):
        """Open a session and return its id.

        Parameters
        ----------
        state : tuple (h (L, O), c (L, H)), optional
            Its initial state; zeros when omitted.

        Returns
        -------
        int
            The session id, >= 0. Ids are never reused: a slot freed by
            ``close`` holds the next session under a new id, so an id kept
            after its session closed names no session (KeyError wherever it
            is used) rather than another one. The first ``capacity`` ids are
            0, 1, ...; an id grows by ``capacity`` each time its slot is
            reused (int64 lasts for 2**63 / capacity reuses of a slot).

        Raises
        ------
        RuntimeError
            The pool is full (``len(pool) == pool.capacity``).
        """
        if state is not None:
            h, c = self._check_one_state(state)
        with self._lock:
            if self._nfree == 0:
                raise RuntimeError(f"the pool is full: {self.capacity} sessions open; close "
                                   "one first, or make a pool with a larger capacity")
            self._nfree -= 1
            slot = int(self._free[self._nfree])
            if state is None:
                self._h[:, slot] = 0
                self._c[:, slot] = 0
            else:
                self._h[:, slot] = h
                self._c[:, slot] = c
            self._handle[slot] += self.capacity
            self._live[slot] = 1
            return int(self._handle[slot])

    def close(self, sid):
        """End session ``sid``; its slot is free for the next ``open``.
        KeyError for an id that is not open."""
        with self._lock:
            slot = self._check_sid(sid)
            self._live[slot] = 0
            self._free[self._nfree] = slot
            self._nfree += 1

    def is_open(self, sid):
        """Whether ``sid`` names an open session (False for the id of a closed
        one, even when its slot holds another session now)."""
        if isinstance(sid, bool) or not isinstance(sid, (int, np.integer)):
            return False
        return self._slot(int(sid)) >= 0

    def state(self, sid):
        """Copies of session ``sid``'s state: h (L, O), c (L, H)."""
        with self._lock:
            slot = self._check_sid(sid)
            return self._h[:, slot].copy(), self._c[:, slot].copy()

    def set_state(self, sid, state):
        """Set session ``sid``'s state to ``state`` (h (L, O), c (L, H)), copied in:
        a state saved with ``state`` (here, or in another pool or process of
        the same model) resumes with exactly the same outputs."""
        h, c = self._check_one_state(state)
        with self._lock:
            slot = self._check_sid(sid)
            self._h[:, slot] = h
            self._c[:, slot] = c

    # ------------------------------------------------------------------
    # Stepping
    # ------------------------------------------------------------------

    _out_ok = None  # the last ``out`` found not to overlap the pool's buffers

    def step(self, sids, x, *, out=None):
        """Advance the sessions ``sids`` by one step; the others do not move.

        Parameters
        ----------
        sids : array (n,) of int
            Distinct open session ids, in any order (n may be 0).
        x : array (n, I)
            Their inputs, row k for ``sids[k]``. An array of the model's
            dtype is copied in without allocating; another float precision
            is converted. NaN and inf are not checked (as ``Stream.step``):
            they propagate into the named sessions only.
        out : array (n, O), optional
            Where to write the outputs: a C-contiguous, writeable NumPy array
            of the model's dtype that is not the pool's own memory. Checked
            before the step (a bad one changes nothing). The zero-allocation
            path.

        Returns
        -------
        array (n, O)
            The top layer's outputs, row k for ``sids[k]``: a new array, the
            caller's to keep and change (later steps never touch it);
            ``out`` itself when given.

        Raises
        ------
        TypeError, ValueError
            ``sids`` not a 1-D integer array; ``x`` not a float array of
            shape (n, I); ``out`` not a NumPy array of shape (n, O) and the
            model's dtype, not C-contiguous, read-only, or overlapping the
            pool's buffers.
        KeyError
            An id that names no open session (closed, stale, never given),
            or named twice. Nothing changes.
        """
        # The common case (an int64 array and an array of the model's dtype,
        # as a batcher sends) takes no conversion.
        if sids.__class__ is not np.ndarray or sids.ndim != 1 or sids.dtype is not _INT64:
            sids = self._check_sids(sids)
        n = sids.shape[0]
        if n > self.capacity:
            raise ValueError(f"sids names {n} sessions, more than the pool's capacity "
                             f"{self.capacity}; ids must be distinct")
        if x.__class__ is not np.ndarray or x.dtype is not self._x.dtype \
                or x.shape != (n, self._x.shape[1]):
            x = weights_mod.check_float_array(x, "x", (n, self._x.shape[1]), self._x.dtype)
        if out is not None:
            self._check_out(out, n)
        with self._lock:
            m = self.model
            if self._version != m.version:
                self._bind()
            if m.layouts_stale:
                m.refresh_layouts()
            slots = self._sids[:n]
            np.remainder(sids, self.capacity, out=slots)
            # Every id must be the one its slot holds now (a negative id is
            # never): comparing the bytes is the quickest test for small n.
            if self._handle[slots].tobytes() != sids.tobytes():
                self._raise_stale(sids)
            self._x[:n] = x
            code = self._run(self._plan, n)
            if code:
                self._raise_for(code, sids)
            if out is None:
                return self._out[:n].copy()
            out[...] = self._out[:n]
            return out

    def _check_out(self, out, n):
        """Refuse an ``out`` that ``step`` of n sessions cannot write into."""
        checks.check_out_array(out, (n, self._out.shape[1]), self._out.dtype)
        if out is not self._out_ok:
            if np.may_share_memory(out, self._states_ws._block) \
                    or np.may_share_memory(out, self._work_ws._block):
                raise ValueError("out overlaps the pool's own buffers (its states); pass an "
                                 "array of your own")
            self._out_ok = out

    @staticmethod
    def _check_sids(sids):
        arr = np.asarray(sids)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise TypeError(f"sids must be a 1-D array of int session ids, got a "
                            f"{arr.ndim}-D array of dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            k = int(np.argmax(arr > np.iinfo(np.int64).max))
            raise KeyError(f"sids[{k}] = {int(arr[k])} is not a session id of this pool "
                           "(over int64); no session was stepped")
        return arr.astype(np.int64)

    @staticmethod
    def _not_open(sid):
        return "negative: no session has that id" if sid < 0 else \
            "not an open session (closed, or never opened here)"

    def _raise_stale(self, sids):
        for k, sid in enumerate(sids.tolist()):
            if self._slot(sid) < 0:
                raise KeyError(f"sids[{k}] = {sid} is {self._not_open(sid)}; "
                               "no session was stepped")

    def _raise_for(self, code, sids):
        kind, k = code % 4, code // 4
        sid = int(sids[k])
        if kind == CLOSED:  # the id its slot held last, since closed
            why = self._not_open(sid)
        elif kind == DUPLICATE:
            why = "named twice in one step (a session steps once per call)"
        else:  # pragma: no cover - an id out of range fails the handle check first
            why = f"refused (code {code})"
        raise KeyError(f"sids[{k}] = {sid} is {why}; no session was stepped")

    # ------------------------------------------------------------------
    # Memory
    # ------------------------------------------------------------------

    def memory_parts(self):
        """Bytes held, by part (``states``, ``workspace``, ``index``, ``total``),
        as ``pool_memory`` predicts them. The model's weights are not counted."""
        parts = {"states": self._states_ws.nbytes, "workspace": self._work_ws.nbytes,
                 "index": self._sids.nbytes + self._mark.nbytes + self._free.nbytes
                 + self._handle.nbytes + self._live.nbytes + self._tick.nbytes}
        parts["total"] = sum(parts.values())
        return parts

    @property
    def nbytes(self):
        """Bytes of the pool's states, workspace and index (weights excluded)."""
        return self.memory_parts()["total"]

    def __repr__(self):
        return f"StreamPool({self.model!r}, capacity={self.capacity}, open={len(self)})"

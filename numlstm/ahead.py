"""Compile ahead: fill the kernel cache with every kernel a model's calls use.

A process with an empty kernel cache compiles each kernel family at its
first use (seconds each: the first stream step, the first forward, the first
training step, and each storage kind's own). ``compile(model, ...)`` (and
``numlstm compile MODEL``) makes those calls once on zeros, on a copy of the
model, so that they are compiled and written to the cache
(``numlstm.kernels.cache``); a later process with that cache loads them in
milliseconds. A container image bakes its cache with
``RUN numlstm compile model.npz`` (docs/design.md, Compiling ahead).

Which kernels a call compiles depends on its shapes: the batch size (one
thread or two, row panels, BLAS), and T * B (the parallel variants of the
batched products, and two threads for long batch-1 sequences); hence the
lists of batch sizes and sequence lengths.
"""

import copy
import logging
import time

import numpy as np

from numlstm import config
from numlstm.kernels import cache

log = logging.getLogger("numlstm")


def compile(model, batch_sizes=(1,), *, seq_lens=(10, 1000), stream=True, forward=True,
            pool=False, training=False):
    """Compile (or load from the cache) the kernels of ``model``'s calls.

    Parameters
    ----------
    model : numlstm.LSTM
        A model on the CPU (not changed: the calls run on a copy).
    batch_sizes : sequence of int
        B of the calls to prepare (default: 1).
    seq_lens : sequence of int
        T of the forward and training calls to prepare.
    stream : bool
        ``model.stream(B).step`` for every B (unidirectional, forward-time
        models only; others skip it), its two-thread kernels included where
        the step would use two threads.
    forward : bool
        Inference ``model(x)`` of every (T, B).
    pool : bool
        A ``StreamPool`` of capacity max(B) stepping B sessions at once.
    training : bool
        ``model(x, training=True)`` and ``model.backward`` of every (T, B)
        (trainable storage kinds only).

    Returns
    -------
    dict
        Seconds each prepared call took, by name (``"stream B=1"``, ...), and
        ``"cache"``: the folder the kernels are cached in.

    Raises
    ------
    TypeError
        ``model`` is not an ``LSTM`` on the CPU, or training was asked of a
        model whose storage is for inference only.
    ValueError
        A batch size or sequence length that is not a positive int.

    Notes
    -----
    Meant for start-up or an image's build: while it runs it switches
    ``config.PAIR_COMPILE`` for its own calls, which other threads stepping
    streams at the same time would see too.
    """
    from numlstm.lstm import LSTM
    from numlstm.pool import StreamPool

    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    if model.device != "cpu":
        raise TypeError("compile prepares the CPU kernels, but the model is on the GPU; "
                        "CUDA kernels compile at their first launch")
    sizes = _positive_ints(batch_sizes, "batch_sizes")
    lens = _positive_ints(seq_lens, "seq_lens")
    if training and not all(w.trainable for w in model.weights().values()):
        raise TypeError("training=True, but the model's storage is for inference only "
                        "(quantized weights)")
    m = copy.deepcopy(model)
    I, dtype = m.input_size, m.dtype
    streams = stream and m.num_directions == 1 and not m.reverse
    times = {}

    def timed(name, call):
        # Twice: on one thread, as a call runs until its two-thread kernels
        # are ready ("off": numlstm.pair), then with the two-thread kernels
        # compiled here where the call would use them.
        t0 = time.perf_counter()
        for when in ("off", "now"):
            config.PAIR_COMPILE = when
            call()
        times[name] = time.perf_counter() - t0
        log.debug("compile: %s ready in %.1f s", name, times[name])

    saved = config.PAIR_COMPILE
    try:
        for B in sizes:
            if streams:
                timed(f"stream B={B}", lambda B=B: m.stream(B).step(np.zeros((B, I), dtype)))
            for T in lens:
                x = np.zeros((T, B, I), dtype)
                if forward:
                    timed(f"forward T={T} B={B}", lambda x=x: m(x))
                if training:
                    timed(f"training T={T} B={B}", lambda x=x: _train_step(m, x))
        if pool and streams:
            B = max(sizes)

            def pool_step():
                p = StreamPool(m, B)
                ids = np.array([p.open() for _ in range(B)])
                p.step(ids, np.zeros((B, I), dtype))
            timed(f"pool B={B}", pool_step)
    finally:
        config.PAIR_COMPILE = saved
    times["cache"] = cache.cache_folder()
    return times


def _train_step(m, x):
    y, _ = m(x, training=True)
    m.backward(np.ones_like(y))
    m.zero_grad()


def _positive_ints(values, name):
    try:
        out = [int(v) for v in values]
        ok = all(int(v) == v for v in values) and all(v >= 1 for v in out)
    except (TypeError, ValueError):
        ok = False
    if not ok or not out:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return out

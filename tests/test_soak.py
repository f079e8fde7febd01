"""Long-run soak (bounded for CI): many streaming steps and many training
iterations hold their memory flat and stay finite.

The full-size version is ``python -m benchmarks --only soak`` (10^6 streaming
steps, 10^3 training iterations at B=16, I=64, H=256, RSS sampled along the way).
"""

import gc
import tracemalloc

import numpy as np
from numba.core.runtime import _nrt_python, rtsys

import numlstm
from numlstm import losses, optim
from numlstm.layers import Linear


def _nrt_net():
    """Numba NRT allocations not yet freed (statistics must be enabled)."""
    s = rtsys.get_allocation_stats()
    return s.alloc - s.free


def _measure(run, rounds):
    """Run ``run(k)`` for k in range(rounds) under tracemalloc with NRT statistics
    on. Rounds 0 and 1 warm up (compilation, first-call caches, buffers); after
    each later round a full collection (which also empties the interpreter's
    free lists) and then the traced bytes and the NRT net allocations are
    written into preallocated arrays (recording allocates nothing). Returns
    both arrays and the traced peak's rise over the first mark."""
    _nrt_python.memsys_enable_stats()
    traced = np.zeros(rounds - 2, np.int64)
    nrt = np.zeros(rounds - 2, np.int64)
    run(0)
    tracemalloc.start()
    try:
        run(1)
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for k in range(2, rounds):
            run(k)
            gc.collect()
            traced[k - 2] = tracemalloc.get_traced_memory()[0]
            nrt[k - 2] = _nrt_net()
        gc.collect()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return traced, nrt, peak - base


def _assert_flat(traced):
    """No leak: the traced bytes rise by less than 2 KiB over the second half
    of the run, and the whole rise is bounded. Interpreter and NumPy caches,
    such as a ufunc's dispatch cache, fill during the first rounds. A leak of
    even one byte per step or iteration would add >= 10^4 bytes a round."""
    half = len(traced) // 2
    assert traced[half:].max() - traced[half] < 2048, f"still growing: {traced}"
    assert traced.max() - traced[0] < 16384, f"grew: {traced}"


def test_streaming_soak_holds_memory_and_stays_finite():
    """2*10^5 steps (20 rounds of 10^4) of a two-layer stream at batch 2."""
    model = numlstm.LSTM(4, 8, num_layers=2, seed=0)
    stream = model.stream(2)
    rng = np.random.default_rng(0)
    xs = rng.uniform(-3, 3, (1000, 2, 4)).astype(np.float32)  # a sane range, reused
    block = [xs[t] for t in range(len(xs))]  # views made before measuring
    sane = np.ones(20, bool)

    def run(k):
        for _ in range(10):
            for x_t in block:
                h = stream.step(x_t)
        sane[k] = np.all(np.isfinite(h)) and np.abs(h).max() <= 1  # |o * tanh(c)| <= 1

    traced, nrt, peak_rise = _measure(run, 20)
    assert sane.all(), np.flatnonzero(~sane)
    # A stream step keeps nothing: after the warm-up rounds, not one byte.
    assert np.all(traced == traced[0]), traced
    assert peak_rise < 4096, peak_rise  # the few transient arrays of the sanity check
    assert np.all(nrt == nrt[0]), nrt
    # The state is still well defined: a reset and a replay give the forward's outputs.
    stream.reset()
    out = np.stack([stream.step(x_t).copy() for x_t in block[:50]])
    y, _ = model(xs[:50])
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


def test_training_soak_holds_memory_and_stays_finite():
    """200 iterations of forward + backward + Adam (and the head's) on one shape."""
    T, B, I, H = 20, 4, 6, 16
    model = numlstm.LSTM(I, H, num_layers=2, seed=0)
    head = Linear(H, 1, seed=0)
    opt = optim.Adam([model, head], lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (T, B, I)).astype(np.float32)
    target = np.sin(np.cumsum(x[..., :1], axis=0)).astype(np.float32)  # (T, B, 1)
    history = np.zeros(20)

    def run(k):
        for _ in range(10):
            opt.zero_grad()
            out, _ = model(x, training=True)
            loss, dpred = losses.mse(head(out, training=True), target)
            model.backward(head.backward(dpred))
            opt.step()
        history[k] = loss

    traced, nrt, _ = _measure(run, 20)
    assert np.all(np.isfinite(history)), history
    assert history[-1] < history[0], history  # it trains, too
    for name, p in model.parameters().items():
        assert np.all(np.isfinite(p)), name
    # Gradients, Adam moments, workspace and tape exist from the warm-up on.
    _assert_flat(traced)
    assert np.all(nrt == nrt[0]), nrt

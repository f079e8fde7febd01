"""Threads: streams of one shared model, forward on separate models, and the
refusal of two concurrent forward/backward calls on one model."""

import threading

import numpy as np
import pytest

import numlstm
from numlstm import prune
from numlstm.quantize import quantize

N_THREADS, STEPS = 6, 200


def _model(kind):
    m = numlstm.LSTM(8, 32, num_layers=2, proj_size=16 if kind == "proj" else 0, seed=0)
    if kind in ("csr", "int8", "float16"):
        prune.magnitude(m, 0.8, scope="per_row")
        if kind != "csr":
            quantize(m, kind)
    elif kind == "bsr":
        prune.blocks(m, 0.5, block=(8, 1))
    return m


def _run_threads(target, n):
    barrier = threading.Barrier(n)
    errors = []

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("kind", ["dense", "csr", "int8", "float16", "bsr", "proj"])
def test_threads_streaming_one_shared_model_match_a_single_thread(kind):
    m = _model(kind)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((N_THREADS, STEPS, 3, 8)).astype(np.float32)  # own input each
    expected = np.empty((N_THREADS, STEPS, 3, m.output_size), np.float32)
    for i in range(N_THREADS):  # one thread, one stream after another
        s = m.stream(3)
        for t in range(STEPS):
            expected[i, t] = s.step(xs[i, t])
    got = np.empty_like(expected)

    def work(i):
        s = m.stream(3)
        for t in range(STEPS):
            got[i, t] = s.step(xs[i, t])

    _run_threads(work, N_THREADS)
    np.testing.assert_array_equal(got, expected)


def test_forward_on_separate_models_in_threads():
    kinds = ["dense", "csr", "int8", "bsr", "proj", "dense"]
    models = [_model(k) for k in kinds]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4, 8)).astype(np.float32)
    expected = [m(x)[0] for m in models]
    got = [None] * len(models)

    def work(i):
        for _ in range(5):
            got[i] = models[i](x)[0]

    _run_threads(work, len(models))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def test_training_on_separate_models_in_threads():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 4, 8))
    models = [numlstm.LSTM(8, 16, dtype=np.float64, seed=i) for i in range(4)]
    expected = []
    for m in models:
        y, _ = m(x, training=True)
        expected.append(m.backward(np.ones_like(y))[0])
    got = [None] * len(models)

    def work(i):
        y, _ = models[i](x, training=True)
        got[i] = models[i].backward(np.ones_like(y))[0]

    _run_threads(work, len(models))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def test_one_model_refuses_a_second_thread_instead_of_racing():
    """forward/backward of one model from two threads share its workspace: the
    second caller gets a RuntimeError at once, and the first one's results are
    exact."""
    m = numlstm.LSTM(8, 64, num_layers=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(4).standard_normal((400, 8, 8))
    expected, _ = m(x)
    refused, results = [], []

    def work(i):
        for _ in range(10):
            try:
                results.append(m(x, training=bool(i % 2))[0])
            except RuntimeError as e:
                assert "busy in another thread" in str(e)
                refused.append(e)

    _run_threads(work, 4)
    for y in results:
        np.testing.assert_array_equal(y, expected)
    assert results  # at least one call ran
    print(f"\n{len(results)} calls ran, {len(refused)} refused as busy")
    # A held model refuses deterministically; a released one works again.
    assert m._busy.acquire(blocking=False)
    try:
        with pytest.raises(RuntimeError, match="busy in another thread"):
            m(x)
        with pytest.raises(RuntimeError, match="busy in another thread"):
            m.backward(np.ones_like(expected))
    finally:
        m._busy.release()
    y, _ = m(x, training=True)
    dx, _ = m.backward(np.ones_like(y))
    assert dx.shape == x.shape
    with pytest.raises(ValueError):  # a refused argument releases the model too
        m(x[:, :, :3])
    m(x)

"""numlstm.dask on a LocalCluster of two worker processes over loopback:
scoring equals the local forward, data-parallel steps equal single-process
steps, and the model travels to each worker once."""

import numpy as np
import pytest

pytest.importorskip("distributed")

import numlstm  # noqa: E402
from numlstm import dask as nd  # noqa: E402
from numlstm import losses, optim  # noqa: E402


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, host="127.0.0.1")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _pruned(model):
    numlstm.prune.magnitude(model, 0.7, scope="per_row")
    return model


def test_score_equals_local_forward_and_sends_the_model_once(client):
    model = _pruned(numlstm.LSTM(6, 16, num_layers=2, seed=0))  # CSR weights travel too
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((15, 37, 6)).astype(np.float32)  # (T, B, I), B not a multiple
    lengths = rng.integers(1, 16, 37)
    h0 = rng.standard_normal((2, 37, 16)).astype(np.float32)
    c0 = rng.standard_normal((2, 37, 16)).astype(np.float32)
    before = client.run(nd.rebuilds)
    future = nd.scatter_model(client, model)
    assert len(client.who_has(future)[future.key]) == 2  # on both workers
    y, (h_n, c_n) = nd.score(client, model, xs, lengths=lengths, state=(h0, c0),
                             chunk_size=5, return_state=True, model_future=future)
    y_ref, (h_ref, c_ref) = model(xs, (h0, c0), lengths=lengths)
    # Same kernels on fewer rows: equal to float rounding (BLAS blocks by batch size).
    tol = {"rtol": 1e-5, "atol": 1e-7}
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(h_n, h_ref, **tol)
    np.testing.assert_allclose(c_n, c_ref, **tol)
    y2 = nd.score(client, model, xs[:, :9], chunk_size=1, model_future=future)  # 9 tasks
    np.testing.assert_allclose(y2, model(xs[:, :9])[0], **tol)
    # 8 + 9 tasks ran, but each worker received the model (and rebuilt it from its
    # bytes) once: the tasks hold only the future. (Dask's broadcast replicates
    # between workers and now and then hands a worker a second copy: <= 2.)
    after = client.run(nd.rebuilds)
    for worker, counts in after.items():
        new = {k: v - before[worker].get(k, 0) for k, v in counts.items()
               if v != before[worker].get(k, 0)}
        assert len(new) == 1 and 1 <= next(iter(new.values())) <= 2, (worker, new)
    future.release()


def test_score_batch_first_and_default_chunks(client):
    model = numlstm.LSTM(3, 8, batch_first=True, proj_size=4, dtype=np.float64, seed=1)
    xs = np.random.default_rng(1).standard_normal((10, 7, 3))  # (B, T, I)
    np.testing.assert_allclose(nd.score(client, model, xs), model(xs)[0], rtol=1e-12,
                               atol=1e-15)
    with pytest.raises(ValueError, match="3-d"):
        nd.score(client, model, xs[0])
    with pytest.raises(ValueError, match="chunk_size"):
        nd.score(client, model, xs, chunk_size=0)


def _single_process_steps(model, opt, batches):
    out = []
    for x, target in batches:
        opt.zero_grad()
        y, _ = model.forward(x, training=True)
        loss, dy = losses.mse(y, target)
        model.backward(dy)
        out.append((loss, {n: g.copy() for n, g in model.grad_arrays().items()}))
        opt.step()
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_data_parallel_steps_equal_single_process_steps(client, sparse):
    """float64; shards of unequal size (7 = 3 + 4 sequences on two workers)."""
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((6, 7, 4)), np.tanh(rng.standard_normal((6, 7, 8))))
               for _ in range(3)]
    make = (lambda: _pruned(numlstm.LSTM(4, 8, num_layers=2, dtype=np.float64, seed=3))) \
        if sparse else (lambda: numlstm.LSTM(4, 8, num_layers=2, dtype=np.float64, seed=3))
    local = make()
    ref = _single_process_steps(local, optim.Adam(local, lr=1e-2), batches)

    model = make()
    opt = optim.Adam(model, lr=1e-2)
    dp = nd.DataParallel(client, model, opt)
    try:
        for (x, target), (ref_loss, ref_grads) in zip(batches, ref, strict=True):
            loss = dp.step(x, target)
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            for name, g in model.grad_arrays().items():
                np.testing.assert_allclose(g, ref_grads[name], rtol=1e-10, atol=1e-14,
                                           err_msg=name)
    finally:
        dp.close()
    for name, p in model.parameters().items():  # the same trajectory
        np.testing.assert_allclose(p, local.parameters()[name], rtol=1e-10, atol=1e-13)
    if sparse:
        assert model.sparsity()["overall"] == pytest.approx(local.sparsity()["overall"])


def test_data_parallel_with_lengths_weights_shards_by_valid_steps(client):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 6, 3))
    target = rng.standard_normal((9, 6, 5))
    lengths = np.array([9, 1, 2, 9, 8, 3])
    local = numlstm.LSTM(3, 5, dtype=np.float64, seed=5)
    local.zero_grad()
    y, _ = local.forward(x, lengths=lengths, training=True)
    ref_loss, dy = losses.mse(y, target, lengths=lengths)
    local.backward(dy)

    model = numlstm.LSTM(3, 5, dtype=np.float64, seed=5)
    dp = nd.DataParallel(client, model, optim.SGD(model, lr=0.1), shards=3)
    try:
        loss = dp.gradients(x, target, lengths)
    finally:
        dp.close()
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name, g in model.grad_arrays().items():
        np.testing.assert_allclose(g, local.grad_arrays()[name], rtol=1e-10, atol=1e-14)


def test_data_parallel_refuses_an_optimizer_over_other_modules(client):
    from numlstm.layers import Linear

    model = numlstm.LSTM(3, 5, seed=0)
    with pytest.raises(ValueError, match="exactly this model"):
        nd.DataParallel(client, model, optim.SGD([model, Linear(5, 1)], lr=0.1))


def test_score_uses_the_weights_scattered_even_in_process():
    """Issue 24, case 14: on an in-process cluster the scattered model is not
    pickled, and a worker thread used to get the caller's model itself; after
    an in-place update, one call then scored some sequences with the old
    weights and some with the new. Every sequence now gets the snapshot."""
    from distributed import Client, LocalCluster

    model = numlstm.LSTM(3, 8, dtype=np.float64, seed=6)
    xs = np.random.default_rng(6).standard_normal((5, 16, 3))
    old = model(xs)[0]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        future = nd.scatter_model(client, model)
        model.parameters()["weight_ih_l0"][:] += 0.5  # in place, after the scatter
        new = model(xs)[0]
        assert not np.allclose(old, new)
        for _ in range(3):  # chunks on both threads, in any order
            y = nd.score(client, model, xs, chunk_size=1, model_future=future)
            np.testing.assert_allclose(y, old, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(nd.score(client, model, xs, chunk_size=1), new,
                                   rtol=1e-12, atol=1e-14)  # a fresh snapshot per call
        future.release()

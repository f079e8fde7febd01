"""Training toolkit: Linear and Embedding, losses, and the fit loop."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import numlstm
from numlstm import losses, optim
from numlstm.layers import Embedding, Linear
from numlstm.train import fit


@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from(["dense", "csr", "bsr"]),
       st.booleans(), st.integers(0, 99))
def test_linear_matches_numpy(n, out, kind, bias, seed):
    rng = np.random.default_rng(seed)
    lin = Linear(4, 2 * out, bias=bias, dtype=np.float64, seed=seed)
    w = lin.state_dict()["weight"] * (rng.random((2 * out, 4)) < 0.6)
    state = {"weight": {"dense": w, "csr": sp.csr_array(w),
                        "bsr": sp.bsr_array(w, blocksize=(2, 2))}[kind]}
    if bias:
        state["bias"] = rng.standard_normal(2 * out)
    lin.load_state_dict(state)
    x = rng.standard_normal((n, 3, 4))
    y = lin(x, training=True)
    dense = lin.state_dict()["weight"]
    dense = dense.toarray() if sp.issparse(dense) else dense
    expected = x @ dense.T + (state["bias"] if bias else 0)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = lin.backward(dy)
    np.testing.assert_allclose(dx, dy @ dense, rtol=1e-12, atol=1e-12)
    full = dy.reshape(-1, 2 * out).T @ x.reshape(-1, 4)
    g = lin.grad_arrays()["weight"]
    if kind == "dense":
        np.testing.assert_allclose(g, full, rtol=1e-12, atol=1e-12)
    else:
        w_ = lin._params["weight"]
        pattern = w_.public(np.ones_like(w_.values)).toarray()
        got = w_.public(g).toarray()
        np.testing.assert_allclose(got, full * pattern, rtol=1e-12, atol=1e-12)
    if bias:
        np.testing.assert_allclose(lin.grad_arrays()["bias"], dy.sum(axis=(0, 1)))


def test_embedding_adds_into_the_looked_up_rows():
    emb = Embedding(10, 3, dtype=np.float64, seed=0)
    idx = np.array([[1, 4], [1, 9]])
    v = emb(idx, training=True)
    np.testing.assert_array_equal(v, emb.parameters()["weight"][idx])
    emb.backward(np.ones((2, 2, 3)))
    g = emb.grad_arrays()["weight"]
    np.testing.assert_array_equal(g[:, 0], [0, 2, 0, 0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(emb.touched_rows, [1, 4, 9])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        emb(np.array([10]))
    with pytest.raises(TypeError, match="indices must be integers"):
        emb(np.array([1.0]))


def test_losses_match_torch_and_respect_lengths():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 3, 7))
    targets = rng.integers(0, 7, (5, 3))
    loss, grad = losses.softmax_cross_entropy(logits, targets)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t.reshape(-1, 7), torch.tensor(targets).reshape(-1))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-12)
    # With lengths: the same as the loss over the valid positions only.
    lengths = np.array([5, 2, 3])
    loss, grad = losses.softmax_cross_entropy(logits, targets, lengths=lengths)
    valid = np.arange(5)[:, None] < lengths[None, :]
    ref_loss, _ = losses.softmax_cross_entropy(logits[valid], targets[valid])
    assert loss == pytest.approx(ref_loss)
    assert np.all(grad[~valid] == 0)
    y, target = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    loss, dy = losses.mse(y, target, lengths=lengths)
    assert loss == pytest.approx(np.mean((y[valid] - target[valid]) ** 2))
    assert np.all(dy[~valid] == 0)
    eps = 1e-6
    y2 = y.copy()
    y2[1, 0, 1] += eps
    assert (losses.mse(y2, target, lengths=lengths)[0] - loss) / eps == \
        pytest.approx(dy[1, 0, 1], rel=1e-4)
    with pytest.raises(ValueError, match="targets must lie in"):
        losses.softmax_cross_entropy(logits, targets + 7)
    with pytest.raises(ValueError, match="target must have the shape of y"):
        losses.mse(y, target[:2])


def _sine_task(seed=0):
    """Predict the next value of noisy sine waves (T, B, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(41)[:, None] * 0.3 + rng.uniform(0, 6, (1, 8))
    s = (np.sin(t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)[:, :, None]
    return s[:-1], s[1:]


def test_fit_trains_validates_hooks_and_stops_early(capsys):
    model = numlstm.LSTM(1, 16, seed=0)
    head = Linear(16, 1, seed=0)
    opt = optim.Adam([model, head], lr=2e-2)
    x, target = _sine_task()

    def step(batch):
        xb, tb = batch
        y, _ = model(xb, training=True)
        loss, dpred = losses.mse(head(y, training=True), tb)
        model.backward(head.backward(dpred))
        return loss

    def validate():
        return losses.mse(head(model(x)[0]), target)[0]

    calls = []
    first = validate()
    hist = fit(step, opt, [(x[:, :4], target[:, :4]), (x[:, 4:], target[:, 4:])], epochs=30,
               validate=validate, clip=1.0, hooks=[lambda i, loss: calls.append(i)],
               progress=False)
    assert calls == list(range(hist["steps"])) and hist["steps"] == 60
    assert hist["valid_loss"][-1] < first / 5
    assert capsys.readouterr().err == ""  # silent
    # A validation that never improves stops after `patience` epochs and
    # restores the parameters of the best epoch.
    values = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    best = {}

    def worse():
        v = next(values)
        if v == 1.0:
            best.update({k: p.copy() for k, p in model.parameters().items()})
        return v

    hist = fit(step, opt, [(x, target)], epochs=5, validate=worse, patience=2, progress=True)
    assert hist["stopped_early"] and len(hist["valid_loss"]) == 3 and hist["best_epoch"] == 0
    for k, p in model.parameters().items():
        np.testing.assert_array_equal(p, best[k])
    assert "epoch 3/5" in capsys.readouterr().err  # tqdm's bar or the plain line


def test_fit_rejects_bad_arguments():
    opt = optim.SGD(numlstm.LSTM(1, 2), lr=0.1)
    with pytest.raises(TypeError, match="step must be callable"):
        fit(None, opt, [])
    with pytest.raises(TypeError, match="optimizer must be a numlstm.optim.Optimizer"):
        fit(lambda b: 0.0, object(), [])
    with pytest.raises(ValueError, match="patience must be an int >= 1 and needs validate"):
        fit(lambda b: 0.0, opt, [], patience=2)

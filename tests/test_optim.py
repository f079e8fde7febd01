"""Optimizers: a hand-computed step, torch.optim on the same numbers, clipping,
schedules, and state that follows pruning."""

import math

import numpy as np
import pytest

import numlstm
from numlstm import optim, prune


class Params:
    """A minimal module: named arrays and their gradients."""

    def __init__(self, **arrays):
        self.p = {k: np.array(v, np.float64) for k, v in arrays.items()}
        self.g = {k: np.zeros_like(v) for k, v in self.p.items()}

    def parameters(self):
        return self.p

    def grad_arrays(self):
        return self.g

    def zero_grad(self):
        for g in self.g.values():
            g.fill(0)


def test_hand_computed_steps():
    m = Params(w=[1.0, -2.0])
    m.g["w"][...] = [0.5, 0.25]
    optim.SGD(m, lr=0.1).step()
    np.testing.assert_allclose(m.p["w"], [0.95, -2.025])
    m = Params(w=[1.0])
    opt = optim.Adam(m, lr=0.1)
    m.g["w"][...] = 3.0
    opt.step()  # first Adam step moves by lr * sign(g) (bias-corrected m/sqrt(v) = 1)
    np.testing.assert_allclose(m.p["w"], [0.9], rtol=1e-7)
    m = Params(w=[2.0])
    opt = optim.SGD(m, lr=0.5, momentum=0.9)
    m.g["w"][...] = 1.0
    opt.step()
    opt.step()  # buffer 1, then 1.9
    np.testing.assert_allclose(m.p["w"], [2.0 - 0.5 - 0.95])


CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
         ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
         ("Adam", dict(lr=0.01)), ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
         ("AdamW", dict(lr=0.01)), ("AdamW", dict(lr=0.02, weight_decay=0.3, eps=1e-6))]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_torch_optim(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in init.items()} for _ in range(6)]
    m = Params(**init)
    opt = getattr(optim, name)(m, **kwargs)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    topt = getattr(torch.optim, name)(list(tp.values()), **kwargs)
    for g in grads:
        for k in init:
            m.g[k][...] = g[k]
            tp[k].grad = torch.tensor(g[k])
        opt.step()
        topt.step()
    for k in init:
        np.testing.assert_allclose(m.p[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-12)


def test_clip_grad_norm_and_schedule():
    m = Params(a=[0.0, 0.0], b=[0.0])
    m.g["a"][...] = [3.0, 0.0]
    m.g["b"][...] = [4.0]
    assert optim.clip_grad_norm(m, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.r_[m.g["a"], m.g["b"]], [0.6, 0, 0.8], rtol=1e-5)
    assert optim.clip_grad_norm(m, 10.0) == pytest.approx(1.0, rel=1e-5)  # no change
    s = optim.cosine_schedule(1.0, 10, warmup_steps=2, min_lr=0.1)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == pytest.approx(1.0) and s(10) == pytest.approx(0.1)
    assert s(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    m = Params(w=[1.0])
    opt = optim.SGD(m, lr=lambda step: 0.1 * (step + 1))
    m.g["w"][...] = 1.0
    opt.step()
    opt.step()
    np.testing.assert_allclose(m.p["w"], [1.0 - 0.1 - 0.2])


def test_trains_csr_values_and_follows_gradual_pruning():
    model = numlstm.LSTM(4, 8, seed=0)
    opt = optim.Adam(model, lr=1e-2)
    pruner = prune.GradualPruner(model, 0.8, num_updates=2, frequency=2, on_prune=opt.remap)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 4))
    for _ in range(8):
        y, _ = model(x, training=True)
        model.zero_grad()
        model.backward(y)  # loss = |y|^2 / 2
        before = {k: v.copy() for k, v in model.parameters().items()}
        opt.step()
        for k, v in model.parameters().items():
            assert v.shape == before[k].shape and not np.array_equal(v, before[k])
        pruner.step()
    assert model.sparsity()["overall"] == pytest.approx(0.8, abs=0.01)
    w = model.weights()["weight_hh_l0"]
    assert opt.state[(0, "weight_hh_l0")]["m"].shape == w.values.shape
    assert opt.nbytes == 2 * sum(v.nbytes for v in model.parameters().values())
    # Re-storing without remapping is caught, not silently misapplied.
    prune.magnitude(model, 0.9)
    with pytest.raises(ValueError, match="changed its storage"):
        opt.step()
    opt.reset()
    opt.step()


def test_bad_arguments():
    m = Params(w=[1.0])
    with pytest.raises(TypeError, match="modules must have parameters"):
        optim.SGD(object())
    with pytest.raises(ValueError, match=r"lr must be a number in \(0.0, inf\), got -1"):
        optim.SGD(m, lr=-1)
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        optim.SGD(m, nesterov=True)
    with pytest.raises(ValueError, match="betas must be a pair"):
        optim.Adam(m, betas=0.9)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(m, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.cosine_schedule(0.1, 5, warmup_steps=5)

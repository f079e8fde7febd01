"""Proof that the oracle (tests/reference.py) is right.

- central finite differences in float64 for dx, dh0, dc0 and every parameter;
- padding semantics: a padded batch equals each sequence run alone;
- torch.nn.LSTM (float64, same weights) when torch is importable.
"""

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import init_params, lstm_backward, lstm_forward, param_shapes, sigmoid

# ---------------------------------------------------------------------------- helpers


def make_case(seed, *, T, B, I, H, L=1, D=1, P=0, bias=True, lengths=None, dropout=None):
    """A random problem: params, inputs, lengths, masks and the loss weights R."""
    rng = np.random.default_rng(seed)
    O = P if P > 0 else H
    params = init_params(I, H, L, bias=bias, bidirectional=(D == 2), proj_size=P, rng=rng)
    masks = None
    if dropout is not None:
        masks = [(rng.random((T, B, D * O)) >= dropout) / (1.0 - dropout) for _ in range(L - 1)]
    return {
        "params": params,
        "x": rng.standard_normal((T, B, I)),
        "h0": 0.5 * rng.standard_normal((L * D, B, O)),
        "c0": 0.5 * rng.standard_normal((L * D, B, H)),
        "lengths": None if lengths is None else np.asarray(lengths, dtype=np.int64),
        "masks": masks,
        "Ry": rng.standard_normal((T, B, D * O)),
        "Rh": rng.standard_normal((L * D, B, O)),
        "Rc": rng.standard_normal((L * D, B, H)),
        "sizes": {"hidden_size": H, "num_layers": L, "proj_size": P, "bidirectional": D == 2},
    }


def forward(case, **overrides):
    kw = {"h0": case["h0"], "c0": case["c0"], "lengths": case["lengths"],
          "dropout_masks": case["masks"], **case["sizes"], **overrides}
    return lstm_forward(case["params"], case["x"], **kw)


def loss(case):
    """L = sum(y * Ry) + sum(h_n * Rh) + sum(c_n * Rc)."""
    y, h_n, c_n, _ = forward(case)
    return np.sum(y * case["Ry"]) + np.sum(h_n * case["Rh"]) + np.sum(c_n * case["Rc"])


def analytic_grads(case):
    """{name: gradient of the loss} for x, h0, c0 and every parameter."""
    *_, cache = forward(case)
    dx, dh0, dc0, grads = lstm_backward(cache, case["Ry"], case["Rh"], case["Rc"])
    return {"x": dx, "h0": dh0, "c0": dc0, **grads}


def numeric_grad(case, array, eps=1e-6):
    """Central differences of the loss w.r.t. every element of ``array`` (perturbed in place)."""
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        saved = array[idx]
        array[idx] = saved + eps
        up = loss(case)
        array[idx] = saved - eps
        down = loss(case)
        array[idx] = saved
        grad[idx] = (up - down) / (2 * eps)
    return grad


# ------------------------------------------------------------------------------ sigmoid


def test_sigmoid_matches_definition():
    z = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(sigmoid(z), 1.0 / (1.0 + np.exp(-z)), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(sigmoid(z) + sigmoid(-z), 1.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_extremes_do_not_warn(dtype):
    z = np.array([-np.inf, -1e308 if dtype == np.float64 else -3e38, -1000, -100, 0,
                  100, 1000, np.inf], dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        s = sigmoid(z)
    assert s.dtype == dtype
    assert s[0] == 0 and s[-1] == 1 and s[4] == 0.5
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 1))
    assert np.all(np.diff(s) >= 0)
    assert sigmoid(3).dtype == np.float64  # integers are computed in float64


# ---------------------------------------------------------------------------- params


def test_init_params_names_shapes_and_range():
    params = init_params(5, 4, 2, bidirectional=True, proj_size=3, rng=0)
    assert list(params) == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
        "weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse",
        "bias_hh_l0_reverse", "weight_hr_l0_reverse",
        "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1", "weight_hr_l1",
        "weight_ih_l1_reverse", "weight_hh_l1_reverse", "bias_ih_l1_reverse",
        "bias_hh_l1_reverse", "weight_hr_l1_reverse",
    ]
    assert params["weight_ih_l0"].shape == (16, 5)
    assert params["weight_ih_l1_reverse"].shape == (16, 6)  # D*O = 2*3
    assert params["weight_hh_l1"].shape == (16, 3)
    assert params["bias_hh_l0"].shape == (16,)
    assert params["weight_hr_l1"].shape == (3, 4)
    for p in params.values():
        assert p.dtype == np.float64
        assert np.all(np.abs(p) <= 0.5)  # 1/sqrt(H)

    nobias = init_params(2, 3, 1, bias=False, rng=np.random.default_rng(1))
    assert list(nobias) == ["weight_ih_l0", "weight_hh_l0"]
    # Same seed, same values.
    np.testing.assert_array_equal(init_params(2, 3, rng=7)["weight_hh_l0"],
                                  init_params(2, 3, rng=7)["weight_hh_l0"])


def test_forward_shapes_and_float64_casting():
    case = make_case(0, T=4, B=3, I=2, H=5, L=2, D=2, P=3)
    case["x"] = case["x"].astype(np.float32)
    y, h_n, c_n, cache = forward(case)
    assert y.shape == (4, 3, 6) and h_n.shape == (4, 3, 3) and c_n.shape == (4, 3, 5)
    assert y.dtype == h_n.dtype == c_n.dtype == np.float64
    dx, dh0, dc0, grads = lstm_backward(cache, np.ones_like(y))
    assert dx.shape == (4, 3, 2) and dx.dtype == np.float64
    assert dh0.shape == (4, 3, 3) and dc0.shape == (4, 3, 5)
    assert list(grads) == list(case["params"])
    for name, g in grads.items():
        assert g.shape == case["params"][name].shape and g.dtype == np.float64


def test_default_states_and_gradients_are_zero():
    case = make_case(1, T=3, B=2, I=2, H=3, L=2, D=2)
    y0, h0, c0, cache = forward(case, h0=None, c0=None)
    zeros = {**case, "h0": np.zeros_like(case["h0"]), "c0": np.zeros_like(case["c0"])}
    y1, h1, c1, _ = forward(zeros)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)
    np.testing.assert_array_equal(c0, c1)
    a = lstm_backward(cache, case["Ry"])
    b = lstm_backward(cache, case["Ry"], np.zeros_like(h0), np.zeros_like(c0))
    for u, v in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(u, v)
    # The backward leaves the cache alone: running it twice gives the same answer.
    c = lstm_backward(cache, case["Ry"])
    for name in a[3]:
        np.testing.assert_array_equal(a[3][name], c[3][name])


def test_single_step_by_hand():
    """One step, written out from the equations with no shared code."""
    rng = np.random.default_rng(3)
    I, H = 3, 2
    p = init_params(I, H, rng=rng)
    x = rng.standard_normal((1, 1, I))
    h = rng.standard_normal((1, 1, H))
    c = rng.standard_normal((1, 1, H))
    z = p["weight_ih_l0"] @ x[0, 0] + p["bias_ih_l0"] + p["weight_hh_l0"] @ h[0, 0] \
        + p["bias_hh_l0"]
    i, f, g, o = (z[0:2], z[2:4], z[4:6], z[6:8])
    i, f, o = (1 / (1 + np.exp(-i)), 1 / (1 + np.exp(-f)), 1 / (1 + np.exp(-o)))
    c1 = f * c[0, 0] + i * np.tanh(g)
    h1 = o * np.tanh(c1)
    y, h_n, c_n, _ = lstm_forward(p, x, hidden_size=H, h0=h, c0=c)
    np.testing.assert_allclose(y[0, 0], h1, rtol=1e-14)
    np.testing.assert_allclose(h_n[0, 0], h1, rtol=1e-14)
    np.testing.assert_allclose(c_n[0, 0], c1, rtol=1e-14)


def test_bad_input_is_named():
    case = make_case(0, T=3, B=2, I=2, H=3, L=2)
    with pytest.raises(ValueError, match="h0"):
        forward(case, h0=np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="lengths"):
        forward(case, lengths=np.array([0, 3]))
    with pytest.raises(ValueError, match="lengths"):
        forward(case, lengths=np.array([4, 3]))
    with pytest.raises(ValueError, match="dropout_masks"):
        forward(case, dropout_masks=[])
    with pytest.raises(ValueError, match="params"):
        forward(case, proj_size=2)


# ---------------------------------------------------------------- finite differences

FD_CONFIGS = [
    # (L, D, P, bias, lengths, dropout); T=4, B=3, I=2, H=3. A cycle of 5 (lengths, dropout)
    # choices against the 16 (L, D, P, bias) products, so that no pairing is fixed.
    (L, D, P, bias, lengths, dropout if L > 1 else None)
    for (L, D, P, bias), (lengths, dropout) in zip(
        itertools.product([1, 2], [1, 2], [0, 2], [True, False]),
        itertools.cycle([(None, None), ([3, 4, 1], 0.3), ([2, 1, 4], None), ([1, 3, 2], 0.5),
                         ([4, 2, 3], 0.3)]),
    )
]


@pytest.mark.parametrize("L, D, P, bias, lengths, dropout", FD_CONFIGS)
def test_gradients_match_finite_differences(L, D, P, bias, lengths, dropout):
    case = make_case(10 * L + D + P, T=4, B=3, I=2, H=3, L=L, D=D, P=P, bias=bias,
                     lengths=lengths, dropout=dropout)
    grads = analytic_grads(case)
    arrays = {"x": case["x"], "h0": case["h0"], "c0": case["c0"], **case["params"]}
    assert set(grads) == set(arrays)
    for name, array in arrays.items():
        num = numeric_grad(case, array)
        err = np.abs(grads[name] - num)
        rel = err / np.maximum(np.abs(num), 1.0)
        assert rel.max() < 1e-7, (name, rel.max())
        assert err.mean() < 1e-8, (name, err.mean())
        assert np.abs(grads[name]).max() > 0 or np.abs(num).max() == 0, name
    if lengths is not None:  # padded inputs get exactly zero gradient
        valid = np.arange(4)[:, None] < np.asarray(lengths)[None, :]
        assert np.all(grads["x"][~valid] == 0)


# --------------------------------------------------------------------------- padding


def check_padding_equals_alone(case):
    """Each sequence of a padded batch == that sequence alone, truncated to its length."""
    L = case["sizes"]["num_layers"]
    y, h_n, c_n, cache = forward(case)
    dx, dh0, dc0, grads = lstm_backward(cache, case["Ry"], case["Rh"], case["Rc"])
    summed = {name: np.zeros_like(g) for name, g in grads.items()}
    tol = {"rtol": 1e-12, "atol": 1e-13}
    for b, n in enumerate(case["lengths"]):
        assert np.all(y[n:, b] == 0)  # outputs on padding are exactly 0
        assert np.all(dx[n:, b] == 0)  # and padded inputs get no gradient
        one = {
            **case,
            "x": case["x"][:n, b:b + 1],
            "h0": case["h0"][:, b:b + 1],
            "c0": case["c0"][:, b:b + 1],
            "lengths": None,
            "masks": None if case["masks"] is None else [m[:n, b:b + 1] for m in case["masks"]],
            "Ry": case["Ry"][:n, b:b + 1],
            "Rh": case["Rh"][:, b:b + 1],
            "Rc": case["Rc"][:, b:b + 1],
        }
        y1, h1, c1, cache1 = forward(one)
        np.testing.assert_allclose(y[:n, b:b + 1], y1, **tol)
        np.testing.assert_allclose(h_n[:, b:b + 1], h1, **tol)
        np.testing.assert_allclose(c_n[:, b:b + 1], c1, **tol)
        dx1, dh01, dc01, grads1 = lstm_backward(cache1, one["Ry"], one["Rh"], one["Rc"])
        np.testing.assert_allclose(dx[:n, b:b + 1], dx1, **tol)
        np.testing.assert_allclose(dh0[:, b:b + 1], dh01, **tol)
        np.testing.assert_allclose(dc0[:, b:b + 1], dc01, **tol)
        for name in summed:
            summed[name] += grads1[name]
    for name in grads:  # the loss is a sum over sequences, so are the parameter gradients
        np.testing.assert_allclose(grads[name], summed[name], rtol=1e-11, atol=1e-12)
    # The final state of the last layer is where each direction's output stops.
    D, O = (2 if case["sizes"]["bidirectional"] else 1), h_n.shape[-1]
    last = np.asarray(case["lengths"]) - 1
    B = len(last)
    np.testing.assert_allclose(h_n[(L - 1) * D], y[last, np.arange(B), :O], rtol=0, atol=0)
    if D == 2:
        np.testing.assert_allclose(h_n[(L - 1) * D + 1], y[0, :, O:], rtol=0, atol=0)


@pytest.mark.parametrize("L, D, P", [(1, 1, 0), (1, 2, 0), (2, 2, 2), (2, 1, 2)])
def test_padding_equals_each_sequence_alone(L, D, P):
    case = make_case(5, T=5, B=4, I=2, H=3, L=L, D=D, P=P, lengths=[3, 5, 1, 4],
                     dropout=0.4 if L > 1 else None)
    check_padding_equals_alone(case)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    T=st.integers(1, 5), B=st.integers(1, 4), I=st.integers(1, 3), H=st.integers(1, 4),
    L=st.integers(1, 2), D=st.integers(1, 2), bias=st.booleans(), use_dropout=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_padding_property(data, T, B, I, H, L, D, bias, use_dropout, seed):
    P = data.draw(st.integers(0, H - 1), label="P")
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="lengths")
    case = make_case(seed, T=T, B=B, I=I, H=H, L=L, D=D, P=P, bias=bias, lengths=lengths,
                     dropout=0.5 if use_dropout and L > 1 else None)
    check_padding_equals_alone(case)


def test_full_lengths_equal_no_lengths():
    case = make_case(2, T=4, B=3, I=2, H=3, L=2, D=2, P=2)
    a = forward(case)
    b = forward(case, lengths=np.array([4, 4, 4]))
    for u, v in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(u, v)


def test_padding_values_are_ignored():
    case = make_case(4, T=4, B=2, I=2, H=3, D=2, lengths=[2, 4])
    y, h_n, c_n, cache = forward(case)
    case["x"][2:, 0] = np.nan
    y2, h2, c2, cache2 = forward(case)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(h_n, h2)
    np.testing.assert_array_equal(c_n, c2)
    a, b = lstm_backward(cache, case["Ry"]), lstm_backward(cache2, case["Ry"])
    for name in a[3]:
        np.testing.assert_array_equal(a[3][name], b[3][name])


# ----------------------------------------------------------------------------- torch

TORCH_CONFIGS = list(itertools.product([1, 2], [1, 2], [0, 2], [True, False], [False, True]))


TORCH_TOL = {"rtol": 0, "atol": 1e-10}


def backward_and_compare_outputs(torch, case, y, h_n, c_n):
    """Backpropagate the case's loss through torch's outputs, check that the
    reference's forward equals them, and return the reference's cache."""
    total = ((y * torch.from_numpy(case["Ry"])).sum() + (h_n * torch.from_numpy(case["Rh"])).sum()
             + (c_n * torch.from_numpy(case["Rc"])).sum())
    total.backward()
    ry, rh, rc, cache = forward(case)
    np.testing.assert_allclose(ry, y.detach().numpy(), **TORCH_TOL)
    np.testing.assert_allclose(rh, h_n.detach().numpy(), **TORCH_TOL)
    np.testing.assert_allclose(rc, c_n.detach().numpy(), **TORCH_TOL)
    return cache


def torch_lstm(torch, case, I):
    s = case["sizes"]
    lstm = torch.nn.LSTM(I, s["hidden_size"], s["num_layers"], bias="bias_ih_l0" in case["params"],
                         bidirectional=s["bidirectional"], proj_size=s["proj_size"],
                         dtype=torch.float64)
    assert [n for n, _ in lstm.named_parameters()] == list(case["params"])
    lstm.load_state_dict({n: torch.from_numpy(p.copy()) for n, p in case["params"].items()})
    return lstm


@pytest.mark.parametrize("L, D, P, bias, use_lengths", TORCH_CONFIGS)
def test_matches_torch(L, D, P, bias, use_lengths):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T, B, I = 5, 4, 3
    lengths = [3, 5, 1, 4] if use_lengths else None
    case = make_case(100 + L + 2 * D + P, T=T, B=B, I=I, H=4, L=L, D=D, P=P, bias=bias,
                     lengths=lengths)
    # param_shapes and init_params agree with torch's own layout.
    ref_shapes = param_shapes(I, 4, L, bias=bias, bidirectional=D == 2, proj_size=P)
    lstm = torch_lstm(torch, case, I)
    assert {n: tuple(p.shape) for n, p in lstm.named_parameters()} == ref_shapes

    x = torch.tensor(case["x"], requires_grad=True)
    h0 = torch.tensor(case["h0"], requires_grad=True)
    c0 = torch.tensor(case["c0"], requires_grad=True)
    if use_lengths:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        out, (h_n, c_n) = lstm(packed, (h0, c0))
        y, _ = pad_packed_sequence(out, total_length=T)
    else:
        y, (h_n, c_n) = lstm(x, (h0, c0))
    cache = backward_and_compare_outputs(torch, case, y, h_n, c_n)
    dx, dh0, dc0, grads = lstm_backward(cache, case["Ry"], case["Rh"], case["Rc"])
    np.testing.assert_allclose(dx, x.grad.numpy(), **TORCH_TOL)
    np.testing.assert_allclose(dh0, h0.grad.numpy(), **TORCH_TOL)
    np.testing.assert_allclose(dc0, c0.grad.numpy(), **TORCH_TOL)
    for name, p in lstm.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), err_msg=name, **TORCH_TOL)


@pytest.mark.parametrize("D, P", [(1, 0), (2, 2)])
def test_dropout_masks_match_stacked_torch_layers(D, P):
    """Dropout between layers == torch single-layer LSTMs stacked by hand with the masks."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T, B, I, H, L = 5, 3, 2, 4, 3
    lengths = [4, 5, 2]
    case = make_case(7, T=T, B=B, I=I, H=H, L=L, D=D, P=P, lengths=lengths, dropout=0.4)
    x = torch.tensor(case["x"], requires_grad=True)
    inp, h_list, c_list = x, [], []
    for k in range(L):
        layer = torch.nn.LSTM(I if k == 0 else inp.shape[-1], H, bidirectional=D == 2,
                              proj_size=P, dtype=torch.float64)
        sfx = f"_l{k}"
        layer.load_state_dict({  # our layer k's weights, under torch's layer-0 names
            n: torch.from_numpy(case["params"][n.replace("_l0", sfx)].copy())
            for n, _ in layer.named_parameters()})
        sl = slice(k * D, (k + 1) * D)
        packed = pack_padded_sequence(inp, torch.tensor(lengths), enforce_sorted=False)
        out, (h, c) = layer(packed, (torch.from_numpy(case["h0"][sl].copy()),
                                     torch.from_numpy(case["c0"][sl].copy())))
        out, _ = pad_packed_sequence(out, total_length=T)
        h_list.append(h)
        c_list.append(c)
        inp = out * torch.from_numpy(case["masks"][k]) if k < L - 1 else out
    h_n, c_n = torch.cat(h_list), torch.cat(c_list)
    cache = backward_and_compare_outputs(torch, case, inp, h_n, c_n)
    dx, *_ = lstm_backward(cache, case["Ry"], case["Rh"], case["Rc"])
    np.testing.assert_allclose(dx, x.grad.numpy(), **TORCH_TOL)

"""Proof that the oracle's cell options are right (tests/reference.py: reverse,
peepholes, clip, input_forget, activations): central finite differences for
every gradient, and ONNX Runtime's LSTM operator (which defines them) on random
nodes with every option, direction, ``sequence_lens`` and initial state.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ACTIVATIONS, lstm_forward, param_shapes
from test_reference import analytic_grads, make_case, numeric_grad

# (L, D, P, lengths, options); T=4, B=3, I=2, H=3.
FD_CONFIGS = [
    (1, 1, 0, None, dict(reverse=True)),
    (2, 1, 2, [3, 4, 1], dict(reverse=True)),
    (2, 2, 0, [2, 4, 3], dict(peepholes=True)),
    (1, 1, 2, None, dict(peepholes=True, reverse=True)),
    (2, 1, 0, [4, 1, 2], dict(clip=0.4)),
    (1, 2, 0, None, dict(input_forget=True)),
    (2, 1, 2, [1, 3, 4], dict(input_forget=True, peepholes=True)),
    (1, 1, 0, None, dict(activations=("hard_sigmoid", "relu", "affine"))),
    (2, 2, 0, [4, 2, 3], dict(activations=(("affine", 0.5, 0.25), "tanh",
                                           ("hard_sigmoid", 0.3, 0.4)))),
    (2, 1, 2, [2, 4, 3], dict(reverse=True, peepholes=True, clip=0.5, input_forget=True,
                              activations=("sigmoid", "relu", "hard_sigmoid"))),
]


def options_case(seed, L, D, P, lengths, options):
    """make_case with the cell options: peephole parameters drawn like the others,
    weights scaled up so that the clip and the activations' kinks are reached."""
    options = dict(options)
    case = make_case(seed, T=4, B=3, I=2, H=3, L=L, D=D, P=P, lengths=lengths)
    rng = np.random.default_rng(seed + 1)
    for name in case["params"]:
        case["params"][name] *= 2.0
    if options.pop("peepholes", False):
        shapes = param_shapes(2, 3, L, bidirectional=(D == 2), proj_size=P, peepholes=True)
        for name, shape in shapes.items():
            if name.startswith("peephole"):
                case["params"][name] = rng.uniform(-1, 1, shape)
    case["sizes"].update(options)
    return case


@pytest.mark.parametrize("L, D, P, lengths, options", FD_CONFIGS)
def test_option_gradients_match_finite_differences(L, D, P, lengths, options):
    case = options_case(7 * L + D, L, D, P, lengths, options)
    grads = analytic_grads(case)
    arrays = {"x": case["x"], "h0": case["h0"], "c0": case["c0"], **case["params"]}
    assert set(grads) == set(arrays)
    for name, array in arrays.items():
        num = numeric_grad(case, array)
        err = np.abs(grads[name] - num)
        assert (err / np.maximum(np.abs(num), 1.0)).max() < 1e-7, (name, err.max())
    if options.get("input_forget"):  # the forget gate's rows take no gradient
        H = 3
        assert np.all(grads["weight_ih_l0"][H:2 * H] == 0)
        assert np.abs(grads["weight_ih_l0"][:H]).max() > 0


def test_clip_bites_and_stops_the_gradient():
    """The clip case above is not vacuous: some pre-activations are clipped, and a
    clipped gate passes no gradient to its weights through that step."""
    case = options_case(9, 2, 1, 0, [4, 1, 2], dict(clip=0.4))
    *_, cache = lstm_forward(case["params"], case["x"], h0=case["h0"], c0=case["c0"],
                             lengths=case["lengths"], **case["sizes"])
    tape = cache["tapes"][0][0]
    clipped = np.concatenate([tape[k].ravel() for k in ("ki", "kf", "kg", "ko")])
    assert 0 < np.count_nonzero(clipped == 0) < clipped.size
    assert np.abs(np.concatenate([tape[k].ravel() for k in ("zi", "zo")])).max() <= 0.4
    # Everything clipped: no gradient reaches the gate weights at all.
    case["sizes"]["clip"] = 1e-9
    grads = analytic_grads(case)
    assert np.all(grads["weight_hh_l0"] == 0)


def test_defaults_are_the_plain_lstm():
    """The options at their defaults (spelled out) give the plain LSTM bit for bit."""
    case = make_case(3, T=5, B=2, I=3, H=4, L=2, D=2, P=0, lengths=[5, 3])
    args = dict(h0=case["h0"], c0=case["c0"], lengths=case["lengths"], **case["sizes"])
    plain = lstm_forward(case["params"], case["x"], **args)
    spelled = lstm_forward(case["params"], case["x"], clip=None, input_forget=False,
                           activations=(("sigmoid", 0, 0), "tanh", "tanh"), **args)
    for a, b in zip(plain[:3], spelled[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_reverse_is_the_flipped_forward():
    """Without padding, a reverse layer is the forward layer on the time-flipped
    input, with its output flipped back."""
    case = make_case(4, T=6, B=2, I=3, H=4)
    rev = lstm_forward(case["params"], case["x"], hidden_size=4, reverse=True)
    fwd = lstm_forward(case["params"], case["x"][::-1], hidden_size=4)
    np.testing.assert_allclose(rev[0], fwd[0][::-1], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(rev[1], fwd[1], rtol=1e-14, atol=1e-15)


def test_bad_options_are_named():
    case = make_case(0, T=2, B=1, I=1, H=2)
    p, x = case["params"], case["x"]
    with pytest.raises(ValueError, match="activation must be one of"):
        lstm_forward(p, x, hidden_size=2, activations=("sigmoid", "gelu", "tanh"))
    with pytest.raises(ValueError, match="3 specs"):
        lstm_forward(p, x, hidden_size=2, activations=("sigmoid", "tanh"))
    with pytest.raises(ValueError, match="clip must be"):
        lstm_forward(p, x, hidden_size=2, clip=0.0)
    with pytest.raises(ValueError, match="reverse is for a unidirectional"):
        lstm_forward(p, x, hidden_size=2, bidirectional=True, reverse=True)


# ------------------------------------------------------------------ ONNX Runtime

ONNX_NAMES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu",
              "hard_sigmoid": "HardSigmoid", "affine": "Affine"}
IOFC = [0, 3, 1, 2]  # ONNX's gate order i, o, f, c in blocks of numlstm's i, f, g, o


def _gates(a, H):
    """numlstm gate rows (4H, ...) -> ONNX's order (i, o, f, c)."""
    return np.concatenate([a[k * H:(k + 1) * H] for k in IOFC])


def onnx_lstm(params, H, D, direction, lengths, h0, c0, clip, input_forget, activations):
    """A one-node ONNX model of the oracle's one-layer LSTM, float32."""
    from onnx import TensorProto, helper, numpy_helper

    sfx = ["", "_reverse"][:D]
    f32 = np.float32
    arrays = {
        "W": np.stack([_gates(params[f"weight_ih_l0{s}"], H) for s in sfx]).astype(f32),
        "R": np.stack([_gates(params[f"weight_hh_l0{s}"], H) for s in sfx]).astype(f32),
        "B": np.stack([np.concatenate([_gates(params[f"bias_ih_l0{s}"], H),
                                       _gates(params[f"bias_hh_l0{s}"], H)])
                       for s in sfx]).astype(f32),
        "sequence_lens": np.asarray(lengths, np.int32),
        "initial_h": h0.astype(f32), "initial_c": c0.astype(f32),
    }
    if "peephole_l0" in params:  # rows i, f, o -> ONNX's i, o, f
        arrays["P"] = np.stack([params[f"peephole_l0{s}"][[0, 2, 1]].ravel()
                                for s in sfx]).astype(f32)
    names, alphas, betas = [], [], []
    for spec in activations:
        name, *ab = (spec,) if isinstance(spec, str) else spec
        names.append(ONNX_NAMES[name])
        if name in ("hard_sigmoid", "affine"):
            a, b = ab if ab else ACTIVATIONS[name][2:]
            alphas.append(a)
            betas.append(b)
    attrs = dict(hidden_size=H, direction=direction, activations=names * D,
                 input_forget=int(input_forget))
    if alphas:
        attrs.update(activation_alpha=alphas * D, activation_beta=betas * D)
    if clip is not None:
        attrs["clip"] = clip
    inputs = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c"]
    inputs += ["P"] if "P" in arrays else []
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")],
        initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


ACTIVATION_SPECS = st.sampled_from([
    "sigmoid", "tanh", "relu", "hard_sigmoid", "affine", ("hard_sigmoid", 0.3, 0.45),
    ("affine", 0.5, 0.1)])


@settings(max_examples=40, deadline=None)
@given(direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
       peepholes=st.booleans(), clip=st.sampled_from([None, 0.5, 3.0]),
       input_forget=st.booleans(),
       activations=st.one_of(st.just(("sigmoid", "tanh", "tanh")),
                             st.tuples(ACTIVATION_SPECS, ACTIVATION_SPECS, ACTIVATION_SPECS)),
       T=st.integers(1, 5), B=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_options_match_onnxruntime(direction, peepholes, clip, input_forget, activations,
                                   T, B, seed):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    I, H = 3, 4
    D = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    case = make_case(seed, T=T, B=B, I=I, H=H, D=D, lengths=lengths)
    params = {k: v.astype(np.float32).astype(np.float64) for k, v in case["params"].items()}
    if peepholes:
        for s in ["", "_reverse"][:D]:
            params[f"peephole_l0{s}"] = rng.uniform(-1, 1, (3, H)).astype(np.float32)
    x, h0, c0 = (case[k].astype(np.float32) for k in ("x", "h0", "c0"))
    y, h_n, c_n, _ = lstm_forward(params, x, hidden_size=H, bidirectional=(D == 2),
                                  reverse=(direction == "reverse"), h0=h0, c0=c0,
                                  lengths=lengths, clip=clip, input_forget=input_forget,
                                  activations=activations)
    proto = onnx_lstm(params, H, D, direction, lengths, h0, c0, clip, input_forget,
                      activations)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    Y, Y_h, Y_c = session.run(None, {"X": x})
    Y = Y.transpose(0, 2, 1, 3).reshape(T, B, D * H)  # (T, D, B, H) -> (T, B, D*H)
    scale = max(1.0, np.abs(y).max(), np.abs(c_n).max())  # relu and affine are unbounded
    np.testing.assert_allclose(Y, y, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(Y_h, h_n, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(Y_c, c_n, rtol=0, atol=1e-5 * scale)

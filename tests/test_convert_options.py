"""ONNX conversion of the cell options (reverse, peepholes, clip,
input_forget, activations): the ONNX project's own LSTM node cases, random
nodes beside ONNX Runtime, and ``to_onnx`` round trips run in ONNX Runtime."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reference_options import ACTIVATION_SPECS, onnx_lstm
from test_reference_options import make_case as oracle_case

import numlstm
from numlstm import convert

onnx = pytest.importorskip("onnx")
TOL = dict(rtol=1e-5, atol=1e-5)


def ort_run(proto, feeds):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def onnx_project_cases():
    """(name, node, inputs, outputs) of every case in onnx's own LSTM node tests
    (``onnx.backend.test.case.node.lstm``), captured from their ``expect``."""
    from onnx.backend.test.case.node import lstm as cases

    found = []
    saved = cases.expect
    cases.expect = lambda node, inputs, outputs, name, **kw: found.append(
        (name, node, inputs, outputs))
    try:
        for attr in sorted(vars(cases.LSTM)):
            if attr.startswith("export"):
                getattr(cases.LSTM, attr)()
    finally:
        cases.expect = saved
    return found


CASES = onnx_project_cases()


def test_the_onnx_project_cases_are_all_found():
    names = {name for name, *_ in CASES}
    assert {"test_lstm_defaults", "test_lstm_with_initial_bias", "test_lstm_with_peepholes",
            "test_lstm_batchwise", "test_lstm_reverse", "test_lstm_bidirectional"} <= names


@pytest.mark.parametrize("name, node, inputs, outputs", CASES, ids=[c[0] for c in CASES])
def test_onnx_project_lstm_cases(name, node, inputs, outputs):
    """Each case's node, its W / R / B / P as initializers, converted by
    ``from_onnx``; sequence_lens and the initial state go to ``forward``."""
    from onnx import TensorProto, helper, numpy_helper

    given_inputs = dict(zip(node.input, inputs, strict=False))
    runtime = {"X", "sequence_lens", "initial_h", "initial_c"}
    inits = [numpy_helper.from_array(a, n) for n, a in given_inputs.items()
             if n and n not in runtime]
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output if n],
        initializer=inits)
    model = convert.from_onnx(helper.make_model(graph))
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    state = None
    if "initial_h" in given_inputs:
        h0, c0 = given_inputs["initial_h"], given_inputs["initial_c"]
        state = (h0.transpose(1, 0, 2), c0.transpose(1, 0, 2)) if layout else (h0, c0)
    lengths = given_inputs.get("sequence_lens")
    y, (h, c) = model(given_inputs["X"], state, lengths=lengths)
    D = model.num_directions
    got = {}
    if layout:  # Y (B, T, D, H), Y_h / Y_c (B, D, H)
        B, T = y.shape[:2]
        got["Y"] = y.reshape(B, T, D, -1)
        got["Y_h"], got["Y_c"] = h.transpose(1, 0, 2), c.transpose(1, 0, 2)
    else:  # Y (T, D, B, H)
        T, B = y.shape[:2]
        got["Y"] = y.reshape(T, B, D, -1).transpose(0, 2, 1, 3)
        got["Y_h"], got["Y_c"] = h, c
    names = [n for n in node.output if n]
    assert len(names) == len(outputs)
    for out_name, want in zip(names, outputs, strict=True):
        np.testing.assert_allclose(got[out_name], want, err_msg=out_name, **TOL)


@settings(max_examples=30, deadline=None)
@given(direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
       peepholes=st.booleans(), clip=st.sampled_from([None, 0.5, 3.0]),
       input_forget=st.booleans(),
       activations=st.one_of(st.just(("sigmoid", "tanh", "tanh")),
                             st.tuples(ACTIVATION_SPECS, ACTIVATION_SPECS, ACTIVATION_SPECS)),
       T=st.integers(1, 5), B=st.integers(1, 3), layout=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_random_nodes_match_onnxruntime(direction, peepholes, clip, input_forget, activations,
                                        T, B, layout, seed):
    """Every option, direction, layout and sequence_lens: the converted model
    gives ONNX Runtime's Y, Y_h, Y_c. ONNX Runtime runs layout 0 only, so a
    layout-1 node is converted from the same node with ``layout=1`` set and
    fed the batch-major input."""
    I, H = 3, 4
    D = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    case = oracle_case(seed, T=T, B=B, I=I, H=H, D=D, lengths=lengths)
    params = dict(case["params"])
    if peepholes:
        for s in ["", "_reverse"][:D]:
            params[f"peephole_l0{s}"] = rng.uniform(-1, 1, (3, H))
    x, h0, c0 = (case[k].astype(np.float32) for k in ("x", "h0", "c0"))
    proto = onnx_lstm(params, H, D, direction, lengths, h0, c0, clip, input_forget,
                      activations)
    Y, Y_h, Y_c = ort_run(proto, {"X": x})
    # The runtime inputs (sequence_lens, initial state) become forward's arguments.
    graph = proto.graph
    kept = [i for i in graph.initializer if i.name not in
            ("sequence_lens", "initial_h", "initial_c")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if layout:
        graph.node[0].attribute.append(onnx.helper.make_attribute("layout", 1))
    model = convert.from_onnx(proto)
    assert model.reverse == (direction == "reverse") and model.batch_first == bool(layout)
    assert model.cell.peepholes == peepholes and model.cell.clip == clip
    y, (h, c) = model(np.ascontiguousarray(x.transpose(1, 0, 2)) if layout else x, (h0, c0),
                      lengths=lengths)
    if layout:
        y = y.transpose(1, 0, 2)
    scale = max(1.0, float(np.abs(Y).max()), float(np.abs(Y_c).max()))
    tol = dict(rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(y, Y.transpose(0, 2, 1, 3).reshape(T, B, D * H), **tol)
    np.testing.assert_allclose(h, Y_h, **tol)
    np.testing.assert_allclose(c, Y_c, **tol)


@pytest.mark.parametrize("kw", [
    dict(reverse=True, num_layers=2),
    dict(peepholes=True, bidirectional=True, num_layers=2),
    dict(clip=1.5, input_forget=True, activations=(("hard_sigmoid", 0.3, 0.4), "relu",
                                                   ("affine", 0.5, 0.1))),
    dict(activations=("hard_sigmoid", "tanh", "tanh"), peepholes=True, reverse=True),
])
def test_to_onnx_round_trips_run_in_onnxruntime(kw):
    model = numlstm.LSTM(3, 4, seed=5, **kw)
    x = np.random.default_rng(5).standard_normal((5, 2, 3)).astype(np.float32)
    lengths = np.array([5, 3], np.int32)
    proto = convert.to_onnx(model, sequence_lens=True)
    y, h, c = ort_run(proto, {"x": x, "sequence_lens": lengths})
    want_y, (want_h, want_c) = model(x, lengths=lengths)
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(h, want_h, **TOL)
    np.testing.assert_allclose(c, want_c, **TOL)
    back = convert.from_onnx(proto)
    assert back.reverse == model.reverse
    # ONNX's float attributes are float32: alpha 0.3 comes back as float32(0.3).
    want = model.cell.as_dict()
    for key in ("peepholes", "input_forget"):
        assert back.cell.as_dict()[key] == want[key]
    got_acts = back.cell.as_dict()["activations"]
    assert [a[0] for a in got_acts] == [a[0] for a in want["activations"]]
    np.testing.assert_allclose([a[1:] for a in got_acts], [a[1:] for a in want["activations"]],
                               rtol=1e-7)
    assert (back.cell.clip is None) == (model.cell.clip is None)
    np.testing.assert_allclose(back(x, lengths=lengths)[0], want_y, rtol=1e-6, atol=1e-6)


def _node_graph(**attrs):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    D = 2 if attrs.get("direction") == "bidirectional" else 1
    arrays = {"W": rng.standard_normal((D, 16, 3)).astype(np.float32),
              "R": rng.standard_normal((D, 16, 4)).astype(np.float32)}
    inputs = ["X", "W", "R"]
    extra = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    if attrs.pop("runtime_p", False):
        inputs += ["", "", "", "", "P"]
        extra.append(helper.make_tensor_value_info("P", TensorProto.FLOAT, [D, 12]))
    node = helper.make_node("LSTM", inputs, ["Y"], name="lstm", hidden_size=4, **attrs)
    graph = helper.make_graph([node], "g", extra,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n)
                                           for n, a in arrays.items()])
    return helper.make_model(graph)


@pytest.mark.parametrize("attrs, match", [
    (dict(activations=["Sigmoid", "LeakyRelu", "Tanh"]),
     r"LSTM node 'lstm': activation 'LeakyRelu' is not supported"),
    (dict(direction="bidirectional",
          activations=["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"]),
     r"LSTM node 'lstm': the two directions use different activations"),
    (dict(activations=["Sigmoid", "Tanh"]), r"must list 3 per direction"),
    (dict(clip=-1.0), r"LSTM node 'lstm': clip must be > 0"),
    (dict(input_forget=2), r"attribute input_forget must be 0 or 1"),
    (dict(runtime_p=True), r"input P \('P'\) must be an initializer"),
])
def test_what_cannot_be_converted_is_named(attrs, match):
    with pytest.raises(ValueError, match=match):
        convert.from_onnx(_node_graph(**attrs))

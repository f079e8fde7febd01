"""Converters: numlstm.convert against PyTorch and ONNX Runtime themselves.

Each framework's tests skip when it is not installed. Outputs (y, h_n, c_n)
must match the framework's to 1e-5 in float32.
"""

import io
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import numlstm
from numlstm import convert

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_outputs(got, want):
    for name, g, w in zip(("y", "h_n", "c_n"), got, want, strict=True):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)


def run(model, x, h0, c0, lengths=None):
    y, (h, c) = model(x, (h0, c0), lengths=lengths)
    return y, h, c


@st.composite
def torch_cases(draw, proj=True):
    T, B = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    H = draw(st.integers(2, 5))
    return dict(T=T, B=B, I=draw(st.integers(1, 4)), H=H, L=draw(st.integers(1, 2)),
                D=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()),
                P=draw(st.integers(0, H - 1)) if proj else 0,
                batch_first=draw(st.booleans()),
                lengths=(np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
                         if draw(st.booleans()) else None),
                seed=draw(st.integers(0, 2**16)))


def inputs(c, rng, O=None):
    D, L, B, T = c["D"], c["L"], c["B"], c["T"]
    shape = (B, T, c["I"]) if c["batch_first"] else (T, B, c["I"])
    x = rng.standard_normal(shape).astype(np.float32)
    h0 = rng.standard_normal((D * L, B, O or c["H"])).astype(np.float32)
    c0 = rng.standard_normal((D * L, B, c["H"])).astype(np.float32)
    return x, h0, c0


# ----------------------------------------------------------------------------- torch


def torch_run(torch, module, x, h0, c0, lengths=None):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    bf = module.batch_first
    xt, state = torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0))
    with torch.no_grad():
        if lengths is None:
            y, (h, c) = module(xt, state)
        else:
            packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=bf,
                                          enforce_sorted=False)
            y, (h, c) = module(packed, state)
            y, _ = pad_packed_sequence(y, batch_first=bf, total_length=x.shape[1 if bf else 0])
    return y.numpy(), h.numpy(), c.numpy()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@settings(max_examples=20)
@given(torch_cases())
def test_from_torch_lstm_matches_torch(c):
    torch = pytest.importorskip("torch")
    torch.manual_seed(c["seed"])
    module = torch.nn.LSTM(c["I"], c["H"], c["L"], bias=c["bias"], batch_first=c["batch_first"],
                           bidirectional=c["D"] == 2, proj_size=c["P"]).eval()
    model = convert.from_torch(module)
    assert (model.num_layers, model.bidirectional, model.proj_size, model.bias,
            model.batch_first) == (c["L"], c["D"] == 2, c["P"], c["bias"], c["batch_first"])
    rng = np.random.default_rng(c["seed"])
    x, h0, c0 = inputs(c, rng, O=c["P"] or c["H"])
    want = torch_run(torch, module, x, h0, c0, c["lengths"])
    assert_outputs(run(model, x, h0, c0, c["lengths"]), want)
    # The state dict gives the same model, batch_first given by keyword.
    again = convert.from_torch(module.state_dict(), batch_first=c["batch_first"])
    assert_outputs(run(again, x, h0, c0, c["lengths"]), want)


def test_from_torch_copies_settings_and_dtype():
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(3, 4, 2, dropout=0.25, batch_first=True)
    m = convert.from_torch(module, dtype=np.float64)
    assert (m.dropout, m.batch_first, m.dtype) == (0.25, True, np.float64)
    m = convert.from_torch(module.state_dict())  # not in a state dict: the defaults
    assert (m.dropout, m.batch_first) == (0.0, False)
    m = convert.from_torch(module, dropout=0.0, batch_first=False)  # overrides
    assert (m.dropout, m.batch_first) == (0.0, False)
    # NumPy values in a state dict work too.
    m = convert.from_torch({k: v.numpy() for k, v in module.state_dict().items()})
    np.testing.assert_array_equal(m.state_dict()["weight_hh_l1"],
                                  module.weight_hh_l1.detach().numpy())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_torch_lstmcell_matches_steps(bias, as_state_dict):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    cell = torch.nn.LSTMCell(3, 5, bias=bias)
    model = convert.from_torch(cell.state_dict() if as_state_dict else cell)
    assert (model.num_layers, model.bidirectional, model.bias) == (1, False, bias)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    h = rng.standard_normal((2, 5)).astype(np.float32)
    c = rng.standard_normal((2, 5)).astype(np.float32)
    y, (h_n, c_n) = model(x, (h[None], c[None]))
    ht, ct = torch.from_numpy(h), torch.from_numpy(c)
    with torch.no_grad():
        for t in range(4):
            ht, ct = cell(torch.from_numpy(x[t]), (ht, ct))
            np.testing.assert_allclose(y[t], ht.numpy(), **TOL)
    np.testing.assert_allclose(h_n[0], ht.numpy(), **TOL)
    np.testing.assert_allclose(c_n[0], ct.numpy(), **TOL)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kw", [dict(num_layers=2, bidirectional=True, proj_size=2,
                                     batch_first=True, dropout=0.5),
                                dict(num_layers=1, bias=False)])
def test_to_torch_round_trip_with_sparse_weights(kw):
    torch = pytest.importorskip("torch")
    m = numlstm.LSTM(3, 4, seed=3, **kw)
    state = m.state_dict()
    w = state["weight_hh_l0"]
    w[np.abs(w) < np.median(np.abs(w))] = 0
    state["weight_hh_l0"] = sp.csr_array(w)
    m.load_state_dict(state)
    module = convert.to_torch(m)
    assert isinstance(module, torch.nn.LSTM)
    assert (module.num_layers, module.bidirectional, module.proj_size, module.batch_first,
            module.dropout, module.bias) == (m.num_layers, m.bidirectional, m.proj_size,
                                             m.batch_first, m.dropout, m.bias)
    back = convert.from_torch(module, dtype=m.dtype)
    for name, v in m.state_dict().items():
        dense = v.toarray() if sp.issparse(v) else v
        np.testing.assert_array_equal(back.state_dict()[name], dense, err_msg=name)
    module.eval()
    c = dict(T=4, B=2, I=3, H=4, L=m.num_layers, D=m.num_directions, batch_first=m.batch_first)
    x, h0, c0 = inputs(c, np.random.default_rng(0), O=m.output_size)
    x, h0, c0 = (a.astype(m.dtype) for a in (x, h0, c0))
    assert_outputs(run(m, x, h0, c0), torch_run(torch, module, x, h0, c0))


def test_to_torch_keeps_float64():
    torch = pytest.importorskip("torch")
    m = numlstm.LSTM(2, 3, dtype=np.float64, seed=0)
    module = convert.to_torch(m)
    assert module.weight_ih_l0.dtype == torch.float64
    np.testing.assert_array_equal(module.weight_ih_l0.detach().numpy(),
                                  m.state_dict()["weight_ih_l0"])
    assert convert.from_torch(module, dtype=np.float64).dtype == np.float64


def test_torch_errors():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"obj must be a torch.nn.LSTM.*got GRU"):
        convert.from_torch(torch.nn.GRU(2, 3))
    with pytest.raises(KeyError, match=r"weight_ih_l0"):
        convert.from_torch({"weight": torch.zeros(2)})
    state = torch.nn.LSTM(2, 3).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        convert.from_torch(state)
    with pytest.raises(TypeError, match=r"state\['weight_ih_l0'\] must be a torch tensor"):
        convert.from_torch({"weight_ih_l0": [1.0]})
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got int32"):
        convert.from_torch(torch.nn.LSTM(2, 3), dtype=np.int32)
    with pytest.raises(TypeError, match=r"model must be a numlstm.LSTM, got LSTM"):
        convert.to_torch(torch.nn.LSTM(2, 3))


def _sparse_state(torch, H, I, layout="coo"):
    """An nn.LSTM state dict of sparse tensors: two values per weight, one per bias."""
    state = {}
    for k, shape in (("weight_ih_l0", (4 * H, I)), ("weight_hh_l0", (4 * H, H))):
        w = torch.sparse_coo_tensor(torch.tensor([[0, 5, 5], [1, 2, 2]]),
                                    torch.tensor([0.5, 0.25, 0.5]), shape)  # (5, 2) twice
        state[k] = {"coo": w, "csr": w.coalesce().to_sparse_csr(),
                    "csc": w.coalesce().to_sparse_csc(),
                    "bsr": w.coalesce().to_sparse_bsr((2, 1))}[layout]
    for k in ("bias_ih_l0", "bias_hh_l0"):
        state[k] = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.tensor([1.0]), (4 * H,))
    return state


@pytest.mark.filterwarnings("ignore:Sparse")  # torch's beta and invariant-check notes
@pytest.mark.parametrize("layout", ["coo", "csr", "csc", "bsr"])
def test_from_torch_keeps_sparse_tensors_sparse(tmp_path, layout):
    torch = pytest.importorskip("torch")
    import tracemalloc

    H = I = 1000  # dense, these weights would be 32 MB; the file is a few KB
    state = _sparse_state(torch, H, I, layout)
    path = tmp_path / "sparse.pt"
    torch.save(state, path)
    tracemalloc.start()
    try:
        model = convert.from_torch(torch.load(path, weights_only=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # indptr and biases (4H each); nothing of (4H, I)
    weights = model.weights()
    assert {w.format for w in weights.values()} == {"bsr" if layout == "bsr" else "csr"}
    if layout != "bsr":
        assert all(w.nnz == 2 for w in weights.values())  # the duplicate summed
    numlstm.save(model, tmp_path / "m.npz")
    assert (tmp_path / "m.npz").stat().st_size < 2**20
    module = torch.nn.LSTM(I, H)
    module.load_state_dict({k: v.to_dense() for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((3, 2, I)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(model(x)[0], want, **TOL)


@pytest.mark.filterwarnings("ignore:Sparse")
def test_from_torch_refuses_sparse_tensors_it_cannot_hold():
    torch = pytest.importorskip("torch")
    H, I = 4, 3
    base = _sparse_state(torch, H, I)

    def refused(key, value, match):
        with pytest.raises(ValueError, match=match):
            convert.from_torch(dict(base, **{key: value}))

    # A sparse bias is checked against the model's shape before it is densified.
    huge = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (10**12,))
    refused("bias_ih_l0", huge, r"state\['bias_ih_l0'\] must have shape \(16,\), got a "
                                r"sparse tensor of shape \(1000000000000,\)")
    hybrid = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1, 2), (16, 3, 2))
    refused("weight_ih_l0", hybrid, r"state\['weight_ih_l0'\] is a sparse COO tensor of 2 "
                                    r"sparse and 1 dense dimensions")
    bsc = torch.zeros(16, 3).to_sparse_bsc((2, 1))
    refused("weight_ih_l0", bsc, r"state\['weight_ih_l0'\] is a sparse_bsc tensor of shape "
                                 r"\(16, 3\); sparse parameters must be 2-D")
    # torch checks no invariants by default: out-of-range indices reach the converter.
    bad = torch.sparse_coo_tensor(torch.tensor([[0], [7]]), torch.ones(1), (16, 3),
                                  check_invariants=False)
    refused("weight_ih_l0", bad, r"state\['weight_ih_l0'\] is not a valid sparse_coo tensor")
    bad = torch.sparse_coo_tensor(torch.tensor([[99]]), torch.ones(1), (16,),
                                  check_invariants=False)
    refused("bias_hh_l0", bad, r"state\['bias_hh_l0'\]: sparse indices must lie in \[0, 16\)")
    wrong = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1), (16, 5))
    refused("weight_hh_l0", wrong, r"weight_hh_l0 must have shape \(16, 4\), got \(16, 5\)")
    flat = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1), (16,))
    refused("weight_ih_l0", flat, r"\['weight_ih_l0'\] must have shape \(4\*H, I\), got "
                                  r"\(16,\)")


# ----------------------------------------------------------------------------- ONNX


def ort_session(proto):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def torch_export(torch, module, x, h0, c0):
    """torch.onnx.export (the TorchScript exporter: no onnxscript needed)."""
    f = io.BytesIO()
    dyn = {0: "B", 1: "T"} if module.batch_first else {0: "T", 1: "B"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x), (torch.from_numpy(h0),
                                                          torch.from_numpy(c0))),
                          f, dynamo=False, input_names=["x", "h0", "c0"],
                          output_names=["y", "h_n", "c_n"],
                          dynamic_axes={"x": dyn, "h0": {1: "B"}, "c0": {1: "B"}})
    import onnx

    return onnx.load_from_string(f.getvalue())


def add_sequence_lens(proto):
    """Feed a new graph input ``sequence_lens`` to every LSTM node."""
    from onnx import TensorProto, helper

    proto.graph.input.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32,
                                                           ["B"]))
    for node in proto.graph.node:
        if node.op_type == "LSTM":
            node.input[4] = "sequence_lens"
    return proto


@pytest.mark.parametrize("L,D,bias,batch_first,with_lengths", [
    (2, 2, True, True, True), (1, 1, False, False, True), (2, 1, True, False, False),
    (1, 2, True, False, True)])
def test_from_onnx_torch_export_matches_onnxruntime(L, D, bias, batch_first, with_lengths):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    torch.manual_seed(L * 10 + D)
    module = torch.nn.LSTM(3, 4, L, bias=bias, batch_first=batch_first,
                           bidirectional=D == 2).eval()
    c = dict(T=5, B=3, I=3, H=4, L=L, D=D, batch_first=batch_first)
    x, h0, c0 = inputs(c, np.random.default_rng(L + D))
    proto = torch_export(torch, module, x, h0, c0)
    feed = dict(x=x, h0=h0, c0=c0)
    lengths = None
    if with_lengths:
        proto = add_sequence_lens(proto)
        lengths = np.array([5, 2, 4])
        feed["sequence_lens"] = lengths.astype(np.int32)
    want = ort_session(proto).run(["y", "h_n", "c_n"], feed)
    model = convert.from_onnx(proto, batch_first=batch_first)
    assert isinstance(model, numlstm.LSTM)
    assert (model.num_layers, model.num_directions, model.bias) == (L, D, bias)
    assert_outputs(run(model, x, h0, c0, lengths), want)
    # torch itself agrees (padding included).
    assert_outputs(want, torch_run(torch, module, x, h0, c0, lengths))


@settings(max_examples=12)
@given(torch_cases(proj=False), st.booleans(), st.booleans())
def test_to_onnx_runs_in_onnxruntime(c, sparse, initial_state):
    pytest.importorskip("onnx")
    m = numlstm.LSTM(c["I"], c["H"], c["L"], bias=c["bias"], batch_first=c["batch_first"],
                     bidirectional=c["D"] == 2, seed=c["seed"])
    if sparse:
        state = m.state_dict()
        w = state["weight_ih_l0"]
        w[np.random.default_rng(0).random(w.shape) < 0.7] = 0
        state["weight_ih_l0"] = sp.csr_array(w)
        m.load_state_dict(state)
    x, h0, c0 = inputs(c, np.random.default_rng(c["seed"]))
    lengths = c["lengths"]
    proto = convert.to_onnx(m, sequence_lens=lengths is not None, initial_state=initial_state)
    feed = dict(x=x)
    if lengths is not None:
        feed["sequence_lens"] = lengths.astype(np.int32)
    if initial_state:
        feed.update(h0=h0, c0=c0)
    else:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    got = ort_session(proto).run(["y", "h_n", "c_n"], feed)
    assert_outputs(got, run(m, x, h0, c0, lengths))
    # ... and back: the same weights, densified.
    back = convert.from_onnx(proto, batch_first=m.batch_first)
    for name, v in m.state_dict().items():
        dense = v.toarray() if sp.issparse(v) else v
        np.testing.assert_array_equal(back.state_dict()[name], dense, err_msg=name)


def test_to_onnx_saves_casts_and_rejects(tmp_path):
    onnx = pytest.importorskip("onnx")
    m = numlstm.LSTM(2, 3, dtype=np.float64, seed=0)
    path = tmp_path / "m.onnx"
    proto = convert.to_onnx(m, path, dtype=np.float32, opset=14)
    assert onnx.load(str(path)) == proto
    assert proto.graph.initializer[-1].data_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((4, 2, 2)).astype(np.float32)
    y = ort_session(proto).run(["y"], dict(x=x))[0]
    back = convert.from_onnx(str(path))  # float32: the weights as written
    np.testing.assert_allclose(y, back(x)[0], **TOL)
    for name, v in m.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], v.astype(np.float32))
    assert convert.from_onnx(str(path), dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match=r"proj_size must be 0 .* got 1"):
        convert.to_onnx(numlstm.LSTM(2, 3, proj_size=1))
    with pytest.raises(ValueError, match=r"opset must be an int in \[10, \d+\], got 9"):
        convert.to_onnx(m, opset=9)
    with pytest.raises(TypeError, match=r"model must be a numlstm.LSTM, got str"):
        convert.to_onnx("m")


# Hand-built single-node graphs (onnx.helper), checked against ONNX Runtime.

def lstm_graph(I=3, H=4, D=1, bias=True, weights_as="initializer", extra_inputs=(),
               seed=0, **attrs):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = dict(W=rng.standard_normal((D, 4 * H, I)).astype(np.float32) * 0.5,
                  R=rng.standard_normal((D, 4 * H, H)).astype(np.float32) * 0.5)
    if bias:
        arrays["B"] = rng.standard_normal((D, 8 * H)).astype(np.float32) * 0.5
    inits, nodes, graph_inputs = [], [], []
    layout = attrs.get("layout", 0)
    x_shape = ["B", "T", I] if layout else ["T", "B", I]
    graph_inputs.append(helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape))
    for name, arr in arrays.items():
        if weights_as == "initializer":
            inits.append(numpy_helper.from_array(arr, name))
        elif weights_as == "constant":
            nodes.append(helper.make_node("Constant", [], [name],
                                          value=numpy_helper.from_array(arr, name + "_c")))
        else:  # a graph input: only known at run time
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                              list(arr.shape)))
    node_inputs = ["X", "W", "R", "B" if bias else ""] + list(extra_inputs)
    for k, name in enumerate(extra_inputs):
        if name == "P":
            inits.append(numpy_helper.from_array(np.ones((D, 3 * H), np.float32), "P"))
            node_inputs[3 + 1 + k] = "P"
    nodes.append(helper.make_node("LSTM", node_inputs, ["Y", "Y_h", "Y_c"], name="lstm",
                                  hidden_size=H, **attrs))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph(nodes, "g", graph_inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def concat_directions(Y):
    """ONNX Y (T, D, B, H) -> numlstm y (T, B, D*H)."""
    T, D, B, H = Y.shape
    return Y.transpose(0, 2, 1, 3).reshape(T, B, D * H)


@pytest.mark.parametrize("D,layout,weights_as,bias", [
    (1, 0, "constant", True), (2, 1, "initializer", False), (2, 0, "initializer", True)])
def test_from_onnx_single_node_matches_onnxruntime(D, layout, weights_as, bias):
    pytest.importorskip("onnx")
    kw = dict(D=D, weights_as=weights_as, bias=bias,
              direction="bidirectional" if D == 2 else "forward",
              activations=["Sigmoid", "Tanh", "Tanh"] * D)
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32)  # (T, B, I)
    # ONNX Runtime runs layout 0 only ("Batchwise recurrent operations (layout == 1)
    # are not supported"): the layout-1 node is checked against the same weights in
    # layout 0, with the batch-major input.
    Y, Y_h, Y_c = ort_session(lstm_graph(**kw)).run(None, dict(X=x))
    model = convert.from_onnx(lstm_graph(layout=layout, **kw).SerializeToString())
    assert model.batch_first == bool(layout)
    y, (h, c) = model(x.transpose(1, 0, 2) if layout else x)
    if layout:
        y = y.transpose(1, 0, 2)
    assert_outputs((y, h, c), (concat_directions(Y), Y_h, Y_c))


def test_from_onnx_reverse_is_a_reverse_model():
    pytest.importorskip("onnx")
    proto = lstm_graph(direction="reverse")
    model = convert.from_onnx(proto)
    assert model.reverse and not model.bidirectional
    x = np.random.default_rng(2).standard_normal((5, 2, 3)).astype(np.float32)
    Y, Y_h, Y_c = ort_session(proto).run(None, dict(X=x))
    y, (h, c) = model(x)
    assert_outputs((y, h, c), (Y[:, 0], Y_h, Y_c))


def test_from_onnx_unchained_nodes_give_a_list():
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    a = lstm_graph(I=3, H=4, seed=1)
    b = lstm_graph(I=3, H=2, seed=2)  # a second LSTM on the same input X
    g = a.graph
    for node in b.graph.node:
        node.input[1:3] = ["W2", "R2"]
        node.input[3] = "B2"
        node.output[:] = ["Y2", "Y_h2", "Y_c2"]
        node.name = "lstm2"
        g.node.append(node)
    for init in b.graph.initializer:
        init.name += "2"
        g.initializer.append(init)
    g.output.append(helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, None))
    models = convert.from_onnx(a)
    assert isinstance(models, list) and [m.hidden_size for m in models] == [4, 2]
    x = np.random.default_rng(3).standard_normal((4, 2, 3)).astype(np.float32)
    Y, Y2 = ort_session(a).run(["Y", "Y2"], dict(X=x))
    np.testing.assert_allclose(models[0](x)[0], Y[:, 0], **TOL)
    np.testing.assert_allclose(models[1](x)[0], Y2[:, 0], **TOL)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activations=["Sigmoid", "Softsign", "Tanh"]),
     r"LSTM node 'lstm': activation 'Softsign' is not supported"),
    (dict(weights_as="graph_input"), r"input W \('W'\) must be an initializer or the output"),
])
def test_from_onnx_rejects_what_numlstm_cannot_compute(kwargs, match):
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=match):
        convert.from_onnx(lstm_graph(**kwargs))


def test_from_onnx_bad_arguments():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    with pytest.raises(TypeError, match=r"model_or_path must be an onnx.ModelProto.*got int"):
        convert.from_onnx(3)
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match=r"must contain an ONNX LSTM node, got none among 1"):
        convert.from_onnx(helper.make_model(g))
    with pytest.raises(ValueError, match=r"direction must be .* got 'sideways'"):
        convert.from_onnx(lstm_graph(direction="sideways"))
    with pytest.raises(ValueError, match=r"input R must have shape \(1, 4\*H, H\) for "
                                         r"direction='forward', got \(2, 16, 4\)"):
        convert.from_onnx(lstm_graph(D=2))
    # float16 weights are converted to the model's dtype.
    from onnx import numpy_helper

    proto = lstm_graph()
    ref = convert.from_onnx(proto).state_dict()
    for k, init in enumerate(proto.graph.initializer):
        arr = numpy_helper.to_array(init).astype(np.float16)
        proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, init.name))
    half = convert.from_onnx(proto).state_dict()
    for name, v in ref.items():
        assert half[name].dtype == np.float32
        np.testing.assert_allclose(half[name], v, rtol=1e-3, atol=1e-3, err_msg=name)
    assert onnx  # imported for the skip


def test_from_onnx_glue_that_does_not_concatenate_directions_breaks_the_chain():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    module = torch.nn.LSTM(3, 4, 2, bidirectional=True).eval()
    c = dict(T=5, B=3, I=3, H=4, L=2, D=2, batch_first=False)
    x, h0, c0 = inputs(c, np.random.default_rng(0))
    proto = torch_export(torch, module, x, h0, c0)
    assert isinstance(convert.from_onnx(proto), numlstm.LSTM)
    # Reshape Y (T, D, B, H) straight to (T, B, D*H), without the Transpose: the
    # second node's input is no longer the concatenated directions.
    nodes = proto.graph.node
    first = next(n for n in nodes if n.op_type == "LSTM")
    glue = next(n for n in nodes if n.op_type == "Transpose" and n.input[0] == first.output[0])
    for n in nodes:
        if n.op_type == "Reshape" and n.input[0] == glue.output[0]:
            n.input[0] = first.output[0]
    models = convert.from_onnx(proto)
    assert isinstance(models, list) and [m.input_size for m in models] == [3, 8]
    assert all(m.num_layers == 1 and m.bidirectional for m in models)


# Hostile graphs: malformed ONNX is refused, naming the node, in time linear in its size.

def _with_glue(proto, glue):
    """``proto`` (``lstm_graph``) with ``glue`` nodes appended after its LSTM node."""
    proto.graph.node.extend(glue)
    return proto


def test_from_onnx_refuses_two_nodes_with_one_output_name():
    pytest.importorskip("onnx")
    from onnx import helper

    # Pairs of Identity nodes defining the same name: each pair doubled the paths the
    # chain search followed (40 pairs, a 2 KB file, ran for minutes). 16 pairs keep a
    # walk that followed every path to 65536 of them, so this cannot hang either way.
    glue = []
    for k in range(16):
        glue += [helper.make_node("Identity", [f"Y{k}" if k else "Y"], [f"Y{k + 1}"],
                                  name=f"id{k}{side}") for side in "ab"]
    with pytest.raises(ValueError, match=r"Identity node 'id0b': output 'Y1' is also the "
                                         r"output of Identity node 'id0a'; an ONNX graph "
                                         r"defines each value once"):
        convert.from_onnx(_with_glue(lstm_graph(), glue))
    # Unnamed nodes are named by their position; an initializer or graph input redefined.
    for source, what in (("W", "an initializer"), ("X", "a graph input")):
        proto = _with_glue(lstm_graph(), [helper.make_node("Identity", ["Y"], [source])])
        with pytest.raises(ValueError, match=rf"Identity node #1: output '{source}' is also "
                                             rf"{what}"):
            convert.from_onnx(proto)
    proto = lstm_graph()
    proto.graph.initializer.append(proto.graph.initializer[0])
    with pytest.raises(ValueError, match=r"initializer 'W' is given twice"):
        convert.from_onnx(proto)


@pytest.mark.parametrize("case", ["identities", "glue", "self", "through_lstm"])
def test_from_onnx_refuses_a_cycle(case):
    pytest.importorskip("onnx")
    from onnx import helper

    proto = lstm_graph()
    if case == "identities":  # Identity Y -> Z -> Y below the LSTM: a RecursionError
        glue = [helper.make_node("Identity", ["Y"], ["Z"], name="fwd"),
                helper.make_node("Identity", ["Z"], ["Y"], name="back")]
        with pytest.raises(ValueError, match=r"Identity node 'back': output 'Y' is also the "
                                             r"output of LSTM node 'lstm'"):
            convert.from_onnx(_with_glue(proto, glue))
        return
    if case == "glue":  # a cycle through Add, which the chain search does not enter
        glue = [helper.make_node("Add", ["Y", "Z"], ["Y2"], name="add"),
                helper.make_node("Identity", ["Y2"], ["Z"], name="back")]
        match = r"cycle: Add node 'add' -> Identity node 'back' -> Add node 'add'"
    elif case == "self":
        glue = [helper.make_node("Identity", ["Z"], ["Z"], name="loop")]
        match = r"cycle: Identity node 'loop' -> Identity node 'loop'"
    else:  # the LSTM reads its own output: it would chain to itself
        proto.graph.node[0].input[0] = "X2"
        glue = [helper.make_node("Identity", ["Y"], ["X2"], name="back")]
        match = r"cycle: (LSTM node 'lstm' -> Identity node 'back'|Identity node 'back' -> " \
                r"LSTM node 'lstm')"
    with pytest.raises(ValueError, match=match + r".*an ONNX graph is acyclic"):
        convert.from_onnx(_with_glue(proto, glue))


@pytest.mark.parametrize("attrs,match", [
    (dict(activations=[1, 2, 3]), r"activations must be a list of strings, got a list of "
                                  r"ints \[1, 2, 3\]"),
    (dict(activations=5), r"activations must be a list of strings, got an int 5"),
    (dict(clip=[1.0]), r"clip must be a float, got a list of floats \[1.0\]"),
    (dict(activation_alpha="0.5"), r"activation_alpha must be a list of floats, got a "
                                   r"string b'0.5'"),
    (dict(direction=1), r"direction must be a string, got an int 1"),
    (dict(layout=[0]), r"layout must be an int, got a list of ints \[0\]"),
    (dict(input_forget=1.0), r"input_forget must be an int, got a float 1.0"),
    (dict(activations=[b"\xff", b"Tanh", b"Tanh"]), r"activations must be UTF-8 text"),
])
def test_from_onnx_refuses_lstm_attributes_of_the_wrong_type(attrs, match):
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=r"LSTM node 'lstm': attribute " + match):
        convert.from_onnx(lstm_graph(**attrs))


def test_from_onnx_refuses_glue_and_constant_attributes_of_the_wrong_type():
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    proto = convert.to_onnx(numlstm.LSTM(3, 4, 2, seed=0))  # LSTM, Transpose, Reshape, LSTM
    k = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Transpose")
    perm = proto.graph.node[k].attribute[0]
    perm.CopyFrom(helper.make_attribute("perm", [0.0, 2.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match=rf"Transpose node #{k}: attribute perm must be a list "
                                         r"of ints, got a list of floats"):
        convert.from_onnx(proto)
    proto = lstm_graph(weights_as="constant")
    const = proto.graph.node[0]
    const.attribute[0].CopyFrom(helper.make_attribute("value", 1.0))
    with pytest.raises(ValueError, match=r"Constant node #0: attribute value must be a "
                                         r"tensor, got a float 1.0"):
        convert.from_onnx(proto)
    proto = lstm_graph()
    proto.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("hidden_size", 4.0))
    with pytest.raises(ValueError, match=r"LSTM node 'lstm': attribute hidden_size must be an "
                                         r"int, got a float 4.0"):
        convert.from_onnx(proto)
    proto = lstm_graph(clip=1.0)
    proto.graph.node[0].attribute.append(helper.make_attribute("clip", 2.0))
    with pytest.raises(ValueError, match=r"LSTM node 'lstm': attribute clip is given twice"):
        convert.from_onnx(proto)
    assert onnx  # imported for the skip

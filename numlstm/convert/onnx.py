"""ONNX <-> numlstm: standard ONNX ``LSTM`` operator nodes.

The ONNX LSTM (opsets 7 and 14) holds, per node,
W (D, 4H, I), R (D, 4H, H), B (D, 8H) = [Wb, Rb], gates in the order
i, o, f, c. numlstm's gate order is i, f, g, o, so block k of ours is block
``_FROM_ONNX[k]`` of theirs; Wb and Rb become ``bias_ih`` and ``bias_hh``.
The onnx package is imported inside the functions (an optional dependency);
ONNX Runtime is not needed here, only to run what ``to_onnx`` writes.
"""

import os

import numpy as np

from numlstm._optional import require
from numlstm.cell import ACTIVATIONS, Cell
from numlstm.convert._common import check_dtype, check_model, dense_state

_FROM_ONNX = [0, 2, 3, 1]  # ours (i, f, g, o) <- ONNX (i, o, f, c)
_TO_ONNX = [0, 3, 1, 2]  # ONNX (i, o, f, c) <- ours (i, f, g, o)
_GLUE = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
_DEFAULT_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]
# ONNX activation names that take alpha / beta (in activation_alpha / _beta,
# consumed in order by the activations that take them, as ONNX Runtime does).
_TAKES_ALPHA = {"affine", "hardsigmoid", "leakyrelu", "thresholdedrelu", "scaledtanh", "elu"}
_TAKES_BETA = {"affine", "hardsigmoid", "scaledtanh"}
_TO_ONNX_NAMES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu",
                  "hard_sigmoid": "HardSigmoid", "affine": "Affine"}
# The type of each attribute read here (onnx.AttributeProto.AttributeType's
# numbers, so that checking them needs no onnx import): one of another type
# is an error naming the node, never a value of the wrong kind used as it is.
_FLOAT, _INT, _STRING, _TENSOR, _FLOATS, _INTS, _STRINGS = 1, 2, 3, 4, 6, 7, 8
_TYPE_NAMES = {0: "no type", 1: "a float", 2: "an int", 3: "a string", 4: "a tensor",
               5: "a graph", 6: "a list of floats", 7: "a list of ints",
               8: "a list of strings", 9: "a list of tensors", 10: "a list of graphs",
               11: "a sparse tensor", 12: "a list of sparse tensors", 13: "a type proto",
               14: "a list of type protos"}
_LSTM_ATTRS = {"activation_alpha": _FLOATS, "activation_beta": _FLOATS,
               "activations": _STRINGS, "clip": _FLOAT, "direction": _STRING,
               "hidden_size": _INT, "input_forget": _INT, "layout": _INT}
_GLUE_ATTRS = {"Transpose": {"perm": _INTS}, "Reshape": {"allowzero": _INT},
               "Squeeze": {"axes": _INTS}, "Unsqueeze": {"axes": _INTS}}
_CONSTANT_ATTRS = {"value": _TENSOR, "value_float": _FLOAT, "value_floats": _FLOATS,
                   "value_int": _INT, "value_ints": _INTS}


def _gates(a, H, order, dtype=None):
    """Reorder the four H-row gate blocks of a (4H, ...) or (4H,) array."""
    out = a.reshape((4, H) + a.shape[1:])[order].reshape(a.shape)
    return np.ascontiguousarray(out, dtype=a.dtype if dtype is None else dtype)


def _load(model_or_path):
    onnx = require("onnx", "onnx", "numlstm.convert.from_onnx")

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path))
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    raise TypeError("model_or_path must be an onnx.ModelProto, a file path or the "
                    f"serialized bytes of a model, got {type(model_or_path).__name__}")


def _label(node, index):
    """How messages name a node: its name, else its position in graph.node."""
    return f"{node.op_type} node {node.name!r}" if node.name else \
        f"{node.op_type} node #{index}"


def _is_default(node):
    return node.domain in ("", "ai.onnx")


def _attributes(node, where, types):
    """name -> Python value of each attribute of ``node`` named in ``types``
    (name -> the AttributeProto type it must have); others are not read.
    Strings come back as str. ValueError naming ``where`` for an attribute
    given twice, of another type, or a string that is not UTF-8."""
    from onnx import helper

    out, seen = {}, set()
    for a in node.attribute:
        if a.name in seen:
            raise ValueError(f"{where}: attribute {a.name} is given twice")
        seen.add(a.name)
        want = types.get(a.name)
        if want is None:
            continue
        if a.type != want:
            try:
                shown = repr(helper.get_attribute_value(a))
                shown = " " + (shown if len(shown) <= 60 else shown[:57] + "...")
            except Exception:  # an undefined type has no value to show
                shown = ""
            raise ValueError(f"{where}: attribute {a.name} must be {_TYPE_NAMES[want]}, "
                             f"got {_TYPE_NAMES.get(a.type, f'type {a.type}')}{shown}")
        value = helper.get_attribute_value(a)
        try:
            if want == _STRING:
                value = value.decode()
            elif want == _STRINGS:
                value = [v.decode() for v in value]
        except UnicodeDecodeError:
            raise ValueError(f"{where}: attribute {a.name} must be UTF-8 text, got "
                             f"{value!r}") from None
        out[a.name] = value
    return out


def _check_graph(graph):
    """Check that every value of ``graph`` has one definition and that its nodes
    form no cycle, so that walking it terminates and visits each node once.

    Raises ValueError naming the node for an output name that is already a
    graph input, an initializer or another node's output (ONNX defines each
    value once; two producers of a name would also make every path through
    them count twice), and for a cycle (e.g. Identity Y -> Z -> Y), listing
    its nodes.
    """
    inputs = {v.name for v in graph.input}
    initializers = set()
    for init in graph.initializer:
        if init.name in initializers:
            raise ValueError(f"initializer {init.name!r} is given twice; an ONNX graph "
                             "defines each value once")
        initializers.add(init.name)
    nodes = graph.node
    producer = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if not name:  # an optional output left out
                continue
            if name in producer:
                j = producer[name]
                raise ValueError(f"{_label(node, i)}: output {name!r} is also the output of "
                                 f"{_label(nodes[j], j)}; an ONNX graph defines each value "
                                 "once")
            if name in inputs or name in initializers:
                what = "a graph input" if name in inputs else "an initializer"
                raise ValueError(f"{_label(node, i)}: output {name!r} is also {what}; an "
                                 "ONNX graph defines each value once")
            producer[name] = i
    # Kahn's algorithm: a node is ready once all its producers are placed.
    deps = [{producer[n] for n in node.input if n in producer} for node in nodes]
    users = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    placed = 0
    while ready:
        j = ready.pop()
        placed += 1
        for i in users[j]:
            waiting[i] -= 1
            if waiting[i] == 0:
                ready.append(i)
    if placed < len(nodes):
        # Every node left waits on a producer that is left too: following them
        # from any of them must come back to a node already seen, on a cycle.
        i = next(k for k, w in enumerate(waiting) if w)
        path, at = [], {}
        while i not in at:
            at[i] = len(path)
            path.append(i)
            i = min(j for j in deps[i] if waiting[j])
        cycle = path[at[i]:][::-1]  # in the direction values flow
        first = cycle.index(min(cycle))  # from its first node in graph order
        cycle = cycle[first:] + cycle[:first]
        names = " -> ".join(_label(nodes[k], k) for k in cycle + cycle[:1])
        raise ValueError(f"the graph has a cycle: {names}; an ONNX graph is acyclic")


def _constants(graph):
    """name -> NumPy array of every initializer and Constant node output;
    ValueError naming the initializer or node whose tensor cannot be read."""
    from onnx import numpy_helper

    def array(tensor, where):
        try:
            return numpy_helper.to_array(tensor)
        except Exception as e:  # onnx raises assorted types for malformed tensors
            raise ValueError(f"{where}: its tensor cannot be read: {e}") from None

    out = {init.name: array(init, f"initializer {init.name!r}") for init in graph.initializer}
    for k, node in enumerate(graph.node):
        if node.op_type != "Constant" or not _is_default(node):
            continue
        where = _label(node, k)
        attrs = _attributes(node, where, _CONSTANT_ATTRS)
        if len(attrs) != 1 or len(node.output) != 1:  # ONNX's Constant: one value, one output
            continue
        (name, value), = attrs.items()
        out[node.output[0]] = array(value, where) if name == "value" else np.array(value)
    return out


def _activations(attrs, D, where):
    """The node's (f, g, h) as numlstm activation specs (name, alpha, beta):
    ONNX's names, with ``activation_alpha`` / ``activation_beta`` consumed in
    order by the activations that take them (ONNX Runtime's reading)."""
    names = attrs.get("activations", _DEFAULT_ACTIVATIONS * D)
    if len(names) != 3 * D:
        raise ValueError(f"{where}: attribute activations must list 3 per direction "
                         f"({3 * D}), got {names}")
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    specs = []
    for name in names:
        key = name.lower()
        alpha = alphas.pop(0) if key in _TAKES_ALPHA and alphas else None
        beta = betas.pop(0) if key in _TAKES_BETA and betas else None
        canon = {"hardsigmoid": "hard_sigmoid"}.get(key, key)
        if canon not in ACTIVATIONS:
            raise ValueError(f"{where}: activation {name!r} is not supported: numlstm's "
                             "cells take Sigmoid, Tanh, Relu, HardSigmoid and Affine")
        _, a0, b0 = ACTIVATIONS[canon]
        specs.append((canon, a0 if alpha is None else float(alpha),
                      b0 if beta is None else float(beta)))
    if D == 2 and specs[:3] != specs[3:]:
        raise ValueError(f"{where}: the two directions use different activations "
                         f"({names}); a numlstm model's cell options are shared by its "
                         "directions")
    return tuple(specs[:3])


class _Node:
    """One ONNX LSTM node, checked and converted to numlstm's layout."""

    def __init__(self, node, index, consts, dtype):
        self.node = node
        where = _label(node, index)
        self.where = where
        attrs = _attributes(node, where, _LSTM_ATTRS)
        inputs = list(node.input) + [""] * (8 - len(node.input))
        direction = attrs.get("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ValueError(f"{where}: attribute direction must be 'forward', 'reverse' or "
                             f"'bidirectional', got {direction!r}")
        self.reverse = direction == "reverse"
        D = 2 if direction == "bidirectional" else 1
        input_forget = attrs.get("input_forget", 0)
        if input_forget not in (0, 1):
            raise ValueError(f"{where}: attribute input_forget must be 0 or 1, got "
                             f"{input_forget!r}")
        clip = attrs.get("clip")
        self.options = {"clip": None if clip is None else float(clip),
                        "input_forget": bool(input_forget),
                        "activations": _activations(attrs, D, where)}
        try:  # numlstm's own checks, with the node named
            Cell(**self.options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        layout = attrs.get("layout", 0)
        if layout not in (0, 1):
            raise ValueError(f"{where}: attribute layout must be 0 or 1, got {layout}")

        def const(k, label):
            name = inputs[k]
            if name not in consts:
                raise ValueError(f"{where}: input {label} ({name!r}) must be an initializer "
                                 "or the output of a Constant node, to be converted")
            arr = consts[name]
            if arr.dtype.kind != "f":
                raise TypeError(f"{where}: input {label} must be floating-point, got dtype "
                                f"{arr.dtype}")
            return arr

        Wt, Rt = const(1, "W"), const(2, "R")
        if Rt.ndim != 3 or Rt.shape[0] != D or Rt.shape[1] != 4 * Rt.shape[2]:
            raise ValueError(f"{where}: input R must have shape ({D}, 4*H, H) for "
                             f"direction={direction!r}, got {Rt.shape}")
        H = Rt.shape[2]
        if "hidden_size" in attrs and attrs["hidden_size"] != H:
            raise ValueError(f"{where}: attribute hidden_size={attrs['hidden_size']} does not "
                             f"match input R of shape {Rt.shape}")
        if Wt.ndim != 3 or Wt.shape[:2] != (D, 4 * H):
            raise ValueError(f"{where}: input W must have shape ({D}, {4 * H}, I) for "
                             f"hidden_size={H}, got {Wt.shape}")
        Bt = const(3, "B") if inputs[3] else None
        if Bt is not None and Bt.shape != (D, 8 * H):
            raise ValueError(f"{where}: input B must have shape ({D}, {8 * H}) for "
                             f"hidden_size={H}, got {Bt.shape}")
        Pt = const(7, "P") if inputs[7] else None
        if Pt is not None and Pt.shape != (D, 3 * H):
            raise ValueError(f"{where}: input P must have shape ({D}, {3 * H}) for "
                             f"hidden_size={H}, got {Pt.shape}")
        self.options["peepholes"] = Pt is not None
        # ONNX's P holds p_i, p_o, p_f; numlstm's peephole rows are p_i, p_f, p_o.
        self.peepholes = [] if Pt is None else [
            np.ascontiguousarray(Pt[d].reshape(3, H)[[0, 2, 1]], dtype) for d in range(D)]
        self.D, self.H, self.I, self.layout = D, H, Wt.shape[2], layout
        self.has_bias = Bt is not None
        self.seq_lens = inputs[4]
        self.params = []  # per direction: (weight_ih, weight_hh, bias_ih, bias_hh)
        for d in range(D):
            if Bt is None:
                b_ih = b_hh = np.zeros(4 * H, dtype)
            else:
                b_ih = _gates(Bt[d, :4 * H], H, _FROM_ONNX, dtype)
                b_hh = _gates(Bt[d, 4 * H:], H, _FROM_ONNX, dtype)
            self.params.append((_gates(Wt[d], H, _FROM_ONNX, dtype),
                                _gates(Rt[d], H, _FROM_ONNX, dtype), b_ih, b_hh))


def _simulate(value, node, attrs, consts):
    """Apply one shape-glue node (its attributes ``attrs``, type-checked) to a
    NumPy array; None when it cannot be known."""
    op = node.op_type

    def axes_of():
        if "axes" in attrs:
            return list(attrs["axes"])
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in consts:
                raise KeyError(node.input[1])
            return [int(a) for a in consts[node.input[1]].reshape(-1)]
        return None

    if op in ("Identity", "Dropout"):
        return value
    if op == "Transpose":
        return np.transpose(value, attrs.get("perm"))
    if op == "Reshape":
        if node.input[1] not in consts:
            return None
        shape = [int(s) for s in consts[node.input[1]].reshape(-1)]
        if not attrs.get("allowzero", 0):
            shape = [value.shape[k] if s == 0 else s for k, s in enumerate(shape)]
        return value.reshape(shape)
    if op == "Squeeze":
        axes = axes_of()
        return np.squeeze(value, None if axes is None else tuple(axes))
    if op == "Unsqueeze":
        axes = axes_of()
        rank = value.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            value = np.expand_dims(value, a)
        return value
    return None


def _chains_to(a, b, glue, consts):
    """Whether the glue nodes ((node, graph index) pairs) turn a's Y into b's X
    exactly as a stacked LSTM does (directions concatenated on the feature
    axis), checked on a probe. ValueError naming a glue node whose
    attributes have the wrong type."""
    attrs = [_attributes(node, _label(node, k), _GLUE_ATTRS.get(node.op_type, {}))
             for node, k in glue]
    T, B = 3, 5
    D, H = a.D, a.H
    y = np.arange(T * D * B * H, dtype=np.float64)
    y = y.reshape(T, D, B, H) if a.layout == 0 else y.reshape(B, T, D, H)
    tm = y if a.layout == 0 else y.transpose(1, 2, 0, 3)  # (T, D, B, H)
    want = tm.transpose(0, 2, 1, 3).reshape(T, B, D * H)  # (T, B, D*H)
    if b.layout == 1:
        want = want.transpose(1, 0, 2)
    value = y
    try:
        for (node, _), node_attrs in zip(glue, attrs, strict=True):
            value = _simulate(value, node, node_attrs, consts)
            if value is None:
                return False
    except (ValueError, KeyError, IndexError, TypeError):  # AxisError is a ValueError
        return False
    return value.shape == want.shape and np.array_equal(value, want)


def _successor(a, nodes, consumers, consts):
    """The LSTM node that a's output Y feeds as the next layer, or None.

    ``consumers``: value name -> (node, input position, graph index) of each
    node reading it. The graph has passed ``_check_graph`` (one producer per
    value, no cycle), so the glue below Y is a tree: the walk visits each of
    its nodes once, and keeps a parent link per node rather than a path."""
    y = a.node.output[0] if len(a.node.output) else ""
    if not y:
        return None
    found = []
    parent = {}  # id(glue node) -> (node, graph index) of the glue node before it, or None
    stack = [(y, None)]
    while stack:
        name, via = stack.pop()
        for node, idx, k in consumers.get(name, ()):
            if idx != 0 or not _is_default(node):
                continue
            if node.op_type == "LSTM":
                found.append((node, via))
            elif node.op_type in _GLUE and node.output and id(node) not in parent:
                parent[id(node)] = via
                stack.append((node.output[0], (node, k)))
        if len(found) > 1:
            return None
    if len(found) != 1:
        return None
    target, via = found[0]
    glue = []
    while via is not None:
        glue.append(via)
        via = parent[id(via[0])]
    glue.reverse()
    b = nodes.get(id(target))
    if b is None or (a.reverse, a.options) != (b.reverse, b.options):
        return None  # one model shares its direction and cell options across layers
    if (b.D, b.H, b.I, b.layout, b.seq_lens) != (a.D, a.H, a.D * a.H, a.layout, a.seq_lens):
        return None
    return b if _chains_to(a, b, glue, consts) else None


def from_onnx(model_or_path, *, dtype=np.float32, batch_first=None):
    """numlstm.LSTM model(s) with the weights of every ONNX ``LSTM`` node.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, path, or bytes
    dtype : np.float32 or np.float64
    batch_first : bool, optional
        Default: from the nodes' ``layout``. Transposes that a graph applies
        around its LSTM nodes (torch.onnx.export of a ``batch_first`` LSTM
        writes layout-0 nodes between two Transposes) are not part of the
        nodes: pass ``batch_first=True`` to take (B, T, I) input then.

    Returns
    -------
    numlstm.LSTM, or a list of them
        LSTM nodes that chain (node k's output Y reaches node k+1's input X
        through shape glue only: Transpose / Reshape / Squeeze / Unsqueeze /
        Identity / Dropout, which is how torch.onnx.export writes a multi-layer
        or bidirectional nn.LSTM; the glue is checked to concatenate the
        directions as a stacked LSTM does, the sizes must match and the
        nodes share ``sequence_lens``, direction and cell options) become one
        multi-layer model. One
        chain gives one model; several give a list, in graph order. LSTM
        nodes in subgraphs (If / Loop / Scan bodies) are not searched.

    What maps
    ---------
    - W, R, B (initializers or Constant node outputs; B absent = zeros):
      gate order i, o, f, c -> i, f, g, o; Wb -> ``bias_ih``, Rb -> ``bias_hh``.
    - ``direction``: 'forward', 'reverse' (-> ``reverse=True``) and
      'bidirectional' (-> ``bidirectional=True``).
    - ``layout`` 0 -> ``batch_first=False``, 1 -> ``batch_first=True``.
    - ``hidden_size``; the cell options (``numlstm.cell``): input P ->
      ``peepholes=True`` and the ``peephole_l{k}`` parameters (ONNX's rows i,
      o, f become rows i, f, o), ``clip``, ``input_forget``, and
      ``activations`` (Sigmoid, Tanh, Relu, HardSigmoid and Affine, with
      ``activation_alpha`` / ``activation_beta``), the same for every
      direction.
    - Runtime inputs are not part of the model: ``sequence_lens`` is
      ``forward``'s ``lengths``; ``initial_h`` / ``initial_c`` (D, B, H) of
      chained node k are rows [k*D, (k+1)*D) of ``state`` (D*L, B, H) (layout 1
      stores them (B, D, H)). Y (T, D, B, H) is ``y`` (T, B, D*H) with the
      directions split; Y_h / Y_c are ``h_n`` / ``c_n``.

    Rejected with ValueError naming the node and the input or attribute:
    other activations (LeakyRelu, ThresholdedRelu, ScaledTanh, Elu, Softsign,
    Softplus), activations that differ between the two directions, W / R /
    B / P computed at run time, and attributes of another type than ONNX's
    (``activations`` must be strings, ``clip`` a float, ``activation_alpha``
    floats, ...; on LSTM, glue and Constant nodes). Malformed graphs are
    rejected before any node is read, in time linear in their size: a value
    defined twice (two nodes with one output name) and a cycle. A node
    without a name is named by its position in ``graph.node`` (``LSTM node
    #3``).
    """
    from numlstm.lstm import LSTM

    dtype = check_dtype(dtype)
    graph = _load(model_or_path).graph
    _check_graph(graph)
    consts = _constants(graph)
    lstm_nodes = [(k, n) for k, n in enumerate(graph.node)
                  if n.op_type == "LSTM" and _is_default(n)]
    if not lstm_nodes:
        raise ValueError("model_or_path must contain an ONNX LSTM node, got none among "
                         f"{len(graph.node)} nodes")
    parsed = [_Node(n, k, consts, dtype) for k, n in lstm_nodes]
    nodes = {id(p.node): p for p in parsed}
    consumers = {}
    for k, node in enumerate(graph.node):
        for idx, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, idx, k))
    nxt = {id(p): _successor(p, nodes, consumers, consts) for p in parsed}
    has_prev = {id(s) for s in nxt.values() if s is not None}
    models = []
    for head in parsed:
        if id(head) in has_prev:
            continue
        chain = [head]
        while nxt[id(chain[-1])] is not None and len(chain) <= len(parsed):
            chain.append(nxt[id(chain[-1])])
        state = {}
        for l, p in enumerate(chain):
            for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(p.params):
                sfx = f"_l{l}" + ("_reverse" if d else "")
                state["weight_ih" + sfx] = w_ih
                state["weight_hh" + sfx] = w_hh
                state["bias_ih" + sfx] = b_ih
                state["bias_hh" + sfx] = b_hh
            for d, peep in enumerate(p.peepholes):
                state[f"peephole_l{l}" + ("_reverse" if d else "")] = peep
        bias = any(p.has_bias for p in chain)
        if not bias:
            state = {k: v for k, v in state.items() if not k.startswith("bias")}
        bf = head.layout == 1 if batch_first is None else batch_first
        model = LSTM(head.I, head.H, len(chain), bias=bias, batch_first=bf,
                     bidirectional=head.D == 2, dtype=dtype, reverse=head.reverse,
                     **head.options)
        model.load_state_dict(state)
        models.append(model)
    return models[0] if len(models) == 1 else models


def _cell_attributes(cell, D):
    """The LSTM node attributes of a model's cell options (none for the plain cell)."""
    attrs = {}
    if cell.clip is not None:
        attrs["clip"] = cell.clip
    if cell.input_forget:
        attrs["input_forget"] = 1
    if cell.activations != Cell().activations:
        names, alphas, betas = [], [], []
        for name, a, b in cell.activations:
            names.append(_TO_ONNX_NAMES[name])
            if name in ("hard_sigmoid", "affine"):
                alphas.append(a)
                betas.append(b)
        attrs["activations"] = names * D
        if alphas:
            attrs["activation_alpha"] = alphas * D
            attrs["activation_beta"] = betas * D
    return attrs


def to_onnx(model, path=None, *, opset=17, sequence_lens=False, initial_state=False,
            dtype=None):
    """Export ``model`` as an ONNX graph of standard ``LSTM`` nodes.

    One LSTM node per layer (layout 0, gate order i, o, f, c, B = [bias_ih,
    bias_hh] or absent without bias; ``direction`` "reverse" for a reverse
    model; the cell options as P, ``clip``, ``input_forget``, ``activations``
    with their alphas and betas) with Transpose + Reshape glue that
    concatenates the directions of Y (T, D, B, H) into the next layer's input
    (T, B, D*H), as torch.onnx.export writes it; ``batch_first`` adds a
    Transpose at each end. Sparse and quantized weights are written dense.
    Dropout is a training setting and is not exported.

    Graph inputs: ``x`` (T, B, I) ((B, T, I) when ``batch_first``);
    ``sequence_lens`` (B,) int32 when ``sequence_lens=True`` (``lengths``);
    ``h0``, ``c0`` (D*L, B, H) when ``initial_state=True`` (zeros otherwise).
    Outputs: ``y`` (like ``forward``'s, padded steps zero), ``h_n``, ``c_n``
    (D*L, B, H). Dimensions T and B are symbolic.

    Parameters
    ----------
    model : numlstm.LSTM
        ``proj_size > 0`` is rejected: the ONNX LSTM op has no projection.
    path : str or os.PathLike, optional
        Also save the model there.
    opset : int
        The default-domain opset, 10 or newer (Slice takes inputs from 10).
    dtype : np.float32 or np.float64, optional
        The graph's float type (default: the model's). ONNX Runtime's CPU
        LSTM kernel runs float32 only (1.32: "does not support double yet"),
        so pass ``dtype=np.float32`` to run a float64 model there.

    Returns
    -------
    onnx.ModelProto (checked with ``onnx.checker``)
    """
    require("onnx", "onnx", "numlstm.convert.to_onnx")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_model(model)
    if model.proj_size:
        raise ValueError(f"model.proj_size must be 0 to export to ONNX (the ONNX LSTM op has "
                         f"no projection), got {model.proj_size}")
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 10 <= opset <= latest:
        raise ValueError(f"opset must be an int in [10, {latest}], got {opset!r}")
    dt = model.dtype if dtype is None else check_dtype(dtype)
    elem = TensorProto.DOUBLE if dt == np.float64 else TensorProto.FLOAT
    state = dense_state(model)
    H, L, D, I = model.hidden_size, model.num_layers, model.num_directions, model.input_size
    x_shape = ["B", "T", I] if model.batch_first else ["T", "B", I]
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    if initial_state:
        inputs += [helper.make_tensor_value_info("h0", elem, [D * L, "B", H]),
                   helper.make_tensor_value_info("c0", elem, [D * L, "B", H])]
    inits, nodes = [], []
    direction = "bidirectional" if D == 2 else ("reverse" if model.reverse else "forward")
    cell_attrs = _cell_attributes(model.cell, D)

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    cur = "x"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_time_major"], perm=[1, 0, 2]))
        cur = "x_time_major"
    init("concat_shape", np.array([0, 0, -1], np.int64))
    if initial_state:
        init("slice_axes", np.array([0], np.int64))
    hs, cs = [], []
    for l in range(L):
        sfx = [f"_l{l}", f"_l{l}_reverse"][:D]
        Wn = init(f"W_l{l}", np.stack([_gates(state["weight_ih" + s], H, _TO_ONNX)
                                       for s in sfx]).astype(dt))
        Rn = init(f"R_l{l}", np.stack([_gates(state["weight_hh" + s], H, _TO_ONNX)
                                       for s in sfx]).astype(dt))
        Bn = ""
        if model.bias:
            Bn = init(f"B_l{l}", np.stack([
                np.concatenate([_gates(state["bias_ih" + s], H, _TO_ONNX),
                                _gates(state["bias_hh" + s], H, _TO_ONNX)]) for s in sfx
            ]).astype(dt))
        ih = ic = ""
        if initial_state:
            init(f"slice_start_l{l}", np.array([l * D], np.int64))
            init(f"slice_end_l{l}", np.array([(l + 1) * D], np.int64))
            ih, ic = f"h0_l{l}", f"c0_l{l}"
            for src, dst in (("h0", ih), ("c0", ic)):
                nodes.append(helper.make_node(
                    "Slice", [src, f"slice_start_l{l}", f"slice_end_l{l}", "slice_axes"],
                    [dst]))
        Pn = ""
        if model.cell.peepholes:  # numlstm's rows i, f, o -> ONNX's i, o, f
            Pn = init(f"P_l{l}", np.stack([state["peephole" + s][[0, 2, 1]].ravel()
                                           for s in sfx]).astype(dt))
        node_inputs = [cur, Wn, Rn, Bn, "sequence_lens" if sequence_lens else "", ih, ic, Pn]
        while node_inputs[-1] == "":
            node_inputs.pop()
        nodes.append(helper.make_node(
            "LSTM", node_inputs, [f"Y_l{l}", f"Y_h_l{l}", f"Y_c_l{l}"], name=f"lstm_l{l}",
            hidden_size=H, direction=direction, **cell_attrs))
        last = l == L - 1
        nodes.append(helper.make_node("Transpose", [f"Y_l{l}"], [f"Y_tbdh_l{l}"],
                                      perm=[0, 2, 1, 3]))
        out = "y" if last and not model.batch_first else f"layer_out_l{l}"
        nodes.append(helper.make_node("Reshape", [f"Y_tbdh_l{l}", "concat_shape"], [out]))
        cur = out
        hs.append(f"Y_h_l{l}")
        cs.append(f"Y_c_l{l}")
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [cur], ["y"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Concat", hs, ["h_n"], axis=0))
    nodes.append(helper.make_node("Concat", cs, ["c_n"], axis=0))
    y_shape = ["B", "T", D * H] if model.batch_first else ["T", "B", D * H]
    outputs = [helper.make_tensor_value_info("y", elem, y_shape),
               helper.make_tensor_value_info("h_n", elem, [D * L, "B", H]),
               helper.make_tensor_value_info("c_n", elem, [D * L, "B", H])]
    graph = helper.make_graph(nodes, "numlstm_lstm", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="numlstm",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto

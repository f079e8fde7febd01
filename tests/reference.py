"""The oracle: a plain float64 NumPy LSTM, forward and backward. No Numba, no torch.

Every kernel in numlstm is checked against this file, so it favours clarity over speed:
Python loops over layers, directions and time, one NumPy expression per equation.

Conventions are PyTorch's ``torch.nn.LSTM`` exactly (gate order i, f, g, o):

    z   = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh      # (B, G)  rows: i | f | g | o
    i = sigmoid(z_i)  f = sigmoid(z_f)  g = tanh(z_g)  o = sigmoid(z_o)
    c_t = f * c_{t-1} + i * g
    m_t = o * tanh(c_t)
    h_t = m_t                 (proj_size P == 0)
    h_t = W_hr m_t            (proj_size P > 0)

Glossary: T time steps, B batch, I input features, H hidden, P projection (0 = none),
O = P or H (output width), G = 4H gate rows, L layers, D directions (1 or 2).

Data is time-major: x (T, B, I), y (T, B, D*O) with the forward direction in
y[..., :O] and the reverse direction in y[..., O:]; h0 / h_n (L*D, B, O) and
c0 / c_n (L*D, B, H), indexed by ``layer * D + direction``.

Variable lengths (``lengths``, shape (B,), values in [1, T]) follow PyTorch packed
sequences: for sequence b the steps t >= lengths[b] are padding. Their outputs are 0,
their input values are ignored, and the state passes through them unchanged, so h_n /
c_n hold the state after each sequence's last valid step and the reverse direction
starts from h0 / c0 at t = lengths[b] - 1 and runs down to t = 0.

Between layers, ``dropout_masks[k]`` (T, B, D*O), already scaled (0 or 1/(1-p)),
multiplies layer k's output before it becomes layer k+1's input. It is never applied
to the last layer's output.

The cell options of ONNX's LSTM operator (and Keras's), all off by default:

- ``reverse``: a unidirectional layer that runs from each sequence's last valid step
  down to t = 0 (ONNX ``direction="reverse"``; the reverse half of a bidirectional
  layer on its own; Keras ``go_backwards`` with its output flipped back).
- peepholes: a parameter ``peephole_l{k}`` (and ``peephole_l{k}_reverse``) of shape
  (3, H), rows p_i, p_f, p_o (ONNX's ``P`` holds them in the order i, o, f):

      z_i += p_i * c_{t-1}    z_f += p_f * c_{t-1}    z_o += p_o * c_t

- ``clip``: every gate pre-activation (peephole term and biases included) is clipped
  to [-clip, clip] before its activation; the gradient is 0 where the clip bites.
- ``input_forget``: f = 1 - i (the forget gate's weights and biases are unused).
- ``activations``: ONNX's (f, g, h): f for the i, f, o gates (default sigmoid), g
  for the cell input (tanh), h for the cell output m = o * h(c_t) (tanh). Each is a
  name of ``ACTIVATIONS`` or (name, alpha, beta); alpha and beta default to ONNX's.
"""

import numpy as np

__all__ = [
    "init_params",
    "lstm_backward",
    "lstm_forward",
    "param_shapes",
    "sigmoid",
]


def sigmoid(z):
    """Logistic function 1 / (1 + exp(-z)), with no overflow for any |z| (inf included).

    Floating inputs keep their dtype; other inputs are computed in float64.
    """
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(-np.abs(z))  # in [0, 1]: never overflows
    s = 1.0 / (1.0 + e)  # sigmoid(|z|)
    return np.where(z >= 0, s, e * s)  # sigmoid(-|z|) = e / (1 + e)


def _hard_sigmoid(z, a, b):
    return np.clip(a * z + b, 0.0, 1.0)


# name: (function, derivative, default alpha, default beta), as ONNX defines them.
ACTIVATIONS = {
    "sigmoid": (lambda z, a, b: sigmoid(z),
                lambda z, a, b: sigmoid(z) * (1.0 - sigmoid(z)), None, None),
    "tanh": (lambda z, a, b: np.tanh(z), lambda z, a, b: 1.0 - np.tanh(z) ** 2, None, None),
    "relu": (lambda z, a, b: np.maximum(z, 0.0), lambda z, a, b: (z > 0).astype(z.dtype),
             None, None),
    "hard_sigmoid": (_hard_sigmoid,
                     lambda z, a, b: np.where((a * z + b > 0) & (a * z + b < 1), a, 0.0),
                     0.2, 0.5),
    "affine": (lambda z, a, b: a * z + b, lambda z, a, b: np.full_like(z, a), 1.0, 0.0),
}


def activation(spec):
    """(function, derivative) of an activation spec: a name of ``ACTIVATIONS`` or
    (name, alpha, beta); each takes and returns an array of pre-activations."""
    name, *ab = (spec,) if isinstance(spec, str) else tuple(spec)
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    fn, dfn, a, b = ACTIVATIONS[name]
    if ab:
        a, b = ab
    return (lambda z: fn(z, a, b)), (lambda z: dfn(z, a, b))


def _cell(clip, input_forget, activations):
    """The cell options as ``_direction_forward`` / ``_direction_backward`` read them."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or > 0, got {clip}")
    specs = ("sigmoid", "tanh", "tanh") if activations is None else tuple(activations)
    if len(specs) != 3:
        raise ValueError(f"activations must hold 3 specs (f, g, h), got {len(specs)}")
    return {"clip": clip, "input_forget": bool(input_forget),
            "acts": [activation(spec) for spec in specs]}


def _clip(z, clip):
    """z clipped to [-clip, clip] and the clip's derivative (1 inside, 0 where it bites)."""
    if clip is None:
        return z, 1.0
    return np.clip(z, -clip, clip), (np.abs(z) <= clip).astype(z.dtype)


def _suffix(direction):
    return "_reverse" if direction == 1 else ""


def param_shapes(input_size, hidden_size, num_layers=1, *, bias=True, bidirectional=False,
                 proj_size=0, peepholes=False):
    """{name: shape} for every parameter, in torch.nn.LSTM's ``named_parameters`` order."""
    I, H, L, P = input_size, hidden_size, num_layers, proj_size
    D = 2 if bidirectional else 1
    O = P if P > 0 else H
    G = 4 * H
    shapes = {}
    for k in range(L):
        layer_in = I if k == 0 else D * O
        for d in range(D):
            sfx = f"_l{k}{_suffix(d)}"
            shapes[f"weight_ih{sfx}"] = (G, layer_in)
            shapes[f"weight_hh{sfx}"] = (G, O)
            if bias:
                shapes[f"bias_ih{sfx}"] = (G,)
                shapes[f"bias_hh{sfx}"] = (G,)
            if P > 0:
                shapes[f"weight_hr{sfx}"] = (P, H)
            if peepholes:
                shapes[f"peephole{sfx}"] = (3, H)
    return shapes


def init_params(input_size, hidden_size, num_layers=1, *, bias=True, bidirectional=False,
                proj_size=0, peepholes=False, rng):
    """PyTorch-named float64 parameters drawn from U(-1/sqrt(H), 1/sqrt(H)), as torch does.

    ``rng`` is a ``numpy.random.Generator`` (or anything ``default_rng`` accepts).
    """
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    shapes = param_shapes(input_size, hidden_size, num_layers, bias=bias,
                          bidirectional=bidirectional, proj_size=proj_size, peepholes=peepholes)
    return {name: rng.uniform(-bound, bound, size=shape) for name, shape in shapes.items()}


def _layer_weights(params, k, direction):
    """The float64 weights of layer k, one direction; absent bias / projection are None."""
    sfx = f"_l{k}{_suffix(direction)}"
    return {
        "W_ih": params[f"weight_ih{sfx}"],  # (G, I or D*O)
        "W_hh": params[f"weight_hh{sfx}"],  # (G, O)
        "b_ih": params.get(f"bias_ih{sfx}"),  # (G,) or None
        "b_hh": params.get(f"bias_hh{sfx}"),  # (G,) or None
        "W_hr": params.get(f"weight_hr{sfx}"),  # (P, H) or None
        "P": params.get(f"peephole{sfx}"),  # (3, H) rows i, f, o, or None
    }


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _direction_forward(x, w, h0, c0, valid, reverse, cell):
    """One layer, one direction.

    x (T, B, F) input, h0 (B, O), c0 (B, H), valid (T, B) bool, cell from ``_cell``.
    Returns out (T, B, O) (0 on padding), h_n (B, O), c_n (B, H), and the tape that the
    backward needs.
    """
    T, B, _ = x.shape
    H = w["W_hh"].shape[0] // 4
    O = w["W_hh"].shape[1]
    act_f, act_g, act_h = (fn for fn, _ in cell["acts"])
    p = w["P"] if w["P"] is not None else np.zeros((3, H))  # peepholes i, f, o
    zeros = {name: np.zeros((T, B, H)) for name in
             ("c_prev", "c", "zi", "zf", "zg", "zo", "ki", "kf", "kg", "ko",
              "i", "f", "g", "o", "h_c", "m")}
    tape = {"x": x, "h_prev": np.zeros((T, B, O)), **zeros}
    # z* are the clipped pre-activations, k* the clips' derivatives, h_c = h(c_t).
    out = np.zeros((T, B, O))
    h = h0.copy()  # (B, O)
    c = c0.copy()  # (B, H)
    for t in _time_order(T, reverse):
        v = valid[t][:, None]  # (B, 1): which sequences are still running at step t
        z = x[t] @ w["W_ih"].T + h @ w["W_hh"].T  # (B, G)
        if w["b_ih"] is not None:
            z = z + w["b_ih"] + w["b_hh"]
        zi, ki = _clip(z[:, 0 * H:1 * H] + p[0] * c, cell["clip"])  # (B, H)
        zf, kf = _clip(z[:, 1 * H:2 * H] + p[1] * c, cell["clip"])
        zg, kg = _clip(z[:, 2 * H:3 * H], cell["clip"])
        i, g = act_f(zi), act_g(zg)
        f = 1.0 - i if cell["input_forget"] else act_f(zf)
        c_new = f * c + i * g  # (B, H)
        zo, ko = _clip(z[:, 3 * H:4 * H] + p[2] * c_new, cell["clip"])
        o = act_f(zo)
        h_c = act_h(c_new)
        m = o * h_c  # (B, H)
        h_new = m @ w["W_hr"].T if w["W_hr"] is not None else m  # (B, O)

        for name, value in (("h_prev", h), ("c_prev", c), ("c", c_new), ("zi", zi), ("zf", zf),
                            ("zg", zg), ("zo", zo), ("ki", ki), ("kf", kf), ("kg", kg),
                            ("ko", ko), ("i", i), ("f", f), ("g", g), ("o", o), ("h_c", h_c),
                            ("m", m)):
            tape[name][t] = value

        out[t] = np.where(v, h_new, 0.0)
        h = np.where(v, h_new, h)  # padding: the state passes through unchanged
        c = np.where(v, c_new, c)
    return out, h, c, tape


def _direction_backward(tape, w, dout, dh, dc, valid, reverse, cell):
    """Backward of ``_direction_forward``.

    dout (T, B, O) gradient of out, dh (B, O) / dc (B, H) gradients of h_n / c_n.
    Returns dx (T, B, F), dh0 (B, O), dc0 (B, H) and {name: gradient} for the weights
    (keys as in ``_layer_weights``, only those that exist).
    """
    x = tape["x"]
    T = x.shape[0]
    d_f, d_g, d_h = (dfn for _, dfn in cell["acts"])
    p = w["P"] if w["P"] is not None else np.zeros((3, tape["c"].shape[2]))
    dw = {name: np.zeros_like(value) for name, value in w.items() if value is not None}
    dx = np.zeros_like(x)  # (T, B, F)
    dh = dh.copy()  # (B, O) gradient of the state leaving step t
    dc = dc.copy()  # (B, H)
    # Walk the steps in the opposite order to the forward.
    for t in _time_order(T, not reverse):
        v = valid[t][:, None]  # (B, 1)
        tp = {name: value[t] for name, value in tape.items() if name != "x"}
        i, f, g, o, c_prev = tp["i"], tp["f"], tp["g"], tp["o"], tp["c_prev"]

        dh_t = dh + np.where(v, dout[t], 0.0)  # (B, O): out[t] is a constant 0 on padding
        if w["W_hr"] is not None:
            dw["W_hr"] += np.where(v, dh_t, 0.0).T @ tp["m"]  # (P, H)
            dm = dh_t @ w["W_hr"]  # (B, H)
        else:
            dm = dh_t
        dzo = dm * tp["h_c"] * d_f(tp["zo"]) * tp["ko"]  # (B, H) pre-activation of o
        dc_t = dc + dm * o * d_h(tp["c"]) + dzo * p[2]  # total gradient of c_t
        di = dc_t * g
        df = dc_t * c_prev
        dg = dc_t * i
        if cell["input_forget"]:  # f = 1 - i
            di, df = di - df, np.zeros_like(df)
        dzi = di * d_f(tp["zi"]) * tp["ki"]
        dzf = df * d_f(tp["zf"]) * tp["kf"]
        dzg = dg * d_g(tp["zg"]) * tp["kg"]
        dz = np.concatenate([dzi, dzf, dzg, dzo], axis=1)  # (B, G) rows i | f | g | o
        dz = np.where(v, dz, 0.0)  # padded steps contribute nothing

        dw["W_ih"] += dz.T @ x[t]  # (G, F)
        dw["W_hh"] += dz.T @ tp["h_prev"]  # (G, O)
        if "b_ih" in dw:
            dw["b_ih"] += dz.sum(axis=0)  # (G,)
            dw["b_hh"] += dz.sum(axis=0)
        H = dzi.shape[1]
        dzi, dzf, dzo = dz[:, :H], dz[:, H:2 * H], dz[:, 3 * H:]
        if "P" in dw:
            dw["P"] += np.stack([(dzi * c_prev).sum(0), (dzf * c_prev).sum(0),
                                 (dzo * tp["c"]).sum(0)])
        dx[t] = dz @ w["W_ih"]  # (B, F)
        dh = np.where(v, dz @ w["W_hh"], dh)  # padding: gradients pass through unchanged
        dc = np.where(v, dc_t * f + dzi * p[0] + dzf * p[1], dc)
    return dx, dh, dc, dw


def _as_float64(name, value, shape):
    """A float64 copy of value (later changes to the caller's array do not leak in)."""
    a = np.array(value, dtype=np.float64)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a


def lstm_forward(params, x, *, hidden_size, num_layers=1, proj_size=0, bidirectional=False,
                 h0=None, c0=None, lengths=None, dropout_masks=None, reverse=False, clip=None,
                 input_forget=False, activations=None):
    """Forward pass of a (multi-layer, optionally bidirectional, projected) LSTM.

    params: PyTorch-named arrays (bias and peephole presence are read from the keys);
    x (T, B, I); h0 (L*D, B, O) and c0 (L*D, B, H), zeros when None; lengths (B,) ints
    in [1, T] or None (all T); dropout_masks: None or L-1 arrays (T, B, D*O), already
    scaled; reverse, clip, input_forget, activations: the cell options (module
    docstring).

    Returns y (T, B, D*O), h_n (L*D, B, O), c_n (L*D, B, H), cache (for ``lstm_backward``).
    """
    H, L, P = hidden_size, num_layers, proj_size
    D = 2 if bidirectional else 1
    O = P if P > 0 else H
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (T, B, I), got {x.shape}")
    T, B, I = x.shape
    bias = "bias_ih_l0" in params
    if reverse and bidirectional:
        raise ValueError("reverse is for a unidirectional layer; bidirectional has both")
    cell = _cell(clip, input_forget, activations)

    expected = param_shapes(I, H, L, bias=bias, bidirectional=bidirectional, proj_size=P,
                            peepholes="peephole_l0" in params)
    if set(params) != set(expected):
        raise ValueError(f"params must have keys {sorted(expected)}, got {sorted(params)}")
    params = {name: _as_float64(name, params[name], shape) for name, shape in expected.items()}

    h0 = np.zeros((L * D, B, O)) if h0 is None else _as_float64("h0", h0, (L * D, B, O))
    c0 = np.zeros((L * D, B, H)) if c0 is None else _as_float64("c0", c0, (L * D, B, H))

    if lengths is None:
        lengths = np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be {B} integers, got {lengths.dtype} {lengths.shape}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"lengths must lie in [1, {T}], got {lengths}")
    valid = np.arange(T)[:, None] < lengths[None, :]  # (T, B)

    if dropout_masks is not None:
        if len(dropout_masks) != L - 1:
            raise ValueError(f"dropout_masks must hold {L - 1} arrays, got {len(dropout_masks)}")
        dropout_masks = [_as_float64(f"dropout_masks[{k}]", m, (T, B, D * O))
                         for k, m in enumerate(dropout_masks)]

    h_n = np.zeros((L * D, B, O))
    c_n = np.zeros((L * D, B, H))
    tapes = []  # tapes[k][d]
    layer_in = np.where(valid[:, :, None], x, 0.0)  # (T, B, I): padding values are ignored
    for k in range(L):
        y = np.zeros((T, B, D * O))  # layer k's output
        tapes.append([])
        for d in range(D):
            idx = k * D + d
            w = _layer_weights(params, k, d)
            out, h_n[idx], c_n[idx], tape = _direction_forward(
                layer_in, w, h0[idx], c0[idx], valid, (d == 1) or reverse, cell)
            y[:, :, d * O:(d + 1) * O] = out
            tapes[k].append(tape)
        if k < L - 1:
            layer_in = y * dropout_masks[k] if dropout_masks is not None else y

    cache = {
        "sizes": {"T": T, "B": B, "I": I, "H": H, "P": P, "O": O, "L": L, "D": D},
        "params": params,  # float64 copies, in param_shapes order
        "valid": valid,  # (T, B)
        "dropout_masks": dropout_masks,
        "tapes": tapes,
        "reverse": reverse,
        "cell": cell,
    }
    return y, h_n, c_n, cache


def lstm_backward(cache, dy, dh_n=None, dc_n=None):
    """Backward pass: gradients of a loss given dy (T, B, D*O) = dloss/dy, and optionally
    dh_n (L*D, B, O), dc_n (L*D, B, H) (zeros when None; dy None means zeros too).

    Returns dx (T, B, I), dh0 (L*D, B, O), dc0 (L*D, B, H) and grads, a dict with exactly
    the keys of params holding dense float64 arrays of the same shapes. The cache is not
    modified, so the backward may be run again with other gradients.
    """
    s = cache["sizes"]
    T, B, I, H, O, L, D = s["T"], s["B"], s["I"], s["H"], s["O"], s["L"], s["D"]
    params, valid, masks = cache["params"], cache["valid"], cache["dropout_masks"]

    dy = np.zeros((T, B, D * O)) if dy is None else _as_float64("dy", dy, (T, B, D * O))
    dh_n = np.zeros((L * D, B, O)) if dh_n is None else _as_float64("dh_n", dh_n, (L * D, B, O))
    dc_n = np.zeros((L * D, B, H)) if dc_n is None else _as_float64("dc_n", dc_n, (L * D, B, H))

    grads = {name: np.zeros_like(p) for name, p in params.items()}
    dh0 = np.zeros((L * D, B, O))
    dc0 = np.zeros((L * D, B, H))
    names = {"W_ih": "weight_ih", "W_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh",
             "W_hr": "weight_hr", "P": "peephole"}

    d_out = dy  # (T, B, D*O) gradient of layer k's output
    for k in reversed(range(L)):
        d_in = np.zeros_like(cache["tapes"][k][0]["x"])  # (T, B, I or D*O)
        for d in range(D):
            idx = k * D + d
            w = _layer_weights(params, k, d)
            dx_d, dh0[idx], dc0[idx], dw = _direction_backward(
                cache["tapes"][k][d], w, d_out[:, :, d * O:(d + 1) * O], dh_n[idx], dc_n[idx],
                valid, (d == 1) or cache["reverse"], cache["cell"])
            d_in += dx_d  # both directions read the same input
            for short, value in dw.items():
                grads[f"{names[short]}_l{k}{_suffix(d)}"] += value
        if k > 0:
            d_out = d_in * masks[k - 1] if masks is not None else d_in
        else:
            dx = d_in
    assert dx.shape == (T, B, I)
    return dx, dh0, dc0, grads

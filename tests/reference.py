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


def _suffix(direction):
    return "_reverse" if direction == 1 else ""


def param_shapes(input_size, hidden_size, num_layers=1, *, bias=True, bidirectional=False,
                 proj_size=0):
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
    return shapes


def init_params(input_size, hidden_size, num_layers=1, *, bias=True, bidirectional=False,
                proj_size=0, rng):
    """PyTorch-named float64 parameters drawn from U(-1/sqrt(H), 1/sqrt(H)), as torch does.

    ``rng`` is a ``numpy.random.Generator`` (or anything ``default_rng`` accepts).
    """
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    shapes = param_shapes(input_size, hidden_size, num_layers, bias=bias,
                          bidirectional=bidirectional, proj_size=proj_size)
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
    }


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _direction_forward(x, w, h0, c0, valid, reverse):
    """One layer, one direction.

    x (T, B, F) input, h0 (B, O), c0 (B, H), valid (T, B) bool.
    Returns out (T, B, O) (0 on padding), h_n (B, O), c_n (B, H), and the tape that the
    backward needs.
    """
    T, B, _ = x.shape
    H = w["W_hh"].shape[0] // 4
    O = w["W_hh"].shape[1]
    tape = {
        "x": x,  # (T, B, F)
        "h_prev": np.zeros((T, B, O)),  # state entering step t
        "c_prev": np.zeros((T, B, H)),
        "i": np.zeros((T, B, H)),  # gate activations
        "f": np.zeros((T, B, H)),
        "g": np.zeros((T, B, H)),
        "o": np.zeros((T, B, H)),
        "tanh_c": np.zeros((T, B, H)),  # tanh(c_t)
        "m": np.zeros((T, B, H)),  # o * tanh(c_t), before the projection
    }
    out = np.zeros((T, B, O))
    h = h0.copy()  # (B, O)
    c = c0.copy()  # (B, H)
    for t in _time_order(T, reverse):
        v = valid[t][:, None]  # (B, 1): which sequences are still running at step t
        z = x[t] @ w["W_ih"].T + h @ w["W_hh"].T  # (B, G)
        if w["b_ih"] is not None:
            z = z + w["b_ih"] + w["b_hh"]
        s = sigmoid(z)  # (B, G); only the i, f, o rows are used
        i = s[:, 0 * H:1 * H]  # (B, H)
        f = s[:, 1 * H:2 * H]
        g = np.tanh(z[:, 2 * H:3 * H])
        o = s[:, 3 * H:4 * H]
        c_new = f * c + i * g  # (B, H)
        tanh_c = np.tanh(c_new)
        m = o * tanh_c  # (B, H)
        h_new = m @ w["W_hr"].T if w["W_hr"] is not None else m  # (B, O)

        tape["h_prev"][t], tape["c_prev"][t] = h, c
        tape["i"][t], tape["f"][t], tape["g"][t], tape["o"][t] = i, f, g, o
        tape["tanh_c"][t], tape["m"][t] = tanh_c, m

        out[t] = np.where(v, h_new, 0.0)
        h = np.where(v, h_new, h)  # padding: the state passes through unchanged
        c = np.where(v, c_new, c)
    return out, h, c, tape


def _direction_backward(tape, w, dout, dh, dc, valid, reverse):
    """Backward of ``_direction_forward``.

    dout (T, B, O) gradient of out, dh (B, O) / dc (B, H) gradients of h_n / c_n.
    Returns dx (T, B, F), dh0 (B, O), dc0 (B, H) and {name: gradient} for the weights
    (keys as in ``_layer_weights``, only those that exist).
    """
    x = tape["x"]
    T = x.shape[0]
    dw = {name: np.zeros_like(value) for name, value in w.items() if value is not None}
    dx = np.zeros_like(x)  # (T, B, F)
    dh = dh.copy()  # (B, O) gradient of the state leaving step t
    dc = dc.copy()  # (B, H)
    # Walk the steps in the opposite order to the forward.
    for t in _time_order(T, not reverse):
        v = valid[t][:, None]  # (B, 1)
        i, f, g, o = tape["i"][t], tape["f"][t], tape["g"][t], tape["o"][t]
        tanh_c = tape["tanh_c"][t]

        dh_t = dh + np.where(v, dout[t], 0.0)  # (B, O): out[t] is a constant 0 on padding
        if w["W_hr"] is not None:
            dw["W_hr"] += np.where(v, dh_t, 0.0).T @ tape["m"][t]  # (P, H)
            dm = dh_t @ w["W_hr"]  # (B, H)
        else:
            dm = dh_t
        do = dm * tanh_c  # (B, H)
        dc_t = dc + dm * o * (1.0 - tanh_c**2)  # total gradient of c_t
        di = dc_t * g
        df = dc_t * tape["c_prev"][t]
        dg = dc_t * i
        dz = np.concatenate(  # (B, G) gradient of the pre-activations, rows i | f | g | o
            [di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g**2), do * o * (1.0 - o)],
            axis=1,
        )
        dz = np.where(v, dz, 0.0)  # padded steps contribute nothing

        dw["W_ih"] += dz.T @ x[t]  # (G, F)
        dw["W_hh"] += dz.T @ tape["h_prev"][t]  # (G, O)
        if "b_ih" in dw:
            dw["b_ih"] += dz.sum(axis=0)  # (G,)
            dw["b_hh"] += dz.sum(axis=0)
        dx[t] = dz @ w["W_ih"]  # (B, F)
        dh = np.where(v, dz @ w["W_hh"], dh)  # padding: gradients pass through unchanged
        dc = np.where(v, dc_t * f, dc)
    return dx, dh, dc, dw


def _as_float64(name, value, shape):
    """A float64 copy of value (later changes to the caller's array do not leak in)."""
    a = np.array(value, dtype=np.float64)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a


def lstm_forward(params, x, *, hidden_size, num_layers=1, proj_size=0, bidirectional=False,
                 h0=None, c0=None, lengths=None, dropout_masks=None):
    """Forward pass of a (multi-layer, optionally bidirectional, projected) LSTM.

    params: PyTorch-named arrays (bias presence is read from the keys); x (T, B, I);
    h0 (L*D, B, O) and c0 (L*D, B, H), zeros when None; lengths (B,) ints in [1, T] or
    None (all T); dropout_masks: None or L-1 arrays (T, B, D*O), already scaled.

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

    expected = param_shapes(I, H, L, bias=bias, bidirectional=bidirectional, proj_size=P)
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
                layer_in, w, h0[idx], c0[idx], valid, reverse=(d == 1))
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
             "W_hr": "weight_hr"}

    d_out = dy  # (T, B, D*O) gradient of layer k's output
    for k in reversed(range(L)):
        d_in = np.zeros_like(cache["tapes"][k][0]["x"])  # (T, B, I or D*O)
        for d in range(D):
            idx = k * D + d
            w = _layer_weights(params, k, d)
            dx_d, dh0[idx], dc0[idx], dw = _direction_backward(
                cache["tapes"][k][d], w, d_out[:, :, d * O:(d + 1) * O], dh_n[idx], dc_n[idx],
                valid, reverse=(d == 1))
            d_in += dx_d  # both directions read the same input
            for short, value in dw.items():
                grads[f"{names[short]}_l{k}{_suffix(d)}"] += value
        if k > 0:
            d_out = d_in * masks[k - 1] if masks is not None else d_in
        else:
            dx = d_in
    assert dx.shape == (T, B, I)
    return dx, dh0, dc0, grads

"""The cell options that ONNX's LSTM operator (and Keras's LSTM) add to
PyTorch's cell: peephole connections, a cell clip, a coupled input-forget gate
and other activations (docs/design.md, "2. Glossary and the cell").

With every option at its default the cell is PyTorch's, and the kernels run
their plain code (kernels/cpu.py, "The cell options"); otherwise ``Cell``
hands them the variant's arguments. The equations, with z the gate
pre-activations of the plain cell (gate order i, f, g, o):

    i = f_act(clip(z_i + p_i * c_{t-1}))     f = f_act(clip(z_f + p_f * c_{t-1}))
    g = g_act(clip(z_g))                     (f = 1 - i with input_forget)
    c_t = f * c_{t-1} + i * g
    o = f_act(clip(z_o + p_o * c_t))         m_t = o * h_act(c_t)

clip(z) bounds z to [-clip, clip] (no bound when clip is None); p_i, p_f, p_o
are the rows of a layer's (3, H) ``peephole`` parameter.
"""

import math

import numpy as np

from numlstm.checks import check_bool
from numlstm.kernels import cpu as cpu_kernels

# Canonical name: (kernel code, default alpha, default beta). The defaults
# are ONNX's (its HardSigmoid: alpha 0.2, beta 0.5; its Affine: 1, 0).
ACTIVATIONS = {
    "sigmoid": (cpu_kernels.SIGMOID, 0.0, 0.0),
    "tanh": (cpu_kernels.TANH, 0.0, 0.0),
    "relu": (cpu_kernels.RELU, 0.0, 0.0),
    "hard_sigmoid": (cpu_kernels.HARD_SIGMOID, 0.2, 0.5),
    "affine": (cpu_kernels.AFFINE, 1.0, 0.0),
}
_SPELLINGS = {"hardsigmoid": "hard_sigmoid", "linear": "affine"}  # ONNX's, Keras's
PLAIN_ACTIVATIONS = (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0), ("tanh", 0.0, 0.0))
_ROLES = ("f (the i, f and o gates)", "g (the cell input)", "h (the cell output)")


def activation(spec, name="activation"):
    """An activation spec as (canonical name, alpha, beta).

    ``spec`` is a name (numlstm's, e.g. "hard_sigmoid"; ONNX's, e.g.
    "HardSigmoid"; or Keras's "linear") or a tuple (name, alpha, beta).
    Alpha and beta default to ONNX's values for the activation, and are 0
    for those that take none.
    """
    if isinstance(spec, str):
        raw, ab = spec, None
    elif isinstance(spec, (tuple, list)) and len(spec) == 3 and isinstance(spec[0], str):
        raw, ab = spec[0], spec[1:]
    else:
        raise TypeError(f"{name} must be a name or (name, alpha, beta), got {spec!r}")
    key = raw.lower().replace("-", "_")
    key = _SPELLINGS.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {sorted(ACTIVATIONS)} (or ONNX's spelling), "
                         f"got {raw!r}")
    _, alpha, beta = ACTIVATIONS[key]
    if ab is not None:
        if key in ("sigmoid", "tanh", "relu"):
            if tuple(ab) != (0.0, 0.0):
                raise ValueError(f"{name}: {key} takes no alpha or beta, got {tuple(ab)}")
        alpha, beta = (_finite(v, f"{name}'s {w}") for v, w in zip(ab, ("alpha", "beta"),
                                                                     strict=True))
    return key, float(alpha), float(beta)


def _finite(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class Cell:
    """The cell options of a model (every layer and direction shares them).

    Parameters
    ----------
    peepholes : bool
        Peephole connections: each layer and direction gets a trainable
        ``peephole`` parameter (3, H) (rows p_i, p_f, p_o).
    clip : float or None
        Bound of every gate pre-activation, > 0 (ONNX's ``clip``); None for none.
    input_forget : bool
        Couple the forget gate to the input gate: f = 1 - i (ONNX's
        ``input_forget``); the forget gate's weights are then unused.
    activations : sequence of 3 specs, optional
        (f, g, h) as ONNX orders them: f for the i, f, o gates (default
        sigmoid), g for the cell input and h for the cell output (tanh).
        Each is a name or (name, alpha, beta); see ``activation``.
    """

    __slots__ = ("peepholes", "clip", "input_forget", "activations")

    def __init__(self, *, peepholes=False, clip=None, input_forget=False, activations=None):
        self.peepholes = check_bool(peepholes, "peepholes")
        self.input_forget = check_bool(input_forget, "input_forget")
        if clip is not None:
            clip = _finite(clip, "clip")
            if clip <= 0:
                raise ValueError(f"clip must be > 0 (or None for no clip), got {clip}")
        self.clip = clip
        if activations is None:
            activations = PLAIN_ACTIVATIONS
        if isinstance(activations, str) or not hasattr(activations, "__len__") \
                or len(activations) != 3:
            raise ValueError(f"activations must be 3 specs (f, g, h), got {activations!r}")
        self.activations = tuple(activation(spec, f"activations[{k}] ({_ROLES[k]})")
                                 for k, spec in enumerate(activations))

    @property
    def plain(self):
        """Whether this is PyTorch's cell (every option at its default)."""
        return (not self.peepholes and self.clip is None and not self.input_forget
                and self.activations == PLAIN_ACTIVATIONS)

    def kernel_cell(self, peep, dpeep, dtype):
        """The kernels' ``cell`` argument: () for the plain cell, else
        (kinds (3,) int64, params (8,) dtype, peep, dpeep) with peep, dpeep
        the layer's (3, H) peephole parameter and gradient ((0, H) arrays
        without peepholes). Small arrays made once, when a model binds."""
        if self.plain:
            return ()
        kinds = np.array([ACTIVATIONS[name][0] for name, _, _ in self.activations], np.int64)
        params = [v for _, a, b in self.activations for v in (a, b)]
        params += [math.inf if self.clip is None else self.clip, float(self.input_forget)]
        return (kinds, np.array(params, dtype), peep, dpeep)

    def as_dict(self):
        """The options as JSON-ready values (for files and ``repr``)."""
        return {"peepholes": self.peepholes, "clip": self.clip,
                "input_forget": self.input_forget,
                "activations": [list(a) for a in self.activations]}

    def __eq__(self, other):
        return isinstance(other, Cell) and self.as_dict() == other.as_dict()

    def __hash__(self):
        return hash((self.peepholes, self.clip, self.input_forget, self.activations))

    def __repr__(self):
        return "Cell(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"

    def options(self):
        """The options that differ from PyTorch's cell, as keyword arguments."""
        out = {}
        if self.peepholes:
            out["peepholes"] = True
        if self.clip is not None:
            out["clip"] = self.clip
        if self.input_forget:
            out["input_forget"] = True
        if self.activations != PLAIN_ACTIVATIONS:
            out["activations"] = tuple(
                name if (a, b) == ACTIVATIONS[name][1:] else (name, a, b)
                for name, a, b in self.activations)
        return out

    def describe(self):
        """One line for ``numlstm info`` and the memory report."""
        if self.plain:
            return "plain (sigmoid, tanh, tanh)"
        parts = []
        if self.peepholes:
            parts.append("peepholes")
        if self.clip is not None:
            parts.append(f"clip {self.clip:g}")
        if self.input_forget:
            parts.append("input_forget")
        acts = ", ".join(name if (a, b) == ACTIVATIONS[name][1:] else f"{name}({a:g}, {b:g})"
                         for name, a, b in self.activations)
        return "; ".join(parts + [f"activations ({acts})"])

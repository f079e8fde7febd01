"""numlstm.cell: the cell options' spellings, defaults, errors, and the
arguments they hand the kernels."""

import math

import numpy as np
import pytest

from numlstm.cell import ACTIVATIONS, Cell, activation
from numlstm.kernels import cpu as cpu_kernels


def test_spellings_and_defaults():
    assert activation("HardSigmoid") == ("hard_sigmoid", 0.2, 0.5)  # ONNX's defaults
    assert activation("hard_sigmoid") == ("hard_sigmoid", 0.2, 0.5)
    assert activation("linear") == ("affine", 1.0, 0.0)  # Keras's name
    assert activation("Affine") == ("affine", 1.0, 0.0)
    assert activation(("affine", 0.5, -1)) == ("affine", 0.5, -1.0)
    assert activation("Relu") == ("relu", 0.0, 0.0)
    assert Cell().plain and Cell(activations=("Sigmoid", "Tanh", "tanh")).plain
    assert not Cell(activations=("hard_sigmoid", "tanh", "tanh")).plain
    assert not Cell(clip=3.0).plain and not Cell(peepholes=True).plain
    assert not Cell(input_forget=True).plain


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clip=0.0), ValueError, "clip must be > 0"),
    (dict(clip=float("nan")), ValueError, "clip must be a finite number"),
    (dict(clip="1"), ValueError, "clip must be a finite number"),
    (dict(peepholes="yes"), TypeError, "peepholes must be a bool"),
    (dict(input_forget=1), TypeError, "input_forget must be a bool"),
    (dict(activations=("sigmoid", "tanh")), ValueError, "3 specs"),
    (dict(activations="sigmoid"), ValueError, "3 specs"),
    (dict(activations=("sigmoid", "gelu", "tanh")), ValueError,
     r"activations\[1\] \(g \(the cell input\)\) must be one of"),
    (dict(activations=(("tanh", 1.0, 0.0), "tanh", "tanh")), ValueError,
     "tanh takes no alpha or beta"),
    (dict(activations=(("affine", math.inf, 0.0), "tanh", "tanh")), ValueError,
     "alpha must be a finite number"),
    (dict(activations=(3, "tanh", "tanh")), TypeError, "name or"),
])
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        Cell(**kwargs)


def test_kernel_cell():
    H = 3
    assert Cell().kernel_cell(np.zeros((0, H)), np.zeros((0, H)), np.float32) == ()
    peep, dpeep = np.ones((3, H), np.float32), np.zeros((3, H), np.float32)
    cell = Cell(peepholes=True, clip=2.5, input_forget=True,
                activations=(("hard_sigmoid", 0.3, 0.4), "relu", "linear"))
    kinds, params, p, dp = cell.kernel_cell(peep, dpeep, np.float32)
    assert kinds.tolist() == [cpu_kernels.HARD_SIGMOID, cpu_kernels.RELU, cpu_kernels.AFFINE]
    assert params.dtype == np.float32
    np.testing.assert_array_equal(params, np.float32([0.3, 0.4, 0, 0, 1, 0, 2.5, 1]))
    assert p is peep and dp is dpeep
    _, params, _, _ = Cell(activations=("relu", "tanh", "tanh")).kernel_cell(
        np.zeros((0, H)), np.zeros((0, H)), np.float64)
    assert params[6] == np.inf and params[7] == 0  # no clip, no coupling


def test_options_round_trip_and_describe():
    cell = Cell(clip=1.5, activations=(("hard_sigmoid", 0.3, 0.4), "tanh", "HardSigmoid"))
    assert cell.options() == {"clip": 1.5, "activations": (
        ("hard_sigmoid", 0.3, 0.4), "tanh", "hard_sigmoid")}
    assert Cell(**cell.options()) == cell and hash(Cell(**cell.options())) == hash(cell)
    assert Cell(**cell.as_dict()) == cell
    assert cell.describe() == "clip 1.5; activations (hard_sigmoid(0.3, 0.4), tanh, hard_sigmoid)"
    assert Cell().describe().startswith("plain") and Cell().options() == {}
    assert repr(Cell(peepholes=True)) == "Cell(peepholes=True)"
    assert set(ACTIVATIONS) == {"sigmoid", "tanh", "relu", "hard_sigmoid", "affine"}

"""Compact and quantized storage (inference only when quantized).

A dense weight can store float16 values (half the bytes; relative error <=
2**-11 per weight), read by the kernels as they are.

Three independent savings on a CSR weight:

* indices as uint16 instead of int32 when the weight has at most 65536
  columns, and indptr as uint16 when it stores at most 65535 values (exact;
  the model still trains);
* values as float16 (relative error <= 2**-11 per weight);
* values as int8 with one symmetric scale per row, the scale stored as
  float16: ``value = q * scale[row]``, q in [-127, 127], ``scale[row]`` the
  smallest float16 >= max |row| / 127 (rounded up, so the largest value
  needs no clipping, and never below float16's smallest subnormal 2**-24,
  so it cannot underflow to 0). q is rounded against that stored scale:
  the error is at most half a step, ``scale[row] / 2``, per weight, which is
  <= max |row| / 254 * (1 + 2**-10) + 2**-25. The first term rules down to
  max |row| ~ 127 * 2**-14 ~ 7.8e-3, where float16 scales are normal; below
  that, their fixed 2**-24 spacing makes the absolute 2**-25 (~3e-8) the
  bound (a row with max |row| <= 2**-25 stores zeros, each within it). A
  row with |w| beyond 127 * 65504 ~ 8.3e6 would need an infinite scale:
  ``quantize`` refuses it with a ValueError naming the weight, and the
  model is left as it was.

Kernels read these kinds directly and convert each value in a register; no
dense or float32 copy is ever made. A model with float16 or int8 values is
for inference: ``forward(..., training=True)`` raises a TypeError.
"""

import numpy as np

from numlstm import weights as weights_mod
from numlstm.lstm import LSTM

VALUE_TYPES = (None, "float16", "int8")
INDEX_TYPES = ("auto", "uint16", "int32")
_UINT16_COLUMNS = 2**16
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT8_MAX_ABS = 127 * _FLOAT16_MAX  # ~8.3e6: larger rows would need an infinite scale


def quantize(model, values="int8", indices="auto", *, skip_dense=False):
    """Re-store every CSR weight of ``model`` compactly, in place; with
    ``values="float16"`` every dense weight too.

    Parameters
    ----------
    model : numlstm.LSTM
    values : {"int8", "float16", None}
        Value storage; None keeps the model's float dtype (trainable).
    indices : {"auto", "uint16", "int32"}
        "auto" picks uint16 for every weight with at most 65536 columns.
    skip_dense : bool
        Block-sparse weights, and dense weights unless ``values="float16"``,
        cannot be quantized here (prune them to CSR first,
        ``numlstm.prune.magnitude``): by default their presence is an error;
        True leaves them as they are.

    Returns
    -------
    numlstm.LSTM
        The model, with fresh zero gradients.
    """
    if values not in VALUE_TYPES:
        raise ValueError(f"values must be one of {VALUE_TYPES}, got {values!r}")
    if indices not in INDEX_TYPES:
        raise ValueError(f"indices must be one of {INDEX_TYPES}, got {indices!r}")
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    weights = model.weights()
    halves = values == "float16"  # dense weights too
    other = [name for name, w in weights.items()
             if w.format == "bsr" or (w.format == "dense" and not halves)]
    if other and not skip_dense:
        kinds = "block-sparse" if halves else "dense or block-sparse"
        hint = "" if halves else ", store dense weights as float16 (values='float16'),"
        raise ValueError(f"quantize(values={values!r}) works on CSR weights"
                         f"{' and dense ones' if halves else ''}; {', '.join(other)} "
                         f"{'are' if len(other) > 1 else 'is'} {kinds}: prune them to CSR "
                         f"first (numlstm.prune.magnitude){hint} or pass skip_dense=True")
    params = dict(model.host_params.params)
    for name, w in weights.items():
        if w.format == "csr":
            params[name] = quantize_weight(w, values, indices, name=name)
        elif w.format == "dense" and halves:
            params[name] = half_dense(w, name)
    model.install_params(params)
    return model


def quantize_weight(weight, values, indices="auto", name="weight"):
    """A new ``weights_mod.CSR`` with the requested value and index storage.

    ``weight`` may itself be quantized: values are requantized from its
    dequantized form. int8 values come within half their row's scale step
    of the float values (the module docstring gives the bound, down to
    subnormal magnitudes). Raises ValueError naming ``name`` if
    ``indices="uint16"`` and the weight has more than 65536 columns, if
    float16 cannot hold a value (|w| > 65504), or, for int8, if a row's
    float16 scale would overflow (|w| beyond 127 * 65504 ~ 8.3e6): such a
    weight is refused, never stored with an infinite scale (a file ``load``
    would reject).
    """
    R, C = weight.shape
    if indices == "uint16" and C > _UINT16_COLUMNS:
        raise ValueError(f"{name} has {C} columns; uint16 indices hold at most "
                         f"{_UINT16_COLUMNS}")
    small = indices == "uint16" or (indices == "auto" and C <= _UINT16_COLUMNS)
    index = weight.indices.astype(np.uint16 if small else np.int32)
    indptr = weight.indptr.astype(np.uint16 if small and weight.nnz < 2**16 else np.int32)
    data = weight.dequantized()
    scales = None
    if values == "float16":
        data = _to_float16(data, name)
    elif values == "int8":
        rows = np.repeat(np.arange(R), np.diff(weight.indptr))
        peak = np.zeros(R, weight.dtype)
        np.maximum.at(peak, rows, np.abs(data))
        scales = _int8_scales(peak)
        if not np.all(np.isfinite(scales)):
            # An infinite scale would run, save, then be refused by load:
            # refuse it here, naming the weight, and leave the model as it was.
            row = int(np.argmax(~np.isfinite(scales)))
            raise ValueError(
                f"{name} cannot be stored as int8: row {row} has |w| up to "
                f"{float(peak[row]):g}, and its float16 scale (max |w| / 127) overflows "
                f"past |w| = {_INT8_MAX_ABS:g}; keep its float values (values=None)")
        # Rounded against the stored scale, so its own rounding adds no error; the
        # scale is >= max |row| / 127, so the clip only absorbs the division's last bit.
        data = np.clip(np.rint(data / scales[rows].astype(weight.dtype)), -127, 127) \
            .astype(np.int8)
    else:
        data = np.array(data, dtype=weight.dtype)
    return weights_mod.CSR(data, index, indptr, weight.shape, dtype=weight.dtype, scales=scales)


def _int8_scales(peak):
    """The float16 row scales (R,) of int8 values for rows whose largest |w| is
    ``peak`` (R,): the smallest float16 >= peak / 127 (inf past float16's
    range, which the caller refuses), 1 for an all-zero row.

    Rounding to nearest could land below peak / 127, and then the row's
    largest values would clip at q = 127, by up to a whole scale step per
    127 steps and far more where float16 is subnormal (its spacing 2**-24
    is then coarse next to the scale) or where peak / 127 underflows to 0.
    Rounding up keeps every |w| / scale <= 127 and the scale > 0.
    """
    target = peak.astype(np.float64) / 127
    with np.errstate(over="ignore"):  # inf is the caller's to refuse
        scales = target.astype(np.float16)
    low = scales.astype(np.float64) < target
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    scales[peak == 0] = 1
    return scales


def half_dense(weight, name="weight"):
    """A new float16 ``weights_mod.Dense`` of a dense weight's values
    (dequantized first if it already is one). Raises ValueError naming
    ``name`` if float16 cannot hold a value (|w| > 65504)."""
    return weights_mod.Dense(_to_float16(weight.to_array(), name), dtype=weight.dtype)


def _to_float16(values, name):
    """``values`` as float16; ValueError naming ``name`` if one is beyond
    float16's range (|w| > 65504)."""
    if values.size and np.max(np.abs(values)) > _FLOAT16_MAX:
        raise ValueError(f"{name} has values beyond float16's range "
                         f"(|w| <= {_FLOAT16_MAX:g}), max |w| = {np.max(np.abs(values)):g}")
    return values.astype(np.float16)

"""Save and load models: one ``.npz`` file, written atomically, validated on load.

File layout (format version 1): a NumPy ``.npz`` archive, no pickles, holding

* ``header``: UTF-8 JSON as a uint8 array: ``{"format": "numlstm",
  "version": 1, "config": {...LSTM arguments...}, "params": {name: spec}}``
  where a weight's spec gives its storage (``format`` dense / csr / bsr,
  ``shape``, and the dtype of every array) and a bias's spec its dtype;
* per weight ``<name>.values`` and, for sparse kinds, ``<name>.indices``,
  ``<name>.indptr`` (and ``<name>.scales`` for int8 values); per bias ``<name>``.

Every storage kind round-trips exactly, quantized and compact ones included.
``load`` checks everything a kernel relies on before any array reaches one:
header, shapes, dtypes, finiteness, indptr starting at 0, non-decreasing and
ending at nnz, indices in range and strictly increasing within each row.
"""

import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from numlstm import weights as W
from numlstm.lstm import LSTM

FORMAT = "numlstm"
VERSION = 1
_CONFIG_KEYS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size", "dtype")
_INDEX_TYPES = ("int32", "uint16")


class ModelFileError(ValueError):
    """A file that is not a valid numlstm model (truncated, corrupted, foreign)."""


def save(model, path):
    """Write ``model`` to ``path`` (an ``.npz`` archive) atomically.

    The archive is written to a temporary file in the same folder, flushed
    and fsync'ed, then renamed over ``path``: a crash leaves either the old
    file or the new one, never a partial one. The path is used exactly as
    given (no suffix is added). A writer killed mid-save (SIGKILL, power
    loss) cannot remove its temporary: a hidden ``.numlstm-*.tmp`` file in
    the folder, which any later save leaves alone (it might be another
    process's live write) and which may be deleted by hand.
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    path = os.fspath(path)
    if model._device is not None:  # a model on the GPU: save its current values
        model._device.pull()
    arrays, params = {}, {}
    for name, p in model._params.items():
        if not name.startswith("weight"):
            arrays[name] = p
            params[name] = {"dtype": p.dtype.name}
            continue
        spec = {"format": p.format, "shape": list(p.shape), "values": p.values.dtype.name}
        arrays[f"{name}.values"] = p.values
        if p.format != "dense":
            spec["indices"] = p.indices.dtype.name
            spec["indptr"] = p.indptr.dtype.name
            arrays[f"{name}.indices"] = p.indices
            arrays[f"{name}.indptr"] = p.indptr
        if getattr(p, "scales", None) is not None:
            spec["scales"] = p.scales.dtype.name
            arrays[f"{name}.scales"] = p.scales
        params[name] = spec
    header = {"format": FORMAT, "version": VERSION,
              "config": {k: (model.dtype.name if k == "dtype" else getattr(model, k))
                         for k in _CONFIG_KEYS},
              "params": params}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".numlstm-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path):
    """Read a model written by ``save``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError (a ValueError)
        The file is truncated, corrupted, not a numlstm model, written by a
        newer format version, holds pickled objects, or breaks any invariant
        (the message says which and where).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # np.load would read anything else as a pickle or .npy
        raise ModelFileError(f"{path!r} is not an .npz archive, so not a numlstm model file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if "header" not in names:
                raise ModelFileError(f"{path!r} is not a numlstm model file: it has no header")
            header = _parse_header(archive["header"], path)
            arrays = {name: archive[name] for name in names - {"header"}}
    except ModelFileError:
        raise
    except ValueError as e:  # numpy refuses object arrays without pickle
        raise ModelFileError(f"{path!r} cannot be read safely: {e}") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, zlib.error,
            NotImplementedError, RuntimeError) as e:  # flipped zip flags: "compressed
        # patched data" (NotImplementedError), "encrypted" (RuntimeError)
        raise ModelFileError(f"{path!r} is truncated or corrupted, or not an .npz "
                             f"archive: {e}") from None
    return _build(header, arrays, path)


def _parse_header(raw, path):
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ModelFileError(f"{path!r}: header must be a 1-D uint8 array, got "
                             f"{raw.dtype} {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path!r}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a numlstm model file (header format "
                             f"{header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path!r}: header version must be an int, got {version!r}")
    if version > VERSION:
        raise ModelFileError(f"{path!r} was written in format version {version} by a newer "
                             f"numlstm; this one reads version {VERSION}")
    if version < 1:
        raise ModelFileError(f"{path!r}: header version must be >= 1, got {version}")
    for key, kind in (("config", dict), ("params", dict)):
        if not isinstance(header.get(key), kind):
            raise ModelFileError(f"{path!r}: header {key} must be a JSON object")
    return header


def _build(header, arrays, path):
    config = header["config"]
    if set(config) != set(_CONFIG_KEYS):
        raise ModelFileError(f"{path!r}: header config must have keys {sorted(_CONFIG_KEYS)}, "
                             f"got {sorted(config)}")
    layers = config["num_layers"]
    if isinstance(layers, int) and layers > len(header["params"]):  # each layer has >= 2
        raise ModelFileError(f"{path!r}: header config num_layers={layers} does not match "
                             f"its {len(header['params'])} parameters")
    try:
        model = LSTM._without_params(**config)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path!r}: header config is invalid: {e}") from None
    except MemoryError as e:  # a forged header: sizes too large to allocate
        raise ModelFileError(f"{path!r}: header config asks for a model too large for "
                             f"memory: {e}") from None
    specs = header["params"]
    expected = model._param_shapes()
    if set(specs) != set(expected):
        raise ModelFileError(f"{path!r}: parameters do not match the config: missing "
                             f"{sorted(set(expected) - set(specs))}, unexpected "
                             f"{sorted(set(specs) - set(expected))}")
    params, used = {}, set()
    for name, shape in expected.items():
        where = f"{path!r}: {name}"
        spec = specs[name]
        if not isinstance(spec, dict):
            raise ModelFileError(f"{where}: spec must be a JSON object, got {spec!r}")
        if name.startswith("bias"):
            arr = _array(arrays, name, spec.get("dtype"), (model.dtype.name,), where, used)
            _expect(arr.shape == shape, f"{where} must have shape {shape}, got {arr.shape}")
            params[name] = _finite(arr, where).copy()
        else:
            params[name] = _weight(arrays, name, spec, shape, model.dtype, where, used)
    unexpected = set(arrays) - used
    if unexpected:
        raise ModelFileError(f"{path!r}: unexpected arrays {sorted(unexpected)}")
    model._install(params)
    return model


def _expect(ok, message):
    if not ok:
        raise ModelFileError(message)


def _array(arrays, key, declared, allowed, where, used):
    _expect(declared in allowed, f"{where}: dtype must be one of {list(allowed)}, "
                                 f"got {declared!r}")
    _expect(key in arrays, f"{where}: array {key!r} is missing")
    arr = arrays[key]
    _expect(arr.dtype.name == declared,
            f"{where}: array {key!r} has dtype {arr.dtype.name}, header says {declared}")
    used.add(key)
    return np.ascontiguousarray(arr)


def _finite(arr, where):
    if arr.dtype.kind == "f":
        _expect(bool(np.all(np.isfinite(arr))), f"{where} must be finite, got NaN or inf")
    return arr


def _weight(arrays, name, spec, shape, dtype, where, used):
    fmt = spec.get("format")
    _expect(fmt in ("dense", "csr", "bsr"),
            f"{where}: format must be dense, csr or bsr, got {fmt!r}")
    _expect(spec.get("shape") == list(shape),
            f"{where}: shape must be {list(shape)}, got {spec.get('shape')!r}")
    R, C = shape
    value_types = (dtype.name,) + (W.QUANTIZED_TYPES if fmt == "csr" else ())
    values = _finite(_array(arrays, f"{name}.values", spec.get("values"), value_types, where,
                            used), where)
    if fmt == "dense":
        _expect(values.shape == shape, f"{where}: values must have shape {shape}, got "
                                       f"{values.shape}")
        return W.Dense(values.copy())
    index_types = _INDEX_TYPES if fmt == "csr" else ("int32",)
    indices = _array(arrays, f"{name}.indices", spec.get("indices"), index_types, where, used)
    indptr = _array(arrays, f"{name}.indptr", spec.get("indptr"), index_types, where, used)
    if fmt == "bsr":
        _expect(values.ndim == 3, f"{where}: BSR values must be 3-D (nblocks, br, bc), got "
                                  f"shape {values.shape}")
        br, bc = values.shape[1:]
        _expect(br >= 1 and bc >= 1 and R % br == 0 and C % bc == 0,
                f"{where}: block {(br, bc)} does not divide shape {shape}")
        _check_pattern(indices, indptr, values.shape[0], R // br, C // bc, where)
        return W.BSR(values.copy(), indices.copy(), indptr.copy(), shape)
    _expect(values.ndim == 1, f"{where}: CSR values must be 1-D, got shape {values.shape}")
    _check_pattern(indices, indptr, values.shape[0], R, C, where)
    scales = None
    if values.dtype == np.int8:
        scales = _finite(_array(arrays, f"{name}.scales", spec.get("scales"), ("float16",),
                                where, used), where)
        _expect(scales.shape == (R,), f"{where}: scales must have shape ({R},), got "
                                      f"{scales.shape}")
    else:
        _expect("scales" not in spec, f"{where}: scales are only for int8 values")
    return W.CSR(values.copy(), indices.copy(), indptr.copy(), shape, dtype=dtype,
                 scales=None if scales is None else scales.copy())


def _check_pattern(indices, indptr, nnz, rows, cols, where):
    """The CSR invariants every kernel trusts (over blocks for BSR)."""
    _expect(indptr.shape == (rows + 1,), f"{where}: indptr must have shape ({rows + 1},), "
                                         f"got {indptr.shape}")
    _expect(indices.shape == (nnz,), f"{where}: indices must have shape ({nnz},) like the "
                                     f"values, got {indices.shape}")
    ptr = indptr.astype(np.int64)
    _expect(ptr[0] == 0 and ptr[-1] == nnz, f"{where}: indptr must start at 0 and end at "
                                            f"nnz={nnz}, got {ptr[0]} ... {ptr[-1]}")
    _expect(bool(np.all(np.diff(ptr) >= 0)), f"{where}: indptr must be non-decreasing")
    if nnz:
        idx = indices.astype(np.int64)
        _expect(idx.min() >= 0 and idx.max() < cols,
                f"{where}: indices must lie in [0, {cols}), got [{idx.min()}, {idx.max()}]")
        # Strictly increasing within each row: every step is positive except
        # where a new row starts.
        steps = np.diff(idx)
        row_start = np.zeros(nnz, bool)
        row_start[ptr[1:-1][ptr[1:-1] < nnz]] = True
        _expect(bool(np.all((steps > 0) | row_start[1:])),
                f"{where}: indices must be sorted and unique within each row")

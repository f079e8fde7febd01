"""Save and load models: one ``.npz`` file, written atomically, validated on load.

File layout (format version 2): a NumPy ``.npz`` archive, no pickles, holding

* ``header``: UTF-8 JSON as a uint8 array: ``{"format": "numlstm",
  "version": 2, "config": {...LSTM arguments...}, "params": {name: spec}}``
  where a weight's spec gives its storage (``format`` dense / csr / bsr,
  ``shape``, and the dtype of every array) and a bias's or peephole's spec
  its dtype;
* per weight ``<name>.values`` and, for sparse kinds, ``<name>.indices``,
  ``<name>.indptr`` (and ``<name>.scales`` for int8 values); per bias or
  peephole ``<name>``.

Version 2 added the cell options to the config (``reverse``, ``peepholes``,
``clip``, ``input_forget``, ``activations``); a version 1 file (written
before them) loads as the plain cell it was.

Every storage kind round-trips exactly, quantized and compact ones included.
``load`` checks everything a kernel relies on before any array reaches one:
header, shapes, dtypes, finiteness, indptr starting at 0, non-decreasing and
ending at nnz, indices in range and strictly increasing within each row.

Loading is bounded by what the header declares. The archive's member names
are checked against the header before any member is read, and each member's
``.npy`` header (dtype, byte order, shape, Fortran order) and its sizes in the
zip directory before any of its data: a member larger than its weight can be
is refused before it is decompressed, so memory never exceeds the declared
model's size plus a small constant (the JSON header, at most
``MAX_HEADER_BYTES``, and 1 MiB of read buffer). ``save`` runs the same checks
on what it is about to write, so every file it writes loads back.
"""

import json
import math
import os
import secrets
import stat
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy

from numlstm import weights
from numlstm.lstm import LSTM

FORMAT = "numlstm"
VERSION = 2
_CONFIG_KEYS_V1 = ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                   "dropout", "bidirectional", "proj_size", "dtype")
_CONFIG_KEYS = _CONFIG_KEYS_V1 + ("reverse", "peepholes", "clip", "input_forget",
                                  "activations")
_INDEX_TYPES = ("int32", "uint16")
MAX_HEADER_BYTES = 16 * 2**20  # the JSON header: ~100 bytes per parameter
MAX_MEMBERS = 2**16 - 1  # archive members (4 per CSR weight): beyond this, zip64
_NPY_HEADER_BYTES = 16 * 2**10  # a .npy member's own header (numpy writes < 10 kB)
_CHUNK = 2**20  # read buffer


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

    Every file ``save`` writes loads back: the header and arrays go through
    the checks ``load`` runs before anything is written (a model with NaN
    or infinite values, say, is refused and no file is touched).

    Permissions: a new file gets the mode any new file gets under the
    process's umask (0666 & ~umask); overwriting keeps the existing file's
    permission bits (its owner becomes whoever saves). A symbolic link is
    written through: the file it points to is replaced (the temporary is
    made in that file's folder) and the link stays a link.

    Raises
    ------
    TypeError
        ``model`` is not a numlstm.LSTM.
    ValueError
        The model would not load back (the message says why).
    IsADirectoryError
        ``path`` is a folder or ends with a path separator.
    OSError
        The folder cannot be written, or ``path`` exists and is not a
        regular file (a FIFO, a device).
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be a numlstm.LSTM, got {type(model).__name__}")
    path = os.fspath(path)
    target = _destination(path)
    model.engine.pull()  # a model on the GPU: save its current values
    arrays, params = {}, {}
    for name, p in model.host_params.params.items():
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
    config = {k: (model.dtype.name if k == "dtype" else getattr(model, k))
              for k in _CONFIG_KEYS_V1}
    config["reverse"] = model.reverse
    config.update(model.cell.as_dict())
    header = {"format": FORMAT, "version": VERSION, "config": config, "params": params}
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    try:
        _check_before_save(raw, arrays)
    except ModelFileError as e:
        raise ValueError(f"cannot save to {path!r}: the file would not load back, so "
                         f"nothing was written: {e}") from None
    arrays["header"] = raw
    folder = os.path.dirname(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except FileNotFoundError:
        mode = None  # a new file: the umask decides, as for any new file
    fd, tmp = _create_temporary(folder)
    try:
        if mode is not None:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            else:
                os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _destination(path):
    """The regular file ``save`` replaces: ``path``, or the file its symlink
    points to. Refuses a folder (or a path ending in a separator) and an
    existing non-regular file."""
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if not path or path.endswith(seps) or os.path.isdir(path):
        raise IsADirectoryError(
            f"cannot save to {path!r}: it names a folder, not a file; give a file path "
            f"such as {os.path.join(path or '.', 'model.npz')!r}")
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as e:
        raise type(e)(f"cannot save to {path!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"cannot save to {path!r}: it is {_file_kind(st.st_mode)}, not a "
                      f"regular file")
    return target


def _create_temporary(folder):
    """A new ``.numlstm-*.tmp`` in ``folder``, opened for writing. Made with
    mode 0666 so that the umask applies, as to any new file (mkstemp's 0600
    would leave the saved model readable by its owner only)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".numlstm-{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder!r}")


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


def _check_before_save(raw, arrays):
    """Run ``load``'s checks on the header bytes and arrays ``save`` would write."""
    src = "the model"
    _expect(raw.size <= MAX_HEADER_BYTES, f"{src}: its header would take {raw.size:,} "
                                          f"bytes, more than the {MAX_HEADER_BYTES:,} "
                                          f"load reads")
    header = _parse_header(raw, src)
    model, members = _plan(header, src)
    _check_names(set(arrays), members, src)
    for key, arr in arrays.items():
        declared, most = members[key]
        _check_npy_header(src, f"array {key!r}", arr.shape, arr.dtype, declared, most)
        _expect(arr.dtype.isnative, f"{src}: array {key!r} is not in native byte order")
    _check_params(model, header["params"], arrays, src)


def _file_kind(mode):
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def load(path):
    """Read a model written by ``save``.

    Memory is bounded by the model the file's header declares: member names,
    each member's ``.npy`` header and its sizes in the zip directory are
    checked before its data is read (a zip bomb is refused before it is
    decompressed). Arrays in non-native byte order (``>f4``) are converted
    to native; Fortran-order arrays to C order.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError (a ValueError)
        The file is truncated, corrupted, not a numlstm model, written by a
        newer format version, holds pickled objects, holds members the
        header does not declare or larger than it allows, is not a regular
        file (a folder, a FIFO, a device), or breaks any invariant (the
        message names the file and the member, and says what is wrong).
    """
    path = os.fspath(path)
    src = repr(path)
    with _open_regular(path) as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would read anything else as a pickle or .npy
            raise ModelFileError(f"{src} is not an .npz archive, so not a numlstm model file")
        _check_directory_size(f, src)
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
                RuntimeError, zlib.error) as e:
            raise ModelFileError(f"{src} is truncated or corrupted, or not an .npz "
                                 f"archive: {e}") from None
        with archive:
            return _read(archive, src)


def _open_regular(path):
    """``path`` opened for reading, refused unless it is a regular file.

    The opened descriptor itself is checked (os.fstat), so a FIFO swapped in
    after a first check cannot block the read; O_NONBLOCK makes opening one
    return at once instead of waiting for a writer.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no model file at {path!r}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path!r} is {_file_kind(st.st_mode)}, not a regular file, "
                             f"so not a numlstm model file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path!r} is {_file_kind(st.st_mode)}, not a regular "
                                 f"file, so not a numlstm model file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_directory_size(f, src):
    """Refuse an archive whose zip directory lists more members than a model
    file can have, before zipfile builds an object for each of them."""
    try:
        end = zipfile._EndRecData(f)  # the end-of-directory record (zip64 aware)
    except AttributeError:  # a future Python without it: zipfile's own checks remain
        return
    except (OSError, ValueError, EOFError) as e:
        raise ModelFileError(f"{src} is truncated or corrupted: {e}") from None
    if end is None:
        raise ModelFileError(f"{src} is truncated or corrupted: no zip directory at its end")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_MEMBERS or size > MAX_MEMBERS * 256:
        raise ModelFileError(f"{src}: its zip directory lists {entries:,} members in "
                             f"{size:,} bytes; a model file has at most {MAX_MEMBERS:,}")


def _read(archive, src):
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ModelFileError(f"{src}: members {dupes[:5]} appear more than once")
    foreign = [n for n in names if not n.endswith(".npy") or n.endswith("/")]
    if foreign:
        raise ModelFileError(f"{src}: members {sorted(foreign)[:5]} are not .npy arrays, "
                             f"so this is not a numlstm model file")
    by_key = {info.filename[:-4]: info for info in infos}
    if "header" not in by_key:
        raise ModelFileError(f"{src} is not a numlstm model file: it has no header")
    raw = _read_member(archive, by_key["header"], src, "uint8", MAX_HEADER_BYTES)
    header = _parse_header(raw, src)
    model, members = _plan(header, src)
    _check_names(set(by_key) - {"header"}, members, src)
    arrays = {key: _read_member(archive, by_key[key], src, *members[key])
              for key in members}
    model.install_params(_check_params(model, header["params"], arrays, src))
    return model


def _check_names(present, members, src):
    unexpected = present - set(members)
    if unexpected:
        raise ModelFileError(f"{src}: unexpected arrays {sorted(unexpected)}")
    missing = set(members) - present
    if missing:
        raise ModelFileError(f"{src}: arrays {sorted(missing)} are missing")


def _check_npy_header(src, what, shape, dtype, declared, most):
    """A member's dtype and size against what the file's header declares,
    from its .npy header alone (no data read yet). ``what`` names the member
    (or the array, for save)."""
    where = f"{src}: {what}"
    if dtype.hasobject:
        raise ModelFileError(f"{src} cannot be read safely: {what} holds Python "
                             f"objects (pickles), which model files never do")
    native = dtype.newbyteorder("=")
    _expect(native == np.dtype(declared),
            f"{where} has dtype {native.name if native.names is None else native}, "
            f"header says {declared}")
    _expect(all(isinstance(n, int) and n >= 0 for n in shape),
            f"{where} has an invalid shape {shape}")
    count = math.prod(shape)
    _expect(count <= most, f"{where} has shape {shape} ({count:,} values); the header "
                           f"allows at most {most:,}")
    return count


def _read_member(archive, info, src, declared, most):
    """One member as a native, C-ordered array of ``declared`` dtype with at
    most ``most`` values, its sizes and .npy header checked before its data is
    read, its data read in bounded chunks (zipfile verifies the CRC at the end).
    """
    where = f"{src}: member {info.filename!r}"
    itemsize = np.dtype(declared).itemsize
    limit = _NPY_HEADER_BYTES + most * itemsize
    _expect(info.file_size <= limit,
            f"{where} declares {info.file_size:,} bytes, more than the {limit:,} its header "
            f"allows (refused before decompressing it)")
    # Deflate never expands data by more than a few bytes per 16 kB block.
    _expect(info.compress_size <= limit + limit // 64 + 1024,
            f"{where} takes {info.compress_size:,} compressed bytes, more than the {limit:,} "
            f"its header allows")
    _expect(info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
            f"{where} uses zip compression method {info.compress_type}; model files use "
            f"stored or deflated members only")
    count = nbytes = None
    try:
        with archive.open(info) as fp:
            version = npy.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(fp)
            else:
                raise ModelFileError(f"{where}: .npy format version {version} is not "
                                     f"one numlstm writes (1.0 or 2.0)")
            count = _check_npy_header(src, f"member {info.filename!r}", shape, dtype,
                                      declared, most)
            nbytes = count * itemsize
            _expect(info.file_size == fp.tell() + nbytes,
                    f"{where} holds {info.file_size - fp.tell():,} bytes of data; its .npy "
                    f"header declares shape {shape} of {declared}, {nbytes:,} bytes")
            out = np.empty(count, np.dtype(declared))
            buf = memoryview(out.view(np.uint8))
            done = 0
            while done < nbytes:
                chunk = fp.read(min(_CHUNK, nbytes - done))
                _expect(len(chunk) > 0, f"{where} is truncated: {done:,} of {nbytes:,} "
                                        f"bytes of data")
                buf[done:done + len(chunk)] = chunk
                done += len(chunk)
    except ModelFileError:
        raise
    except MemoryError:
        raise ModelFileError(f"{where} declares {nbytes or 0:,} bytes, more than this "
                             f"machine can allocate") from None
    except Exception as e:  # noqa: BLE001 - anything parsing these bytes is a file problem
        raise ModelFileError(f"{where} is truncated or corrupted: "
                             f"{type(e).__name__}: {e}") from None
    if not dtype.isnative:  # ">f4" on a little-endian machine: kernels need native
        out.byteswap(inplace=True)
    if fortran and len(shape) > 1:
        return np.ascontiguousarray(out.reshape(shape[::-1]).T)
    return out.reshape(shape)


def _parse_header(raw, src):
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ModelFileError(f"{src}: header must be a 1-D uint8 array, got "
                             f"{raw.dtype} {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is one
        raise ModelFileError(f"{src}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{src} is not a numlstm model file (header format "
                             f"{header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{src}: header version must be an int, got {version!r}")
    if version > VERSION:
        raise ModelFileError(f"{src} was written in format version {version} by a newer "
                             f"numlstm; this one reads version {VERSION}")
    if version < 1:
        raise ModelFileError(f"{src}: header version must be >= 1, got {version}")
    for key, kind in (("config", dict), ("params", dict)):
        if not isinstance(header.get(key), kind):
            raise ModelFileError(f"{src}: header {key} must be a JSON object")
    return header


def _plan(header, src):
    """The model the header declares (configured, no parameters yet) and every
    array it implies: key -> (dtype name, most values), from the header alone.
    The configuration goes through the constructor's own checks (types,
    bounds)."""
    config = header["config"]
    keys = _CONFIG_KEYS if header["version"] >= 2 else _CONFIG_KEYS_V1
    if set(config) != set(keys):
        raise ModelFileError(f"{src}: header config must have keys {sorted(keys)}, "
                             f"got {sorted(config)}")
    layers = config["num_layers"]
    if isinstance(layers, int) and layers > len(header["params"]):  # each layer has >= 2
        raise ModelFileError(f"{src}: header config num_layers={layers} does not match "
                             f"its {len(header['params'])} parameters")
    try:
        model = LSTM.without_params(**config)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{src}: header config is invalid: {e}") from None
    except MemoryError as e:  # a forged header: sizes too large to allocate
        raise ModelFileError(f"{src}: header config asks for a model too large for "
                             f"memory: {e}") from None
    specs = header["params"]
    expected = model.param_shapes()
    if set(specs) != set(expected):
        raise ModelFileError(f"{src}: parameters do not match the config: missing "
                             f"{sorted(set(expected) - set(specs))}, unexpected "
                             f"{sorted(set(specs) - set(expected))}")
    members = {}
    for name, shape in expected.items():
        where = f"{src}: {name}"
        spec = specs[name]
        if not isinstance(spec, dict):
            raise ModelFileError(f"{where}: spec must be a JSON object, got {spec!r}")
        if not name.startswith("weight"):  # a bias or peephole array
            members[name] = (_declared(spec.get("dtype"), (model.dtype.name,), where),
                             math.prod(shape))
            continue
        fmt = spec.get("format")
        _expect(fmt in ("dense", "csr", "bsr"),
                f"{where}: format must be dense, csr or bsr, got {fmt!r}")
        _expect(spec.get("shape") == list(shape),
                f"{where}: shape must be {list(shape)}, got {spec.get('shape')!r}")
        R, C = shape
        value_types = (model.dtype.name,) + {"csr": weights.QUANTIZED_TYPES,
                                             "dense": ("float16",)}.get(fmt, ())
        values = _declared(spec.get("values"), value_types, where)
        members[f"{name}.values"] = (values, R * C)  # nnz <= R * C
        if fmt == "dense":
            continue
        index_types = _INDEX_TYPES if fmt == "csr" else ("int32",)
        members[f"{name}.indices"] = (_declared(spec.get("indices"), index_types, where),
                                      R * C)
        members[f"{name}.indptr"] = (_declared(spec.get("indptr"), index_types, where),
                                     R + 1)
        if values == "int8":
            members[f"{name}.scales"] = (_declared(spec.get("scales"), ("float16",), where),
                                         R)
        else:
            _expect("scales" not in spec, f"{where}: scales are only for int8 values")
    return model, members


def _declared(declared, allowed, where):
    _expect(declared in allowed, f"{where}: dtype must be one of {list(allowed)}, "
                                 f"got {declared!r}")
    return declared


def _check_params(model, specs, arrays, src):
    """Every parameter built from ``arrays`` (no copies) after the checks every
    kernel relies on: shapes, finiteness, the CSR / BSR pattern."""
    params = {}
    for name, shape in model.param_shapes().items():
        where = f"{src}: {name}"
        spec = specs[name]
        if not name.startswith("weight"):  # a bias or peephole array
            arr = _array(arrays, name, spec["dtype"], where)
            _expect(arr.shape == shape, f"{where} must have shape {shape}, got {arr.shape}")
            params[name] = _finite(arr, where)
        else:
            params[name] = _weight(arrays, name, spec, shape, model.dtype, where)
    return params


def _expect(ok, message):
    if not ok:
        raise ModelFileError(message)


def _array(arrays, key, declared, where):
    arr = arrays[key]  # present: _check_names ran
    _expect(arr.dtype == np.dtype(declared),
            f"{where}: array {key!r} has dtype {arr.dtype.name}, header says {declared}")
    return np.ascontiguousarray(arr)


def _finite(arr, where):
    if arr.dtype.kind == "f":
        flat = arr.reshape(-1)  # a view: arr is C-contiguous
        for a in range(0, flat.size, _CHUNK):  # a bounded temporary, not one of arr's size
            _expect(bool(np.isfinite(flat[a:a + _CHUNK]).all()),
                    f"{where} must be finite, got NaN or inf")
    return arr


def _weight(arrays, name, spec, shape, dtype, where):
    """A weight from its arrays (format, shape and dtypes already checked
    against the spec by ``_plan``)."""
    fmt = spec["format"]
    R, C = shape
    values = _finite(_array(arrays, f"{name}.values", spec["values"], where), where)
    if fmt == "dense":
        _expect(values.shape == shape, f"{where}: values must have shape {shape}, got "
                                       f"{values.shape}")
        return weights.Dense(values, dtype)
    indices = _array(arrays, f"{name}.indices", spec["indices"], where)
    indptr = _array(arrays, f"{name}.indptr", spec["indptr"], where)
    if fmt == "bsr":
        _expect(values.ndim == 3, f"{where}: BSR values must be 3-D (nblocks, br, bc), got "
                                  f"shape {values.shape}")
        br, bc = values.shape[1:]
        _expect(br >= 1 and bc >= 1 and R % br == 0 and C % bc == 0,
                f"{where}: block {(br, bc)} does not divide shape {shape}")
        _check_pattern(indices, indptr, values.shape[0], R // br, C // bc, where)
        return weights.BSR(values, indices, indptr, shape)
    _expect(values.ndim == 1, f"{where}: CSR values must be 1-D, got shape {values.shape}")
    _check_pattern(indices, indptr, values.shape[0], R, C, where)
    scales = None
    if values.dtype == np.int8:
        scales = _finite(_array(arrays, f"{name}.scales", spec["scales"], where), where)
        _expect(scales.shape == (R,), f"{where}: scales must have shape ({R},), got "
                                      f"{scales.shape}")
    return weights.CSR(values, indices, indptr, shape, dtype=dtype, scales=scales)


def _check_pattern(indices, indptr, nnz, rows, cols, where):
    """The CSR invariants every kernel trusts (over blocks for BSR), checked
    in chunks so that the temporaries stay a few MiB whatever the weight's size."""
    _expect(indptr.shape == (rows + 1,), f"{where}: indptr must have shape ({rows + 1},), "
                                         f"got {indptr.shape}")
    _expect(indices.shape == (nnz,), f"{where}: indices must have shape ({nnz},) like the "
                                     f"values, got {indices.shape}")
    ptr = indptr.astype(np.int64)
    _expect(ptr[0] == 0 and ptr[-1] == nnz, f"{where}: indptr must start at 0 and end at "
                                            f"nnz={nnz}, got {ptr[0]} ... {ptr[-1]}")
    _expect(bool(np.all(np.diff(ptr) >= 0)), f"{where}: indptr must be non-decreasing")
    if nnz:
        lo, hi = int(indices.min()), int(indices.max())
        _expect(lo >= 0 and hi < cols,
                f"{where}: indices must lie in [0, {cols}), got [{lo}, {hi}]")
        # Strictly increasing within each row: every step is positive except
        # into a position where a new row starts.
        starts = ptr[1:-1]
        for a in range(1, nnz, _CHUNK):
            b = min(nnz, a + _CHUNK)
            ok = np.diff(indices[a - 1:b].astype(np.int64)) > 0  # steps into a .. b-1
            ok[starts[(starts >= a) & (starts < b)] - a] = True
            _expect(bool(ok.all()),
                    f"{where}: indices must be sorted and unique within each row")

"""Hostile model files: ``load`` is bounded by what the header declares, typed,
and refuses everything else with a ModelFileError naming the file and member;
``save`` writes only files that load back, with the permissions and symlink
behaviour its docstring promises.

Archives are built byte by byte here (``_zip``) so that a test can declare
sizes that do not match the data, or hold a deflated 1 GiB member in ~1 MB.
"""

import io
import json
import os
import re
import stat
import struct
import sys
import threading
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np
import pytest

import numlstm
from numlstm import prune
from numlstm.quantize import quantize

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and FIFOs")


def _models():
    dense = numlstm.LSTM(3, 4, num_layers=2, proj_size=2, seed=0)
    csr = numlstm.LSTM(3, 4, seed=1)
    prune.magnitude(csr, 0.5)
    int8 = numlstm.LSTM(3, 4, seed=2)
    prune.magnitude(int8, 0.5)
    quantize(int8, "int8")
    bsr = numlstm.LSTM(4, 4, dtype=np.float64, seed=3)
    prune.blocks(bsr, 0.5, block=(4, 2))
    return {"dense": dense, "csr": csr, "int8": int8, "bsr": bsr}


MODELS = _models()


def _members(path):
    """name -> (raw .npy bytes) of every member of the archive at ``path``."""
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _npy(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _zip(members):
    """A zip archive from ``members``: name -> bytes (stored as they are), or
    name -> (raw deflate stream, crc, declared uncompressed size, method)."""
    out, central = bytearray(), bytearray()
    for name, member in members.items():
        if isinstance(member, bytes):
            data, crc, size, method = member, zlib.crc32(member), len(member), 0
        else:
            data, crc, size, method = member
        n = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data),
                           size, len(n), 0) + n + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc,
                               len(data), size, len(n), 0, 0, 0, 0, 0, offset) + n
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                      len(central), len(out), 0)
    return bytes(out + central + end)


def _zero_bomb(mib):
    """(raw deflate stream, crc) of ``mib`` MiB of zeros, built from one
    compressed MiB repeated (a full flush makes each copy independent), so the
    test never compresses the whole gibibyte."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc, zeros = 0, bytes(2**20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return block * mib + tail, crc


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.npz"
    numlstm.save(MODELS["dense"], path)
    return path


def _load_bounded(path, limit=8 * 2**20):
    """load(path) must raise ModelFileError while allocating under ``limit``."""
    tracemalloc.start()
    try:
        with pytest.raises(numlstm.ModelFileError) as exc:
            numlstm.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, peak
    return str(exc.value)


# ----------------------------------------------------------------------
# Byte order and memory layout: converted, never handed to a kernel as is
# ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODELS))
def test_big_endian_arrays_load_native_and_run(tmp_path, kind):
    model = MODELS[kind]
    path = tmp_path / "m.npz"
    numlstm.save(model, path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    swapped = {k: (v if k == "header" else v.astype(v.dtype.newbyteorder(">")))
               for k, v in arrays.items()}
    assert any(v.dtype.byteorder == ">" for v in swapped.values())
    np.savez(path, **swapped)
    loaded = numlstm.load(path)
    for name, p in loaded._params.items():
        for part in ((p,) if name.startswith("bias") else
                     (p.values, p.indices, p.indptr, p.scales)):
            assert part is None or (part.dtype.isnative and part.flags.c_contiguous), name
    x = np.random.default_rng(0).standard_normal((5, 2, model.input_size))
    np.testing.assert_array_equal(loaded(x)[0], model(x)[0])
    if loaded.weights()["weight_hh_l0"].trainable:  # prune copies native arrays
        prune.magnitude(loaded, 0.6)
        numlstm.save(loaded, tmp_path / "p.npz")
        assert numlstm.load(tmp_path / "p.npz")(x)[0].shape == (5, 2, model.output_size)


def test_fortran_order_arrays_load_in_c_order(saved):
    members = _members(saved)
    with np.load(saved) as z:
        w = z["weight_ih_l0.values"]
    members["weight_ih_l0.values.npy"] = _npy(np.asfortranarray(w))
    saved.write_bytes(_zip(members))
    loaded = numlstm.load(saved)
    values = loaded.weights()["weight_ih_l0"].values
    assert values.flags.c_contiguous
    np.testing.assert_array_equal(values, w)


@pytest.mark.parametrize("kind", ["csr", "int8", "bsr"])
def test_chunked_reads_and_checks_match_whole_ones(tmp_path, monkeypatch, kind):
    """Data is read, and finiteness and index order checked, in chunks (a
    bounded temporary): with 3-element chunks every boundary case occurs."""
    import numlstm.io

    path = tmp_path / "m.npz"
    numlstm.save(MODELS[kind], path)
    monkeypatch.setattr(numlstm.io, "_CHUNK", 3)
    x = np.ones((2, 1, MODELS[kind].input_size))
    np.testing.assert_array_equal(numlstm.load(path)(x)[0], MODELS[kind](x)[0])
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for key, change in (("weight_hh_l0.indices", lambda v: v[::-1].copy()),
                        ("weight_hh_l0.values", lambda v: np.where(
                            np.arange(v.size).reshape(v.shape) == v.size - 1,
                            np.array(np.inf, v.dtype) if v.dtype.kind == "f" else v, v))):
        bad = change(arrays[key])
        if np.array_equal(bad, arrays[key]):  # int8 values cannot hold inf
            continue
        np.savez(path, **{**arrays, key: bad})
        with pytest.raises(numlstm.ModelFileError, match="sorted and unique|must be finite"):
            numlstm.load(path)


# ----------------------------------------------------------------------
# Malformed members: ModelFileError naming the file and the member
# ----------------------------------------------------------------------

def _huge_shape(members):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4398046511104,), }"
    members["bias_ih_l0.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) \
        + header.ljust(117).encode() + b"\n" + bytes(64)


def _no_magic(members):
    members["bias_ih_l0.npy"] = b"just some bytes, no magic"


def _bad_npy_header(members):
    members["bias_ih_l0.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", 16) \
        + b"not a dict     \n" + bytes(64)


def _truncated_data(members):
    members["bias_ih_l0.npy"] = members["bias_ih_l0.npy"][:-8]


def _object_dtype(members):
    members["bias_ih_l0.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) \
        + "{'descr': '|O', 'fortran_order': False, 'shape': (16,), }".ljust(117).encode() \
        + b"\n" + bytes(64)


def _wrong_dtype(members):
    members["bias_ih_l0.npy"] = _npy(np.zeros(16, np.int64))


def _version_3(members):
    data = bytearray(members["bias_ih_l0.npy"])
    data[6] = 3
    members["bias_ih_l0.npy"] = bytes(data)


def _declares_too_much(members):
    data = members["bias_ih_l0.npy"]
    members["bias_ih_l0.npy"] = (zlib.compress(data)[2:-4], zlib.crc32(data), 2**30, 8)


def _bzip2(members):
    import bz2

    data = members["bias_ih_l0.npy"]
    members["bias_ih_l0.npy"] = (bz2.compress(data), zlib.crc32(data), len(data), 12)


def _bad_crc(members):
    data = bytearray(members["bias_ih_l0.npy"])
    data[-1] ^= 0x55
    members["bias_ih_l0.npy"] = (bytes(data), zlib.crc32(members["bias_ih_l0.npy"]),
                                 len(data), 0)


def _not_npy(members):
    members["readme.txt"] = b"hello"


def _header_bomb(members):
    members["header.npy"] = (*_zero_bomb(64), 64 * 2**20, 8)


CASES = {
    "huge shape": (_huge_shape, r"'bias_ih_l0.npy'.*shape \(4398046511104,\)"),
    "no magic": (_no_magic, r"member 'bias_ih_l0.npy' is truncated or corrupted"),
    "bad .npy header": (_bad_npy_header, r"member 'bias_ih_l0.npy' is truncated or corrupted"),
    "truncated data": (_truncated_data, r"member 'bias_ih_l0.npy' holds 56 bytes of data"),
    "object dtype": (_object_dtype, r"cannot be read safely: member 'bias_ih_l0.npy' holds Python"),
    "wrong dtype": (_wrong_dtype, r"member 'bias_ih_l0.npy' has dtype int64, header says float32"),
    ".npy version 3": (_version_3, r"'bias_ih_l0.npy': .npy format version \(3, 0\)"),
    "declares 1 GiB": (_declares_too_much, r"'bias_ih_l0.npy' declares 1,073,741,824 bytes"),
    "bzip2 member": (_bzip2, r"'bias_ih_l0.npy' uses zip compression method 12"),
    "bad crc": (_bad_crc, r"'bias_ih_l0.npy' is truncated or corrupted.*CRC"),
    "foreign member": (_not_npy, r"members \['readme.txt'\] are not .npy arrays"),
    "header bomb": (_header_bomb, r"'header.npy' declares 67,108,864 bytes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_members_are_refused_naming_file_and_member(saved, case):
    change, message = CASES[case]
    members = _members(saved)
    change(members)
    saved.write_bytes(_zip(members))
    text = _load_bounded(saved)
    assert repr(str(saved)) in text
    assert re.search(message, text), text


def test_duplicate_members_are_refused(saved):
    members = list(_members(saved).items())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, payload in members + members[:1]:  # the first name twice
            if name == members[0][0] and name in z.namelist():
                with pytest.warns(UserWarning, match="Duplicate name"):
                    z.writestr(name, payload)
            else:
                z.writestr(name, payload)
    saved.write_bytes(buf.getvalue())
    assert "appear more than once" in _load_bounded(saved)


def test_a_zip_directory_larger_than_any_model_is_refused(saved):
    data = bytearray(saved.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 12:end + 16] = struct.pack("<L", 0x7FFF0000)  # central directory size
    saved.write_bytes(bytes(data))
    assert "zip directory lists" in _load_bounded(saved)


def test_a_one_gib_bomb_member_is_refused_before_decompressing(saved):
    """The issue's bomb: a valid model plus a deflated 1 GiB member (~1 MB on
    disk). Refused by name before a byte of it is decompressed; the same
    gibibyte under an expected name is refused by its declared size."""
    bomb, crc = _zero_bomb(1024)
    members = _members(saved)
    saved.write_bytes(_zip({**members, "junk.npy": (bomb, crc, 2**30, 8)}))
    assert saved.stat().st_size < 2 * 2**20
    assert r"unexpected arrays ['junk']" in _load_bounded(saved)
    members["weight_hh_l0.values.npy"] = (bomb, crc, 2**30, 8)
    saved.write_bytes(_zip(members))
    assert "declares 1,073,741,824 bytes" in _load_bounded(saved)


def test_the_bomb_helper_makes_a_valid_stream():
    bomb, crc = _zero_bomb(3)
    data = zlib.decompress(bomb, -15)
    assert data == bytes(3 * 2**20) and zlib.crc32(data) == crc


# ----------------------------------------------------------------------
# Not a regular file; header values typed and bounded
# ----------------------------------------------------------------------

@posix_only
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    outcome = []

    def run():
        try:
            numlstm.load(fifo)
        except numlstm.ModelFileError as e:
            outcome.append(str(e))

    t = threading.Thread(target=run, daemon=True)  # a blocked open must not hang the suite
    t.start()
    t.join(20)
    assert outcome and "FIFO" in outcome[0] and "not a regular file" in outcome[0]


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(numlstm.ModelFileError, match="is a folder, not a regular file"):
        numlstm.load(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("bias", "false", "bias must be a bool"),
    ("batch_first", "false", "batch_first must be a bool"),
    ("bidirectional", 0, "bidirectional must be a bool"),
    ("num_layers", 10_001, "num_layers must be <= 10000"),
    ("hidden_size", 2**40, "hidden_size must be <= 2147483647"),
])
def test_header_values_go_through_the_constructor_checks(saved, key, value, message):
    with np.load(saved) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("header").tobytes())
    header["config"][key] = value
    if key == "num_layers":  # get past the cheap "layers > parameters" check
        header["params"].update({f"x{k}": {} for k in range(10_001)})
    np.savez(saved, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    text = _load_bounded(saved, limit=32 * 2**20)
    assert "header config is invalid" in text and message in text


# ----------------------------------------------------------------------
# save: only files that load back; modes; symlinks; folders
# ----------------------------------------------------------------------

def test_save_refuses_a_model_that_would_not_load_back(tmp_path, saved):
    before = saved.read_bytes()
    model = numlstm.LSTM(3, 4, num_layers=2, proj_size=2, seed=0)
    model.parameters()["bias_ih_l0"][0] = np.nan
    with pytest.raises(ValueError, match=r"would not load back.*bias_ih_l0 must be finite"):
        numlstm.save(model, saved)
    assert saved.read_bytes() == before
    with pytest.raises(ValueError, match="would not load back"):
        numlstm.save(model, tmp_path / "new.npz")
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_int8_quantize_refuses_scales_that_overflow(tmp_path):
    model = numlstm.LSTM(3, 4, seed=0)
    prune.magnitude(model, 0.5)
    w = model.weights()["weight_hh_l0"]
    w.values[0] = 9e6  # past 127 * 65504: the float16 scale would be inf
    before = {k: v.values.copy() for k, v in model.weights().items()}
    with pytest.raises(ValueError, match=r"weight_hh_l0 cannot be stored as int8: row 0 "
                                         r"has \|w\| up to 9e\+06"):
        quantize(model, "int8")
    assert all(np.array_equal(model.weights()[k].values, v) for k, v in before.items())
    w.values[0] = 8e6  # just inside: quantized, saved and loaded back
    quantize(model, "int8")
    numlstm.save(model, tmp_path / "q.npz")
    x = np.ones((2, 1, 3), np.float32)
    np.testing.assert_array_equal(numlstm.load(tmp_path / "q.npz")(x)[0], model(x)[0])


@posix_only
def test_save_modes_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    model = MODELS["dense"]
    old = os.umask(0o022)
    try:
        numlstm.save(model, tmp_path / "a.npz")
        os.umask(0o077)
        numlstm.save(model, tmp_path / "b.npz")
        (tmp_path / "a.npz").chmod(0o640)
        numlstm.save(model, tmp_path / "a.npz")  # overwrite keeps 0640 under umask 077
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.npz").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a.npz").stat().st_mode) == 0o640
    os.umask(0o022)
    try:
        numlstm.save(model, tmp_path / "c.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == 0o644


@posix_only
def test_save_writes_through_a_symlink(tmp_path):
    real = tmp_path / "store"
    real.mkdir()
    links = tmp_path / "links"
    links.mkdir()
    target = real / "model.npz"
    numlstm.save(MODELS["csr"], target)
    link = links / "current.npz"
    link.symlink_to(target)
    numlstm.save(MODELS["dense"], link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert repr(numlstm.load(target)) == repr(MODELS["dense"])
    assert sorted(os.listdir(real)) == ["model.npz"] and os.listdir(links) == ["current.npz"]
    dangling = links / "next.npz"
    dangling.symlink_to(real / "next.npz")  # points at a file not yet there: created
    numlstm.save(MODELS["csr"], dangling)
    assert dangling.is_symlink() and (real / "next.npz").is_file()


def test_saving_to_a_folder_is_a_clear_error(tmp_path):
    for path in (tmp_path, str(tmp_path / "new") + os.sep):
        with pytest.raises(IsADirectoryError, match="names a folder, not a file; give a "
                                                     "file path such as"):
            numlstm.save(MODELS["dense"], path)
    assert os.listdir(tmp_path) == []


@posix_only
def test_saving_onto_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="is a FIFO"):
        numlstm.save(MODELS["dense"], fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and os.listdir(tmp_path) == ["pipe"]


@pytest.mark.parametrize("layout", ["csr", "sell", "windows", "dense"])
def test_int8_rows_of_tiny_weights_keep_their_bound_and_run(tmp_path, layout, monkeypatch):
    from numlstm import config
    monkeypatch.setattr(config, "STEP_LAYOUT", layout)  # read when the weight is stored
    monkeypatch.setattr(config, "DENSE_FOR_QUANTIZED", layout == "dense")
    # One row per magnitude, from float16-normal scales down to float32 subnormals:
    # the float16 scale max|row| / 127 would round down (clipping the row's largest
    # values) or underflow to 0 (a row of zeros and a divide-by-zero warning).
    peaks = [0.5, 1e-2, 1e-3, 1e-4, 1e-5, 2e-6, 1e-7, 2**-25, 1e-9, 1e-30, 1e-40]
    model = numlstm.LSTM(5, 4, seed=0)
    prune.magnitude(model, 0.25)
    w = model.weights()["weight_ih_l0"]
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    for r, peak in enumerate(peaks):
        w.values[rows == r] *= np.float32(peak) / np.max(np.abs(w.values[rows == r]))
    before = w.values.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or overflow warning
        quantize(model, "int8")
    q = model.weights()["weight_ih_l0"]
    err = np.abs(q.dequantized().astype(np.float64) - before)
    scale = q.scales.astype(np.float64)[rows]
    peak = np.asarray(peaks)[rows[rows < len(peaks)]]
    assert np.all(scale > 0)
    assert np.all(err <= scale / 2 * (1 + 2**-20))  # half a step of the stored scale
    # ... which is the documented bound: max|row| / 254 * (1 + 2**-10) + 2**-25.
    assert np.all(err[rows < len(peaks)] <= peak / 254 * (1 + 2**-10) + 2**-25)
    nonzero = np.abs(before) > 2**-25  # a value beyond half the smallest step survives
    assert np.all(q.dequantized()[nonzero] != 0)
    # The kernels (forward, per-step and batched, and a stream) run exactly the
    # dequantized values, and so does the model loaded back from its file.
    ref = numlstm.LSTM(5, 4, seed=0)
    ref.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 5, 5)).astype(np.float32)
    numlstm.save(model, tmp_path / "q.npz")
    loaded = numlstm.load(tmp_path / "q.npz")
    assert loaded.weights()["weight_ih_l0"].scales.tobytes() == q.scales.tobytes()
    for B in (1, 5):
        want = ref(x[:, :B])[0]
        np.testing.assert_allclose(model(x[:, :B])[0], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(loaded(x[:, :B])[0], model(x[:, :B])[0])
    s = model.stream(1)
    for t in range(6):
        out = s.step(x[t, :1])
    np.testing.assert_allclose(out, ref(x[:, :1])[0][-1], rtol=1e-5, atol=1e-7)

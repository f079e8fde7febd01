"""Fuzzing model files: every storage kind, mutated byte by byte and field by field.

``numlstm.load`` must either return a model that runs ``forward`` (the
mutation kept the file valid) or raise ``numlstm.ModelFileError`` (a
ValueError); never another exception, never a crash. Counts of mutated files
and rejections are printed by the last test (run with ``-s``). An optional
coverage-guided atheris run is bounded and skipped when atheris is absent.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import numlstm
from numlstm import prune
from numlstm.quantize import quantize

COUNTS = {"mutated": 0, "rejected": 0, "loaded": 0}


def _kinds():
    out = {"dense": numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0)}
    m = numlstm.LSTM(3, 4, proj_size=2, seed=1)
    prune.magnitude(m, 0.5)
    out["csr"] = m
    for values, label in ((None, "compact"), ("float16", "float16"), ("int8", "int8")):
        m = numlstm.LSTM(3, 4, seed=2)
        prune.magnitude(m, 0.5)
        quantize(m, values, "uint16")
        out[label] = m
    m = numlstm.LSTM(4, 4, dtype=np.float64, seed=3)
    prune.blocks(m, 0.5, block=(4, 2))
    out["bsr"] = m
    return out


KINDS = _kinds()


def _check(path):
    """Load ``path``: a model that runs, or ModelFileError. Returns 'loaded' / 'rejected'."""
    COUNTS["mutated"] += 1
    try:
        m = numlstm.load(path)
    except numlstm.ModelFileError:
        COUNTS["rejected"] += 1
        return "rejected"
    x = np.random.default_rng(0).standard_normal((3, 2, m.input_size)).astype(m.dtype)
    if m.batch_first:
        x = x.transpose(1, 0, 2)
    m(x)
    COUNTS["loaded"] += 1
    return "loaded"


@pytest.fixture(params=sorted(KINDS))
def saved(request, tmp_path):
    path = tmp_path / "m.npz"
    numlstm.save(KINDS[request.param], path)
    return request.param, path, path.read_bytes()


def _entries(data):
    """(name, header offset, data offset, data size) of every zip member."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        out = []
        for info in z.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            out.append((info.filename, info.header_offset, start, info.compress_size))
        return out


def test_truncations_and_flips(saved):
    label, path, data = saved
    n = len(data)
    cuts = sorted(set(range(0, n, max(1, n // 60))) | {1, 3, 4, 21, n - 1, n - 22})
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert _check(path) == "rejected", (label, cut)
    positions = set(range(0, n, max(1, n // 150)))
    for _, hdr, start, size in _entries(data):  # inside every member's header and data
        positions |= {hdr, hdr + 8, hdr + 14, hdr + 18, hdr + 26, start, start + 8,
                      start + 60, start + size - 1}
    rng = np.random.default_rng(0)
    for pos in sorted(p for p in positions if 0 <= p < n):
        for flip in (0xFF, 1 << int(rng.integers(8))):
            bad = bytearray(data)
            bad[pos] ^= flip
            path.write_bytes(bytes(bad))
            _check(path)
    for k in range(40):  # random bursts
        bad = bytearray(data)
        for pos in rng.integers(0, n, 1 + k % 5):
            bad[pos] = int(rng.integers(256))
        path.write_bytes(bytes(bad))
        _check(path)


def _arrays(data):
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(arrays.pop("header").tobytes())


def _write(path, arrays, header):
    if header is not None:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        arrays = {**arrays, "header": np.frombuffer(raw, np.uint8)}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _field_mutations(arrays, header):
    """Yield (description, arrays, header) variants of one saved model."""
    import copy

    def hdr(change):
        h = copy.deepcopy(header)
        change(h)
        return h

    for key, values in (("version", [0, 2, -1, "1", None, 1.0, True, 10**30]),
                        ("format", ["numlstm2", None, 1])):
        for v in values:
            yield f"{key}={v!r}", arrays, hdr(lambda h, k=key, v=v: h.__setitem__(k, v))
    for key in header["config"]:
        for v in (0, -1, 10**12, 2**63, None, "3", 3.5, True, [], "float16", "int8"):
            yield f"config.{key}={v!r}", arrays, \
                hdr(lambda h, k=key, v=v: h["config"].__setitem__(k, v))
    yield "config missing key", arrays, hdr(lambda h: h["config"].popitem())
    yield "config extra key", arrays, hdr(lambda h: h["config"].__setitem__("x", 1))
    yield "params not a dict", arrays, hdr(lambda h: h.__setitem__("params", []))
    yield "header not json", arrays, b"{not json"
    yield "header not utf-8", arrays, b"\xff\xfe"
    yield "header a list", arrays, b"[1, 2]"
    yield "no header", arrays, None
    for name, spec in header["params"].items():
        if not isinstance(spec, dict):
            continue
        for field in list(spec):
            for v in ("dense", "csr", "bsr", "coo", "float64", "float16", "int8", "int32",
                      "uint16", "int64", "object", None, [4, 3], [10**12, 1], [], 0):
                yield f"{name}.{field}={v!r}", arrays, \
                    hdr(lambda h, n=name, f=field, v=v: h["params"][n].__setitem__(f, v))
            yield f"{name} drops {field}", arrays, \
                hdr(lambda h, n=name, f=field: h["params"][n].pop(f))
        yield f"{name} spec a list", arrays, hdr(lambda h, n=name: h["params"].__setitem__(n, []))
    names = sorted(arrays)
    for i, a in enumerate(names):  # swap arrays between weights
        b = names[(i + 1) % len(names)]
        yield f"swap {a} {b}", {**arrays, a: arrays[b], b: arrays[a]}, header
        yield f"drop {a}", {k: v for k, v in arrays.items() if k != a}, header
        arr = arrays[a]
        variants = {"empty": arr[:0], "scalar": np.array(arr.flat[0]) if arr.size else arr,
                    "object": arr.astype(object), "float64": arr.astype(np.float64),
                    "int64": arr.astype(np.int64), "bool": arr.astype(bool),
                    "complex": arr.astype(np.complex64), "2d": arr.reshape(1, -1),
                    "longer": np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
                    if arr.size else arr.reshape(-1),
                    "fortran": np.asfortranarray(arr.reshape(arr.shape[0], -1)) if arr.ndim
                    else arr}
        if arr.dtype.kind == "f":
            for bad in (np.nan, np.inf, -np.inf):
                v = arr.copy()
                v.flat[0] = bad
                variants[f"{bad}"] = v
        if a.endswith((".indices", ".indptr")) and arr.size:
            v = arr.astype(np.int64)
            variants["past end"] = (v + 10**4).astype(arr.dtype)
            variants["negative"] = np.full_like(arr, -1) if arr.dtype.kind == "i" else v - 1
            variants["reversed"] = arr[::-1].copy()
            w = arr.copy()
            w[-1] = w[0] if a.endswith(".indptr") else w[-1]
            variants["indptr end low" if a.endswith(".indptr") else "same"] = w
            if a.endswith(".indptr") and arr.size > 2:
                w = arr.copy()
                w[1] = w[-1]
                variants["decreasing"] = w
        for vname, v in variants.items():
            yield f"{a} {vname}", {**arrays, a: v}, header


def test_field_mutations(saved, tmp_path):
    label, path, data = saved
    arrays, header = _arrays(data)
    outcomes = {"loaded": [], "rejected": []}
    for what, arr, hdr in _field_mutations(arrays, header):
        _write(path, arr, hdr)
        outcomes[_check(path)].append(what)
    assert len(outcomes["rejected"]) > 50, label


def test_pickled_arrays_are_rejected(saved, tmp_path):
    label, path, data = saved
    arrays, header = _arrays(data)
    name = sorted(arrays)[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # an object array saved with a pickle payload
        for k, v in {**arrays, "header": np.frombuffer(json.dumps(header).encode(),
                                                       np.uint8)}.items():
            member = io.BytesIO()
            np.save(member, np.array([v], dtype=object) if k == name else v,
                    allow_pickle=True)
            z.writestr(k + ".npy", member.getvalue())
    path.write_bytes(buf.getvalue())
    assert _check(path) == "rejected"


def test_zz_counts():
    print(f"\nmodel files mutated: {COUNTS['mutated']}, rejected: {COUNTS['rejected']}, "
          f"loaded and ran: {COUNTS['loaded']}")
    if COUNTS["mutated"]:
        assert COUNTS["rejected"] > COUNTS["mutated"] // 2


ATHERIS = """
import io, os, sys, tempfile, atheris
import numlstm  # not instrumented: instrument_imports() made libFuzzer report an exit here
path = os.path.join(tempfile.mkdtemp(), 'f.npz')
def one(data):
    with open(path, 'wb') as f:
        f.write(data)
    try:
        m = numlstm.load(path)
    except numlstm.ModelFileError:
        return
    import numpy as np
    m(np.zeros((2, 1, m.input_size), m.dtype))
atheris.Setup([sys.argv[0], '-runs=%s' % sys.argv[2], '-seed=1', '-max_len=20000',
               '-artifact_prefix=%s/' % sys.argv[4], sys.argv[3]], one)
atheris.Fuzz()
"""


def test_atheris_bounded(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for label, m in KINDS.items():
        numlstm.save(m, corpus / f"{label}.npz")
    runs = os.environ.get("NUMLSTM_ATHERIS_RUNS", "300")
    proc = subprocess.run([sys.executable, "-c", ATHERIS, "unused", runs, str(corpus),
                           str(tmp_path)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

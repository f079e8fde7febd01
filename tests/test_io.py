"""save / load: exact round trips of every storage kind, atomic writes, and a
clear ModelFileError for every kind of bad file."""

import io
import json
import os
import zipfile

import numpy as np
import pytest

import numlstm
from numlstm import prune
from numlstm.quantize import quantize


def _models():
    """(label, model) for every storage kind and a few configurations."""
    out = [("dense", numlstm.LSTM(5, 8, num_layers=2, bidirectional=True, seed=0)),
           ("dense64", numlstm.LSTM(5, 8, proj_size=3, bias=False, batch_first=True,
                                    dropout=0.25, num_layers=2, dtype=np.float64, seed=1))]
    m = numlstm.LSTM(5, 8, num_layers=2, seed=2)
    prune.magnitude(m, 0.7)
    out.append(("csr", m))
    for values in (None, "float16", "int8"):
        m = numlstm.LSTM(5, 8, proj_size=4, seed=3)
        prune.magnitude(m, 0.6, scope="per_row")
        quantize(m, values)
        out.append((f"csr-{values}", m))
    m = numlstm.LSTM(4, 8, seed=4)
    prune.blocks(m, 0.5, block=(4, 2))
    out.append(("bsr", m))
    return out


@pytest.mark.parametrize("label,model", _models())
def test_every_storage_kind_round_trips_exactly(tmp_path, label, model):
    path = tmp_path / "model.npz"
    numlstm.save(model, path)
    loaded = numlstm.load(path)
    assert repr(loaded) == repr(model)
    for name, w in model._params.items():
        v = loaded._params[name]
        if not name.startswith("weight"):
            np.testing.assert_array_equal(v, w)
            continue
        assert (v.format, v.value_type, getattr(v, "index_type", None)) == \
            (w.format, w.value_type, getattr(w, "index_type", None)), name
        np.testing.assert_array_equal(v.values, w.values)
        for part in ("indices", "indptr", "scales"):
            if getattr(w, part, None) is not None:
                np.testing.assert_array_equal(getattr(v, part), getattr(w, part))
    x = np.random.default_rng(0).standard_normal((6, 2, model.input_size))
    if model.batch_first:
        x = x.transpose(1, 0, 2)
    y, _ = model(x)
    np.testing.assert_array_equal(loaded(x)[0], y)
    assert os.listdir(tmp_path) == ["model.npz"]  # no temporary left behind


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    old = numlstm.LSTM(3, 4, seed=0)
    numlstm.save(old, path)
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        numlstm.save(numlstm.LSTM(3, 4, seed=1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


def _saved(tmp_path, model=None):
    model = model or numlstm.LSTM(3, 4, seed=0)
    path = tmp_path / "m.npz"
    numlstm.save(model, path)
    return path


def _rewrite(path, change):
    """Re-write the archive at ``path`` after ``change(arrays, header)``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("header").tobytes())
    change(arrays, header)
    if header is not None:
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


def _sparse_model():
    m = numlstm.LSTM(3, 4, seed=0)
    prune.magnitude(m, 0.5)
    return m


def _set(key, value):
    def change(arrays, header):
        arrays[key] = value(arrays[key]) if callable(value) else value
    return change


def _set_header(*keys, value):
    def change(arrays, header):
        node = header
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


BAD = {
    "no header": (None, lambda a, h: h.clear() or h.update(format="other"),
                  "not a numlstm model file"),
    "newer version": (None, _set_header("version", value=3), "format version 3 by a newer"),
    "bad config": (None, _set_header("config", "hidden_size", value=-4),
                   "header config is invalid: hidden_size must be >= 1"),
    "missing param": (None, lambda a, h: h["params"].pop("bias_hh_l0"),
                      r"missing \['bias_hh_l0'\]"),
    "wrong shape": (None, _set("weight_hh_l0.values", lambda v: v[:, :3].copy()),
                    "values must have shape"),
    "wrong dtype": (None, _set("bias_ih_l0", lambda v: v.astype(np.float64)),
                    "has dtype float64, header says float32"),
    "nan": (None, _set("bias_ih_l0", lambda v: np.full_like(v, np.nan)), "must be finite"),
    "extra array": (None, _set("surprise", np.zeros(3)), r"unexpected arrays \['surprise'\]"),
    "indptr decreasing": (_sparse_model, _set("weight_hh_l0.indptr",
                                              lambda p: p[::-1].copy()), "indptr must start"),
    "indptr end": (_sparse_model, _set("weight_hh_l0.indptr", lambda p: np.minimum(p, 3)),
                   "end at nnz"),
    "indptr not monotone": (_sparse_model, _set("weight_hh_l0.indptr",
                                                lambda p: np.r_[0, p[2], p[1], p[3:]]
                                                .astype(p.dtype)), "non-decreasing"),
    "index past the end": (_sparse_model, _set("weight_ih_l0.indices",
                                               lambda i: i + 100), r"must lie in \[0, 3\)"),
    "unsorted indices": (_sparse_model, _set("weight_hh_l0.indices",
                                             lambda i: i[::-1].copy()), "sorted and unique"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_rejected_clearly(tmp_path, case):
    make, change, message = BAD[case]
    path = _saved(tmp_path, make() if make else None)
    _rewrite(path, change)
    with pytest.raises(numlstm.ModelFileError, match=message):
        numlstm.load(path)


def test_truncated_corrupted_foreign_and_pickled_files_are_rejected(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(numlstm.ModelFileError):
            numlstm.load(path)
    corrupted = bytearray(data)
    for k in range(200, len(data) - 200, 97):  # flip bits inside the stored arrays
        corrupted[k] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(numlstm.ModelFileError):
        numlstm.load(path)
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(numlstm.ModelFileError, match="not an .npz archive"):
        numlstm.load(path)
    np.savez(path, x=np.zeros(3))
    with pytest.raises(numlstm.ModelFileError, match="it has no header"):
        numlstm.load(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        payload = io.BytesIO()
        np.save(payload, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        z.writestr("header.npy", payload.getvalue())
    path.write_bytes(buf.getvalue())
    with pytest.raises(numlstm.ModelFileError, match="cannot be read safely"):
        numlstm.load(path)
    with pytest.raises(FileNotFoundError, match="no model file"):
        numlstm.load(tmp_path / "absent.npz")


def test_save_checks_its_argument(tmp_path):
    with pytest.raises(TypeError, match="model must be a numlstm.LSTM, got dict"):
        numlstm.save({}, tmp_path / "x.npz")


def test_a_forged_header_size_costs_no_memory(tmp_path):
    """The header's sizes are checked against the arrays before anything of
    that size is allocated (no random initialisation of a declared model)."""
    import tracemalloc

    path = _saved(tmp_path)
    _rewrite(path, _set_header("config", "hidden_size", value=20_000))
    tracemalloc.start()
    with pytest.raises(numlstm.ModelFileError, match=r"shape must be \[80000, 3\]"):
        numlstm.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak  # a 20000-wide LSTM would take ~13 GB


@pytest.mark.parametrize("label,model", _models())
def test_models_pickle_and_copy(label, model):
    import copy
    import pickle

    x = np.random.default_rng(0).standard_normal((6, 2, model.input_size))
    if model.batch_first:
        x = x.transpose(1, 0, 2)
    y, _ = model(x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        np.testing.assert_array_equal(clone(x)[0], y)
        if all(w.trainable for w in clone.weights().values()):
            for p in clone.parameters().values():  # in-place updates reach the kernels
                p *= 0
            assert not np.any(clone(x)[0])
    np.testing.assert_array_equal(model(x)[0], y)  # the original is untouched

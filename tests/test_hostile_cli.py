"""The command line never prints a traceback: every failure is one line on
stderr naming the file and what to do, exit status 1 (2 for usage)."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from test_hostile_files import _members, _zero_bomb, _zip

import numlstm
from numlstm import cli, prune

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs")


def _fails(capsys, argv, *needles):
    """Run the CLI: status 1, one line on stderr holding every needle, no
    traceback, no terminal escape codes. Returns that line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "\x1b" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.npz"
    numlstm.save(numlstm.LSTM(3, 4, seed=0), path)
    return path


# ----------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------

@pytest.fixture
def torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    lstm = torch.nn.LSTM(3, 4)
    files = {"good": tmp_path / "good.pt", "module": tmp_path / "module.pt",
             "meta": tmp_path / "meta.pt", "tensor": tmp_path / "tensor.pt",
             "empty": tmp_path / "empty.pt", "garbage": tmp_path / "garbage.pth"}
    torch.save(lstm.state_dict(), files["good"])
    torch.save(lstm, files["module"])  # a pickled full module
    torch.save({k: v.to("meta") for k, v in lstm.state_dict().items()}, files["meta"])
    torch.save(torch.zeros(3), files["tensor"])
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\x80\x02garbage")
    return files


@pytest.mark.parametrize("case,needles", [
    ("module", ["holds a pickled torch.nn.modules.rnn.LSTM object, not a state dict",
                "torch.save(module.state_dict(), path)"]),
    ("meta", ["meta tensor", "weight_ih_l0"]),
    ("tensor", ["holds a Tensor, not a state dict", "torch.save(module.state_dict()"]),
    ("empty", ["is empty", "torch.save(module.state_dict(), path)"]),
    ("garbage", ["is not a loadable torch state dict", "torch.save(module.state_dict()"]),
])
def test_convert_bad_torch_files(torch_files, tmp_path, capsys, case, needles):
    src = torch_files[case]
    _fails(capsys, ["convert", src, "-o", tmp_path / "out.npz"], repr(str(src)), *needles)
    assert not (tmp_path / "out.npz").exists()


def test_convert_bad_onnx_files(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    good = tmp_path / "good.onnx"
    numlstm.convert.to_onnx(numlstm.LSTM(3, 4, seed=0), str(good))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[:len(data) // 2])
    _fails(capsys, ["convert", truncated, "-o", tmp_path / "o.npz"], repr(str(truncated)),
           "could not be loaded as an ONNX model", "check that the file is complete")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _fails(capsys, ["convert", empty, "-o", tmp_path / "o.npz"], "is empty")
    # External data that onnx refuses: outside the model's folder, absolute, missing.
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(onnx.load(str(good)), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    for k, location in enumerate(("../secret.bin", "/etc/passwd", "missing.bin")):
        proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        bad = folder / f"bad{k}.onnx"
        onnx.save_model(proto, str(bad))
        _fails(capsys, ["convert", bad, "-o", tmp_path / "o.npz"], repr(str(bad)),
               "external data files sit beside it")
    assert cli.main(["convert", str(folder / "m.onnx"), "-o", str(tmp_path / "o.npz")]) == 0
    assert not (tmp_path / "secret.bin").exists()


@posix_only
def test_convert_of_a_fifo_does_not_block(tmp_path, capsys):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    _fails(capsys, ["convert", fifo, "-o", tmp_path / "o.npz"], "is not a regular file")


@pytest.mark.filterwarnings("ignore:Sparse")  # torch's invariant-check note
def test_convert_keeps_a_sparse_state_dict_sparse(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    H = 1000  # a 3 KB file; densified, its weights would write 32 MB
    one = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1), (4 * H, H))
    zero = torch.zeros(4 * H).to_sparse()
    state = {"weight_ih_l0": one, "weight_hh_l0": one, "bias_ih_l0": zero, "bias_hh_l0": zero}
    torch.save(state, tmp_path / "sparse.pt")
    assert (tmp_path / "sparse.pt").stat().st_size < 2**12
    out = tmp_path / "o.npz"
    assert cli.main(["convert", str(tmp_path / "sparse.pt"), "-o", str(out)]) == 0
    assert out.stat().st_size < 2**18  # indptr and biases, 4H values each
    assert "csr float32" in repr(numlstm.load(out))
    capsys.readouterr()


def test_output_to_a_folder(torch_files, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for dest in (out, str(out) + os.sep, str(tmp_path / "new") + os.sep):
        _fails(capsys, ["convert", torch_files["good"], "-o", dest],
               "names a folder, not a file; give a file path such as")
        _fails(capsys, ["prune", model_file, "--sparsity", "0.5", "-o", dest],
               "names a folder, not a file")
    assert os.listdir(out) == [] and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------
# info on malformed model files
# ----------------------------------------------------------------------

def _bad_model_files(path):
    """label -> bytes of a hostile variant of the model file at ``path``."""
    members = _members(path)
    out = {}
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (4398046511104,), }"
    out["huge shape"] = _zip({**members, "bias_ih_l0.npy": b"\x93NUMPY\x01\x00"
                              + struct.pack("<H", 118) + hdr.ljust(117).encode() + b"\n"})
    out["no magic"] = _zip({**members, "bias_ih_l0.npy": b"no magic here"})
    out["bomb"] = _zip({**members, "junk.npy": (*_zero_bomb(256), 256 * 2**20, 8)})
    header = json.loads(np.load(path)["header"].tobytes())
    header["config"]["bias"] = "false"
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    from test_hostile_files import _npy

    out["string bias"] = _zip({**members, "header.npy": _npy(raw)})
    out["truncated"] = path.read_bytes()[:300]
    out["empty"] = b""
    return out


def test_info_on_malformed_model_files(model_file, tmp_path, capsys):
    for label, data in _bad_model_files(model_file).items():
        bad = tmp_path / f"{label.replace(' ', '_')}.npz"
        bad.write_bytes(data)
        _fails(capsys, ["info", bad], repr(str(bad)))
    _fails(capsys, ["info", tmp_path], "is a folder, not a regular file")


def test_info_on_a_big_endian_file_works(model_file, capsys):
    with np.load(model_file) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(model_file, **{k: v if k == "header" else v.astype(v.dtype.newbyteorder(">"))
                            for k, v in arrays.items()})
    assert cli.main(["info", str(model_file)]) == 0
    assert "weight_hh_l0" in capsys.readouterr().out


def test_quantize_of_values_past_int8_scales(tmp_path, capsys):
    m = numlstm.LSTM(3, 4, seed=0)
    prune.magnitude(m, 0.5)
    m.weights()["weight_ih_l0"].values[0] = 1e7
    numlstm.save(m, tmp_path / "big.npz")
    _fails(capsys, ["quantize", tmp_path / "big.npz", "-o", tmp_path / "q.npz"],
           "weight_ih_l0 cannot be stored as int8", "(--dtype none)")
    assert not (tmp_path / "q.npz").exists()


def test_an_unexpected_error_is_one_line_too(model_file, monkeypatch, capsys):
    def broken(path):
        raise RuntimeError("\x1b[1mboom\x1b[0m\nsecond line")

    monkeypatch.setattr(numlstm, "load", broken)
    _fails(capsys, ["info", model_file], "unexpected error: RuntimeError: boom (please report")
    monkeypatch.setattr(numlstm, "load", lambda path: (_ for _ in ()).throw(KeyError()))
    _fails(capsys, ["info", model_file], "error: KeyError")


def test_one_line_escapes_control_characters():
    assert cli._one_line(ValueError("a\tb\x07c")) == "a\\tb\\x07c"
    assert cli._one_line(EOFError()) == "EOFError"
    assert cli._one_line(KeyError("no 'x'")) == "no 'x'"


# ----------------------------------------------------------------------
# The installed command, end to end
# ----------------------------------------------------------------------

def test_the_command_prints_one_line_for_a_pickled_module(torch_files, model_file, tmp_path):
    env = dict(os.environ, TERM="xterm-256color", FORCE_COLOR="1")
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(_bad_model_files(model_file)["bomb"])
    for argv in (["convert", str(torch_files["module"]), "-o", str(tmp_path / "o.npz")],
                 ["info", str(bomb)]):
        proc = subprocess.run([sys.executable, "-m", "numlstm", *argv], capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "\x1b" not in proc.stderr and proc.stdout == ""

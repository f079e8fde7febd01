"""The command line: info, prune, quantize end to end, and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest

import numlstm
import numlstm.convert
from numlstm import cli


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.npz"
    numlstm.save(numlstm.LSTM(8, 16, num_layers=2, seed=0), path)
    return path


def test_prune_quantize_info_end_to_end(saved, tmp_path, capsys):
    pruned, quantized, blocked = (tmp_path / n for n in ("p.npz", "q.npz", "b.npz"))
    assert cli.main(["prune", str(saved), "--sparsity", "0.9", "--scope", "global",
                     "-o", str(pruned)]) == 0
    m = numlstm.load(pruned)
    assert m.sparsity()["overall"] == pytest.approx(0.9, abs=0.01)
    assert cli.main(["quantize", str(pruned), "--dtype", "int8", "-o", str(quantized)]) == 0
    q = numlstm.load(quantized)
    assert {w.value_type for w in q.weights().values()} == {"int8"}
    x = np.random.default_rng(0).standard_normal((5, 1, 8)).astype(np.float32)
    assert np.max(np.abs(q(x)[0] - m(x)[0])) < 0.05
    assert cli.main(["prune", str(saved), "--sparsity", "0.5", "--block", "8x1",
                     "-o", str(blocked)]) == 0
    assert {w.format for w in numlstm.load(blocked).weights().values()} == {"bsr"}
    capsys.readouterr()
    assert cli.main(["info", str(quantized), "--seq-len", "10"]) == 0
    out = capsys.readouterr().out
    assert "csr int8/uint16" in out and "weight_hh_l1" in out and "total" in out
    assert cli.main(["info", str(pruned), "--training"]) == 0
    assert "optimizer state" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "{missing}"], "no model file at"),
    (["info", "{garbage}"], "not an .npz archive"),
    (["quantize", "{model}", "-o", "{out}"], "prune them to CSR first"),
    (["prune", "{model}", "--sparsity", "0.5", "--block", "3x3", "-o", "{out}"],
     "not divisible by --block 3x3"),
])
def test_user_mistakes_give_one_line_and_status_1(saved, tmp_path, capsys, argv, message):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"nonsense")
    names = {"missing": tmp_path / "absent.npz", "garbage": garbage, "model": saved,
             "out": tmp_path / "out.npz"}
    assert cli.main([a.format(**names) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.npz").exists()


def test_argument_errors_exit_2(saved):
    for argv in (["prune", str(saved), "--sparsity", "1.5", "-o", "x"],
                 ["prune", str(saved), "--sparsity", "0.5", "--block", "big", "-o", "x"],
                 ["quantize", str(saved), "--dtype", "int4", "-o", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2


def test_the_installed_command_runs(saved):
    proc = subprocess.run([sys.executable, "-m", "numlstm", "info", str(saved) + ".nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("numlstm info: error: no model file")
    assert "Traceback" not in proc.stderr


def test_convert_torch_state_dict_and_onnx(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    lstm = torch.nn.LSTM(4, 6, num_layers=2)
    torch.save(lstm.state_dict(), tmp_path / "t.pt")
    assert cli.main(["convert", str(tmp_path / "t.pt"), "-o", str(tmp_path / "a.npz")]) == 0
    x = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
    with torch.no_grad():
        expected = lstm(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(numlstm.load(tmp_path / "a.npz")(x)[0], expected, atol=1e-5)
    numlstm.convert.to_onnx(numlstm.load(tmp_path / "a.npz"), str(tmp_path / "m.onnx"))
    assert cli.main(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b.npz")]) == 0
    np.testing.assert_allclose(numlstm.load(tmp_path / "b.npz")(x)[0], expected, atol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert cli.main(["convert", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "c.npz")]) == 1
    assert "not a loadable torch state dict" in capsys.readouterr().err

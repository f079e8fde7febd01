"""API conventions: every public class has a repr of its own, and every public
function, class, method and property a docstring; ``fit``'s progress fits its stream."""

import importlib
import inspect
import io
import sys

import numpy as np
import pytest

import numlstm
from numlstm import layers, optim, prune
from numlstm.serve import Batcher

# numlstm.dask imports dask only inside its functions, so it is walked too.
PUBLIC_MODULES = ["numlstm", "numlstm.layers", "numlstm.losses", "numlstm.optim",
                  "numlstm.prune", "numlstm.quantize", "numlstm.serve", "numlstm.convert",
                  "numlstm.dask"]


def _public_names(module):
    """(qualified name, object) of the names a module offers: ``__all__``, or,
    without one, the names it defines that do not start with an underscore (a
    helper it imports, ``numlstm.checks.check_int`` say, is not its API)."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")
                 and getattr(vars(module)[n], "__module__", None) == module.__name__]
    for name in names:
        obj = getattr(module, name)
        if not inspect.ismodule(obj):
            yield f"{module.__name__}.{name}", obj


def public_objects():
    """Every public function and class of the public modules, once each."""
    seen, found = set(), []
    for mod_name in PUBLIC_MODULES:
        module = importlib.import_module(mod_name)
        items = list(_public_names(module))
        if mod_name == "numlstm":
            items.append(("numlstm.compile", numlstm.compile))
        for qual, obj in items:
            if id(obj) not in seen and (inspect.isclass(obj) or callable(obj)):
                seen.add(id(obj))
                found.append((qual, obj))
    return found


def test_the_walk_finds_the_api():
    names = {q for q, _ in public_objects()}
    assert {"numlstm.LSTM", "numlstm.Stream", "numlstm.layers.Linear", "numlstm.optim.Adam",
            "numlstm.serve.Batcher", "numlstm.compile", "numlstm.fit"} <= names


def test_every_public_class_has_its_own_repr():
    lacking = [q for q, obj in public_objects()
               if inspect.isclass(obj) and not issubclass(obj, BaseException)
               and obj.__repr__ is object.__repr__]
    assert not lacking, f"classes with object's default repr: {lacking}"


def _public_members(cls):
    """(name, function or property) of a class's public methods and properties,
    inherited ones included, that numlstm defines (not ``object``'s or
    ``Exception``'s)."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        owner = next(c for c in cls.__mro__ if name in vars(c))
        if owner.__module__.split(".")[0] != "numlstm":
            continue
        attr = vars(owner)[name]
        if isinstance(attr, property):
            yield name, attr.fget
        elif isinstance(attr, (staticmethod, classmethod)):
            yield name, attr.__func__
        elif inspect.isfunction(attr):
            yield name, attr


def missing_docstrings():
    missing = []
    for qual, obj in public_objects():
        if not (obj.__doc__ or "").strip():
            missing.append(qual)
        if inspect.isclass(obj):
            missing += [f"{qual}.{name}" for name, fn in _public_members(obj)
                        if not (fn.__doc__ or "").strip()]
    return missing


def test_every_public_name_has_a_docstring():
    missing = missing_docstrings()
    assert not missing, f"public names without a docstring: {missing}"


def test_returned_callables_have_docstrings():
    """Objects the API hands out, not named in any module: a schedule, a future."""
    assert optim.cosine_schedule(1e-3, 10).__doc__.strip()
    from numlstm.serve import _Future

    assert _Future.add_done_callback.__doc__.strip()


def test_the_docstring_walk_sees_methods_and_properties():
    members = dict(_public_members(optim.Adam))
    assert {"zero_grad", "step", "current_lr", "nbytes"} <= set(members)
    members = dict(_public_members(layers.Linear))
    assert {"state_dict", "zero_grad", "load_state_dict", "forward"} <= set(members)


@pytest.fixture
def model():
    return numlstm.LSTM(3, 5, num_layers=2, seed=0)


def test_layer_reprs_show_configuration():
    lin = layers.Linear(4, 6, bias=False, dtype=np.float64, seed=0)
    assert repr(lin) == "Linear(4, 6, bias=False, dtype=float64, weight=dense float64)"
    emb = layers.Embedding(10, 3, seed=0)
    assert repr(emb) == "Embedding(10, 3, dtype=float32)"


def test_optimizer_reprs_show_hyperparameters(model):
    r = repr(optim.SGD(model, lr=0.1, momentum=0.9))
    assert r == "SGD(1 module(s), lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, steps=0)"
    r = repr(optim.AdamW([model, layers.Linear(5, 2)], lr=optim.cosine_schedule(1e-3, 10)))
    assert r.startswith("AdamW(2 module(s), lr=schedule ") and "betas=(0.9, 0.999)" in r
    assert "weight_decay=0.01" in r and "array" not in r


def test_stream_pool_batcher_pruner_reprs(model):
    s = model.stream(batch_size=4)
    assert repr(s) == f"Stream({model!r}, batch_size=4, device='cpu')"
    pool = numlstm.StreamPool(model, 8)
    pool.open()
    with Batcher(pool, max_batch=4) as b:
        r = repr(b)
    assert r.startswith("Batcher(pool with 1/8 sessions open, max_batch=4, max_delay=0.0005")
    assert "closed=True" in repr(b)
    g = prune.GradualPruner(model, 0.8, num_updates=3, frequency=5)
    assert repr(g).startswith("GradualPruner(0.0 -> 0.8, begin_step=0, num_updates=3, ")


def _fit_quietly(epochs=2, steps=5):
    """``numlstm.fit`` on a tiny Linear, progress on (to wherever sys.stderr is)."""
    lin = layers.Linear(2, 1, seed=0)
    x = np.ones((4, 2), np.float32)

    def step(batch):
        y = lin(x, training=True)
        lin.backward(np.ones_like(y))
        return float(y.sum())

    numlstm.fit(step, optim.SGD(lin, lr=1e-3), list(range(steps)), epochs=epochs, progress=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_fit_progress_into_a_file_is_plain_lines(monkeypatch):
    out = io.StringIO()  # isatty() is False, as for a pipe or a log file
    monkeypatch.setattr(sys, "stderr", out)
    _fit_quietly(epochs=2, steps=5)
    text = out.getvalue()
    assert "\r" not in text, f"carriage returns written into a non-terminal: {text!r}"
    lines = text.splitlines()
    # Per epoch: the first step's line, then (steps within PLAIN_EVERY) the closing one.
    assert len(lines) == 4 and text.endswith("\n"), lines
    assert lines[1].startswith("epoch 1/2 5/5  loss ") and lines[1].endswith("(done)")
    assert lines[3].startswith("epoch 2/2 5/5")


def test_fit_progress_on_a_terminal_updates_in_place(monkeypatch):
    out = _Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain bar, not tqdm's
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    _fit_quietly(epochs=1, steps=3)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "epoch 1/1 3/3" in text


@pytest.mark.parametrize("module,extra,package,expected", [
    ("onnx", "onnx", None, 'W needs the onnx package: pip install "numlstm[onnx]"'),
    ("numba.cuda", "cuda", "numba-cuda",
     'W needs the numba-cuda package: pip install "numlstm[cuda]"'),
    ("torch", None, None, "W needs the torch package: pip install torch"),
])
def test_require_names_the_extra(monkeypatch, module, extra, package, expected):
    from numlstm._optional import require

    monkeypatch.setitem(sys.modules, module, None)  # "not installed", whether it is or not
    with pytest.raises(ImportError) as info:
        require(module, extra, "W", package=package)
    assert str(info.value) == expected


def test_require_passes_a_broken_install_through(monkeypatch):
    from numlstm._optional import require

    def broken(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'google.protobuf'", name="google.protobuf")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="google.protobuf"):
        require("onnx", "onnx", "numlstm.convert.from_onnx")


@pytest.mark.parametrize("blocked,call,message", [
    ("onnx", lambda: numlstm.convert.from_onnx("m.onnx"),
     'numlstm.convert.from_onnx needs the onnx package: pip install "numlstm[onnx]"'),
    ("onnx", lambda: numlstm.convert.to_onnx(numlstm.LSTM(2, 3)),
     'numlstm.convert.to_onnx needs the onnx package: pip install "numlstm[onnx]"'),
    ("torch", lambda: numlstm.convert.to_torch(numlstm.LSTM(2, 3)),
     "numlstm.convert.from_torch / to_torch needs the torch package: pip install torch"),
    ("distributed", lambda: importlib.import_module("numlstm.dask")._require_dask(),
     'numlstm.dask needs the dask.distributed package: pip install "numlstm[dask]"'),
    ("numba.cuda", lambda: numlstm.LSTM(2, 3).to("cuda"),
     'needs the numba-cuda package: pip install "numlstm[cuda]"'),
])
def test_missing_optional_packages_name_their_extra(monkeypatch, blocked, call, message):
    import numlstm.convert  # noqa: F401

    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(ImportError) as info:
        call()
    assert message in str(info.value)


def test_cli_convert_without_onnx_names_the_extra(monkeypatch, tmp_path, capsys):
    from numlstm import cli

    src = tmp_path / "m.onnx"
    src.write_bytes(b"\x08\x07")  # not empty: the CLI refuses an empty file first
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert cli.main(["convert", str(src), "-o", str(tmp_path / "m.npz")]) != 0
    assert 'converting an .onnx file needs the onnx package: pip install "numlstm[onnx]"' \
        in capsys.readouterr().err


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.npz"
    numlstm.save(numlstm.LSTM(8, 16, seed=0), path)
    return path


@pytest.mark.parametrize("argv,says", [
    (["quantize", "{m}", "--dtype", "int8"],
     ["--dtype int8 works on CSR weights", "(numlstm prune)", "(--dtype float16)",
      "pass --skip-dense"]),
    (["prune", "{m}", "--sparsity", "0.5", "--block", "8x1", "--scope", "per_row"],
     ["--scope per_row cannot be used with --block"]),
    (["prune", "{m}", "--sparsity", "0.5", "--block", "3x1"], ["not divisible by --block 3x1"]),
])
def test_cli_errors_speak_in_flags(saved, tmp_path, capsys, argv, says):
    from numlstm import cli

    argv = [a.format(m=saved) for a in argv] + ["-o", str(tmp_path / "out.npz")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"numlstm {argv[0]}: error: ")
    for text in says:
        assert text in err, err
    for python in ("skip_dense", "values=", "scope must be", "block (", "numlstm.prune."):
        assert python not in err, err


def test_cli_flag_wording_leaves_file_names_alone(tmp_path, capsys):
    from numlstm import cli

    missing = tmp_path / "skip_dense=True values='int8'.npz"  # a name that looks like Python
    assert cli.main(["quantize", str(missing), "-o", str(tmp_path / "o.npz")]) == 1
    assert "skip_dense=True values='int8'.npz" in capsys.readouterr().err


@pytest.mark.parametrize("opt_out", ["0", "off", "OFF "])
def test_openblas_timeout_opt_out_leaves_the_environment_untouched(opt_out):
    import os
    import subprocess

    code = ("import os; before = dict(os.environ); import numlstm; "
            "from numlstm import config; "
            "print(dict(os.environ) == before, config.OPENBLAS_THREAD_TIMEOUT)")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
        check=True).stdout.split()
    assert run({"NUMLSTM_OPENBLAS_THREAD_TIMEOUT": opt_out}) == ["True", "None"]
    assert run({"NUMLSTM_OPENBLAS_THREAD_TIMEOUT": opt_out,
                "OPENBLAS_THREAD_TIMEOUT": "28"}) == ["True", "28"]
    assert run({}) == ["False", "20"]  # without the opt-out numlstm sets it


def test_flag_wording_keeps_the_type_and_unmapped_errors():
    from numlstm import cli

    with pytest.raises(TypeError, match=r"^--seq-len must be an int, got 'x'$"):
        with cli._in_flags("info"):
            raise TypeError("seq_len must be an int, got 'x'")
    original = ValueError("nothing to map here")
    with pytest.raises(ValueError) as info:
        with cli._in_flags("quantize"):
            raise original
    assert info.value is original
    odd = UnicodeDecodeError("ascii", b"\xff", 0, 1, "bad seq_len")  # takes 5 arguments
    with pytest.raises(UnicodeDecodeError) as info:  # cannot be rebuilt from one message
        with cli._in_flags("info"):
            raise odd
    assert info.value is odd


def test_data_parallel_repr_without_a_cluster(model):
    from numlstm.dask import DataParallel
    from numlstm.losses import mse

    dp = DataParallel.__new__(DataParallel)  # no client: only what repr reads
    dp.model, dp.optimizer, dp.loss_grad, dp.shards = model, optim.Adam(model), mse, None
    assert repr(dp) == (f"DataParallel({model!r}, {dp.optimizer!r}, loss_grad=mse, "
                        "shards=one per worker thread)")

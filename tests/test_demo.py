"""Smoke test of ``numlstm demo`` at tiny sizes (no timing assertions)."""

import math

import pytest

from numlstm import cli
from numlstm.demo import encode, load_corpus, run_demo


@pytest.fixture(scope="module")
def figures():
    return run_demo(steps=40, finetune_steps=15, hidden=32, seq_len=16, batch=8,
                    bench_steps=50, sample_chars=20, valid_chars=4000, seed=1, quiet=True)


def test_losses_are_finite_and_learned(figures):
    for key in ("untrained", "dense", "pruned", "finetuned"):
        assert math.isfinite(figures[f"loss_{key}"]), key
        assert figures[f"bits_{key}"] == pytest.approx(figures[f"loss_{key}"] / math.log(2))
    ln_v = math.log(figures["vocab"])
    assert figures["loss_untrained"] == pytest.approx(ln_v, abs=0.1)
    assert figures["loss_dense"] < ln_v
    assert figures["loss_finetuned"] < ln_v


def test_pruned_model_is_sparse_and_small(figures):
    assert figures["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert figures["pattern_kept"]  # fine-tuning trained only the stored values
    # float32 values + int32 column indices: 8 bytes per kept weight against 4 per
    # dense weight, so 90% sparsity gives ~1/5 of the bytes plus indptr and biases.
    assert figures["bytes_csr"] < figures["bytes_dense"] / 4


def test_streaming_and_sample(figures):
    assert figures["us_step_dense"] > 0 and figures["us_step_csr"] > 0
    assert figures["sample"].startswith("def ") and len(figures["sample"]) == 24
    assert figures["steps"] == 40 and figures["finetune_steps"] == 15


def test_corpus_split_and_encoding():
    train_text, valid_text, names = load_corpus()
    assert names and len(valid_text) > 1000 and len(train_text) > 9 * len(valid_text) // 2
    train, valid, alphabet = encode(train_text, valid_text)
    assert train.min() >= 0 and train.max() < len(alphabet)
    assert valid.min() >= 0 and valid.max() < len(alphabet)
    assert "\n" in alphabet and " " in alphabet


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--seconds", "-1"])
    assert exc.value.code == 2
    assert "--seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


@pytest.mark.parametrize("flag,value", [("--seed", "-1"), ("--hidden", "100000000"),
                                        ("--hidden", "0"), ("--seconds", "nan")])
def test_demo_arguments_out_of_range_get_a_message_not_a_traceback(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_a_demo_failure_is_one_line(monkeypatch, capsys):
    """The demo runs inside the CLI's error handling, as every subcommand."""
    import numlstm.demo

    def fail(**kwargs):
        raise MemoryError("Unable to allocate 9.3 TiB")
    monkeypatch.setattr(numlstm.demo, "run_demo", fail)
    assert cli.main(["demo", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("numlstm demo: error:") and "9.3 TiB" in err
    assert len(err.splitlines()) == 1

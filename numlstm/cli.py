"""The ``numlstm`` command line (also ``python -m numlstm``).

Subcommands:

``demo``
    Train a character-level LSTM on Python standard-library source, prune it
    to 90% sparsity (CSR), fine-tune the kept weights and compare dense with
    CSR: validation loss, weight bytes, streaming latency. See ``numlstm.demo``.
``info MODEL``
    Configuration, storage and sparsity of every weight, and a memory report.
``prune MODEL --sparsity S -o OUT``
    Magnitude pruning (``--scope``), or whole blocks into BSR (``--block``).
``quantize MODEL --dtype int8 -o OUT``
    Compact indices, and float16 or int8 values, for inference.
``compile MODEL [--batch N ...] [--seq-len T ...] [--training] [--pool]``
    Compile (into the kernel cache) every kernel the model's streams,
    forwards, pools and training steps of those shapes use: a container image
    runs it at build time so that its processes start warm.
``convert SRC -o OUT``
    An ONNX file (its LSTM nodes) or a saved torch ``nn.LSTM`` / ``LSTMCell``
    state dict (``torch.save(module.state_dict(), "x.pt")``) to a model file.

Every failure ends with a one-line message on stderr naming the file and
what to do, and exit status 1 (2 for arguments argparse rejects), never a
traceback: user mistakes (a missing, truncated or foreign file, a bad
argument, an output path that is a folder) and errors from the optional
frameworks alike; anything else is reported on one line as an unexpected
error (set ``NUMLSTM_TRACEBACK=1`` to see its traceback when reporting it).
"""

import argparse
import contextlib
import os
import re
import stat
import sys
import time


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# The demo trains a character model for a minute: past this H it would
# neither fit a minute nor a small machine's memory.
DEMO_MAX_HIDDEN = 4096


def _seed(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _hidden(text):
    value = _positive_int(text)
    if value > DEMO_MAX_HIDDEN:
        raise argparse.ArgumentTypeError(f"must be at most {DEMO_MAX_HIDDEN}, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _block(text):
    try:
        br, bc = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 8x1 (rows x columns), got {text}") \
            from None
    return br, bc


def build_parser():
    from numlstm import __version__

    parser = argparse.ArgumentParser(
        prog="numlstm", description="numlstm: a memory-lean, framework-free LSTM.")
    parser.add_argument("--version", action="version", version=f"numlstm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="train, prune (90%% CSR), fine-tune and stream a char-level LSTM",
        description="Train a character-level LSTM on the source of a few Python stdlib "
                    "modules, prune every weight matrix to 90% sparsity into CSR, "
                    "fine-tune the kept weights, and compare dense with CSR: held-out "
                    "loss, weight bytes and streaming latency at batch 1.")
    demo.add_argument("--seconds", type=_positive_float, default=45.0,
                      help="wall-clock budget, numba compilation included (default 45)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    demo.add_argument("--hidden", type=_hidden, default=128,
                      help=f"hidden size H, at most {DEMO_MAX_HIDDEN} (default 128)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="exact dense training steps instead of the time budget")
    demo.add_argument("--quiet", action="store_true", help="print only the final table")

    info = sub.add_parser("info", help="configuration, storage, sparsity and memory of a model",
                          description="Print a saved model's configuration, every weight's "
                                      "storage, sparsity and bytes, and a memory report.")
    info.add_argument("model", help="a model file written by numlstm.save")
    info.add_argument("--seq-len", type=_positive_int, default=100,
                      help="T for the memory report (default 100)")
    info.add_argument("--batch", type=_positive_int, default=1,
                      help="B for the memory report (default 1)")
    info.add_argument("--training", action="store_true",
                      help="report a training step (with Adam) instead of inference")

    prune = sub.add_parser("prune", help="prune a model's weights (CSR, or blocks into BSR)",
                           description="Magnitude-prune every weight matrix of a saved model "
                                       "and save the result.")
    prune.add_argument("model", help="a model file written by numlstm.save")
    prune.add_argument("--sparsity", type=_fraction, required=True,
                       help="fraction of weights to remove, in [0, 1)")
    prune.add_argument("--scope", choices=("per_matrix", "global", "per_row"),
                       default="per_matrix", help="where the target applies "
                                                  "(default per_matrix)")
    prune.add_argument("--block", type=_block, default=None,
                       help="prune whole blocks, e.g. 8x1, into BSR (scope per_matrix or "
                            "global)")
    prune.add_argument("-o", "--output", required=True, help="where to save the pruned model")

    quant = sub.add_parser("quantize", help="store weights compactly (for inference)",
                           description="Re-store every CSR weight of a saved model with uint16 "
                                       "indices where they fit and float16 or int8 values; "
                                       "with --dtype float16 every dense weight too.")
    quant.add_argument("model", help="a model file written by numlstm.save")
    quant.add_argument("--dtype", choices=("int8", "float16", "none"), default="int8",
                       help="value storage; none keeps float values (default int8)")
    quant.add_argument("--indices", choices=("auto", "uint16", "int32"), default="auto",
                       help="index storage (default auto: uint16 where it fits)")
    quant.add_argument("--skip-dense", action="store_true",
                       help="leave block-sparse weights, and dense ones unless --dtype "
                            "float16, as they are instead of failing")
    quant.add_argument("-o", "--output", required=True,
                       help="where to save the quantized model")

    comp = sub.add_parser(
        "compile", help="compile a model's kernels into the kernel cache",
        description="Compile every kernel that a saved model's streams, forwards, pools and "
                    "training steps of the given shapes use, and write them to the kernel "
                    "cache, so that later processes start without compiling (a container "
                    "image: RUN numlstm compile model.npz).")
    comp.add_argument("model", help="a model file written by numlstm.save")
    comp.add_argument("--batch", type=_positive_int, nargs="+", default=[1], metavar="N",
                      help="batch sizes to prepare (default 1)")
    comp.add_argument("--seq-len", type=_positive_int, nargs="+", default=[10, 1000],
                      metavar="T", help="sequence lengths of forward and training calls "
                                        "(default 10 1000)")
    comp.add_argument("--training", action="store_true",
                      help="also a training step (forward with training, backward)")
    comp.add_argument("--pool", action="store_true",
                      help="also a StreamPool stepping the largest batch")
    comp.add_argument("--no-stream", action="store_true", help="skip stream steps")
    comp.add_argument("--no-forward", action="store_true", help="skip inference forwards")

    conv = sub.add_parser("convert", help="an ONNX file or a torch state dict to a model file",
                          description="Convert an ONNX model's LSTM nodes (.onnx) or a torch "
                                      "nn.LSTM / nn.LSTMCell state dict saved with torch.save "
                                      "(.pt, .pth) into a numlstm model file. Needs the onnx "
                                      "or torch package.")
    conv.add_argument("source", help="an .onnx file, or a .pt / .pth torch state dict")
    conv.add_argument("--batch-first", action="store_true",
                      help="the model reads (B, T, I) inputs (not stored in either format)")
    conv.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    conv.add_argument("-o", "--output", required=True, help="where to save the model")
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return {"info": _info, "prune": _prune, "quantize": _quantize, "convert": _convert,
                "compile": _compile, "demo": _demo}[args.command](args)
    except KeyboardInterrupt:
        print(f"numlstm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, KeyError, ImportError, MemoryError) as e:
        # ModelFileError is a ValueError; ImportError: an optional framework is missing.
        print(f"numlstm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the promise: one line, never a traceback
        if os.environ.get("NUMLSTM_TRACEBACK"):
            raise
        print(f"numlstm {args.command}: unexpected error: {type(e).__name__}: "
              f"{_one_line(e)} (please report it; NUMLSTM_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")  # ANSI terminal sequences
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_line(e, limit=600):
    """An exception's message as one printable line: terminal escape codes
    dropped, the first non-empty line of a multi-line message, any other
    control character (a newline in a file name) escaped, the exception's
    type when the message is empty."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    text = _ESCAPES.sub("", str(text))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = _CONTROLS.sub(lambda m: repr(m.group())[1:-1], lines[0])
    return line if len(line) <= limit else line[:limit] + "..."


# The library's messages name Python arguments; a command-line user typed flags.
# (pattern, replacement) per command, applied only to the messages of the library
# call a command makes (never to a file name, which may hold any word).
_FLAG_WORDING = {
    "info": ((r"\bseq_len\b", "--seq-len"), (r"\bbatch_size\b", "--batch")),
    "prune": ((r"scope must be 'per_matrix' or 'global' for blocks, got '(\w+)'",
               r"--scope \1 cannot be used with --block: use --scope per_matrix or global"),
              (r"\bblock \((\d+), (\d+)\)", r"--block \1x\2")),
    "quantize": ((r"quantize\(values=None\)", "--dtype none"),
                 (r"quantize\(values='(\w+)'\)", r"--dtype \1"),
                 (r"\(values='(\w+)'\)", r"(--dtype \1)"),
                 (r"\(values=None\)", "(--dtype none)"),
                 (r"\(numlstm\.prune\.magnitude\)", "(numlstm prune)"),
                 (r"\bpass skip_dense=True\b", "pass --skip-dense"),
                 (r"uint16 indices hold at most (\d+)",
                  r"uint16 indices hold at most \1: use --indices auto or int32")),
}


@contextlib.contextmanager
def _in_flags(command):
    """Re-raise a ValueError / TypeError of the library with its message in
    ``command``'s flags (``skip_dense=True`` -> ``--skip-dense``)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        text = str(e)
        for pattern, flag in _FLAG_WORDING[command]:
            text = re.sub(pattern, flag, text)
        try:
            mapped = type(e)(text) if text != str(e) else None
        except TypeError:  # an exception type that takes other arguments: keep it
            mapped = None
        if mapped is None:
            raise
        raise mapped from None


def _info(args):
    import numlstm
    from numlstm import weights

    model = numlstm.load(args.model)
    print(repr(model))
    print(f"cell: {model.cell.describe()}" + ("; every layer runs backwards in time (reverse)"
                                              if model.reverse else ""))
    sparsity = model.sparsity()
    print(f"\n{'weight':<24}{'shape':>12}  {'storage':<26}{'sparsity':>9}{'bytes':>12}")
    for name, w in model.weights().items():
        shape = "x".join(str(n) for n in w.shape)
        print(f"{name:<24}{shape:>12}  {weights.describe(w):<26}{sparsity[name]:>9.1%}"
              f"{w.nbytes:>12,}")
    print(f"{'all weights and biases':<64}{model.weight_bytes():>12,}")
    print(f"overall sparsity {sparsity['overall']:.1%}\n")
    trainable = all(w.trainable for w in model.weights().values())
    training = args.training and trainable
    if args.training and not trainable:
        print("(quantized weights are for inference only: reporting inference)")
    with _in_flags("info"):
        report = numlstm.memory_report(model, args.seq_len, args.batch, training=training,
                                       optimizer="adam" if training else None)
    print(report)
    return 0


def _prune(args):
    import numlstm

    model = numlstm.load(args.model)
    with _in_flags("prune"):
        if args.block is None:
            numlstm.prune.magnitude(model, args.sparsity, scope=args.scope)
        else:
            numlstm.prune.blocks(model, args.sparsity, block=args.block, scope=args.scope)
    numlstm.save(model, args.output)
    print(f"pruned to {model.sparsity()['overall']:.1%} sparsity; weights "
          f"{model.weight_bytes():,} bytes; saved {args.output}")
    return 0


def _quantize(args):
    import numlstm

    model = numlstm.load(args.model)
    before = model.weight_bytes()
    with _in_flags("quantize"):
        numlstm.quantize.quantize(model, None if args.dtype == "none" else args.dtype,
                                  args.indices, skip_dense=args.skip_dense)
    numlstm.save(model, args.output)
    print(f"weights {before:,} -> {model.weight_bytes():,} bytes "
          f"(x{before / model.weight_bytes():.1f} smaller); saved {args.output}")
    return 0


def _convert(args):
    import numpy as np

    import numlstm

    dtype = np.dtype(args.dtype)
    source = args.source
    suffix = source.lower().rsplit(".", 1)[-1]
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {source!r}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block torch.load / onnx.load for good
        raise ValueError(f"{source!r} is not a regular file: give the path of an .onnx, "
                         ".pt or .pth file")
    if os.stat(source).st_size == 0:
        raise ValueError(f"{source!r} is empty: give a complete .onnx file, or a state dict "
                         "saved with torch.save(module.state_dict(), path)")
    if suffix == "onnx":
        model = _from_onnx(source, dtype, args.batch_first)
    elif suffix in ("pt", "pth"):
        model = _from_torch(source, dtype, args.batch_first)
    else:
        raise ValueError(f"source must end in .onnx, .pt or .pth, got {source!r}")
    numlstm.save(model, args.output)
    print(f"converted {source} to {model!r}; saved {args.output}")
    return 0


def _from_onnx(source, dtype, batch_first):
    from numlstm import convert
    from numlstm._optional import require

    onnx = require("onnx", "onnx", "converting an .onnx file")
    try:  # onnx and protobuf raise many types (DecodeError, ValidationError, ...)
        proto = onnx.load(source)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{source!r} could not be loaded as an ONNX model ({_one_line(e)}); "
                         "check that the file is complete and that any external data "
                         "files sit beside it, inside its folder") from None
    try:
        model = convert.from_onnx(proto, dtype=dtype, batch_first=batch_first)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source!r}: {_one_line(e)}") from None
    if isinstance(model, list):
        raise ValueError(f"{source!r} holds {len(model)} separate LSTM stacks; convert "
                         "it with numlstm.convert.from_onnx in Python and save each")
    return model


def _from_torch(source, dtype, batch_first):
    import pickle
    from collections.abc import Mapping

    from numlstm import convert
    from numlstm._optional import require

    torch = require("torch", None, "converting a .pt file")
    how = "save one with torch.save(module.state_dict(), path)"
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only refusal: many lines, terminal escapes, advice to
        # load unsafely. Keep only what it refused.
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(f"{source!r} holds a pickled {found.group(1)} object, not a "
                             f"state dict, and objects are not unpickled (that could run "
                             f"code): {how}") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        raise ValueError(f"{source!r} is not a loadable torch state dict "
                         f"({_one_line(ValueError(detail))}): {how}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{source!r} is not a loadable torch state dict ({_one_line(e)}): "
                         f"{how}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{source!r} holds a {type(state).__name__}, not a state dict: {how}")
    try:
        return convert.from_torch(state, dtype=dtype, batch_first=batch_first)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source!r}: {_one_line(e)}") from None


def _compile(args):
    import numlstm

    model = numlstm.load(args.model)
    if args.training and not all(w.trainable for w in model.weights().values()):
        raise ValueError(f"{args.model!r}: --training, but its weights are for inference only "
                         "(quantized); drop --training")
    t0 = time.perf_counter()
    with _compile_log():
        times = numlstm.compile(model, args.batch, seq_lens=args.seq_len,
                                stream=not args.no_stream, forward=not args.no_forward,
                                pool=args.pool, training=args.training)
    folder = times.pop("cache")
    for name, seconds in times.items():
        print(f"{name:<28}{seconds:8.2f} s")
    print(f"{len(times)} calls ready in {time.perf_counter() - t0:.1f} s; kernels cached in "
          f"{folder}")
    return 0


def _compile_log():
    """Show the ``numlstm`` logger's INFO lines (what is compiling) on stderr
    for the duration of a command."""
    import logging

    @contextlib.contextmanager
    def shown():
        logger = logging.getLogger("numlstm")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("numlstm: %(message)s"))
        level = logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return shown()


def _demo(args):
    from numlstm.demo import format_report, run_demo

    with contextlib.nullcontext() if args.quiet else _compile_log():
        res = run_demo(seconds=args.seconds, steps=args.steps, hidden=args.hidden,
                       seed=args.seed, quiet=args.quiet, log=lambda *a: print(*a, flush=True))
    if not args.quiet:
        print()
    print(format_report(res))
    sys.stdout.flush()
    return 0

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
``convert SRC -o OUT``
    An ONNX file (its LSTM nodes) or a saved torch ``nn.LSTM`` / ``LSTMCell``
    state dict (``torch.save(module.state_dict(), "x.pt")``) to a model file.

User mistakes (a missing or bad file, a bad argument) end with a one-line
message on stderr and exit status 1 (2 for arguments argparse rejects),
never a traceback.
"""

import argparse
import os
import sys


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
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--hidden", type=_positive_int, default=128,
                      help="hidden size H (default 128)")
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

    quant = sub.add_parser("quantize", help="store sparse weights compactly (for inference)",
                           description="Re-store every CSR weight of a saved model with uint16 "
                                       "indices where they fit and float16 or int8 values.")
    quant.add_argument("model", help="a model file written by numlstm.save")
    quant.add_argument("--dtype", choices=("int8", "float16", "none"), default="int8",
                       help="value storage; none keeps float values (default int8)")
    quant.add_argument("--indices", choices=("auto", "uint16", "int32"), default="auto",
                       help="index storage (default auto: uint16 where it fits)")
    quant.add_argument("--skip-dense", action="store_true",
                       help="leave dense and block-sparse weights as they are instead of "
                            "failing")
    quant.add_argument("-o", "--output", required=True,
                       help="where to save the quantized model")

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
    if args.command == "demo":
        return _demo(args)
    try:
        return {"info": _info, "prune": _prune, "quantize": _quantize,
                "convert": _convert}[args.command](args)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        # ModelFileError is a ValueError; ImportError: an optional framework is missing.
        print(f"numlstm {args.command}: error: {e}", file=sys.stderr)
        return 1


def _info(args):
    import numlstm
    from numlstm import weights as W

    model = numlstm.load(args.model)
    print(repr(model))
    sparsity = model.sparsity()
    print(f"\n{'weight':<24}{'shape':>12}  {'storage':<26}{'sparsity':>9}{'bytes':>12}")
    for name, w in model._weights().items():
        shape = "x".join(str(n) for n in w.shape)
        print(f"{name:<24}{shape:>12}  {W.describe(w):<26}{sparsity[name]:>9.1%}"
              f"{w.nbytes:>12,}")
    print(f"{'all weights and biases':<64}{model.weight_bytes():>12,}")
    print(f"overall sparsity {sparsity['overall']:.1%}\n")
    trainable = all(w.trainable for w in model._weights().values())
    training = args.training and trainable
    if args.training and not trainable:
        print("(quantized weights are for inference only: reporting inference)")
    report = numlstm.memory_report(model, args.seq_len, args.batch, training=training,
                                   optimizer="adam" if training else None)
    print(report)
    return 0


def _prune(args):
    import numlstm

    model = numlstm.load(args.model)
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
    numlstm.quantize.quantize(model, None if args.dtype == "none" else args.dtype,
                              args.indices, skip_dense=args.skip_dense)
    numlstm.save(model, args.output)
    print(f"weights {before:,} -> {model.weight_bytes():,} bytes "
          f"(x{before / model.weight_bytes():.1f} smaller); saved {args.output}")
    return 0


def _convert(args):
    import numpy as np

    import numlstm
    from numlstm import convert

    dtype = np.dtype(args.dtype)
    suffix = args.source.lower().rsplit(".", 1)[-1]
    if not os.path.exists(args.source):
        raise FileNotFoundError(f"no file at {args.source!r}")
    if suffix == "onnx":
        model = convert.from_onnx(args.source, dtype=dtype, batch_first=args.batch_first)
        if isinstance(model, list):
            raise ValueError(f"{args.source} holds {len(model)} separate LSTM stacks; convert "
                             "it with numlstm.convert.from_onnx in Python and save each")
    elif suffix in ("pt", "pth"):
        try:
            import torch
        except ImportError:
            raise ImportError("converting a .pt file needs torch (pip install torch)") from None
        try:
            state = torch.load(args.source, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise ValueError(f"{args.source} is not a loadable torch state dict: "
                             f"{str(e).splitlines()[0]}") from None
        model = convert.from_torch(state, dtype=dtype, batch_first=args.batch_first)
    else:
        raise ValueError(f"source must end in .onnx, .pt or .pth, got {args.source!r}")
    numlstm.save(model, args.output)
    print(f"converted {args.source} to {model!r}; saved {args.output}")
    return 0


def _demo(args):
    from numlstm.demo import format_report, run_demo

    res = run_demo(seconds=args.seconds, steps=args.steps, hidden=args.hidden,
                   seed=args.seed, quiet=args.quiet, log=lambda *a: print(*a, flush=True))
    if not args.quiet:
        print()
    print(format_report(res))
    sys.stdout.flush()
    return 0

"""The ``numlstm`` command line (also ``python -m numlstm``).

Subcommands:

``demo``
    Train a character-level LSTM on Python standard-library source, prune it
    to 90% sparsity (CSR), fine-tune the kept weights and compare dense with
    CSR: validation loss, weight bytes, streaming latency. See ``numlstm.demo``.
"""

import argparse
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
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from numlstm.demo import format_report, run_demo

        res = run_demo(seconds=args.seconds, steps=args.steps, hidden=args.hidden,
                       seed=args.seed, quiet=args.quiet,
                       log=lambda *a: print(*a, flush=True))
        if not args.quiet:
            print()
        print(format_report(res))
        sys.stdout.flush()
    return 0

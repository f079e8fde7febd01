"""``python -m benchmarks [--quick] [--out DIR] [--only NAME ...] [--cases LETTER ...]``."""

import argparse
import importlib
import sys
import time

from benchmarks import BENCHMARKS

SUITE_CASES = ("a", "b", "c", "d", "e", "f", "g")  # benchmarks/suite/config.py CASES


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Time numlstm beside its peers (torch, ONNX "
                                            "Runtime, NumPy, scipy when importable); write "
                                            "JSON, Markdown and PNG results.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a smoke test, not a measurement")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where results go (default: benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                   help="run only these benchmarks (default: all; only suite when --cases "
                        "is given)")
    p.add_argument("--cases", nargs="+", choices=SUITE_CASES, default=None, metavar="LETTER",
                   help="the suite's cases to run, among a b c d e f g (default: all)")
    args = p.parse_args(argv)
    only = args.only or (["suite"] if args.cases else list(BENCHMARKS))
    if args.cases and "suite" not in only:
        p.error("--cases picks cases of the suite benchmark: add suite to --only")
    for name in only:
        module = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        kwargs = {"cases": args.cases} if name == "suite" and args.cases else {}
        result = module.run(quick=args.quick, out_dir=args.out,
                            log=lambda *a: print(*a, flush=True), **kwargs)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s; wrote "
              + ", ".join(result["files"]), flush=True)
        print()
        print(module.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

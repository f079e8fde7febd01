"""``python -m benchmarks [--quick] [--out DIR] [--only NAME ...]``."""

import argparse
import importlib
import sys
import time

from benchmarks import BENCHMARKS


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Time numlstm beside its peers (torch when "
                                            "importable); write JSON and Markdown results.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a smoke test, not a measurement")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where results go (default: benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                   help="run only these benchmarks")
    args = p.parse_args(argv)
    for name in args.only:
        module = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        result = module.run(quick=args.quick, out_dir=args.out,
                            log=lambda *a: print(*a, flush=True))
        print(f"== {name}: {time.perf_counter() - t0:.1f} s; wrote "
              + ", ".join(result["files"]), flush=True)
        print()
        print(module.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

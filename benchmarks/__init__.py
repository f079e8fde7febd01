"""numlstm's benchmarks against its peers: ``python -m benchmarks [--quick] [--out DIR]``.

Each module is one benchmark with a ``run(quick, out_dir, log)`` function that
runs its cases in separate processes and writes ``<name>.json`` and
``<name>.md`` (and ``<name>.png`` when matplotlib is importable) to
``benchmarks/results/`` or ``--out``. ``suite`` (issue 6's cases a-g, every
peer; ``--cases`` picks letters) also writes its scaling plots. Shared helpers
live in ``benchmarks.common``. Nothing is imported here, so that
worker processes (``python -m benchmarks.<name> --worker ...``) start light.
"""

BENCHMARKS = ("coldstart", "first", "memory", "pair", "pool", "pruning", "soak", "step_parts",
              "suite")

"""Helpers every benchmark shares: timing, statistics, the machine's description,
worker processes, and writing results (JSON, Markdown, PNG plots).

Imports only the standard library and NumPy, so that worker processes start light.
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_repeats(fn, repeats, warmup):
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def stats(values):
    """Median, min, max and every value, as floats."""
    return {"median": float(np.median(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "all": [float(v) for v in values]}


def peak_rss_mib():
    """This process's peak resident set size in MiB, or None off POSIX.

    VmHWM where /proc exists: ``ru_maxrss`` starts a child at its parent's peak
    (Linux carries the forked image's high-water mark across exec), so a worker
    of a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info():
    """CPU, cores, platform, library versions, thread variables and load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
           if k in os.environ}
    try:
        from numlstm import layouts

        l2 = layouts._l2_bytes()
    except ImportError:
        l2 = None
    return {"cpu": cpu, "isa": isa_info(), "l2_bytes": l2, "logical_cores": os.cpu_count(),
            "usable_cores": usable,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("numlstm", "numpy", "scipy", "numba",
                                                 "llvmlite", "torch", "onnxruntime")},
            "thread_env": env,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg")
            else None}


def isa_info():
    """The vector features numlstm's kernels choose by, as LLVM sees the host:
    its CPU name, the SIMD flags that matter, and the SELL layout widths."""
    try:
        import llvmlite.binding as llvm

        from numlstm.kernels.vector_ir import SELL_LANES, WINDOW
    except ImportError:
        return None
    features = llvm.get_host_cpu_features()
    flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                         "avx512fp16") if features.get(f, False)]
    return {"llvm_cpu": llvm.get_host_cpu_name(), "flags": flags,
            "sell_lanes": SELL_LANES, "window": WINDOW}


def machine_markdown(m, threads):
    """The "## Machine" section of a report, from ``machine_info()`` (plus the
    ``load_average_at_end`` a run adds); ``threads`` states the thread settings."""
    lines = ["## Machine", "",
             f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores "
             f"({m['usable_cores']} usable)"
             + (f", L2 {m['l2_bytes'] // 1024} KiB per core" if m.get("l2_bytes") else ""),
             f"- {m['platform']}, Python {m['python']}"]
    isa = m.get("isa")
    if isa:
        lines.append(f"- ISA (as LLVM compiles for it): {isa['llvm_cpu']}, "
                     f"{' '.join(isa['flags']) or 'no AVX2'}; SELL slices of "
                     f"{isa['sell_lanes']} rows, windows of {isa['window']} columns")
    lines += ["- " + ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val),
              f"- thread settings: {threads}; environment {m['thread_env'] or 'none set'}"]
    if m["load_average_at_start"]:
        lines.append("- load average (1, 5, 15 min) at start: "
                     + ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
                     + "; at end: "
                     + ", ".join(f"{x:.2f}" for x in m.get("load_average_at_end") or []))
    return lines


def worker_env(extra=None):
    """The environment of a worker: this one, the repository on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_worker(module, args, timeout, label, env=None):
    """Run ``python -m <module> <args>`` in a fresh process from the repository
    root and return the JSON object its last stdout line holds. ``env`` adds
    environment variables."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=worker_env(env), cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {label} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def have_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


def write_results(name, result, out_dir, markdown, draw=None, plots=None):
    """Note the load average at the end, write ``<name>.json`` and ``<name>.md``
    to ``out_dir`` atomically, and, when matplotlib is importable, ``<name>.png``
    with ``draw(result, ax)`` and ``<name>_<key>.png`` with ``plots[key](result, ax)``
    for each key of ``plots``; return the paths written."""
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md")]
    figures = ({"": draw} if draw is not None else {}) | dict(plots or {})
    if figures and have_matplotlib():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key, fn in figures.items():
            fig, ax = plt.subplots(figsize=(7, 3.5))
            fn(result, ax)
            ax.legend()
            fig.tight_layout()
            paths.append(os.path.join(out_dir, f"{name}{'_' + key if key else ''}.png"))
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    _write_atomic(paths[0], json.dumps(result, indent=2) + "\n")
    _write_atomic(paths[1], markdown(result))
    return paths


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)

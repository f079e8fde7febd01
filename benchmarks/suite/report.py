"""The suite's Markdown report, its target check and its plots."""

from benchmarks.common import machine_markdown
from benchmarks.suite.config import (
    CASES,
    COLD_START_TARGET_S,
    LABELS,
    PEERS,
    TORCH_THREADS,
    VARIANTS,
)

COLUMN = {"dense": "vs numlstm dense", "csr-f32": "vs numlstm 90% CSR (float32)",
          "torch-cell": "vs torch `nn.LSTMCell`",
          "torch-lstm": "vs torch `nn.LSTM`", "ort": "vs ONNX Runtime", "numpy": "vs NumPy loop",
          "scipy": "vs scipy loop (same pattern)", "reference": "vs NumPy reference (float64)"}


def _f(value, spec=".2f", none="–"):
    return none if value is None else format(value, spec)


def _g(value):
    """A figure with 3 significant digits."""
    if value is None:
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _stat(s):
    return f"{_g(s['median'])} ({_g(s['min'])}–{_g(s['max'])})"


def _verdict(met):
    return {True: "**pass**", False: "**miss**", None: "not measured"}[met]


# ----------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------

def targets(result):
    """Every target of the issue with its measured figure and verdict."""
    from benchmarks.suite.config import TARGETS

    out = []
    for case, table, system, peer, bound in TARGETS:
        entry = {"case": case, "table": table, "system": system, "peer": peer,
                 "target": bound, "speedup": None, "met": None}
        t = result["cases"].get(case, {}).get("tables", {}).get(table, {})
        for c in t.get("comparisons", []):
            if c["system"] == system and c["column"] == peer:
                entry["speedup"], entry["met"] = c["speedup"], c["met"]
        out.append(entry)
    f = result["cases"].get("f", {}).get("tables", {}).get("cold", {}).get("rows", {})
    warm = f.get("dense")
    out.append({"case": "f", "table": "cold", "system": "dense", "peer": None,
                "target": COLD_START_TARGET_S,
                "seconds": warm["stats"]["median"] if warm else None,
                "met": bool(warm["stats"]["median"] < COLD_START_TARGET_S) if warm else None})
    return out


def _targets_md(result):
    lines = ["## Targets", "",
             "Speedup = peer median / numlstm median in this run (> 1: numlstm faster).", "",
             "| case | figure | target | measured | verdict |", "|---|---|---:|---:|---|"]
    names = {"stream": "streaming step", "B=1": "whole sequence, batch 1",
             "B=16": "whole sequence, batch 16", "train": "training step (forward + backward)"}
    for t in result["targets"]:
        if t["case"] == "f":
            lines.append(f"| f | {LABELS['dense']}: fresh process to first output, warm "
                         f"kernel cache | < {t['target']:g} s | {_f(t['seconds'], '.2f')} s "
                         f"| {_verdict(t['met'])} |")
            continue
        bound = (f"≥ {t['target']:g}×" if t["target"] >= 1
                 else f"≥ {t['target']:.2f}× (time ≤ {1 / t['target']:.2g}× the other's)")
        lines.append(f"| {t['case']} | {LABELS[t['system']]}, {names[t['table']]}, "
                     f"vs {LABELS[t['peer']]} | {bound} | {_f(t['speedup'])}× | "
                     f"{_verdict(t['met'])} |")
    return lines


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------

def _cell(c):
    s = f"{c['speedup']:.2f}×"
    d = []
    if "max_abs_diff" in c:
        d.append(f"Δ{'y ' if 'grad_rel_diff' in c else ' '}{c['max_abs_diff']:.1e}")
    if "grad_rel_diff" in c:
        d.append(f"Δg {c['grad_rel_diff']:.1e}")
    if d:
        s += " (" + ", ".join(d) + ")"
    if "target" in c:
        s += f" ≥{c['target']:.3g}×: {_verdict(c['met'])}"
    return s


def _timing_table(table, columns):
    unit = table["unit"]
    cols = [c for c in columns if any(k["column"] == c for k in table.get("comparisons", []))]
    lines = [f"| system | {unit} median (min–max) | floor | / floor | "
             + " | ".join(COLUMN[c] for c in cols) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cols)]
    comps = {(c["system"], c["column"]): c for c in table.get("comparisons", [])}
    for key, r in table["rows"].items():
        cells = [_cell(comps[(key, c)]) if (key, c) in comps else "–" for c in cols]
        label = r["label"] + (" (float64)" if r.get("dtype") == "float64" and
                              "float64" not in r["label"] else "")
        lines.append(f"| {label} | {_stat(r['stats'])} | {_g(r.get('floor'))} | "
                     f"{_f(r.get('to_floor'), '.1f')} | " + " | ".join(cells) + " |")
    return lines


def _reason(text):
    """A skip reason on one line: a failed worker's first line and its error's last."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} … {lines[-1]}"
    return lines[0] if lines else "?"


def _skipped(res):
    if not res.get("skipped"):
        return []
    return ["", "Skipped: " + "; ".join(f"{LABELS.get(k, k)}: {_reason(v)}"
                                       for k, v in res["skipped"].items()) + "."]


def _case_a(res):
    c = res["config"]
    return ([f"float32, batch 1, I={c['I']}, H={c['H']}; {c['T']} steps per repeat, one "
             f"call per step with the state carried (numlstm `Stream.step`; torch "
             f"`nn.LSTMCell` and `nn.LSTM` per step under no_grad; ONNX Runtime one `run` "
             f"per step with h, c fed back). Median (min–max) of {c['repeats']} repeats after "
             f"{c['warmup']} warm-up; floor per step = max(weight bytes / bandwidth, "
             "2·stored weights / GEMM rate). Δ = max |difference| of the "
             f"{c['T']} outputs h_t from the peer's on the same kind's weights "
             "(dequantized for float16 / int8).", ""]
            + _timing_table(res["tables"]["stream"], PEERS["a"]))


def _case_b(res):
    c = res["config"]
    out = [f"float32, I={c['I']}, H={c['H']}, T={c['T']}, one call for the whole sequence "
           "(numlstm `LSTM.forward`, torch `nn.LSTM`, ONNX Runtime `run`; the `LSTMCell` "
           "and NumPy / scipy loops step in Python with the input projection of the NumPy "
           f"loops done as one product). µs per time step; median (min–max) of "
           f"{c['repeats']} repeats after {c['warmup']} warm-up. Floor per step: the "
           "recurrent weights read once, 2·B·stored weights of flops. Δ over all "
           "T·B outputs."]
    for name, table in res["tables"].items():
        out += ["", f"**{name}**", ""] + _timing_table(table, PEERS["b"])
    return out


def _case_c(res):
    c = res["config"]
    return ([f"float32, T={c['T']}, B={c['B']}, I={c['I']}, H={c['H']}: one forward + "
             "backward (numlstm `forward(training=True)` + `backward(dy)`, full tape; torch "
             "`y.backward(dy)`; the float64 NumPy reference). ms per step; median (min–max) "
             f"of {c['repeats']} repeats after {c['warmup']} warm-up ({c['reference_repeats']} "
             "for the reference). Floor: 6 flops per stored weight, step and sequence, and "
             "the tape written and read once. Δy = max |difference| of y; Δg = largest "
             "gradient difference on the stored positions relative to the peer's largest "
             "|gradient|.", ""]
            + _timing_table(res["tables"]["train"], PEERS["c"]))


def _case_d(res):
    c = res["config"]
    labels = {"torch": "torch `nn.LSTM`", "numlstm": "numlstm full tape",
              "numlstm-ckpt": 'numlstm `checkpoint="auto"`'}
    lines = [f"float32, B={c['B']}, I={c['I']}, H={c['H']}, dense weights "
             "(`benchmarks.memory`'s worker): the rise of peak RSS during one forward + "
             "backward in a fresh process, and its time. Memory floor: y (T, B, H) and dx "
             "(T, B, I), which every implementation returns. Time floor as in c. "
             "Ratios: numlstm / torch (< 1: smaller or faster); Δg: relative difference "
             "of the per-parameter sums of |gradient| from torch's.", "",
             "| T | system | peak MiB | / torch | floor MiB | / floor | step s | / torch "
             "| floor s | / floor | Δg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for T, row in res.get("train", {}).items():
        for system, e in row.items():
            lines.append(
                f"| {T} | {labels.get(system, system)} | {e['peak_increase_mib']:.1f} | "
                f"{_f(e.get('memory_to_torch'), '.3f')} | {_g(e.get('memory_floor_mib'))} | "
                f"{_f(e.get('memory_to_floor'), '.1f')} | {_g(e['step_s']['median'])} | "
                f"{_f(e.get('time_to_torch'))} | {_g(e.get('time_floor_s'))} | "
                f"{_f(e.get('time_to_floor'), '.1f')} | "
                f"{_f(e.get('grad_rel_diff_to_torch'), '.1e')} |")
    return lines


def _case_e(res):
    lines = ["Bytes of parameter storage (`LSTM.weight_bytes()`, biases included) and of "
             "the saved file, per storage kind (I={I}, H={H}). Floor: the stored values and "
             "biases alone, without indices; read time: the bytes at the measured "
             "bandwidth.".format(**res["config"]), "",
             "| kind | weight bytes | / torch | file bytes | stored weights | bits per stored "
             "weight | floor bytes | / floor | read at bandwidth µs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = res.get("rows", {}).get(v)
        if r is None:
            continue
        lines.append(f"| {r['label']} | {r['weight_bytes']:,} | {r['to_torch']:.3f} | "
                     f"{r['file_bytes']:,} | {r['stored_weights']:,} | "
                     f"{8 * r['weight_bytes'] / r['stored_weights']:.1f} | "
                     f"{r['values_bytes']:,} | {r['to_floor']:.2f} | "
                     f"{_g(r.get('read_floor_us'))} |")
    lines.append(f"| torch `nn.LSTM` float32 parameters | {res['torch_bytes']:,} | 1.000 | "
                 f"{_f(res.get('onnx_file_bytes'), ',')} (ONNX file) | | 32.0 | | | |")
    return lines


def _case_f(res):
    t = res["tables"]["cold"]
    lines = ["Wall time from starting `python -c ...` to its first output line, printed "
             "right after the first step: imports, loading the saved model (numlstm "
             "`numlstm.load`; torch: weights from an .npz into `nn.LSTMCell`; ONNX Runtime: "
             "a session on torch's export) and one step at batch 1. Warm cache: after a "
             "priming run; empty cache: `NUMBA_CACHE_DIR` set to a fresh folder (every "
             "kernel the step needs is compiled). Inside the child: import, load and first "
             f"step times (medians). Floor: `python -c \"import numpy\"`, "
             f"{res.get('floor_s', 0):.2f} s. Δ: max |difference| of the first output. "
             f"numlstm's kernel cache: {res.get('kernel_cache', 'on')}.", "",
             "| system | s to first output, median (min–max) | import s | load s | first step s "
             "| / floor | vs torch | vs ONNX Runtime |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    comps = {(c["system"], c["column"]): c for c in t.get("comparisons", [])}
    for key, r in t["rows"].items():
        cells = [_cell(comps[(key, p)]) if (key, p) in comps else "–"
                 for p in ("torch-cell", "ort")]
        lines.append(f"| {r['label']} | {_stat(r['stats'])} | {_g(r.get('import_s'))} | "
                     f"{_g(r.get('load_s'))} | {_g(r.get('step_s'))} | "
                     f"{_f(r.get('to_floor'), '.1f')} | " + " | ".join(cells) + " |")
    return lines


def _case_g(res):
    from benchmarks.suite.cases import G_LABELS

    c, pts = res["config"], res.get("points", {})
    sys_h = [s for s in ("numlstm-dense", "numlstm-csr", "numlstm-bsr", "torch-cell",
                         "scipy-csr") if s in pts]
    lines = [f"Streaming step (batch 1, I={c['I']}, one call per step, {c['T']} steps per "
             f"repeat, median of {c['repeats']}), µs per step. As H grows: dense, 90% CSR, "
             f"90% BSR; as sparsity grows at H={c['sparsity_H']}: CSR and BSR pruned by "
             "magnitude (0% = every weight stored in CSR). Floor: weight bytes / bandwidth.",
             "", "**As H grows**", "",
             "| H | " + " | ".join(G_LABELS[s] + (" 90%" if s not in ("numlstm-dense",
                                                                      "torch-cell") else "")
                                  for s in sys_h)
             + " | dense / torch | 90% CSR / torch | 90% BSR / torch | floor dense "
             "| floor 90% CSR |", "|---:|" + "---:|" * (len(sys_h) + 5)]
    comps = res.get("comparisons", [])

    def speed(mine, peer, key):
        for x in comps:
            if (x["system"], x["peer"], x["point"]) == (mine, peer, key):
                return f"{x['speedup']:.2f}×"
        return "–"

    for H in c["H"]:
        cells = []
        for s in sys_h:
            sp = 0.0 if s in ("numlstm-dense", "torch-cell") else 0.9
            p = pts[s].get(f"H={H},s={sp:g}")
            cells.append(_g(p["stats"]["median"]) if p else "–")
        fd = pts.get("numlstm-dense", {}).get(f"H={H},s=0", {}).get("floor")
        fc = pts.get("numlstm-csr", {}).get(f"H={H},s=0.9", {}).get("floor")
        lines.append(f"| {H} | " + " | ".join(cells) + " | "
                     + " | ".join(speed(m, "torch-cell", f"H={H},s={sp}") for m, sp in
                                  (("numlstm-dense", 0), ("numlstm-csr", 0.9),
                                   ("numlstm-bsr", 0.9)))
                     + f" | {_g(fd)} | {_g(fc)} |")
    sys_s = [s for s in ("numlstm-csr", "numlstm-bsr", "scipy-csr", "scipy-bsr") if s in pts]
    Hs = c["sparsity_H"]
    dense = pts.get("numlstm-dense", {}).get(f"H={Hs},s=0")
    torch = pts.get("torch-cell", {}).get(f"H={Hs},s=0")
    lines += ["", f"**As sparsity grows** (H={Hs}; numlstm dense "
              f"{_g(dense['stats']['median']) if dense else '–'} µs, torch `nn.LSTMCell` "
              f"{_g(torch['stats']['median']) if torch else '–'} µs)", "",
              "| sparsity | " + " | ".join(G_LABELS[s] for s in sys_s)
              + " | CSR / dense | BSR / dense | CSR / torch | floor CSR |",
              "|---:|" + "---:|" * (len(sys_s) + 4)]
    for s in c["sparsity"]:
        key = f"H={Hs},s={s:g}"
        cells = [_g(pts[x][key]["stats"]["median"]) if key in pts[x] else "–" for x in sys_s]
        fc = pts.get("numlstm-csr", {}).get(key, {}).get("floor")
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " | "
                     + " | ".join(speed(m, p, key) for m, p in
                                  (("numlstm-csr", "numlstm-dense"),
                                   ("numlstm-bsr", "numlstm-dense"),
                                   ("numlstm-csr", "torch-cell")))
                     + f" | {_g(fc)} |")
    cross = res.get("crossover", {})
    lines += ["", "Speedups are the column system's time over the row system's (> 1: the "
              "numlstm kind is faster). CSR overtakes dense numlstm at "
              f"{_f(cross.get('numlstm-csr'), '.0%', 'no measured')} sparsity, BSR at "
              f"{_f(cross.get('numlstm-bsr'), '.0%', 'no measured')} (H={Hs})."]
    agree = {}
    for x in comps:
        if "max_abs_diff" in x:
            k = (x["system"], x["peer"])
            agree[k] = max(agree.get(k, 0.0), x["max_abs_diff"])
    if agree:
        lines.append("Agreement (max |difference| of all outputs over all points): "
                     + ", ".join(f"{G_LABELS[a]} vs {G_LABELS[b]} {d:.1e}"
                                 for (a, b), d in agree.items()) + ".")
    return lines


RENDER = {"a": _case_a, "b": _case_b, "c": _case_c, "d": _case_d, "e": _case_e,
          "f": _case_f, "g": _case_g}


def markdown(result):
    """The whole report."""
    lines = ["# Benchmark `suite`: numlstm beside its peers"
             + (" (quick smoke run: small sizes, not a measurement)" if result["quick"] else ""),
             "",
             "Every system in its own process on the same weights and inputs; medians "
             "(min–max) over repeats after warm-up. Timings on these shared machines move "
             "between runs, so every numlstm figure is given as a speedup over each peer "
             "measured in the same run (peer median / numlstm median), with the max "
             "|difference| of their outputs (Δ) beside it. Cases run: "
             + ", ".join(result["cases_run"]) + f"; {result.get('seconds', 0):.0f} s in all.",
             ""]
    lines += _targets_md(result) + [""] + _limits_md(result)
    for letter, res in result["cases"].items():
        lines += ["", f"## {letter}. {CASES[letter]}", ""] + RENDER[letter](res) + _skipped(res)
    th = result.get("threads", {"torch": TORCH_THREADS, "onnxruntime": TORCH_THREADS,
                                "blas": "default"})
    lines += [""] + machine_markdown(
        result["machine"],
        f"torch.set_num_threads({th['torch']}), ONNX Runtime {th['onnxruntime']} intra-op "
        f"thread(s), NumPy's BLAS {th['blas']}, numba default"
        + ("; a quick run runs two workers at a time with one thread each" if result["quick"]
           else "; one worker at a time"))
    load = result["machine"].get("load_average_at_start") or [0]
    cores = result["machine"].get("usable_cores") or 1
    if load[0] > cores:
        lines.append(f"- the machine was busy when this run started (1-min load {load[0]:.1f} "
                     f"on {cores} cores): thread pools that spin (torch's OpenMP, OpenBLAS, "
                     "ONNX Runtime) suffer most, so speedups over those peers are inflated")
    return "\n".join(lines) + "\n"


def _limits_md(result):
    lim, nom = result.get("limits"), result["nominal"]
    if not lim:
        return ["## Machine limits", "", "Not measured (the limits worker failed): no floors."]
    g, b = lim["gemm_gflops"], lim["bandwidth_gbs"]
    return ["## Machine limits", "",
            f"Measured at the start of this run: float32 GEMM ({lim['gemm_n']}², NumPy's "
            f"BLAS, its default threads) best {g['best']:.0f} GFLOP/s (median {g['median']:.0f}); "
            f"memory bandwidth (`np.copyto` of {lim['copy_mib']} MiB, bytes read + written) "
            f"best {b['best']:.1f} GB/s (median {b['median']:.1f}). The issue's figures for "
            f"these machines: {nom['gemm_gflops']:g} GFLOP/s and {nom['bandwidth_gbs']:g} GB/s. "
            "Each figure's **floor** is max(bytes it must move / bandwidth, flops / GEMM "
            "rate) at the measured best rates, and **/ floor** is its median over that "
            "floor. It is a DRAM floor: weights small enough to stay in cache between steps "
            "can beat it (/ floor < 1)."]


# ----------------------------------------------------------------------------
# Plots (case g)
# ----------------------------------------------------------------------------

def plots(result):
    """{suffix: draw(result, ax)} for the scaling plots, when case g ran."""
    if "g" not in result["cases"] or not result["cases"]["g"].get("points"):
        return {}
    return {"g_hidden": _draw_h, "g_sparsity": _draw_s}


COLOR = {"numlstm-dense": "C0", "numlstm-csr": "C1", "numlstm-bsr": "C2", "torch-cell": "C3",
         "scipy-csr": "C4", "scipy-bsr": "C5"}


def _draw_h(result, ax):
    from benchmarks.suite.cases import G_LABELS, G_SYSTEMS

    g = result["cases"]["g"]
    for system, pts in g["points"].items():
        sp = G_SYSTEMS[system][0]
        if sp is None:  # not in the H sweep
            continue
        xy = sorted((p["H"], p["stats"]["median"]) for p in pts.values()
                    if p["sparsity"] == sp and p["H"] in g["config"]["H"])
        if xy:
            ax.plot(*zip(*xy, strict=True), marker="o", color=COLOR[system],
                    label=G_LABELS[system] + ("" if sp == 0 else " 90%"))
    for system, style in (("numlstm-dense", "k--"), ("numlstm-csr", "k:")):
        xy = sorted((p["H"], p["floor"]) for p in g["points"].get(system, {}).values()
                    if "floor" in p and p["sparsity"] in (0.0, 0.9)
                    and p["H"] in g["config"]["H"] and (p["sparsity"] == 0.9) == (
                        system == "numlstm-csr"))
        if xy:
            ax.plot(*zip(*xy, strict=True), style,
                    label=f"floor {'dense' if system == 'numlstm-dense' else '90% CSR'}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("H (hidden size)")
    ax.set_ylabel("µs per step (median)")
    ax.set_title(f"streaming step, batch 1, I={g['config']['I']}, float32")


def _draw_s(result, ax):
    from benchmarks.suite.cases import G_LABELS

    g = result["cases"]["g"]
    Hs = g["config"]["sparsity_H"]
    for system, pts in g["points"].items():
        xy = sorted((p["sparsity"] * 100, p["stats"]["median"]) for p in pts.values()
                    if p["H"] == Hs)
        if not xy:
            continue
        if len(xy) == 1:
            ax.axhline(xy[0][1], linestyle="--", color=COLOR[system], label=G_LABELS[system])
        else:
            ax.plot(*zip(*xy, strict=True), marker="o", color=COLOR[system],
                    label=G_LABELS[system])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity, %")
    ax.set_ylabel("µs per step (median)")
    ax.set_title(f"streaming step, batch 1, I={g['config']['I']}, H={Hs}, float32")

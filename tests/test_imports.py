"""The package's import graph: no cycle, and every module imports on its own.

docs/design.md, "1. Layers and imports": each layer imports only the layers
below it. A cycle broken only by a lazy import (an import inside a function)
still counts here: the static check reads every import statement, at module
level or not.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numlstm

ROOT = Path(numlstm.__file__).parent


def _modules():
    """module name -> path, for every .py file of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("numlstm",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name, path, modules):
    """The numlstm modules that ``name`` imports, anywhere in its source. An
    import of a package's own ancestor (which Python does implicitly anyway)
    is not an edge."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from pkg import mod`` imports pkg.mod when that is a module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # ``import numlstm.kernels.cpu as x`` etc.
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack, cycles = {}, [], []

    def visit(node):  # depth-first; a grey node met again closes a cycle
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "black"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imports (in one new interpreter, in sorted order) without
    needing another to be imported first; modules whose optional third-party
    dependency is missing are reported as skipped, not failed."""
    names = [n for n in sorted(_modules()) if n != "numlstm.__main__"]  # runs the CLI
    code = f"""
import importlib, json, sys
out = {{}}
for name in {names!r}:
    try:
        importlib.import_module(name)
        out[name] = "ok"
    except ModuleNotFoundError as e:
        out[name] = "missing " + str(e.name) if not str(e.name).startswith("numlstm") else repr(e)
    except Exception as e:
        out[name] = repr(e)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=ROOT.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in result.items() if v != "ok" and not v.startswith("missing ")}
    assert not bad, bad
    assert result["numlstm.lstm"] == result["numlstm.engine"] == "ok"

"""The import graph is one-directional (docs/ARCHITECTURE.md): no cycles at all, and every
import goes down the layers

    kernels  <-  contrast, ops, metrics, augment  <-  models, data  <-  checkpoint, submission
             <-  train, evaluate, export, prepare    (evaluate/export/prepare never import train)

plus leaves that import nothing from the package (``_cuda_toolkit``, ``reporting``, ``device``,
``dispatch``), usable from every layer. The graph is read from the source: every ``import`` statement, also those
inside functions (they still form cycles even when they happen to work), and
``importlib.import_module("<constant>")`` (how ``contrast`` reaches the Triton kernels). An
edge A -> B when module A imports module B by name; ``from package import submodule`` is an
edge to the submodule only (the package is already being imported at that point). The
top-level ``kernels/`` folder is ``sepico_fast.kernels``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sepico_fast"

# Layer of each module, by the longest matching name prefix (lower = imported by higher).
LAYERS = {
    "sepico_fast._cuda_toolkit": 0, "sepico_fast.reporting": 0, "sepico_fast.kernels": 0,
    "sepico_fast.device": 0, "sepico_fast.dispatch": 0,
    "sepico_fast.contrast": 1, "sepico_fast.ops": 1, "sepico_fast.metrics": 1, "sepico_fast.augment": 1,
    "sepico_fast.models": 2, "sepico_fast.data": 2,
    "sepico_fast.checkpoint": 3, "sepico_fast.submission": 3,
    "sepico_fast.train": 4, "sepico_fast.evaluate": 4, "sepico_fast.export": 4, "sepico_fast.prepare": 4,
    "sepico_fast": 0,  # the package itself imports nothing eagerly (sepico_fast.kernels is a lazy finder)
}
LEAVES = ("sepico_fast._cuda_toolkit", "sepico_fast.reporting", "sepico_fast.device", "sepico_fast.dispatch")


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((PKG, ["sepico_fast"]), (ROOT / "kernels", ["sepico_fast", "kernels"])):
        for path in base.rglob("*.py"):
            parts = prefix + list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            if subs:
                edges.update(subs)
            if len(subs) < len(node.names) and target in modules:
                edges.add(target)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in modules):
            edges.add(node.args[0].value)
    edges.discard(name)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{name} has no layer: add it to LAYERS (and docs/ARCHITECTURE.md)"
    return LAYERS[best]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert "sepico_fast.data.preparation" in graph["sepico_fast.data.synthetic"]  # the graph sees lazy imports
    assert "sepico_fast.kernels" in graph["sepico_fast.contrast.validation"]     # ... and import_module
    assert "sepico_fast.kernels._common" in graph["sepico_fast.kernels.moments"]
    assert _cycles(graph) == []


def test_imports_go_down_the_layers():
    graph = _graph()
    up = [f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})"
          for a, targets in sorted(graph.items()) for b in sorted(targets) if _layer(b) > _layer(a)]
    assert up == []
    leaves = {leaf: sorted(graph[leaf]) for leaf in LEAVES}
    assert leaves == {leaf: [] for leaf in LEAVES}
    # the command lines next to train are not built on it (train may use evaluate)
    clis = ("sepico_fast.evaluate", "sepico_fast.export", "sepico_fast.prepare")
    into_train = [(a, b) for a in clis for b in graph[a] if b.startswith("sepico_fast.train")]
    assert into_train == []


def test_cycle_finder_and_layers_catch_violations():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("sepico_fast.data.loader") == 2 and _layer("sepico_fast.train.runner") == 4
    assert _layer("sepico_fast.kernels.moments") == 0 and _layer("sepico_fast.contrast") == 1

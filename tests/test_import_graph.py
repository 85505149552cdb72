"""No import cycles through the data modules or the prepare command (issue 14).

The graph is read from the source (every ``import`` statement, also those inside
functions, which still form cycles even when they happen to work): an edge A -> B when
module A imports module B by name; ``from package import submodule`` is an edge to the
submodule only (the package is already being imported at that point).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sepico_fast"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
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
    edges.discard(name)
    return edges


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


def test_no_import_cycle_through_data_or_prepare():
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    assert "sepico_fast.data.preparation" in graph["sepico_fast.data.synthetic"]  # the graph sees lazy imports
    bad = [c for c in _cycles(graph)
           if any(m.startswith("sepico_fast.data") or m == "sepico_fast.prepare" for m in c)]
    assert bad == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_does_not_import_train_or_the_cli():
    """Import direction: data <- train; the prepare CLI is a thin layer over data."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("sepico_fast.data"):
            edges = _edges(name, path, modules)
            assert not any(e.startswith(("sepico_fast.train", "sepico_fast.prepare")) for e in edges), (name, edges)

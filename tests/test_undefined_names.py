"""No Python file of the project reads a global name that nothing defines.

Much of bench/ and scripts/ only runs on a GPU or in long runs, so CI never executes it: a
NameError there (``_skip_reason`` of bench/test_bench_kernels.py once read ``bench``, a
parameter of its caller) would first show on the GPU machine. This is a static check of
every file with the compiler's own symbol tables: each name a function, class body or the
module reads as a global must be bound at module level (assignment, def, class, import,
also inside ``if`` / ``try``), declared ``global`` and assigned somewhere, or be a builtin.
"""
import builtins
import symtable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bench", "scripts", "sepico_fast", "kernels", "tests")
MODULE_NAMES = {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__",
                "__builtins__", "__path__", "__annotations__", "__dict__"}


def undefined_globals(source: str, filename: str) -> list[str]:
    """``"scope: name"`` for every global read that nothing in the module binds."""
    top = symtable.symtable(source, filename, "exec")
    if any(s.get_name() == "*" for s in top.get_symbols()):
        return []  # a star import could bind anything
    tables, todo = [], [top]
    while todo:
        table = todo.pop()
        tables.append(table)
        todo.extend(table.get_children())
    bound = set(dir(builtins)) | MODULE_NAMES
    for table in tables:
        for sym in table.get_symbols():
            if (table is top or sym.is_declared_global()) and (sym.is_assigned() or sym.is_imported()
                                                               or sym.is_namespace()):
                bound.add(sym.get_name())
    return sorted(f"{table.get_type()} {table.get_name()}: {sym.get_name()}"
                  for table in tables for sym in table.get_symbols()
                  if sym.is_referenced() and (table is top or sym.is_global()) and sym.get_name() not in bound)


def test_the_check_finds_what_it_should():
    source = '''
import os
from typing import Any
try:
    import numpy as np
except ImportError:
    np = None
LIMIT = 3

def caller(bench, n):
    return helper(n) + len(bench)

def helper(n):
    if n > LIMIT and bench == "x":          # the bug: bench is caller's parameter
        return os.sep
    return [missing_in_comprehension for _ in range(n)]

class Thing:
    size = LIMIT + undefined_in_class_body
    def method(self):
        global COUNTER
        COUNTER = 1
        return lambda: np, print, undefined_in_lambda

def reader():
    return COUNTER, Any
'''
    found = undefined_globals(source, "<snippet>")
    assert "function helper: bench" in found and "class Thing: undefined_in_class_body" in found
    # the comprehension's scope is named differently across Python versions
    assert sorted(entry.split(": ")[1] for entry in found) == [
        "bench", "missing_in_comprehension", "undefined_in_class_body", "undefined_in_lambda"], found


FILES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")) + [ROOT / "setup.py"]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_undefined_global_names(path):
    assert undefined_globals(path.read_text(), str(path)) == []

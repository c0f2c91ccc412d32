"""No import cycle anywhere in ``fractalgen``, counting every edge import-linter's ``acyclic_siblings``
contract does not see: a package's ``__init__`` and its own sub-modules, and imports inside functions.

The graph is grimp's (the library under import-linter; ``make lint`` runs the layer contracts of
``pyproject.toml``). The check is shown to fail on a small package with a deliberate cycle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest


def import_cycles(package: str) -> list[list[str]]:
    """The strongly connected components of more than one module in ``package``'s import graph."""
    graph = grimp.build_graph(package, cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm (the graph has well under 100 modules)
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_fractalgen_has_no_import_cycle() -> None:
    assert import_cycles("fractalgen") == []


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pkg/__init__`` imports ``pkg.child``, which imports a name from ``pkg`` inside a function:
    the kind of cycle ``acyclic_siblings`` does not report."""
    package = tmp_path / "cyclepkg"
    package.mkdir()
    (package / "__init__.py").write_text("from cyclepkg.child import helper\nVALUE = 1\n")
    (package / "child.py").write_text("def helper():\n    from cyclepkg import VALUE\n    return VALUE\n")
    (package / "leaf.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_cycles("cyclepkg") == [["cyclepkg", "cyclepkg.child"]]
    finally:
        sys.modules.pop("cyclepkg", None)

"""No import cycle anywhere in ``fractalgen``, counting every edge import-linter's ``acyclic_siblings``
contract does not see: a package's ``__init__`` and its own sub-modules, and imports inside functions.

The graph is grimp's (the library under import-linter; ``make lint`` runs the layer contracts of
``pyproject.toml``). The check is shown to fail on a small package with a deliberate cycle.
"""

from __future__ import annotations

import ast
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


# ------------------------------------------------------------------ function-local imports
HEAVY = {"ray", "deepspeed", "mlflow", "torch", "torchvision", "numpy", "pandas", "pyarrow", "boto3", "botocore",
         "streaming", "matplotlib", "PIL", "scipy", "skimage", "optuna", "psutil", "tqdm", "yaml", "torch_fidelity"}  # fmt: skip
MARK = "# deferred: heavy import"


def _modules(package: Path) -> dict[str, Path]:
    return {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in package.rglob("*.py")}  # fmt: skip


def _imported(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> list[str]:
    """The modules (and their parent packages) an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".")[: None if modules[module].name == "__init__.py" else -1]
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return [".".join(n.split(".")[: i + 1]) for n in names for i in range(n.count(".") + 1)]


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.Try) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test)
        ):
            out += [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    return out


def local_import_problems(package: Path) -> list[str]:
    """Imports inside functions that load nothing heavy, or that lack MARK. A module is heavy when
    importing it loads one of HEAVY (directly, or through fractalgen modules imported at module level)."""
    modules = _modules(package)
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    edges = {
        m: {t for n in _module_level_imports(tree) for t in _imported(n, m, modules)}
        for m, tree in trees.items()
    }
    heavy = {m for m, targets in edges.items() if any(t.split(".")[0] in HEAVY for t in targets)}
    while more := {m for m, targets in edges.items() if m not in heavy and targets & heavy}:
        heavy |= more
    problems = []
    for module, tree in sorted(trees.items()):
        lines = modules[module].read_text().splitlines()
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            guarded = {id(n) for t in ast.walk(fn) if isinstance(t, ast.Try) for n in ast.walk(t)}
            for node in (n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)):
                if id(node) in guarded:  # optional or platform-specific: try/except ImportError
                    continue
                loads = _imported(node, module, modules)
                where = f"{module}:{node.lineno}: {ast.unparse(node)}"
                if not any(t.split(".")[0] in HEAVY or t in heavy for t in loads):
                    problems.append(f"{where} is light: import it at module level")
                elif not any(MARK in line for line in lines[node.lineno - 1 : node.end_lineno]):
                    problems.append(f"{where} lacks '{MARK}'")
    return problems


def test_function_local_imports_only_defer_heavy_modules_and_say_so() -> None:
    """Imports inside functions exist only to keep ``fractalgen --help`` fast (heavy ones, marked)."""
    assert local_import_problems(Path(__file__).resolve().parents[1] / "fractalgen") == []


def test_the_local_import_check_reports_light_and_unmarked_imports(tmp_path: Path) -> None:
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "heavy.py").write_text("import torch\n")
    (package / "light.py").write_text("import json\n")
    (package / "user.py").write_text(
        "def a():\n    from fakepkg import light\n\n"
        "def b():\n    from fakepkg import heavy\n\n"
        f"def c():\n    import mlflow  {MARK}\n"
    )
    assert local_import_problems(package) == [
        "fakepkg.user:2: from fakepkg import light is light: import it at module level",
        f"fakepkg.user:5: from fakepkg import heavy lacks '{MARK}'",
    ]

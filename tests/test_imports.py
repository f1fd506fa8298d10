"""The import graph of ``mtl_lightning`` and ``datamodules``: no cycle, and one direction between the two packages.

Every module file is parsed with ``ast`` (nothing is imported) and every
``import`` / ``from ... import`` statement in it -- at module level or inside a
function, since a lazy import is still a dependency -- becomes an edge to the
module it names. ``from package import name`` is an edge to ``package.name``
when that is a module file, else to ``package``; importing ``a.b.c`` also
initialises the packages ``a`` and ``a.b`` (those the importer is not itself
inside), so they are edges too. ``importlib.import_module`` calls with computed
names (the registries' ``import_submodules``) are not seen.

Rules:
* no cycle between modules;
* ``datamodules`` may import ``mtl_lightning`` (features, tasks, the batch),
  never the other way round. The one exception is a module-level
  ``__getattr__`` (PEP 562) that re-exports a name which used to live in
  ``mtl_lightning`` for backwards compatibility: it runs only when that old
  name is asked for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "mtl_lightning").is_dir() and ROOT != ROOT.parent:  # tests/<area>/ or tests/
    ROOT = ROOT.parent
PACKAGES = ("mtl_lightning", "datamodules")


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the two packages (a package is its ``__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _in_backwards_compatible_getattr(stack: list[ast.AST]) -> bool:
    """Whether the statement sits in a module-level ``def __getattr__`` (a PEP 562 re-export)."""
    return len(stack) >= 2 and isinstance(stack[1], ast.FunctionDef) and stack[1].name == "__getattr__" \
        and isinstance(stack[0], ast.Module)


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a module __getattr__)`` for every import statement of module ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(sub if sub in modules else base)
        return out

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return  # annotations only: nothing is imported when the program runs
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lazy = _in_backwards_compatible_getattr(stack)
            for target in targets(node):
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):  # the packages initialised on the way, then the module
                    candidate = ".".join(parts[:depth])
                    if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                        found.append((candidate, node.lineno, lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, [*stack, node])

    visit(tree, [])
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int, bool]]]:
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    edges = []
    for name, path in files.items():
        for target, line, lazy in imports_of(name, path, modules):
            graph[name].add(target)
            edges.append((name, target, line, lazy))
    return graph, edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_sees_the_imports():
    """The parser finds the edges it must: a relative import, a package's own submodules, an absolute import."""
    graph, _ = import_graph()
    assert "mtl_lightning.features" in graph["mtl_lightning"]  # from .features import ... in __init__
    assert "mtl_lightning.features" in graph["datamodules.parquet"]  # from mtl_lightning.features import ...
    assert "mtl_lightning" in graph["datamodules.parquet"]  # ... which initialises the package first
    assert "datamodules.paths" in graph["datamodules.files"]  # from .paths import ...


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph, edges = import_graph()
    found = cycles(graph)
    if found:
        lines = sorted({f"{a} -> {b} (line {line})" for a, b, line, _ in edges
                        if any(a in cycle and b in cycle for cycle in found)})
        pytest.fail(f"import cycles between modules: {found}; the imports that close them:\n" + "\n".join(lines))


def test_mtl_lightning_never_imports_datamodules():
    _, edges = import_graph()
    wrong = sorted({f"{a} imports {b} (line {line})" for a, b, line, lazy in edges
                    if a.split(".")[0] == "mtl_lightning" and b.split(".")[0] == "datamodules" and not lazy})
    assert not wrong, "mtl_lightning must not import datamodules (datamodules imports mtl_lightning):\n" + "\n".join(wrong)


def test_no_library_file_over_500_lines():
    """Each library file does one job, small enough to read in one sitting (issue 28): split a file that grows past
    500 lines by job, keeping its public names importable."""
    long = {name: n for name, path in module_files().items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"library files over 500 lines: {long}"

"""The package's layout: its import graph has no cycle, no module is over 600 lines, and the
README's Layout table names every module and, for each, the test files that check it (every
test file named, every name a file).

Every ``import`` of a module of ``tierstore/`` by another counts, at module level or inside a
function (a function-level import only hides a cycle until the function runs); imports under
``if TYPE_CHECKING:`` never run and do not count. An edge goes to the module an import names:
``from . import cpu`` to ``tierstore.cpu``, ``from .cache import EMPTY`` to ``tierstore.cache``,
``from .replay import REFERENCE`` to ``tierstore.replay`` (its ``__init__``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tierstore"
TESTS = Path(__file__).resolve().parent


def _modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name of every module of ``package`` -> (its file, whether it is a package)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under an ``if TYPE_CHECKING:`` (imports there never run)."""
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return hidden


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """For each module of ``package``, the modules of the package it imports, each with the
    line of its first such import."""
    modules = _modules(package)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        hidden = _type_checking_nodes(tree)
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:  # `from . import cpu` names a module
                    sub = f"{module}.{alias.name}"
                    targets.append(sub if sub in modules else module)
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative), each sorted; every import cycle lies within one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    members = set(cycle)
    edges = [
        f"  {a} imports {b} (line {line})"
        for a in cycle
        for b, line in sorted(graph[a].items())
        if b in members
    ]
    return " <-> ".join(cycle) + "\n" + "\n".join(edges)


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40  # the whole package was read
    assert "tierstore.cache" in graph["tierstore.cuda_cache"]  # and its imports were seen
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in tierstore/:\n" + "\n".join(
        _describe(graph, c) for c in cycles
    )


def test_the_check_finds_cycles_through_function_level_imports(tmp_path):
    """A synthetic package: a cycle closed by an import inside a function, one through a
    package's ``__init__``, and a ``TYPE_CHECKING`` import that must not count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n\ndef f():\n    return b\n",
        "b.py": "def g():\n    from .a import f\n    return f\n",
        "c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .d import x\n",
        "d.py": "from .c import TYPE_CHECKING as x\n",
        "sub/__init__.py": "from .e import y\n",
        "sub/e.py": "def y():\n    from pkg.sub import y\n    return y\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a": 2}
    assert "pkg.d" not in graph["pkg.c"]  # under TYPE_CHECKING
    assert sorted(find_cycles(graph)) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.e"]]


MAX_MODULE_LINES = 600  # issue 26: a module a reader takes in at one sitting


def test_no_module_of_the_package_is_over_600_lines():
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 40 and max(sizes.values()) > 100  # the files were read
    over = {name: n for name, n in sorted(sizes.items()) if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def layout_table(readme: str) -> list[tuple[str, str, str]]:
    """The README's Layout table: (path, what, tested in) of each row."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip() for cell in row.strip().strip("|").split(" | ")) for row in rows]


def named(cell: str) -> set[str]:
    """The names in backticks of a table cell."""
    return set(re.findall(r"`([^`]+)`", cell))


def test_the_readme_layout_names_every_module_and_its_tests():
    rows = layout_table((PACKAGE.parent / "README.md").read_text())
    assert len(rows) > 25 and all(len(row) == 3 for row in rows), "a row without three cells"
    names = set().union(*(named(path) | named(what) for path, what, _ in rows))
    folders = {n for n in names if n.endswith("/")}
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()  # tierstore/replay/cli.py
        if path.stem.startswith("__") or rel in names or path.name in names:
            continue
        if not any(rel.startswith(folder) for folder in folders):
            unnamed.append(rel)
    assert not unnamed, f"modules the README's Layout table does not name: {unnamed}"
    tests = set().union(*(named(cell) for _, _, cell in rows))
    files = {path.name for path in TESTS.glob("test_*.py")}
    assert len(files) > 40
    assert not tests - files, f"Layout names test files that do not exist: {tests - files}"
    assert not files - tests, f"test files the Layout table does not name: {files - tests}"

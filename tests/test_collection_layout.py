"""The collection's modules: public names where users import them, and no import cycle through
any of them (imports inside functions included), found by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import tierstore as ts
import tierstore.collection as collection
from tierstore import table_groups

PACKAGE = Path(ts.__file__).resolve().parent
OURS = {
    "tierstore.collection",
    "tierstore.collection_batch",
    "tierstore.collection_dir",
    "tierstore.collection_stats",
    "tierstore.keyed",
    "tierstore.pipeline",
    "tierstore.table_config",
    "tierstore.table_groups",
    "tierstore.table_views",
}


def import_graph() -> dict[str, set[str]]:
    """Module name to the package modules it imports, anywhere in its body."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{mod}.{alias.name}"
                    deps.add(full if full in files else mod)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_no_import_cycle_through_the_collection_modules():
    graph = import_graph()
    assert OURS <= set(graph)
    cycles = [(m, d) for m in sorted(OURS) for d in sorted(graph[m]) if reaches(graph, d, m)]
    assert not cycles, f"imports that lead back to the importer: {cycles}"


def test_public_names_import_from_the_collection_and_the_package():
    for name in ("TieredEmbeddingBagCollection", "TableConfig", "CollectionStats"):
        assert getattr(collection, name) is getattr(ts, name)
    assert collection.split_rows is table_groups.split_rows
    assert collection.TAG_SHIFT == 47 and collection.MANIFEST == "collection.json"
    assert collection.MAX_TAGGED_TABLES == 1 << 16

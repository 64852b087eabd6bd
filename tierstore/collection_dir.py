"""A collection's directory: ``collection.json`` (its manifest: the tables, their optimizers
and their grouping) beside one LMDB environment per group, named after the group.

A directory is created with its manifest written atomically (a temporary file renamed), and
reopened only by a collection of the same tables, grouped alike; anything else is refused
with the table named, before any environment opens.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from .errors import NotATableError, StorageError, TableMismatchError
from .optim import Optimizer, optimizer_from_dict
from .table_config import TableConfig
from .table_groups import TableGroup

MANIFEST = "collection.json"


def manifest(tables: list[TableConfig], groups: list[TableGroup]) -> dict:
    """What the directory records of a collection: its groups and every table (with the
    optimizer of its group)."""
    optimizer_of: dict[str, Optimizer | None] = {
        t.name: g.optimizer for g in groups for t in g.tables
    }
    return {
        "format": "tierstore-collection",
        "version": 1,
        "groups": {g.name: [t.name for t in g.tables] for g in groups},
        "tables": [t.manifest(optimizer_of[t.name]) for t in tables],
    }


def tables_of(have: dict) -> list[TableConfig]:
    """The :class:`TableConfig` list (each with its stored optimizer) of a manifest."""
    tables = []
    for t in have["tables"]:
        tables.append(TableConfig(
            name=t["name"], embedding_dim=t["embedding_dim"],
            num_embeddings=t["num_embeddings"], feature_names=tuple(t["feature_names"]),
            pooling=t["pooling"], seed=t["seed"], init_scale=t["init_scale"],
            optimizer=optimizer_from_dict(t["optimizer"]),
        ))  # fmt: skip
    return tables


def remove_created(root: pathlib.Path, existed: bool) -> None:
    """Empties a directory that a failed construction created (and removes it if it did not
    exist before): a collection not finished leaves no trace."""
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    if not existed:
        root.rmdir()


def open_directory(root: pathlib.Path, want: dict) -> bool:
    """Checks that ``root`` holds the collection whose manifest is ``want``: False; or creates
    it (writes its manifest, atomically): True."""
    mfile = root / MANIFEST
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not mfile.is_file():
            kind = "a single table" if (root / "data.mdb").exists() else "no collection"
            raise NotATableError(f"{root}: holds {kind} (no {MANIFEST})")
        have = read_manifest(root)
        compare_manifest(root, have, want)
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
        os.replace(tmp, mfile)
    except OSError as exc:
        raise StorageError(f"{root}: cannot create the collection ({exc})") from exc
    return True


def read_manifest(root: str | os.PathLike) -> dict:
    """The ``collection.json`` of the collection at ``root``."""
    mfile = pathlib.Path(root) / MANIFEST
    try:
        have = json.loads(mfile.read_text())
    except FileNotFoundError as exc:
        raise NotATableError(f"{root}: not a tierstore collection (no {MANIFEST})") from exc
    except (OSError, ValueError) as exc:
        raise StorageError(f"{mfile}: unreadable ({exc})") from exc
    if not isinstance(have, dict) or have.get("format") != "tierstore-collection":
        raise NotATableError(f"{mfile}: not a tierstore collection manifest")
    return have


def compare_manifest(root: pathlib.Path, have: dict, want: dict) -> None:
    """Raises :class:`TableMismatchError` naming the table unless the stored manifest
    ``have`` describes the configured ``want`` (shapes, seeds, optimizers, grouping)."""
    stored = {t["name"]: t for t in have.get("tables", [])}
    wanted = {t["name"]: t for t in want["tables"]}
    keys = ("embedding_dim", "num_embeddings", "seed", "init_scale")
    for name, t in wanted.items():
        if name not in stored:
            raise TableMismatchError(
                f"{root}: holds other tables ({sorted(stored)}); table {name!r} is not one"
            )
        s = stored[name]
        wrong = [f"{k}={s.get(k)!r} (expected {t[k]!r})" for k in keys if s.get(k) != t[k]]
        if (s.get("optimizer") or {}).get("name") != (t["optimizer"] or {}).get("name"):
            wrong.append(f"optimizer {(s.get('optimizer') or {}).get('name')!r}")
        if wrong:
            raise TableMismatchError(f"{root}: table {name!r} was made with {', '.join(wrong)}")
    extra = sorted(set(stored) - set(wanted))
    if extra or have.get("groups") != want["groups"]:
        raise TableMismatchError(
            f"{root}: holds other tables or groups (stored {have.get('groups')}, configured "
            f"{want['groups']}): tables {extra} are not configured"
            if extra
            else f"{root}: its tables are grouped as {have.get('groups')}, not as "
            f"{want['groups']} (the same tables, in the same order, with the same optimizers)"
        )

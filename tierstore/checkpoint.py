"""Checkpoints of a ``TieredEmbeddingBag``: every row and its optimizer state, through any tiers.

The table has no ``nn.Parameter``: its rows live in the tiers. The module's
``_save_to_state_dict`` / ``_load_from_state_dict`` call :func:`save_table` / :func:`load_table`
so that ``model.state_dict()``, ``torch.save``, ``model.load_state_dict`` and
``torch.distributed.checkpoint`` see the table as tensors (a ``TieredEmbeddingBagCollection``
does the same per table, under ``tables.<name>.``, through a view of each table). Shapes:
``R`` rows in the checkpoint, ``D`` embedding dim, ``S`` optimizer-state floats per row (0 for SGD or no optimizer, 1 for
row-wise AdaGrad, ``D`` for AdaGrad). Keys, under the module's prefix:

==================  =================  ==========================================================
``weight``          (R, D) float32     the weights
``optimizer_state`` (R, S) float32     the fused optimizer's per-row state (absent when S == 0);
                                       FBGEMM calls row-wise AdaGrad's ``momentum1``
``ids``             (R,) int64         sparse form only: each row's id, ascending
``_extra_state``    dict               what the rows are: form, shape, optimizer, seed, init_scale
==================  =================  ==========================================================

Forms:

- *dense* (a table with ``num_embeddings``): row ``i`` of ``weight`` is row id ``i``,
  ``R = num_embeddings``. For a table kept wholly in host memory (no SSD tier) the tensors are
  views of L2 after L1's dirty rows are written back to it, with no copy (as ``nn.Module``'s
  state tensors share memory with its parameters: copy them to keep a snapshot while training
  goes on); with an SSD tier they are new tensors filled a chunk at a time.
- *sparse* (``num_embeddings=None``: any int64 id; or an SSD table inside
  ``with sparse_state_dict():``): only rows ever written (flushed or staged on SSD, or dirty in
  L2 or L1); every other row is the initial value of ``(seed, id)``, so loading one requires a
  table of the same ``seed`` and ``init_scale``. A dense SSD state computes every never-written
  row; the sparse one costs only the rows written.
- *incremental* (:func:`incremental_state_dict`, an SSD tier only): the sparse form of the rows
  changed since the last :func:`mark_checkpoint` or incremental checkpoint; loading it changes
  only those rows.

Loading accepts any form into any table of the same ``embedding_dim`` and optimizer kind (its
hyper-parameters may differ), whatever its cache sizes, policies, device or tiers, and continues
training bit for bit. Every check runs before the first row changes: a shape or optimizer
mismatch raises :class:`~tierstore.errors.TableMismatchError` with the table as it was. A load
writes rows as training does (into the caches, staged on SSD): ``flush()`` makes them durable.

Memory: reading and writing go a chunk of at most ``_CHUNK_BYTES`` (32 MiB) of rows at a time
(plus the tiers' few chunk-sized temporaries). A dense in-memory table's state costs no copy.
A table with an SSD tier makes new tensors of ``R x (D + S) x 4`` bytes (and 8 bytes per row
for ``ids``): inside ``with spill_state_dict(directory):`` they are backed by files there
(memory-mapped, pages the kernel may drop), so a table larger than host memory can be saved;
the sparse form's id listing still takes about 16 bytes per written row of memory while it is
built. Loading reads the given tensors a chunk at a time, so ``torch.load(f, mmap=True)``
loads a checkpoint larger than host memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import tempfile
import threading
from collections.abc import Iterator

import torch
from torch import nn

from .cache import EMPTY, by_slot
from .errors import InvalidInputError, NotPicklableError, TableMismatchError
from .store import TieredStore

FORMAT = "tierstore.rows/1"
KEYS = ("weight", "optimizer_state", "ids", "_extra_state")
_CHUNK_BYTES = 32 << 20  # rows moved per step: bounds the temporaries of a save or load

_spill = threading.local()


# ---------------------------------------------------------------------------- saving


def save_table(emb, destination: dict, prefix: str) -> None:
    """Adds ``emb``'s rows to ``destination`` under ``prefix`` (``nn.Module._save_to_state_dict``)."""
    store, dim = emb.store, emb.embedding_dim
    sparse = store.inclusive_host and getattr(_spill, "sparse", False)
    if emb.num_embeddings is None or sparse:
        ids = stored_ids(store)
        weight, state = _read_rows(store, ids, ids.numel())
        destination[prefix + "ids"] = _spilled(ids)
        form = "sparse"
    elif not store.inclusive_host:  # the whole table in L2: views of it, after L1's writeback
        store.flush()
        if store.device.type == "cuda":  # kernels may still be updating L2 rows in place
            torch.cuda.synchronize(store.device)
        data = store.host.data
        weight, state = data[:, :dim], data[:, dim:]
        form = "dense"
    else:
        weight, state = _read_rows(store, None, emb.num_embeddings, stored_ids(store))
        form = "dense"
    destination[prefix + "weight"] = weight
    if store.layout.state_width:
        destination[prefix + "optimizer_state"] = state
    destination[prefix + "_extra_state"] = _meta(emb, form, incremental=False)


def incremental_state_dict(module: nn.Module, prefix: str = "") -> dict:
    """Rows changed since the last :func:`mark_checkpoint` (or incremental checkpoint) of every
    ``TieredEmbeddingBag`` in ``module`` (the module itself or any of its children), keyed as
    ``module.state_dict()`` keys them (sparse form), ready for ``torch.save``.

    Cheap: a table lists the rows its dirty bits and its flushes since the mark know of, reads
    only those, then flushes (so its SSD copy is durable at the same point) and starts the next
    increment. Load a chain with ``model.load_state_dict(full)`` then
    ``model.load_state_dict(increment, strict=False)`` for each increment in order.
    Every table needs an SSD tier and a :func:`mark_checkpoint` before its first increment.
    """
    out: dict = {}
    for name, emb in _tables(module):
        store = emb.store
        log = _change_log(emb)
        ids = torch.unique(torch.cat([log, changed_ids(store)]))
        weight, state = _read_rows(store, ids, ids.numel())
        p = prefix + name
        out[p + "ids"], out[p + "weight"] = _spilled(ids), weight
        if store.layout.state_width:
            out[p + "optimizer_state"] = state
        out[p + "_extra_state"] = _meta(emb, "sparse", incremental=True)
    for _, emb in _tables(module):  # only once every table's rows are read
        _restart_log(emb)
    return out


def mark_checkpoint(module: nn.Module) -> None:
    """Marks now as the base of the next incremental checkpoint of every table in ``module``
    (call it right after saving a full ``state_dict``): each table flushes and starts
    recording which rows its flushes write (8 bytes of memory per changed row)."""
    for _, emb in _tables(module):
        if not emb.store.inclusive_host:
            raise InvalidInputError(
                "incremental checkpoints need an SSD tier (ssd=ts.SSDConfig(path), a collection's "
                "path=): a table in host memory "
                "keeps no record of changed rows; save its state_dict instead"
            )
    for _, emb in _tables(module):
        _restart_log(emb)


@contextlib.contextmanager
def spill_state_dict(directory: str | os.PathLike) -> Iterator[None]:
    """Inside this block (in this thread), the state tensors that tables with an SSD tier make
    are backed by files in ``directory`` (memory-mapped, the files unlinked at once: the space
    is freed with the tensors), so that saving a table larger than host memory keeps resident
    memory bounded. A table in host memory gives views of its rows either way."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    previous = getattr(_spill, "directory", None)
    _spill.directory = path
    try:
        yield
    finally:
        _spill.directory = previous


@contextlib.contextmanager
def sparse_state_dict() -> Iterator[None]:
    """Inside this block (in this thread), tables with an SSD tier save the sparse form even
    when they have ``num_embeddings``: only their written rows, so that the cost follows the
    rows trained, not the table's size (the dense form computes every never-written row)."""
    previous = getattr(_spill, "sparse", False)
    _spill.sparse = True
    try:
        yield
    finally:
        _spill.sparse = previous


def dcp_load(module: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load`` of ``module`` from ``checkpoint_id`` (a directory
    written by ``dcp.save(module.state_dict(), ...)``), then ``module.load_state_dict``.

    A plain ``dcp.load`` loads into tensors of the shapes the module has now; a sparse or
    incremental table's row count is the checkpoint's, so this reads the saved shapes first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint_id)
    saved = reader.read_metadata().state_dict_metadata
    state = module.state_dict()
    for key, md in saved.items():
        if key in state and isinstance(md, TensorStorageMetadata):
            if tuple(state[key].shape) != tuple(md.size):
                state[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp.load(state, storage_reader=reader)
    module.load_state_dict(state)


def not_picklable(emb) -> NotPicklableError:
    """The error for pickling or deep-copying a table."""
    return NotPicklableError(
        f"{type(emb).__name__} cannot be pickled or deep-copied (its rows live in the tiers, "
        "with open files and device caches): checkpoint it with torch.save(model.state_dict()) "
        "and load_state_dict into a new model"
    )


# ---------------------------------------------------------------------------- loading


def load_table(emb, state_dict: dict, prefix: str, missing_keys: list) -> dict:
    """Loads ``emb``'s rows from ``state_dict`` under ``prefix`` (``nn.Module``'s
    ``_load_from_state_dict``); returns ``state_dict`` without the table's keys.

    Checks everything first (raising :class:`TableMismatchError` or :class:`InvalidInputError`
    with nothing changed), then writes a chunk at a time."""
    got = {k: state_dict[prefix + k] for k in KEYS if prefix + k in state_dict}
    rest = {k: v for k, v in state_dict.items() if k[len(prefix) :] not in KEYS or
            not k.startswith(prefix)}  # fmt: skip
    width = emb.store.layout.state_width
    if "weight" not in got:
        missing_keys.append(prefix + "weight")
    if width and "optimizer_state" not in got:
        missing_keys.append(prefix + "optimizer_state")
    if "weight" not in got:
        return rest
    ids, incremental = _check(emb, prefix, got)
    _write(emb, got["weight"], got.get("optimizer_state"), ids, incremental)
    return rest


def check_table(emb, state_dict: dict, prefix: str) -> None:
    """Raises as :func:`load_table` would on ``emb``'s entries in ``state_dict`` under
    ``prefix``, changing nothing: a module of several tables checks them all before loading."""
    got = {k: state_dict[prefix + k] for k in KEYS if prefix + k in state_dict}
    if "weight" in got:
        _check(emb, prefix, got)


def _check(emb, prefix: str, got: dict) -> tuple[torch.Tensor | None, bool]:
    """Validates a checkpoint's table entries against ``emb``: ``(ids, incremental)``."""
    dim, width, n = emb.embedding_dim, emb.store.layout.state_width, emb.num_embeddings
    meta = got.get("_extra_state")
    if meta is not None and (not isinstance(meta, dict) or meta.get("format") != FORMAT):
        raise InvalidInputError(
            f"{prefix}_extra_state: not a tierstore table checkpoint ({FORMAT})"
        )
    weight = got["weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise InvalidInputError(f"{prefix}weight must be a 2-D floating-point tensor (rows, D)")
    rows = weight.shape[0]
    if weight.shape[1] != dim:
        raise TableMismatchError(
            f"{prefix}weight: the checkpoint's rows have embedding_dim {weight.shape[1]}, "
            f"this table's {dim}"
        )
    state = got.get("optimizer_state")
    theirs = state.shape[1] if isinstance(state, torch.Tensor) and state.dim() == 2 else 0
    ours_name = _optimizer_name(emb)
    their_name = meta.get("optimizer") if meta is not None else ours_name
    if (their_name != ours_name and (theirs or width)) or (state is not None and theirs != width):
        raise TableMismatchError(
            f"{prefix}optimizer_state: the checkpoint's optimizer is {their_name!r} ({theirs} "
            f"state floats a row), this table's {ours_name!r} ({width}): build the table with "
            "the same optimizer kind (its hyper-parameters may differ)"
        )
    if state is not None and (state.shape[0] != rows or not state.is_floating_point()):
        raise InvalidInputError(
            f"{prefix}optimizer_state must be a floating-point tensor of shape ({rows}, {width})"
        )
    ids = got.get("ids")
    incremental = bool(meta is not None and meta.get("incremental"))
    if ids is None:
        if n is not None and rows != n:
            raise TableMismatchError(
                f"{prefix}weight: the checkpoint holds {rows} rows, this table has "
                f"num_embeddings={n}"
            )
        return None, incremental
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype not in (torch.int32, torch.int64)
        or (tuple(ids.shape) != (rows,))
    ):
        raise InvalidInputError(f"{prefix}ids must be an int64 tensor of shape ({rows},)")
    for lo in range(0, rows, _CHUNK_BYTES // 8):  # ascending and unique, a chunk at a time
        part = ids[lo : lo + _CHUNK_BYTES // 8 + 1]
        if part.numel() > 1 and not bool((part[1:] > part[:-1]).all()):
            raise InvalidInputError(f"{prefix}ids must be ascending and unique")
    if n is not None and rows and (int(ids[0]) < 0 or int(ids[-1]) >= n):
        raise TableMismatchError(
            f"{prefix}ids: the checkpoint holds row ids in [{int(ids[0])}, {int(ids[-1])}], "
            f"this table has num_embeddings={n}"
        )
    store = emb.store
    if meta is not None and not incremental:
        theirs = (meta.get("seed"), meta.get("init_scale"))
        if theirs != (store.seed, store.init_scale):
            raise TableMismatchError(
                f"{prefix}ids: the checkpoint holds only written rows, the others being the "
                f"initial values of seed={theirs[0]}, init_scale={theirs[1]}; this table has "
                f"seed={store.seed}, init_scale={store.init_scale}: build it with those"
            )
    return ids, incremental


def _write(emb, weight, state, ids, incremental: bool) -> None:
    """Writes checked rows into the table; unless ``incremental``, every other row the table
    may hold goes back to its initial value (so the table equals the checkpoint)."""
    store, dim = emb.store, emb.embedding_dim
    rows = weight.shape[0]
    # Rows the SSD table holds now (before writing): those the checkpoint lacks are reset.
    held = stored_ids(store) if store.inclusive_host and not incremental else None
    step = _chunk_rows(store)
    if ids is None and not store.inclusive_host:  # the whole table in L2: copy slices
        _write_whole_l2(store, weight, state)
        return
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        part = torch.arange(lo, hi) if ids is None else ids[lo:hi].to("cpu", torch.int64)
        w = weight[lo:hi].to("cpu", torch.float32)
        if store.layout.state_width:
            s = state[lo:hi].to("cpu", torch.float32) if state is not None else None
            if s is None:  # no state given: keep the table's own
                s = store.read_rows(part)[:, dim:].cpu()
            w = torch.cat([w, s], 1)
        if ids is None and held is not None:  # dense into an SSD table: a row at its initial
            # value that the table does not hold needs no write (most rows of a big table)
            need = (w != store.init_rows(part).cpu()).any(1) | torch.isin(part, held)
            part, w = part[need], w[need]
        store.write_rows(part, w)
    if incremental:
        return
    if held is not None:
        if ids is None:
            stale = held[(held < 0) | (held >= rows)]
        else:
            stale = held[~torch.isin(held, ids.to("cpu", torch.int64))]
        _reset(store, stale)
    elif ids is not None:  # a sparse checkpoint into a table in host memory: reset the rest
        for lo in range(0, emb.num_embeddings, step):
            part = torch.arange(lo, min(lo + step, emb.num_embeddings))
            _reset(store, part[~torch.isin(part, ids.to("cpu", torch.int64))])


def _write_whole_l2(store, weight: torch.Tensor, state: torch.Tensor | None) -> None:
    """A dense checkpoint into a table held whole in L2: row slices straight into L2, then
    L1's cached copies refreshed from it (a chunk of rows costs one copy, not a lookup)."""
    data, dim = store.host.data, store.layout.dim
    store.flush()  # L1's dirty rows into L2 first: a row's state may be kept from there
    if store.device.type == "cuda":  # no kernel may still be updating L2 rows in place
        torch.cuda.synchronize(store.device)
    step = _chunk_rows(store)
    for lo in range(0, weight.shape[0], step):
        data[lo : lo + step, :dim] = weight[lo : lo + step]
        if state is not None:  # else the table keeps its own state
            data[lo : lo + step, dim:] = state[lo : lo + step]
    written = getattr(store.host, "written", None)
    if written is not None:  # every row now holds the checkpoint's value, not its initial one
        written.fill_(1)  # (the device computes fills of unwritten rows: kernels/insert.cu)
    tags = by_slot(store.l1.tags)
    slots = (tags != EMPTY).nonzero().squeeze(1)
    # The L1 rows now equal L2's, dirty or not: a later writeback rewrites the same values.
    store.l1.set_rows(slots, data[tags[slots].cpu()].to(store.device))


def _reset(store, ids: torch.Tensor) -> None:
    """Gives ``ids`` (ascending, unique) their initial rows."""
    step = _chunk_rows(store)
    for lo in range(0, ids.numel(), step):
        part = ids[lo : lo + step]
        store.write_rows(part, store.init_rows(part))


# ---------------------------------------------------------------------------- rows and ids


def stored_ids(store) -> torch.Tensor:
    """Ids of every row an SSD table holds apart from its initial value, ascending (int64):
    flushed or staged on SSD, or dirty in L2 or L1."""
    parts = [store.host.ssd.stored_ids(), changed_ids(store)]
    return torch.unique(torch.cat(parts))


def changed_ids(store) -> torch.Tensor:
    """Ids an SSD table changed since its last flush, ascending: staged on SSD, dirty in L2 or
    L1 (a flush writes exactly these)."""
    l1 = store.l1
    parts = [
        store.host.ssd.stored_ids(flushed=False),
        store.host.dirty_ids(),  # borrowed ways (L2's overflow) hold rows under no tag
        by_slot(l1.tags)[by_slot(l1.dirty)].cpu(),
    ]
    return torch.unique(torch.cat(parts))


def _read_rows(store, ids: torch.Tensor | None, rows: int, written: torch.Tensor | None = None):
    """``(weight (R, D), state (R, S))`` of ``ids`` (``None``: ids ``0..rows-1``), read a chunk
    at a time into tensors from :func:`_empty`. With ``written`` (ascending: every id whose row
    is not its initial value), the other rows are computed, not looked up in the tiers."""
    dim, width = store.layout.dim, store.layout.state_width
    weight = _empty((rows, dim), torch.float32)
    state = _empty((rows, width), torch.float32) if width else None
    step = _chunk_rows(store)
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        part = torch.arange(lo, hi) if ids is None else ids[lo:hi]
        if written is None:
            got = store.read_rows(part).cpu()
        else:
            got = store.init_rows(part).cpu()
            first, last = torch.searchsorted(written, torch.tensor([lo, hi])).tolist()
            if last > first:
                got[written[first:last] - lo] = store.read_rows(written[first:last]).cpu()
        weight[lo:hi] = got[:, :dim]
        if width:
            state[lo:hi] = got[:, dim:]
    return weight, state


def _spilled(ids: torch.Tensor) -> torch.Tensor:
    """``ids``, copied into a file-backed tensor inside :func:`spill_state_dict`."""
    if getattr(_spill, "directory", None) is None:
        return ids
    return _empty(tuple(ids.shape), ids.dtype).copy_(ids)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor, backed by a file in the :func:`spill_state_dict` directory if one is set."""
    directory = getattr(_spill, "directory", None)
    numel = math.prod(shape)
    if directory is None or numel == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    fd, name = tempfile.mkstemp(dir=directory, suffix=".rows")
    try:
        os.ftruncate(fd, nbytes)  # a sparse file: disk blocks come as rows are written
        out = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the data; the space goes with the tensor
    return out.view(shape)


def _chunk_rows(store) -> int:
    return max(1, _CHUNK_BYTES // store.layout.row_bytes)


# ---------------------------------------------------------------------------- the change log


def _tables(module: nn.Module):
    # Tables are known by what they hold rather than by class: module.py and collection.py
    # import this module, so it imports neither (no import cycle).
    found = []
    for name, m in module.named_modules():
        prefix = name + "." if name else ""
        if callable(getattr(m, "table_views", None)):  # a collection: a view per table
            found.extend((prefix + key, view) for key, view in m.table_views())
        elif isinstance(getattr(m, "store", None), TieredStore):  # a TieredEmbeddingBag
            found.append((prefix, m))
    if not found:
        raise InvalidInputError(f"{type(module).__name__} holds no TieredEmbeddingBag")
    return found


def _change_log(emb) -> torch.Tensor:
    host = emb.store.host
    log = getattr(host, "flushed_since_mark", None)
    if log is None:
        raise InvalidInputError(
            "incremental_state_dict needs a base: call mark_checkpoint() right after saving a "
            "full state_dict (and the table needs an SSD tier: ssd=ts.SSDConfig(path))"
        )
    return log


def _restart_log(emb) -> None:
    emb.store.flush()
    emb.store.host.flushed_since_mark = torch.empty(0, dtype=torch.int64)


def _optimizer_name(emb) -> str | None:
    """The fused optimizer's kind (``"rowwise_adagrad"``...), which a checkpoint's state fits."""
    optimizer = emb.optimizer
    if optimizer is None:
        return None
    return getattr(optimizer, "name", None) or type(optimizer).__name__


def _meta(emb, form: str, incremental: bool) -> dict:
    store = emb.store
    return {
        "format": FORMAT,
        "form": form,
        "incremental": incremental,
        "num_embeddings": emb.num_embeddings,
        "embedding_dim": emb.embedding_dim,
        "optimizer": _optimizer_name(emb),
        "state_width": store.layout.state_width,
        "seed": store.seed,
        "init_scale": store.init_scale,
    }

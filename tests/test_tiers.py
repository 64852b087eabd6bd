"""The host tier's interface (``tierstore/tiers.py``): both host tiers implement it, and the
store, the module and the backends call nothing on a host tier beyond it."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import tierstore as ts
from tierstore.host import HostTable
from tierstore.host_cache import HostCache
from tierstore.tiers import HostTier

PACKAGE = pathlib.Path(ts.__file__).parent
# the modules of the batch step: what they call on a host tier must be the interface's
CALLERS = ["store.py", "module.py", "cpu.py", "cuda_rows.py", "cuda_bags.py", "cuda.py",
           "weights.py", "bag_max.py", "graphs.py", "checkpoint.py"]  # fmt: skip
# the SSD tier's own names, used only on its paths (checkpoint.py's incremental form)
SSD_ONLY = {"ssd", "dirty_ids", "flushed_since_mark"}


def _host_names(path: pathlib.Path) -> set[str]:
    """Names reached as ``<anything>.host.<name>``, or as ``host.<name>`` (a local alias of a
    store's ``host``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "host":
            names.add(node.attr)
        elif isinstance(owner, ast.Name) and owner.id == "host":
            names.add(node.attr)
    return names


def _interface() -> set[str]:
    return {n for n in vars(HostTier) if not n.startswith("_")} | set(HostTier.__annotations__)


def test_the_callers_use_only_the_interface():
    used = set().union(*(_host_names(PACKAGE / m) for m in CALLERS))
    assert {"acquire", "mark_dirty", "page_lock", "data", "written"} <= used  # the scan sees them
    assert used - SSD_ONLY <= _interface(), sorted(used - SSD_ONLY - _interface())


def test_both_host_tiers_implement_it(tmp_path):
    table = ts.TieredEmbeddingBag(50, 4, device="cpu")
    cached = ts.TieredEmbeddingBag(
        200,
        4,
        device="cpu",
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
    )
    assert type(table.store.host) is HostTable and isinstance(table.store.host, HostTier)
    assert type(cached.store.host) is HostCache and isinstance(cached.store.host, HostTier)
    for name in _interface():  # each class's own, not a default of the Protocol
        assert hasattr(HostTable(4, 2, lambda ids: torch.zeros(len(ids), 2)), name), name
        assert name in vars(HostCache) or name in {"data", "written"}, name
    assert cached.store.host.written is None  # its fills read every row
    assert table.store.host.stats() == {} and set(cached.store.host.stats()) <= set(
        vars(table.stats())
    )
    cached.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="page-locking works with CUDA")
@pytest.mark.parametrize("n", [16, 3 << 20])  # copied when locked; in mappings of their own
def test_page_lock_without_cuda_raises_with_nothing_changed(n):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, 3, generator=gen)
    table = HostTable(n, 3, lambda ids: rows[ids])
    data, written = table.data, table.written
    with pytest.raises(RuntimeError, match="CUDA|accelerator"):
        table.page_lock()
    assert table.data is data and table.written is written
    torch.testing.assert_close(table.data, rows, rtol=0, atol=0)


def _huge_page_bytes(address: int) -> int:
    """Bytes of transparent huge pages backing the mapping of this process that holds
    ``address`` (``/proc/self/smaps``' AnonHugePages), 0 if none."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:  # a mapping's first line: lo-hi perms ...
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def _thp_mode(setting: str = "enabled") -> str:
    """The kernel's transparent huge page ``setting``, its bracketed word (``never`` if none)."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{setting}") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="no transparent huge pages on this host")
def test_a_large_host_tier_lives_in_huge_pages_and_trains_as_a_small_one(monkeypatch):
    """L2 of a huge page or more sits in a mapping of its own advised to use huge pages
    (tierstore.host.host_memory): the kernel backs it with some, and the table trains exactly
    as one in ordinary memory (the same rows after a step)."""
    from tierstore import host

    rows, dim = 8 * host._HUGE_BYTES // (4 * 17), 16  # 16 weights + row-wise state
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, rows, (4096,), generator=gen)
    offs = torch.arange(0, 4096, 8)
    kw = dict(mode="sum", cache=ts.CacheConfig(rows=1024), optimizer=ts.RowWiseAdagrad(lr=0.1),
              seed=3)  # fmt: skip
    huge = ts.TieredEmbeddingBag(rows, dim, **kw)
    data = huge.store.host.data
    assert data.shape == (rows, dim + 1)
    # where a fault in an advised mapping may compact memory for a huge page, it gets some
    if _thp_mode("defrag") in ("always", "madvise", "defer+madvise"):
        assert _huge_page_bytes(data.data_ptr()) > 0
    monkeypatch.setattr(host, "_HUGE_BYTES", 1 << 62)  # every size from torch.empty
    plain = ts.TieredEmbeddingBag(rows, dim, **kw)
    if _thp_mode() == "madvise":  # ordinary memory gets none unless advised
        assert _huge_page_bytes(plain.store.host.data.data_ptr()) == 0
    for emb in (huge, plain):
        emb(idx, offs).sum().backward()
    ids = torch.cat([idx.unique(), torch.randint(0, rows, (64,), generator=gen)])
    assert torch.equal(huge.read_rows(ids, True), plain.read_rows(ids, True))


@pytest.mark.gpu
def test_a_large_host_tier_is_page_locked_in_place_and_trains_as_on_the_cpu():
    """A table whose L2 passes the in-place threshold (tierstore.host.pinned) is registered, not
    copied; the CUDA kernels read it over PCIe and train it as the CPU backend does, and a second
    table made after the first is freed registers its own memory again."""
    import gc

    from tierstore.host import _REGISTER_BYTES

    rows, dim = _REGISTER_BYTES // (4 * 17) + 1000, 16  # 16 weights + row-wise state
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, rows, (4096,), generator=gen)
    offs = torch.arange(0, 4096, 8)
    for _ in range(2):
        tables = {}
        for dev in ("cpu", "cuda"):
            tables[dev] = ts.TieredEmbeddingBag(
                rows, dim, mode="sum", device=dev, cache=ts.CacheConfig(rows=1024),
                optimizer=ts.RowWiseAdagrad(lr=0.1), seed=3,
            )  # fmt: skip
        host = tables["cuda"].store.host
        assert host.data.is_pinned() and host.data.numel() * 4 >= _REGISTER_BYTES
        for dev, emb in tables.items():
            emb(idx.to(dev), offs.to(dev)).sum().backward()
        got = tables["cuda"].read_rows(idx.unique().cuda(), True).cpu()
        want = tables["cpu"].read_rows(idx.unique(), True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        del tables, host
        gc.collect()

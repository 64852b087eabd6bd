"""Research: what a miss path's row moves reach over PCIe when a kernel moves them (zero-copy),
by direction and by the order of host addresses (issue 23's L1 = 20 % step moves about 180 000
rows of 512 B each way a step). The host table is page-locked as L2 is (``host.pinned``);
180 000 distinct rows a move, drawn at random from it. Prints GB/s of row data (each way, and
both ways together where two moves run at once) against the DMA copies of the same bytes.

``--row-floats 64 --rows 33800000 --moves 48000`` is near the criteo26 collection's L1 = 10 %
step (issue 27: about 48 000 rows of 65 floats each way a step, spread over 33.8 M rows, where
the step's kernel reached 17 GB/s); ``--huge`` puts the host table in transparent huge pages as
L2 now is (``host.host_memory``; without it, ordinary memory as L2 was before), to tell whether
the device's translations of host pages, not the bytes, bound such sparse reads.

    python3 bench/exp/pcie_moves.py [--rows 10000000] [--moves 180000] [--row-floats 128]
        [--huge]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import t_ms  # noqa: E402

from tierstore.host import host_memory, pinned  # noqa: E402


def host_table(rows: int, floats: int, huge: bool) -> torch.Tensor:
    """A random ``(rows, floats)`` float32 table, page-locked in place (``host.pinned``); with
    ``huge``, in transparent huge pages as L2 is (``host.host_memory``), else in ordinary
    memory."""
    t, own = (
        host_memory((rows, floats), torch.float32) if huge else (torch.empty(rows, floats), False)
    )
    return pinned(t.normal_(), own)


def thp_setting() -> str:
    """The kernel's transparent huge page mode (``[always] madvise never``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main() -> None:
    import cupy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--moves", type=int, default=180_000)
    parser.add_argument("--row-floats", type=int, default=128, help="a multiple of 4")
    parser.add_argument("--huge", action="store_true", help="2 MiB pages under the host table")
    args = parser.parse_args()
    w4 = args.row_floats // 4  # float4 a row
    dev = torch.device("cuda")
    host = host_table(args.rows, 4 * w4, args.huge)
    host_ptr = host.data_ptr()  # UVA: the device reaches page-locked memory at its address
    n = args.moves
    pick = torch.randperm(args.rows, device=dev)[: 2 * n]
    fills_sorted = pick[:n].sort().values
    fills_random = pick[:n].clone()
    backs_sorted = pick[n:].sort().values
    backs_random = pick[n:].clone()
    staged_in = torch.empty(n, 4 * w4, device=dev)
    staged_out = torch.randn(n, 4 * w4, device=dev)
    module = cupy.RawModule(code=(Path(__file__).parent / "pcie_moves.cu").read_text())
    one, two = module.get_function("copy_one"), module.get_function("copy_two")
    threads, blocks = 256, 132 * 16
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    null = 0

    def fill(rows):  # host rows -> staging (a read over PCIe)
        args_ = (staged_in.data_ptr(), null, host_ptr, rows.data_ptr(), n, w4)
        return lambda: one((blocks,), (threads,), args_, stream=stream)

    def back(rows):  # staging -> host rows (a write over PCIe)
        args_ = (host_ptr, rows.data_ptr(), staged_out.data_ptr(), null, n, w4)
        return lambda: one((blocks,), (threads,), args_, stream=stream)

    def both(f_rows, b_rows):
        args_ = (staged_in.data_ptr(), null, host_ptr, f_rows.data_ptr(),
                 host_ptr, b_rows.data_ptr(), staged_out.data_ptr(), null, n, w4)  # fmt: skip
        return lambda: two((2 * blocks,), (threads,), args_, stream=stream)

    mb = n * 16 * w4 / 1e6
    print(f"# {torch.cuda.get_device_name()}; {n:,} rows of {16 * w4} B a move ({mb:.1f} MB), "
          f"host table {args.rows:,} rows page-locked, huge pages asked: {args.huge} "
          f"(THP {thp_setting()}); GB/s of row data")  # fmt: skip
    dense_h = pinned(torch.randn(n, 4 * w4))
    h2d = t_ms(lambda: staged_in.copy_(dense_h, non_blocking=True), 30)
    d2h = t_ms(lambda: dense_h.copy_(staged_out, non_blocking=True), 30)
    print(f"DMA of the same bytes, dense: H2D {mb / h2d:.1f}, D2H {mb / d2h:.1f}")  # MB/ms
    cases = [
        ("fills (reads), rows ascending", fill(fills_sorted), 1),
        ("fills (reads), rows random", fill(fills_random), 1),
        ("writebacks (writes), rows ascending", back(backs_sorted), 1),
        ("writebacks (writes), rows random", back(backs_random), 1),
        ("both at once, both ascending", both(fills_sorted, backs_sorted), 2),
        ("both at once, fills ascending, writebacks random", both(fills_sorted, backs_random), 2),
        ("both at once, both random", both(fills_random, backs_random), 2),
    ]
    for name, fn, ways in cases:
        t = t_ms(fn, 30)
        print(f"{name:<52} {t:7.3f} ms  {ways * mb / t:6.1f} GB/s")
    order = fills_sorted
    seq = fill(order)
    seq()
    torch.cuda.synchronize()
    ok = torch.equal(staged_in.cpu(), host[order.cpu()])
    print(f"(fills checked against an index of the host table: {ok})")


if __name__ == "__main__":
    main()

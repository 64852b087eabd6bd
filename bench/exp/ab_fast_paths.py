"""Research: the training step with and without its fast paths, same table, same ids, same
process (RowWiseAdagrad, every row in L1).

    python3 bench/exp/ab_fast_paths.py [--quick] [--json out.json]

'before' is ``torch.unique`` (the host reads the unique count: a second sync in the step) and a
second sort in the backward (``cuda_unique.FAST_UNIQUE = False``); 'sync-free' is the unique step of
``kernels/unique.cu`` with the count left on the device and its sort reused as the backward's
transpose; 'graphed' is the same step, and an inference forward, through ``GraphedStep``. Each
configuration twice, [0] and [1]. Formerly the ``ab`` section of ``bench/bench_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common

import common  # noqa: E402
from common import B, D, L, N, Table, headline_table, t_ms, trace, wall_ms  # noqa: E402

import tierstore as ts  # noqa: E402
from tierstore import cuda_unique  # noqa: E402


def _ab_rows(out: Table, name: str, dist: str, step, look_fwd, ref: float, it: int) -> None:
    """Rows of one configuration: the train step (events, then wall time back to back) and
    lookup + forward against ``F.embedding_bag``'s ``ref`` ms."""
    step()
    t = t_ms(step, it)
    wall = wall_ms(step, it)
    tl = t_ms(look_fwd, it)
    out.row(f"{name}: train step, {dist}", t, "ms", f"wall {wall:.3f} ms")
    out.row(
        f"{name}: lookup + forward, {dist}", tl, "ms", f"{ref:.3f} ms", f"<= {1.5 * ref:.3f} ms"
    )


def bench_ab(quick: bool) -> Table:
    it = 10 if quick else 30
    out = Table(
        "same-run comparison of the fast paths (RowWiseAdagrad, every row in L1)",
        f"{N:,} x {D} fp32 rows, int64 ids", f"{B} bags x {L} ids", "ms",
    )  # fmt: skip
    offsets = torch.arange(0, B * L + 1, L, device="cuda")
    emb = headline_table(ts.RowWiseAdagrad(lr=0.01))
    store = emb.store
    g = torch.randn(B, D, device="cuda")
    weight = torch.randn(N, D, device="cuda")
    try:
        for dist in ("uniform", "zipf"):
            x = trace(dist, B * L).view(B, L)
            flat = x.reshape(-1)
            emb(x).backward(g)  # rows in
            ref = t_ms(lambda f=flat: F.embedding_bag(f, weight, offsets[:-1]), it)
            out.row(f"torch F.embedding_bag fwd, table in HBM, {dist}", ref)
            for rep in range(2):
                for name, fast in (("before", False), ("sync-free", True)):
                    cuda_unique.FAST_UNIQUE = fast

                    def step(x=x):
                        emb(x).backward(g)

                    def look_fwd(f=flat):
                        common.lookup_and_forward(store, f, offsets)

                    _ab_rows(out, f"[{rep}] {name}", dist, step, look_fwd, ref, it)
                # the same step and an inference forward captured as CUDA graphs (GraphedStep:
                # each call copies the batch in, checks it, and replays)
                train_g = ts.GraphedStep(lambda x: emb(x).backward(g))
                infer_g = ts.GraphedStep(torch.no_grad()(emb.forward))  # inference
                _ab_rows(
                    out, f"[{rep}] graphed", dist, lambda x=x, s=train_g: s(x),
                    lambda x=x, s=infer_g: s(x), ref, it,
                )  # fmt: skip
                del train_g, infer_g  # their graphs' memory
    finally:
        cuda_unique.FAST_UNIQUE = True
    return out


if __name__ == "__main__":
    common.main(__doc__, {"ab": bench_ab})

"""The forward and the training step on one GPU, every row in L1, each beside torch's baseline
measured in the same run on the same ids.

Table: 10 M rows x 128 fp32, 65 536 bags of 32 ids, uniform or Zipf(1.05) ids (``common.trace``).

    python3 bench/bench_step.py [--quick] [--json out.json] [--only forward,train]

- ``forward``: the forward with the batch's slots known, and an inference lookup + forward (one
  call on an idle device, and back to back), against ``F.embedding_bag`` over the table in HBM.
  Targets (issue 4): the forward <= the baseline; lookup + forward <= 1.5 x the baseline.
- ``train``: the training step (lookup, forward, backward with the fused optimizer) eager and
  captured by ``GraphedStep``, SGD and RowWiseAdagrad, one step on an idle device and back to
  back; the step with per-sample weights that take a gradient; torch's
  ``EmbeddingBag(sparse=True)`` + ``torch.optim.SGD`` / ``Adagrad`` on the same ids. Target
  (issue 4): the RowWiseAdagrad step <= 1.5 ms.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F
from common import B, D, L, N, Table, free, headline_table, note, t_ms, t_ms_queued, trace

import tierstore as ts
from tierstore.stats import HITS, UNIQUE

TYPES, BATCH = f"{N:,} x {D} fp32 rows, int64 ids", f"{B} bags x {L} ids"


def offsets_of_bags() -> torch.Tensor:
    """(B + 1,) offsets of B bags of L ids."""
    return torch.arange(0, B * L + 1, L, device="cuda")


def bench_forward(quick: bool) -> Table:
    it = 10 if quick else 30
    table = Table("forward, every row in L1", TYPES, BATCH, "ms")
    offsets = offsets_of_bags()
    weight = torch.randn(N, D, device="cuda")
    emb = headline_table(ts.SGD(lr=0.01))
    store = emb.store
    for dist in ("uniform", "zipf"):
        ids = trace(dist, B * L)
        ref = t_ms(lambda ids=ids: F.embedding_bag(ids, weight, offsets[:-1]), it)
        table.row(f"torch F.embedding_bag fwd, table in HBM, {dist}", ref)
        store.release(store.lookup(ids))  # brings the rows in
        batch = store.lookup(ids)
        y = common.forward_pooled(store, batch, offsets)
        unique_ids = batch.trimmed().ids
        rows = store.read_rows(unique_ids)[:, :D]
        want = F.embedding_bag(batch.inverse, rows, offsets, mode="sum", include_last_offset=True)
        err = ((y - want).norm() / want.norm()).item()
        note(f"{dist}: {unique_ids.numel():,} unique ids, rel err vs embedding_bag {err:.1e}")

        def forward(b=batch):
            b.transpose.places = None  # each call resolves its places anew: part of its forward
            common.forward_pooled(store, b, offsets)

        t = t_ms(forward, it)
        table.row(
            f"tierstore forward, slots known, {dist}", t, None, f"{ref:.3f} ms", "<= baseline"
        )
        store.release(batch)

        def look_fwd(ids=ids):
            common.lookup_and_forward(store, ids, offsets)

        t = t_ms(look_fwd, it)
        table.row(
            f"tierstore lookup + forward, one call, {dist}", t, None, f"{ref:.3f} ms",
            f"<= {1.5 * ref:.3f} ms",
        )  # fmt: skip
        ref_q = t_ms_queued(lambda ids=ids: F.embedding_bag(ids, weight, offsets[:-1]), it)
        t = t_ms_queued(look_fwd, it)
        table.row(
            f"tierstore lookup + forward, back to back, {dist}", t, None,
            f"{ref_q:.3f} ms back to back", f"<= {1.5 * ref_q:.3f} ms",
        )  # fmt: skip
        before = store.l1.counters.tolist()
        look_fwd()
        after = store.l1.counters.tolist()
        hits, unique = after[HITS] - before[HITS], after[UNIQUE] - before[UNIQUE]
        note(f"hits in that step: {hits:,} of {unique:,} unique")
    return table


def bench_train(quick: bool) -> Table:
    it = 10 if quick else 30
    table = Table("training step, every row in L1", TYPES, BATCH, "ms")
    offsets = offsets_of_bags()
    g = torch.randn(B, D, device="cuda")
    tables = {
        "SGD": headline_table(ts.SGD(lr=0.01)),
        "RowWiseAdagrad": headline_table(ts.RowWiseAdagrad(lr=0.01)),
    }
    for dist in ("uniform", "zipf"):
        ids = trace(dist, B * L)
        x = ids.view(B, L)
        for name, emb in tables.items():
            target = "<= 1.5 ms" if name == "RowWiseAdagrad" else ""

            def eager(emb=emb, x=x):
                emb(x).backward(g)

            eager()  # rows in
            t = t_ms(eager, it)
            table.row(f"eager step (lookup, fwd, bwd, fused {name}), one call, {dist}", t)
            t = t_ms_queued(eager, it)
            table.row(f"eager step, {name}, back to back, {dist}", t, None, "", target)
            graphed = ts.GraphedStep(lambda x, emb=emb: emb(x).backward(g))
            t = t_ms(lambda s=graphed, x=x: s(x), it)
            table.row(f"graphed step (GraphedStep), {name}, one call, {dist}", t)
            t = t_ms_queued(lambda s=graphed, x=x: s(x), it)
            table.row(f"graphed step, {name}, back to back, {dist}", t, None, "", target)
            del graphed  # its graph's memory
        rw = tables["RowWiseAdagrad"]
        psw = torch.rand(B * L, device="cuda")

        def psw_step(rw=rw, ids=ids, psw=psw):  # weighted features: the weights take a gradient
            w = psw.detach().requires_grad_()
            torch.autograd.grad(rw(ids, offsets[:-1], per_sample_weights=w), w, g)

        psw_step()
        t = t_ms(psw_step, it)
        table.row(f"eager step, RowWiseAdagrad, per-sample weights, one call, {dist}", t)
        for opt_name in ("sgd", "adagrad"):
            if quick and opt_name == "adagrad" and dist == "zipf":
                continue  # 60 ms a step: the quick run skips it
            emb = torch.nn.EmbeddingBag(N, D, mode="sum", sparse=True).cuda()
            opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adagrad)(
                emb.parameters(), lr=0.01
            )

            def tstep(emb=emb, opt=opt, ids=ids):
                opt.zero_grad(set_to_none=True)
                emb(ids, offsets[:-1]).backward(g)
                opt.step()

            t = t_ms(tstep, 5 if opt_name == "adagrad" else it, warm=2)
            table.row(f"torch EmbeddingBag(sparse) + optim.{opt_name} step, {dist}", t)
            del emb, opt, tstep
            free()
    return table


if __name__ == "__main__":
    common.main(__doc__, {"forward": bench_forward, "train": bench_train})

"""Research: where a training step's device time goes (RowWiseAdagrad, every row in L1):
``torch.profiler``'s kernels by total device time over three eager steps, after the host wall
time per step and CUDA-event times of the step's parts (the input checks, ``torch.unique``,
the store's lookup and release).

    python3 bench/exp/profile_step.py [--quick]

Prints the profiler's tables; no figures for ``--json``. Formerly the ``profile`` section of
``bench/bench_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common

import common  # noqa: E402
from common import B, D, L, headline_table, t_ms, trace, wall_ms  # noqa: E402

import tierstore as ts  # noqa: E402


def bench_profile(quick: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    emb = headline_table(ts.RowWiseAdagrad(lr=0.01))
    store = emb.store
    g = torch.randn(B, D, device="cuda")
    for dist in ("uniform", "zipf"):
        x = trace(dist, B * L).view(B, L)

        def step(x=x):
            emb(x).backward(g)

        for _ in range(3):
            step()
        wall = wall_ms(step, 5)
        flat = x.reshape(-1)
        t_prep = t_ms(lambda x=x: emb._prepare(x, None, None)[3].wait(), 10)
        t_uniq = t_ms(lambda f=flat: torch.unique(f, return_inverse=True, return_counts=True), 10)
        t_look = t_ms(lambda f=flat: store.release(store.lookup(f)), 10)
        print(
            f"\n  {dist}: validation (normalize_batch + check_ids) {t_prep:.3f} ms, "
            f"torch.unique {t_uniq:.3f} ms, store.lookup + release (unique included) "
            f"{t_look:.3f} ms (CUDA events)"
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(
            f"\n#### RowWiseAdagrad step, {dist}: host wall {wall:.3f} ms a step; kernels (3 steps)"
        )
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=22, max_name_column_width=48
        )
        print(table)


if __name__ == "__main__":
    common.main(__doc__, {"profile": bench_profile})

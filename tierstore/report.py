"""Results people compare, as a table on the terminal, a CSV file and a line plot."""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence


def format_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> str:
    """A fixed-width text table of ``rows`` (dicts) with ``columns`` in order; floats get 4
    significant digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: str | pathlib.Path) -> None:
    """Writes ``rows`` to a CSV file with a header of ``columns``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_lines(
    rows: Sequence[dict],
    x: str,
    ys: Sequence[str],
    group: str,
    path: str | pathlib.Path,
    title: str,
    xlabel: str | None = None,
    logx: bool = True,
) -> bool:
    """One panel per column in ``ys``, one line per value of ``group``, saved as a PNG.
    Returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for name in dict.fromkeys(r[group] for r in rows):
            pts = sorted((r[x], r[y]) for r in rows if r[group] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

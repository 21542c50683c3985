"""The per-epoch ACC / ASR / RA plot a defense writes next to its CSV (BackdoorBench's acc_like_metric_plots.png)."""

from __future__ import annotations

import io
from typing import Sequence

__all__ = ["plot_acc_like_metrics"]


def plot_acc_like_metrics(history: Sequence[dict], title: str, path: str) -> None:
    """Plot test_acc / test_asr / test_ra of the evaluated epochs in `history` to the PNG `path` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ftsam_plugin.io import atomic_write_bytes

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for key, label in (("test_acc", "ACC"), ("test_asr", "ASR"), ("test_ra", "RA")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())

"""Draw a control chart from an optimizer's per-step history (matplotlib, an optional extra)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from accel._optional import require

__all__ = ["plot_control_chart"]


def plot_control_chart(history: Sequence[dict[str, Any]], path: str | Path | None = None, *, ax=None,
                       title: str | None = "ISGD control chart"):
    """Plot batch losses, the chart's center line (window mean, or the trend's prediction for the residual chart)
    and the control limit, with chased batches marked.

    Args:
        history (sequence of dict): ``opt.history`` of an :class:`~accel.optim.ISGD` or
            :class:`~accel.optim.Inconsistent` built with ``history=True``.
        path (str or Path, optional): where to save the figure (format from the suffix); ``None`` saves nothing.
        ax (matplotlib Axes, optional): draw into these axes instead of a new figure.
        title (str, optional): axes title.

    Returns:
        The matplotlib ``Axes`` drawn on.

    Raises:
        MissingDependency: (an ImportError) if matplotlib is not installed (``pip install 'accel-train[plot]'``).
        ValueError: if ``history`` is empty (was the optimizer built with ``history=True``?).
    """
    if history is None or len(history) == 0:
        raise ValueError("plot_control_chart got an empty history: build the optimizer with history=True")
    matplotlib = require("matplotlib", extra="plot", feature="plot_control_chart")
    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    steps = [record["step"] for record in history]
    losses = [record["loss"] for record in history]
    warm = [record.get("warm", True) and math.isfinite(record["limit"]) for record in history]
    if ax is None:
        figure, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, losses, lw=0.7, color="tab:blue", label="batch loss")
    ax.plot([s for s, w in zip(steps, warm) if w], [r.get("center", r["mean"]) for r, w in zip(history, warm) if w],
            lw=1.2, color="tab:green", label="center line")
    ax.plot([s for s, w in zip(steps, warm) if w], [r["limit"] for r, w in zip(history, warm) if w],
            lw=1.2, ls="--", color="tab:red", label="control limit")
    chased = [r for r in history if r["chased"]]
    if chased:
        ax.scatter([r["step"] for r in chased], [r["loss"] for r in chased], s=18, color="tab:red", zorder=3,
                   label=f"chased ({len(chased)})")
        after = [(r["step"], r["final_loss"]) for r in chased if math.isfinite(r["final_loss"])]
        ax.scatter([s for s, _ in after], [v for _, v in after], s=12, marker="v", color="tab:orange",
                   zorder=3, label="after chase")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax

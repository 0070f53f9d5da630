"""Figures: the one place matplotlib is set up (headless, the Agg back-end) and a grid of panels
is laid out, saved and closed, for every figure the package writes (evaluate's robustness
plots, the paired-difference plot, the exact-posterior benchmark's per-task plots)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

__all__ = ["grid_for", "panel_grid", "pyplot"]


def pyplot():
    """matplotlib.pyplot on the Agg back-end (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_for(count: int, cols: int = 3) -> tuple[int, int]:
    """(rows, columns) of a grid for ``count`` panels at most ``cols`` wide."""
    cols = max(1, min(cols, count))
    return math.ceil(count / cols), cols


@contextmanager
def panel_grid(path: Path, rows: int, cols: int, *, panel: tuple[float, float] = (4.2, 3.3), dpi: int = 120,
               used: int | None = None, **subplots):
    """``with panel_grid(path, rows, cols) as (fig, axes):`` draw into ``axes`` (rows x cols,
    always 2-D); on leaving, the panels past the first ``used`` are blanked, the figure is laid out
    and saved to ``path``; it is closed whatever happens."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False, **subplots)
    try:
        yield fig, axes
        if used is not None:
            for ax in list(axes.flat)[used:]:
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)

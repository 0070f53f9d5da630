"""Paired comparisons of an evaluation: with against without DiffStateGrad on the same items.

Two runs of a cell, with and without the projector, share the image, the seed, the task's
operator and noise and the solver's noise stream, so their metric difference is a paired
sample. ``paired_differences`` gives, per (task, solver, guidance multiplier), the mean paired
difference with a percentile-bootstrap 95 % interval (resampling the pairs, a fixed seed, so the
report is reproducible), the worst-case 5th percentile of each side, and both failure rates.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["bootstrap_mean_ci", "paired_differences", "write_paired", "paired_figure"]

PAIR = ("image", "seed", "samples")  # what makes two records of a cell the same item
CELL = ("task", "solver", "guidance_multiplier")


def bootstrap_mean_ci(values, level: float = 0.95, reps: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of ``values`` and its percentile-bootstrap interval."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (reps, x.size))].mean(1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _p05(values, higher_is_better: bool) -> float:
    x = [v for v in values if math.isfinite(v)]
    return float(np.percentile(x, 5 if higher_is_better else 95)) if x else float("nan")


def paired_differences(records, metric: str = "psnr", higher_is_better: bool = True) -> list[dict]:
    """One row per (task, solver, guidance multiplier) holding both projector modes: the number
    of pairs, each side's mean and 5th percentile (95th for lower-is-better metrics), the mean
    paired difference (with - without) and its bootstrap 95 % interval, the share of pairs where
    DiffStateGrad is better, and both failure rates. Failed items count with their outputs."""
    from diffstategrad.records import guidance_multiplier

    cells: dict = defaultdict(lambda: {False: {}, True: {}})
    for r in records:
        if r.get(metric) is None:
            continue
        r = {**r, "guidance_multiplier": guidance_multiplier(r)}
        cells[tuple(r[k] for k in CELL)][bool(r["diffstategrad"])][tuple(r.get(k) for k in PAIR)] = r
    rows = []
    for cell in sorted(cells, key=lambda c: (c[0], c[1], c[2] if c[2] is not None else 0.0)):
        without, with_ = cells[cell][False], cells[cell][True]
        keys = sorted(set(without) & set(with_), key=str)
        if not keys:
            continue
        a = [float(without[k][metric]) for k in keys]
        b = [float(with_[k][metric]) for k in keys]
        diffs = [y - x for x, y in zip(a, b)]
        mean, lo, hi = bootstrap_mean_ci(diffs)
        sign = 1 if higher_is_better else -1
        rows.append({
            **dict(zip(CELL, cell)), "metric": metric, "pairs": len(keys),
            "without_mean": float(np.mean(a)), "with_mean": float(np.mean(b)),
            "without_p05": _p05(a, higher_is_better), "with_p05": _p05(b, higher_is_better),
            "difference": mean, "ci_low": lo, "ci_high": hi,
            "better_share": float(np.mean([sign * d > 0 for d in diffs])),
            "without_failure_rate": float(np.mean([bool(without[k].get("failed")) for k in keys])),
            "with_failure_rate": float(np.mean([bool(with_[k].get("failed")) for k in keys])),
        })
    return rows


def write_paired(rows: list[dict], out_dir: Path, metric: str = "psnr") -> None:
    """``paired_{metric}.csv`` and ``paired_{metric}.md`` in ``out_dir``."""
    from diffstategrad.storage import atomic_write_text

    if not rows:
        return
    out_dir = Path(out_dir)
    tmp = out_dir / f"paired_{metric}.csv.partial"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / f"paired_{metric}.csv")
    name = metric.upper()
    head = (f"| task | solver | guidance (x default) | pairs | {name} without | {name} with | difference [95 % CI] "
            f"| DSG better | 5th pct without | 5th pct with | failed without | failed with |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ci = "" if math.isnan(r["ci_low"]) else f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        lines.append(f"| {r['task']} | {r['solver']} | {r['guidance_multiplier']:g} | {r['pairs']} | {r['without_mean']:.2f} "
                     f"| {r['with_mean']:.2f} | {r['difference']:+.2f}{ci} | {r['better_share']:.0%} | {r['without_p05']:.2f} "
                     f"| {r['with_p05']:.2f} | {r['without_failure_rate']:.0%} | {r['with_failure_rate']:.0%} |")
    atomic_write_text(out_dir / f"paired_{metric}.md", "\n".join(lines) + "\n")


def paired_figure(rows: list[dict], path: Path, metric: str = "psnr") -> None:
    """The paired difference (with - without) against the guidance multiplier with its 95 %
    interval, one panel per task, one line per solver; zero is no effect."""
    from diffstategrad.figures import grid_for, panel_grid

    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return
    with panel_grid(path, *grid_for(len(tasks)), used=len(tasks)) as (_, axes):
        for ax, task in zip(axes.flat, tasks):
            for k, solver in enumerate(sorted({r["solver"] for r in rows if r["task"] == task})):
                pts = sorted((r["guidance_multiplier"], r["difference"], r["ci_low"], r["ci_high"]) for r in rows
                             if r["task"] == task and r["solver"] == solver)
                xs, ys, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
                err = np.nan_to_num(np.stack([ys - lo, hi - ys]), nan=0.0)
                ax.errorbar(xs, ys, yerr=err, marker="os^dv"[k % 5], capsize=3, label=solver, color=f"C{k}")
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(task, fontsize=10)
            ax.set_xlabel("guidance step size (x default)")
            ax.set_ylabel(f"{metric.upper()} with - without DSG")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

"""The benchmark's outputs: the table (plain text or JSON), a summary table, one figure per task."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

__all__ = [
    "format_paired",
    "format_pivot",
    "format_summary",
    "format_table",
    "paired_rows",
    "summary_rows",
    "task_figures",
    "to_json",
]

COLUMNS = (
    ("shape", "shape", "{}"),
    ("task", "task", "{}"),
    ("noise_sigma", "noise", "{:g}"),
    ("solver", "solver", "{}"),
    ("diffstategrad", "DSG", "{}"),
    ("multiplier", "mult", "{:g}"),
    ("sw", "SW", "{:.3f}"),
    ("sw_floor", "SW floor", "{:.3f}"),
    ("energy", "energy", "{:.3f}"),
    ("energy_floor", "E floor", "{:.3f}"),
    ("mean_error", "mean err", "{:.3f}"),
    ("mean_error_floor", "m floor", "{:.3f}"),
    ("correct_mass", "correct", "{:.2f}"),
    ("correct_mass_exact", "exact", "{:.2f}"),
    ("off_manifold", "off-man", "{:.3f}"),
    ("off_manifold_exact", "exact", "{:.3f}"),
    ("failure_rate", "failed", "{:.2f}"),
)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return fmt.format(value)


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_table(records: list[dict], markdown: bool = False) -> str:
    """Every record, one row: distances with their floors, mean error with its floor, the mass
    in the correct component and the off-manifold distance beside the exact posterior's."""
    header = [title for _, title, _ in COLUMNS]
    rows = [[_cell(r.get(key), fmt) for key, _, fmt in COLUMNS] for r in records]
    return _render(header, rows, markdown)


def format_pivot(records: list[dict], metric: str = "sw_ratio", fmt: str = "{:.2f}", markdown: bool = False) -> str:
    """One row per (shape, task, noise, solver, with/without), one column per multiplier:
    ``metric`` (default the sliced Wasserstein distance in units of its noise floor)."""
    multipliers = sorted({r["multiplier"] for r in records})
    rows, index = [], {}
    for r in records:
        key = (r["shape"], r["task"], r["noise_sigma"], r["solver"], r["diffstategrad"])
        if key not in index:
            index[key] = len(rows)
            rows.append([_cell(v, f) for v, f in zip(key, ("{}", "{}", "{:g}", "{}", "{}"))] + ["-"] * len(multipliers))
        rows[index[key]][5 + multipliers.index(r["multiplier"])] = _cell(r.get(metric), fmt)
    header = ["shape", "task", "noise", "solver", "DSG"] + [f"x{m:g}" for m in multipliers]
    return _render(header, rows, markdown)


def summary_rows(records: list[dict]) -> list[dict]:
    """Per (solver, DiffStateGrad, multiplier), averaged over shapes, tasks and noise levels:
    SW in units of its floor (sw_ratio), the mean error, the correct-component mass minus the
    exact posterior's, the off-manifold distance over the exact posterior's, failure rate."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["solver"], r["diffstategrad"], r["multiplier"])].append(r)
    out = []
    for (solver, dsg, mult), rs in groups.items():
        def mean(f, rs=rs):
            return sum(f(r) for r in rs) / len(rs)

        out.append({
            "solver": solver,
            "diffstategrad": dsg,
            "multiplier": mult,
            "sw_ratio": mean(lambda r: r["sw_ratio"]),
            "worst_sw_ratio": max(r["sw_ratio"] for r in rs),
            "mean_error": mean(lambda r: r["mean_error"]),
            "correct_mass_gap": mean(lambda r: r["correct_mass"] - r["correct_mass_exact"]),
            "off_manifold_ratio": mean(lambda r: r["off_manifold"] / r["off_manifold_exact"]),
            "failure_rate": mean(lambda r: r["failure_rate"]),
            "cells": len(rs),
        })
    return sorted(out, key=lambda r: (r["solver"], r["multiplier"], r["diffstategrad"]))


def paired_rows(records: list[dict]) -> list[dict]:
    """Per (solver, multiplier): with against without DiffStateGrad over the cells (shape, task,
    noise) where both ran: the mean SW / floor of each, the number of cells where DiffStateGrad
    is closer to the posterior, and the worst cell of each."""
    by_key = {(r["shape"], r["task"], r["noise_sigma"], r["solver"], r["multiplier"], r["diffstategrad"]): r for r in records}
    groups = defaultdict(list)
    for (shape, task, noise, solver, mult, dsg), r in by_key.items():
        other = by_key.get((shape, task, noise, solver, mult, False))
        if dsg and other is not None:
            groups[(solver, mult)].append((other, r))
    out = []
    for (solver, mult), pairs in sorted(groups.items()):
        out.append({
            "solver": solver,
            "multiplier": mult,
            "without": sum(a["sw_ratio"] for a, _ in pairs) / len(pairs),
            "with": sum(b["sw_ratio"] for _, b in pairs) / len(pairs),
            "cells_better": sum(b["sw"] < a["sw"] for a, b in pairs),
            "cells": len(pairs),
            "worst_without": max(a["sw_ratio"] for a, _ in pairs),
            "worst_with": max(b["sw_ratio"] for _, b in pairs),
            "off_manifold_without": sum(a["off_manifold"] / a["off_manifold_exact"] for a, _ in pairs) / len(pairs),
            "off_manifold_with": sum(b["off_manifold"] / b["off_manifold_exact"] for _, b in pairs) / len(pairs),
        })
    return out


def format_paired(records: list[dict], markdown: bool = False) -> str:
    cols = (("solver", "solver", "{}"), ("multiplier", "mult", "{:g}"), ("without", "SW/floor without", "{:.2f}"),
            ("with", "SW/floor with", "{:.2f}"), ("cells_better", "cells DSG closer", "{}"), ("cells", "of", "{}"),
            ("worst_without", "worst without", "{:.2f}"), ("worst_with", "worst with", "{:.2f}"),
            ("off_manifold_without", "off-man/exact without", "{:.2f}"), ("off_manifold_with", "off-man/exact with", "{:.2f}"))
    rows = [[_cell(r[key], fmt) for key, _, fmt in cols] for r in paired_rows(records)]
    return _render([title for _, title, _ in cols], rows, markdown)


def format_summary(records: list[dict], markdown: bool = False) -> str:
    cols = (("solver", "solver", "{}"), ("multiplier", "mult", "{:g}"), ("diffstategrad", "DSG", "{}"),
            ("sw_ratio", "SW / floor", "{:.2f}"), ("worst_sw_ratio", "worst SW / floor", "{:.2f}"),
            ("mean_error", "mean err", "{:.3f}"), ("correct_mass_gap", "correct - exact", "{:+.2f}"),
            ("off_manifold_ratio", "off-man / exact", "{:.2f}"), ("failure_rate", "failed", "{:.3f}"))
    rows = [[_cell(r[key], fmt) for key, _, fmt in cols] for r in summary_rows(records)]
    return _render([title for _, title, _ in cols], rows, markdown)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(results: dict) -> str:
    """The results as strict JSON (non-finite numbers become null)."""
    return json.dumps(_finite(results), indent=2, allow_nan=False)


def task_figures(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per task: the sliced Wasserstein distance against the guidance multiplier, one
    panel per (shape, noise level), one colour per solver, solid with DiffStateGrad and dashed
    without; the grey band is the estimator's noise floor (mean +- one standard deviation over
    the measurements); a cross marks configurations where half the samples or more failed (their
    distances are those of the last finite states)."""
    from diffstategrad.figures import panel_grid, pyplot

    out_dir = Path(out_dir)
    paths = []
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == task]
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        noises = list(dict.fromkeys(r["noise_sigma"] for r in rs))
        solvers = list(dict.fromkeys(r["solver"] for r in rs))
        path = out_dir / f"posterior_{task}.png"
        with panel_grid(path, len(shapes), len(noises), panel=(3.6, 2.9), dpi=90, sharex=True) as (fig, axes):
            _task_panels(fig, axes, task, rs, shapes, noises, solvers, colours)
        paths.append(path)
    return paths


def _task_panels(fig, axes, task, rs, shapes, noises, solvers, colours):
    for i, shape in enumerate(shapes):
        for j, noise in enumerate(noises):
            ax = axes[i][j]
            cell = [r for r in rs if r["shape"] == shape and r["noise_sigma"] == noise]
            floor, spread = cell[0]["sw_floor"], cell[0]["sw_floor_std"]
            ax.axhspan(max(floor - spread, 1e-6), floor + spread, color="0.85", zorder=0)
            ax.axhline(floor, color="0.5", lw=1, zorder=1)
            for k, solver in enumerate(solvers):
                for dsg, style in ((False, "--"), (True, "-")):
                    line = sorted((r for r in cell if r["solver"] == solver and r["diffstategrad"] == dsg), key=lambda r: r["multiplier"])
                    xs = [r["multiplier"] for r in line]
                    ys = [r["sw"] if math.isfinite(r["sw"]) else float("nan") for r in line]
                    colour = colours[k % len(colours)]
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colour, label=f"{solver}{' + DSG' if dsg else ''}")
                    failed = [(x, y) for x, y, r in zip(xs, ys, line) if r["failure_rate"] >= 0.5]
                    if failed:
                        ax.plot(*zip(*failed), "x", ms=8, mew=1.5, color=colour)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape}, noise {noise:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel("SW to exact posterior")
            if i == len(shapes) - 1:
                ax.set_xlabel("guidance multiplier")
            ax.tick_params(labelsize=8)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task}: distance to the exact posterior (grey: noise floor; x: half the samples or more failed)", fontsize=9)

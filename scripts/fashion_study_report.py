"""One report over the folders of `scripts/fashion_study.sh` (docs/claims.md).

    .venv/bin/python scripts/fashion_study_report.py runs/fashion-study-full --figures docs/images/claims_fashion_full

Reads every ``<task>/records.jsonl`` under the study folder and the noise run beside it
(``<folder>-noise0.2``, labelled ``box_inpainting@noise0.2``), and prints markdown: the paired
table (bootstrap 95 % intervals over the image x seed pairs, the mean difference per seed, the
5th percentile, failure rates), each side at its own best step against TV, and what the run
cost. With ``--figures PREFIX`` it writes ``PREFIX_paired.png`` and ``PREFIX_robustness.png``.
Folders still running are read as they stand (the pair counts say how far they are).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffstategrad.evaluate import robustness_figure, summarize
from diffstategrad.stats import paired_differences, paired_figure


def load(folder: Path) -> list[dict]:
    records = []
    noise = folder.with_name(folder.name + "-noise0.2")
    for path in sorted(folder.glob("*/records.jsonl")) + sorted(noise.glob("records.jsonl")):
        label = None if path.parent.parent == folder else "@noise0.2"
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if label:
                    r["task"] += label
                records.append(r)
    return records


def per_seed(records: list[dict]) -> dict:
    """(task, solver, multiplier) -> {seed: mean paired PSNR difference of that seed alone}."""
    out: dict = defaultdict(dict)
    for seed in sorted({r["seed"] for r in records}):
        for row in paired_differences([r for r in records if r["seed"] == seed]):
            out[(row["task"], row["solver"], row["guidance_multiplier"])][seed] = row["difference"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--figures", default=None, help="path prefix of the two figures")
    args = parser.parse_args(argv)
    records = load(args.folder)
    if not records:
        raise SystemExit(f"no records under {args.folder}")
    rows = paired_differences(records)
    seeds = per_seed(records)
    all_seeds = sorted({r["seed"] for r in records})
    print("| task | solver | x default | pairs | PSNR without | PSNR with | difference [95 % CI] | per seed | DSG better "
          "| 5th pct without / with | failed without / with |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        by_seed = seeds.get((r["task"], r["solver"], r["guidance_multiplier"]), {})
        seed_text = " / ".join(f"{by_seed[s]:+.2f}" if s in by_seed else "-" for s in all_seeds)
        ci = "" if math.isnan(r["ci_low"]) else f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        print(f"| {r['task']} | {r['solver']} | {r['guidance_multiplier']:g} | {r['pairs']} | {r['without_mean']:.2f} | {r['with_mean']:.2f} "
              f"| {r['difference']:+.2f}{ci} | {seed_text} | {r['better_share']:.0%} | {r['without_p05']:.2f} / {r['with_p05']:.2f} "
              f"| {r['without_failure_rate']:.0%} / {r['with_failure_rate']:.0%} |")

    print("\nEach side at its own best step (the multiplier with the highest mean PSNR, chosen on these images):\n")
    print("| task | TV | solver | best without (x) | best with (x) | with - without |")
    print("|---|---|---|---|---|---|")
    tv = defaultdict(list)
    for r in records:
        if r["solver"] == "tv" and r.get("psnr") is not None:
            tv[r["task"]].append(r["psnr"])
    for (task, solver) in sorted({(r["task"], r["solver"]) for r in rows}):
        cells = [r for r in rows if r["task"] == task and r["solver"] == solver]
        a = max(cells, key=lambda r: r["without_mean"])
        b = max(cells, key=lambda r: r["with_mean"])
        tv_text = f"{np.mean(tv[task]):.2f}" if tv.get(task) else "-"
        print(f"| {task} | {tv_text} | {solver} | {a['without_mean']:.2f} (x{a['guidance_multiplier']:g}) "
              f"| {b['with_mean']:.2f} (x{b['guidance_multiplier']:g}) | {b['with_mean'] - a['without_mean']:+.2f} |")

    seconds = defaultdict(list)
    for r in records:
        seconds[r["solver"]].append(float(r.get("seconds") or 0.0))
    cost = ", ".join(f"{s} {len(v)} items, {np.mean(v):.3f} s per image" for s, v in sorted(seconds.items()))
    print(f"\n{len(records)} items: {cost} (solver time per image of a batch, per core).")
    if args.figures:
        prefix = Path(args.figures)
        paired_figure(rows, prefix.with_name(prefix.name + "_paired.png"))
        robustness_figure(summarize(records), prefix.with_name(prefix.name + "_robustness.png"))
        print(f"wrote {prefix}_paired.png, {prefix}_robustness.png")


if __name__ == "__main__":
    main()

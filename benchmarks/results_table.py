"""Turn an evaluation's records.jsonl into the solver x task table of docs/results.md: mean of a
metric without and with DiffStateGrad (and the difference), seconds per image, failures.

    python benchmarks/results_table.py runs/table64/records.jsonl [--scale 1] [--metric psnr]
    python benchmarks/results_table.py runs/a/records.jsonl runs/b/records.jsonl --against tv

``--against tv``: one row per task and diffusion solver, PSNR / LPIPS without and with
DiffStateGrad beside the classical solver's, and whether the best diffusion result of the task
beats it (the targets of docs/results.md: LPIPS at least 0.03 lower, PSNR not lower).
"""

from __future__ import annotations

import argparse
import json

from diffstategrad.evaluate import summarize
from diffstategrad.records import guidance_multiplier


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--scale", type=float, default=1.0, help="guidance multiple to tabulate")
    parser.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "lpips"])
    parser.add_argument("--against", default=None, help="a classical solver to set every diffusion solver beside (e.g. tv)")
    args = parser.parse_args()
    records = []
    for path in args.records:
        with open(path) as f:
            records += [r for r in map(json.loads, f) if guidance_multiplier(r) == args.scale]
    rows = {(r["solver"], r["task"], bool(r["diffstategrad"])): r for r in summarize(records)}
    if args.against:
        return against(rows, args.against)
    m = args.metric
    print(f"| solver | task | n | {m.upper()} without | {m.upper()} with | difference | s / image (without, with) | failed (without, with) |")
    print("|---|---|---|---|---|---|---|---|")
    for s, t in sorted({k[:2] for k in rows}):
        a, b = rows.get((s, t, False)), rows.get((s, t, True))
        if a is None or b is None:
            continue
        ma, mb = a[f"{m}_mean"], b[f"{m}_mean"]
        fa, fb = round(a["failure_rate"] * a["n"]), round(b["failure_rate"] * b["n"])
        print(f"| {s} | {t} | {a['n']} | {ma:.2f} | {mb:.2f} | {mb - ma:+.2f} | {a['seconds_mean']:.1f}, {b['seconds_mean']:.1f} | {fa}, {fb} |")


def against(rows: dict, classical: str) -> None:
    print(f"| task | {classical} PSNR / LPIPS | solver | without: PSNR / LPIPS | with: PSNR / LPIPS | PSNR with - without | best diffusion beats {classical} |")
    print("|---|---|---|---|---|---|---|")
    for task in sorted({k[1] for k in rows}):
        base = rows.get((classical, task, False))
        if base is None:
            continue
        cells = [(s, rows.get((s, task, False)), rows.get((s, task, True))) for s in sorted({k[0] for k in rows if k[1] == task and k[0] != classical})]
        cells = [c for c in cells if c[1] is not None and c[2] is not None]
        results = [r for _, a, b in cells for r in (a, b)]
        wins = [r for r in results if r["lpips_mean"] <= base["lpips_mean"] - 0.03 and r["psnr_mean"] >= base["psnr_mean"]]
        best = min(wins or results, key=lambda r: r["lpips_mean"], default=None)  # a result that meets both, else the best LPIPS
        for i, (solver, a, b) in enumerate(cells):
            verdict = ""
            if i == 0 and best is not None:
                which = f"{best['solver']}{' + DSG' if best['diffstategrad'] else ''}"
                verdict = f"{'yes' if wins else 'no'} ({which}: LPIPS {best['lpips_mean'] - base['lpips_mean']:+.3f}, PSNR {best['psnr_mean'] - base['psnr_mean']:+.2f})"
            print(f"| {task if i == 0 else ''} | {base['psnr_mean']:.2f} / {base['lpips_mean']:.3f} | {solver} | {a['psnr_mean']:.2f} / {a['lpips_mean']:.3f} | "
                  f"{b['psnr_mean']:.2f} / {b['lpips_mean']:.3f} | {b['psnr_mean'] - a['psnr_mean']:+.2f} | {verdict} |")


if __name__ == "__main__":
    main()

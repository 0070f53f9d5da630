"""Turn an evaluation's records.jsonl into the solver x task table of docs/results.md: mean of a
metric without and with DiffStateGrad (and the difference), seconds per image, failures.

    python benchmarks/results_table.py runs/table64/records.jsonl [--scale 1] [--metric psnr]
"""

from __future__ import annotations

import argparse
import json

from diffstategrad.evaluate import summarize


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    parser.add_argument("--scale", type=float, default=1.0, help="guidance-scale multiple to tabulate")
    parser.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "lpips"])
    args = parser.parse_args()
    with open(args.records) as f:
        records = [r for r in map(json.loads, f) if float(r["guidance_scale"]) == args.scale]
    rows = {(r["solver"], r["task"], bool(r["diffstategrad"])): r for r in summarize(records)}
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


if __name__ == "__main__":
    main()

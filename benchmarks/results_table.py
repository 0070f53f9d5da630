"""Turn an evaluation's records.jsonl into the solver x task table of docs/results.md: mean PSNR
without and with DiffStateGrad (and the difference), seconds per image, failures.

    python benchmarks/results_table.py runs/table64/records.jsonl [--scale 1] [--metric psnr]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    parser.add_argument("--scale", type=float, default=1.0, help="guidance-scale multiple to tabulate")
    parser.add_argument("--metric", default="psnr")
    args = parser.parse_args()
    cells = defaultdict(list)
    for line in open(args.records):
        r = json.loads(line)
        if float(r["guidance_scale"]) == args.scale:
            cells[(r["solver"], r["task"], bool(r["diffstategrad"]))].append(r)
    solvers = sorted({k[0] for k in cells})
    tasks = sorted({k[1] for k in cells})
    m = args.metric
    print(f"| solver | task | n | {m.upper()} without | {m.upper()} with | difference | s / image (without, with) | failed (without, with) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in solvers:
        for t in tasks:
            a, b = cells.get((s, t, False), []), cells.get((s, t, True), [])
            if not a or not b:
                continue
            va = [r[m] for r in a if r.get(m) is not None]
            vb = [r[m] for r in b if r.get(m) is not None]
            ma, mb = statistics.fmean(va), statistics.fmean(vb)
            ta, tb = statistics.fmean(r["seconds"] for r in a), statistics.fmean(r["seconds"] for r in b)
            fa, fb = sum(bool(r["failed"]) for r in a), sum(bool(r["failed"]) for r in b)
            print(f"| {s} | {t} | {len(a)} | {ma:.2f} | {mb:.2f} | {mb - ma:+.2f} | {ta:.1f}, {tb:.1f} | {fa}, {fb} |")


if __name__ == "__main__":
    main()

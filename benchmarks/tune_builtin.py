"""Tune the guidance scale of every solver for the built-in models (configs/solvers.yaml, the
``builtin`` blocks).

For each solver and task, ``diffstategrad evaluate`` runs the solver without DiffStateGrad (or,
with ``--diffstategrad with``, with it: the values for the profile's ``with_diffstategrad``
block) at multiples of its current plain built-in default on the
*tuning* photographs (64x64; the ``tune`` split of ``diffstategrad data build``, never the
held-out ``val`` images results are reported on: the script refuses those), and the multiple
with the best mean PSNR wins. It prints the resulting ``builtin`` task entries as YAML, ready
to paste into configs/solvers.yaml, and keeps every record in --out.

    python benchmarks/tune_builtin.py --images data/photos/tune --limit-images 2 --out runs/tune \
        --multipliers 0.3,1,3,10 --workers 2

Re-running resumes (the evaluation records are resumable).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

from click.testing import CliRunner

from diffstategrad.cli import main as cli
from diffstategrad.data import VALIDATION_IMAGES
from diffstategrad.operators import list_tasks
from diffstategrad.presets import solver_defaults
from diffstategrad.records import guidance_multiplier
from diffstategrad.solvers import SOLVERS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="data/photos/tune", help="a folder of tuning photographs (held-out names are refused)")
    parser.add_argument("--diffstategrad", choices=("without", "with"), default="without", help="tune the solver without or with the projector")
    parser.add_argument("--limit-images", type=int, default=2, help="use the first N images (sorted by name)")
    parser.add_argument("--solvers", default=",".join(sorted(SOLVERS)))
    parser.add_argument("--tasks", default=",".join(t for t in list_tasks() if t != "nonlinear_deblur"))
    parser.add_argument("--multipliers", default="0.3,1,3,10")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = out / "images"
    if not subset.exists():
        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.limit_images]
        subset.mkdir()
        for f in files:
            shutil.copy(f, subset / f.name)
    held_out = sorted(f.name for f in subset.iterdir() if f.stem in VALIDATION_IMAGES)
    if held_out:  # checked on the copies too: a folder left by an earlier run is not trusted
        raise SystemExit(f"tune_builtin.py: {', '.join(held_out)} are held-out images (results are reported on them); tune on data/photos/tune")
    best = {}
    for solver in args.solvers.split(","):
        run_dir = out / (solver if args.diffstategrad == "without" else f"{solver}-with-dsg")
        result = CliRunner().invoke(
            cli,
            ["evaluate", "--images", str(subset), "--tasks", args.tasks, "--solvers", solver, "--guidance-scales", args.multipliers,
             "--seeds", "0", "--size", str(args.size), "--diffstategrad", args.diffstategrad, "--dsg-defaults", "shared", "--workers", str(args.workers), "--out", str(run_dir), "--quiet"],
            catch_exceptions=False,
        )
        if result.exit_code not in (0, 3):  # 3: some items diverged (recorded, and scored as such)
            raise SystemExit(f"evaluate failed for {solver}: {result.output}")
        scores = defaultdict(list)
        for line in (run_dir / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["diffstategrad"] == (args.diffstategrad == "with"):
                scores[(r["task"], guidance_multiplier(r))].append(r["psnr"] if r["psnr"] is not None else float("-inf"))
        for task in args.tasks.split(","):
            cands = {m: sum(v) / len(v) for (t, m), v in scores.items() if t == task}
            m_best = max(cands, key=cands.get)
            value = solver_defaults(solver, task, "builtin")["guidance_scale"] * m_best
            best[(solver, task)] = (value, m_best, cands)
    where = "builtin.tasks" if args.diffstategrad == "without" else "builtin.with_diffstategrad.tasks"
    print(f"# paste into configs/solvers.yaml, under each solver's {where} (multiples of the plain builtin value)")
    for solver in args.solvers.split(","):
        print(f"{solver}:")
        for task in args.tasks.split(","):
            value, m, cands = best[(solver, task)]
            edge = " (at the edge of the grid)" if m in (min(cands), max(cands)) else ""
            trail = ", ".join(f"x{k:g}: {v:.2f}" for k, v in sorted(cands.items()))
            print(f"    {task}: {{guidance_scale: {value:.3g}}}  # best x{m:g}{edge}; PSNR {trail}")


if __name__ == "__main__":
    main()

"""Choose the base guidance value of each solver for the exact-posterior benchmark.

Runs the benchmark WITHOUT DiffStateGrad on tuning draws (``--seed 1000``: other ground truths,
operators, noise and solver seeds than the reported run's seed 0), with fewer measurements and
samples, at multiples of each solver's current base value, and prints, per solver, the
multiple with the smallest sliced Wasserstein distance to the exact posterior (in units of the
noise floor) averaged over shapes, tasks and noise levels, with the per-cell values.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/tune_posterior.py --out runs/tune-posterior
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from diffstategrad.posterior_benchmark.report import to_json
from diffstategrad.posterior_benchmark.run import BenchmarkConfig, run_benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default="dps,daps")
    parser.add_argument("--multipliers", default="0.03,0.1,0.3,1,3,10")
    parser.add_argument("--measurements", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="runs/tune-posterior")
    args = parser.parse_args()
    cfg = BenchmarkConfig(solvers=tuple(args.solvers.split(",")), multipliers=tuple(float(m) for m in args.multipliers.split(",")),
                          measurements=args.measurements, samples=args.samples, seed=args.seed, projector_modes=(False,))
    results = run_benchmark(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(to_json(results) + "\n")
    ratios = defaultdict(list)
    for r in results["records"]:
        ratios[(r["solver"], r["multiplier"])].append(r["sw_ratio"])
    for solver in cfg.solvers:
        means = {m: sum(ratios[(solver, m)]) / len(ratios[(solver, m)]) for m in cfg.multipliers}
        best = min(means, key=means.get)
        print(f"{solver}: best multiple x{best:g} of the current base; mean SW / floor per multiple: "
              + json.dumps({f"x{m:g}": round(v, 2) for m, v in means.items()}))


if __name__ == "__main__":
    main()

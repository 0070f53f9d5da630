"""Tune the classical baselines' regularisation per task preset on the TUNING photographs.

    DIFFSTATEGRAD_DATA=data/photos python benchmarks/tune_classical.py [--size 64] [--json out.json]
    python benchmarks/tune_classical.py --fashion 64 --tasks box_inpainting,gaussian_deblur   # Fashion-MNIST

For every task: ``tv``'s lam over a log grid (300 primal-dual iterations) and, for linear
operators, ``pseudo-inverse``'s mu (200 CG iterations), on the tuning split (data.TUNING_IMAGES,
never the held-out photographs; with ``--fashion N`` the first N Fashion-MNIST *training* images
at 32x32, never the test split), one operator / noise seed per image (seed = its index), the
task preset's own noise. The value with the best mean PSNR wins; the script prints the
``tasks:`` entries for configs/solvers.yaml. The grids' edges are reported, so a winner at an
edge is visible.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

TV_LAMS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
PINV_MUS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def main(argv=None) -> int:
    from diffstategrad import load_task, solve
    from diffstategrad.data import default_data_dir
    from diffstategrad.metrics import psnr
    from diffstategrad.operators.tasks import list_tasks
    from diffstategrad.images import load_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tasks", default=",".join(list_tasks()))
    ap.add_argument("--json", default=None)
    ap.add_argument("--fashion", type=int, default=0, help="tune on the first N Fashion-MNIST training images (32x32) instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.fashion:
        from diffstategrad.data import gray_to_model_range, load_fashion_mnist

        x = gray_to_model_range(load_fashion_mnist("train")[: args.fashion])
        images = [f"fashion-train-{i}" for i in range(args.fashion)]
        args.size = 32
    else:
        files = sorted((default_data_dir() / "tune").glob("*.png"))
        if not files:
            sys.exit(f"no tuning images in {default_data_dir()}/tune: run `python -m diffstategrad.data build`")
        images = [f.stem for f in files]
        x = torch.cat([load_image(f, args.size).image for f in files])
    seeds = list(range(x.shape[0]))
    print(f"{len(seeds)} tuning images: {', '.join(images[:8])} at {args.size}x{args.size}", file=sys.stderr)
    results = {}
    for task in args.tasks.split(","):
        problem = load_task(task).build(tuple(x.shape[1:]), seeds=seeds)
        y = problem.measure(x)
        rows = {}
        for name, key, grid, steps in (("tv", "lam", TV_LAMS, 300), ("pseudo-inverse", "mu", PINV_MUS, 200)):
            scores = {}
            for value in grid:
                try:
                    r = solve(name, None, problem.operator, y, shape=tuple(x.shape[1:]), seeds=seeds, steps=steps, **{key: value})
                except ValueError:  # pseudo-inverse on a nonlinear operator
                    break
                scores[value] = float(psnr(r.x.clamp(-1, 1), x).mean())
            if scores:
                best = max(scores, key=scores.get)
                edge = best in (grid[0], grid[-1])
                rows[name] = {"key": key, "best": best, "psnr": scores[best], "scores": scores, "at_grid_edge": edge}
                print(f"{task:18s} {name:15s} {key}={best:g}  PSNR {scores[best]:.2f}" + ("  (grid edge)" if edge else "")
                      + "   " + " ".join(f"{v:g}:{s:.2f}" for v, s in scores.items()), file=sys.stderr)
        results[task] = rows
    for name in ("tv", "pseudo-inverse"):
        print(f"{name}:\n  tasks:")
        for task, rows in results.items():
            if name in rows:
                r = rows[name]
                print(f"    {task}: {{{r['key']}: {r['best']:g}}}  # tuning PSNR {r['psnr']:.2f}" + (" (grid edge)" if r["at_grid_edge"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": args.size, "images": list(images), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

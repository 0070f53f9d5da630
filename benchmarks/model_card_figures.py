"""Figures for docs/models.md: training loss curves and unconditional sample grids of the
built-in models.

    python benchmarks/model_card_figures.py --runs runs/gpu/runs --out docs/images

--runs holds the run folders of scripts/train_builtin_gpu.sh (pixel/, autoencoder/, latent/,
each with loss.csv). Samples: 16 images of 64x64 per model, DDPM with 250 steps, seeds 0..15.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch


def loss_curves(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pixel", "pixel prior: epsilon MSE"), ("autoencoder", "autoencoder: L1 + MSE (+ KL)"), ("latent", "latent prior: epsilon MSE")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (name, title) in zip(axes, panels):
        rows = list(csv.DictReader(open(runs / name / "loss.csv")))
        steps = [int(r["step"]) for r in rows]
        ax.plot(steps, [float(r["loss"]) for r in rows], color="tab:gray", alpha=0.5, label="batch")
        ax.plot(steps, [float(r["loss_smoothed"]) for r in rows], color="tab:blue", label="smoothed")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if "psnr" in rows[0]:
            twin = ax.twinx()
            twin.plot(steps, [float(r["psnr"]) for r in rows], color="tab:red", label="train PSNR (dB)")
            twin.set_ylabel("PSNR (dB)", color="tab:red")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "training_loss.png", dpi=110)
    plt.close(fig)


def sample_grids(out: Path) -> None:
    from diffstategrad.images import to_pil
    from diffstategrad.priors import load_prior
    from diffstategrad.solvers.sample import sample

    for name, source in (("pixel", "builtin"), ("latent", "builtin-latent")):
        prior = load_prior(source)
        images = sample(prior, (3, 64, 64), steps=250, seeds=range(16), progress=True).clamp(-1, 1)
        grid = images.reshape(4, 4, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, 256, 256)
        to_pil(grid).resize((512, 512), resample=0).save(out / f"samples_{name}.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/gpu/runs")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    loss_curves(Path(args.runs), out)
    sample_grids(out)


if __name__ == "__main__":
    main()

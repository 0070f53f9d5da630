"""Quality of a Fashion-MNIST prior: one-step denoising on held-out test images against tuned
classical denoisers, and an unconditional sample grid.

    python benchmarks/fashion_quality.py src/diffstategrad/weights/fashion   # the shipped model
    python benchmarks/fashion_quality.py runs/fashion                        # a run folder (EMA weights)
    python benchmarks/fashion_quality.py runs/fashion --which model          # its raw weights
    python benchmarks/fashion_quality.py MODEL --grid docs/images/samples_fashion.png --json out.json

Protocol: the first ``--images`` images of a fixed permutation of the 10,000 test images (never
trained on), padded to 32x32, in [-1, 1]; y = x0 + sigma * n with one fixed noise draw per image
and level; the prior's estimate is its one-step Tweedie estimate ``DiffusionPrior.denoise`` at
the timestep whose sigma is nearest; baselines are scikit-image's TV (Chambolle) and wavelet
(BayesShrink) denoisers, each with its strength tuned for the best mean PSNR on the same images
(optimistic for the baselines). PSNR with peak-to-peak 2 on [-1, 1] (= PSNR on [0, 1]), outputs
clipped to the range. The sample grid: DDPM ancestral sampling, ``--grid-steps`` steps, seeds 0..N-1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

SIGMAS = (0.1, 0.2, 0.5, 1.0)
TV_WEIGHTS = (0.25, 0.4, 0.55, 0.75, 1.0, 1.35, 1.8, 2.4, 3.2)  # x sigma in [0, 1] units
WAVELET_SIGMA_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    mse = float(np.mean((np.clip(estimate, -1, 1) - clean) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def test_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32) float64 in [-1, 1]: a fixed subset of the held-out test split."""
    from diffstategrad.data import load_fashion_mnist

    images = load_fashion_mnist("test")
    idx = np.random.default_rng([seed, 0x7E57]).permutation(len(images))[:n]
    return images[idx].astype(np.float64) / 127.5 - 1.0


def tune(clean: np.ndarray, noisy: np.ndarray, sigma: float) -> dict:
    from skimage.restoration import denoise_tv_chambolle, denoise_wavelet

    s01 = sigma / 2

    def score(fn):
        return float(np.mean([psnr(2 * fn((n + 1) / 2) - 1, c) for n, c in zip(noisy, clean)]))

    tv = {w: score(lambda n, w=w: denoise_tv_chambolle(n, weight=w * s01)) for w in TV_WEIGHTS}
    wav = {(k, wv): score(lambda n, k=k, wv=wv: denoise_wavelet(n, sigma=k * s01, wavelet=wv, mode="soft", method="BayesShrink",
                                                                 rescale_sigma=True))
           for k in WAVELET_SIGMA_SCALES for wv in ("db1", "sym4")}
    tv_best, wav_best = max(tv, key=tv.get), max(wav, key=wav.get)
    return {"tv": tv[tv_best], "tv_weight_over_sigma": tv_best, "wavelet": wav[wav_best], "wavelet_setting": list(wav_best)}


def load_prior(path: str, which: str = "ema"):
    """The prior of a shipped / converted folder, or of a run folder (EMA or raw weights)."""
    from diffstategrad.priors.builtin import BuiltinPixelPrior
    from diffstategrad.priors.converted import load_converted
    from diffstategrad.schedules import make_schedule
    from diffstategrad.training import load_checkpoint_model

    p = Path(path)
    if (p / "config.json").is_file():
        return load_converted(p).eval(), {"source": str(p)}
    net, summary = load_checkpoint_model(p, which=which)
    s = summary["settings"]
    prior = BuiltinPixelPrior(net.config, make_schedule(s["schedule"], s["num_timesteps"]), {},
                              {"kind": s.get("preconditioning", "none"), "sigma_data": s.get("sigma_data", 0.5)})
    prior.unet.load_state_dict(net.state_dict())
    return prior.eval(), {"source": str(p), "which": which, "step": summary["step"], "images_seen": summary["images_seen"]}


@torch.no_grad()
def denoise(prior, noisy: np.ndarray, sigma: float, batch: int = 250) -> np.ndarray:
    out = []
    for i in range(0, len(noisy), batch):
        y = torch.from_numpy(noisy[i:i + batch]).unsqueeze(1).float()
        out.append(prior.denoise(y, sigma)[:, 0].double().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--which", choices=["ema", "model"], default="ema", help="run folders: EMA or raw weights")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--grid", default=None, help="write an unconditional sample grid (PNG) here")
    ap.add_argument("--grid-count", type=int, default=64)
    ap.add_argument("--grid-steps", type=int, default=250)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prior, info = load_prior(args.model, args.which)
    clean = test_images(args.images)
    rows = []
    print(f"{'sigma':>5} {'noisy':>6} {'TV':>6} {'wavelet':>7} {'prior':>6}")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        rng = np.random.default_rng([0, int(round(sigma * 1000))])
        noisy = clean + sigma * rng.standard_normal(clean.shape)
        row = {"sigma": sigma, "images": len(clean), "noisy": float(np.mean([psnr(n, c) for n, c in zip(noisy, clean)])),
               "prior": float(np.mean([psnr(e, c) for e, c in zip(denoise(prior, noisy, sigma), clean)]))}
        if not args.no_baselines:
            row.update(tune(clean, noisy, sigma))
        rows.append(row)
        print(f"{sigma:5.2f} {row['noisy']:6.2f} {row.get('tv', float('nan')):6.2f} {row.get('wavelet', float('nan')):7.2f} {row['prior']:6.2f}",
              flush=True)
    if args.grid:
        from diffstategrad.images import to_pil
        from diffstategrad.solvers.sample import sample

        x = sample(prior, (1, 32, 32), steps=args.grid_steps, seeds=list(range(args.grid_count)), progress=True)
        side = int(np.ceil(np.sqrt(args.grid_count)))
        x = torch.cat([x, -torch.ones(side * side - len(x), *x.shape[1:])])
        grid = x.reshape(side, side, 1, 32, 32).permute(2, 0, 3, 1, 4).reshape(1, 1, side * 32, side * 32)
        to_pil(grid.clamp(-1, 1)).resize((side * 64, side * 64), resample=0).save(args.grid)
        print(f"wrote {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

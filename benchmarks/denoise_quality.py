"""One-step denoising quality of a pixel prior against tuned classical denoisers.

    python benchmarks/denoise_quality.py runs/pixel                 # a run folder (EMA weights of checkpoint.pt)
    python benchmarks/denoise_quality.py path/to/pixel.safetensors  # an exported model
    python benchmarks/denoise_quality.py src/diffstategrad/weights/pixel  # a shipped (converted) folder
    python benchmarks/denoise_quality.py runs/pixel --json out.json --data data/photos

Protocol (issue 3's quality bar):
- crops at the original resolution of the held-out images (``val`` split of the prepared
  dataset): ``--crops-64`` 64x64 and ``--crops-256`` 256x256 crops per image, at positions
  drawn from ``--seed``;
- noise levels sigma in [-1, 1] units: y = x0 + sigma * n, n ~ N(0, I) (one fixed draw per crop
  and level, the same for every method);
- the prior's estimate is its one-step Tweedie estimate x0(x_t, t) via
  ``DiffusionPrior.denoise``: t is the discrete timestep whose sigma_t = sqrt((1 - a_t) / a_t)
  is nearest to sigma in log space, and x_t = sqrt(a_t) * y. (With the linear 1000-step schedule
  neighbouring timesteps differ by < 4% in sigma here, so the noise level the network sees is
  within 2% of its nominal one; no interpolation between timesteps.)
- baselines: scikit-image's ``denoise_tv_chambolle`` (weight) and ``denoise_wavelet``
  (BayesShrink, soft thresholding; noise-sigma multiplier, wavelet and YCbCr conversion), each
  tuned per (size, sigma) for the best mean PSNR on these same crops -- an optimistic setting for
  the baselines. Their results do not depend on the model and are cached (``--baseline-cache``).
- PSNR on [-1, 1] with peak-to-peak 2 (= PSNR on [0, 1]), outputs clipped to the range, mean
  over crops. The bar: prior >= best baseline + 1.0 dB at every level and size.

Runs on one thread at low priority so that it does not disturb a training run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIGMAS = (0.1, 0.2, 0.4)
TV_WEIGHTS = (0.4, 0.55, 0.75, 1.0, 1.35, 1.8, 2.4)  # x sigma in [0, 1] units
WAVELET_SIGMA_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)
WAVELETS = ("db1", "sym4")
MARGIN_DB = 1.0


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in dB of arrays in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.clip(estimate, -1, 1) - clean) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def held_out_crops(data: str, size: int, per_image: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """(N, size, size, 3) float64 crops in [-1, 1] of the val images at native resolution."""
    from diffstategrad.data import load_split

    images = load_split(data, "val")
    crops, labels = [], []
    for k, name in enumerate(sorted(images)):
        img = images[name]
        H, W = img.shape[:2]
        if min(H, W) < size:
            raise ValueError(f"held-out image {name} ({H}x{W}) is smaller than {size}")
        rng = np.random.default_rng([seed, k, size])
        for _ in range(per_image):
            y, x = int(rng.integers(H - size + 1)), int(rng.integers(W - size + 1))
            crops.append(img[y:y + size, x:x + size].astype(np.float64) / 127.5 - 1.0)
            labels.append(f"{name}@{y},{x}")
    return np.stack(crops), labels


def noisy_versions(crops: np.ndarray, sigma: float, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, size, int(round(sigma * 1000)), 7])
    return crops + sigma * rng.standard_normal(crops.shape)


# -- classical baselines ------------------------------------------------------------------------


def _tv(noisy01: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy01, weight=weight, channel_axis=-1)


def _wavelet(noisy01: np.ndarray, sigma01: float, wavelet: str, ycbcr: bool) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(noisy01, sigma=sigma01, wavelet=wavelet, mode="soft", method="BayesShrink",
                           convert2ycbcr=ycbcr, channel_axis=-1, rescale_sigma=True)


def tune_baselines(crops: np.ndarray, noisy: np.ndarray, sigma: float) -> dict:
    """Best mean PSNR of TV and wavelet over their grids (images handed to skimage in [0, 1])."""
    sigma01 = sigma / 2
    clean = crops
    noisy01 = (noisy + 1) / 2

    def score(fn) -> float:
        return float(np.mean([psnr(2 * fn(n) - 1, c) for n, c in zip(noisy01, clean)]))

    tv = {w: score(lambda n, w=w: _tv(n, w * sigma01)) for w in TV_WEIGHTS}
    wav = {
        (s, wv, yc): score(lambda n, s=s, wv=wv, yc=yc: _wavelet(n, s * sigma01, wv, yc))
        for s in WAVELET_SIGMA_SCALES for wv in WAVELETS for yc in (False, True)
    }
    tv_best = max(tv, key=tv.get)
    wav_best = max(wav, key=wav.get)
    edge = []
    if tv_best in (TV_WEIGHTS[0], TV_WEIGHTS[-1]):
        edge.append("tv")
    if wav_best[0] in (WAVELET_SIGMA_SCALES[0], WAVELET_SIGMA_SCALES[-1]):
        edge.append("wavelet")
    return {
        "tv": {"psnr": tv[tv_best], "weight": tv_best * sigma01, "weight_over_sigma": tv_best},
        "wavelet": {"psnr": wav[wav_best], "sigma_scale": wav_best[0], "wavelet": wav_best[1], "ycbcr": wav_best[2]},
        "best_at_grid_edge": edge,
    }


def cached_baselines(crops: np.ndarray, labels: list[str], noisy: np.ndarray, size: int, sigma: float, seed: int,
                     cache_path: Path, cache: dict | None = None) -> dict:
    """``tune_baselines`` for these crops and level, through the JSON cache at ``cache_path``
    (keyed by the crops, the level, the seed and the tuning grids)."""
    cache_path = Path(cache_path)
    if cache is None:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    key = hashlib.sha256(json.dumps([labels, size, sigma, seed, TV_WEIGHTS, WAVELET_SIGMA_SCALES, WAVELETS,
                                     hashlib.sha256(crops.tobytes()).hexdigest()]).encode()).hexdigest()[:16]
    if key not in cache:
        cache[key] = tune_baselines(crops, noisy, sigma)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[key]


# -- the prior ----------------------------------------------------------------------------------


def load_prior_from(path: str):
    """A DiffusionPrior around the UNet of a run folder, a checkpoint.pt, an exported
    .safetensors or a converted (shipped) folder."""
    from diffstategrad.priors.base import DiffusionPrior, as_timesteps
    from diffstategrad.schedules import make_schedule
    from diffstategrad.training import load_checkpoint_model, load_exported

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        from diffstategrad.priors.converted import load_converted

        prior = load_converted(p)
        if prior.kind != "pixel":
            raise ValueError(f"{p} holds a {prior.kind} prior; use benchmarks/latent_quality.py")
        info = getattr(prior, "info", {})
        return prior.eval(), {"source": str(p), "step": info.get("steps"), "images_seen": info.get("images_seen")}
    if p.suffix == ".safetensors":
        net, record = load_exported(p)
        schedule = make_schedule(record["schedule"]["name"], record["schedule"]["num_timesteps"])
        info = {"source": str(p), "step": record["training"]["steps"], "images_seen": record["training"]["images_seen"]}
    else:
        rundir = p.parent if p.is_file() else p
        net, summary = load_checkpoint_model(rundir)
        schedule = make_schedule(summary["settings"]["schedule"], summary["settings"]["num_timesteps"])
        info = {"source": str(rundir / "checkpoint.pt"), "step": summary["step"], "images_seen": summary["images_seen"]}

    class UNetPrior(DiffusionPrior):
        def __init__(self):
            super().__init__(schedule, 3)
            self.net = net

        def eps(self, x_t, t):
            return self.net(x_t, as_timesteps(t, x_t.shape[0], x_t.device))

    return UNetPrior().eval(), info


@torch.no_grad()
def prior_denoise(prior, noisy: np.ndarray, sigma: float, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(noisy), batch):
        y = torch.from_numpy(noisy[i:i + batch]).permute(0, 3, 1, 2).float()
        out.append(prior.denoise(y, sigma).permute(0, 2, 3, 1).double().numpy())
    return np.concatenate(out)


# -- main ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="run folder, checkpoint.pt or exported .safetensors (omit with --baselines-only)")
    ap.add_argument("--data", default="data/photos", help="prepared dataset (its val split is used)")
    ap.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    ap.add_argument("--crops-64", type=int, default=8, help="64x64 crops per held-out image")
    ap.add_argument("--crops-256", type=int, default=2, help="256x256 crops per held-out image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--baseline-cache", default="runs/denoise_baselines.json")
    ap.add_argument("--baselines-only", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(args.threads)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    sizes = {64: args.crops_64, 256: args.crops_256}

    cache_path = Path(args.baseline_cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    prior, info = (None, {})
    if not args.baselines_only:
        if not args.model:
            ap.error("give a model, or --baselines-only")
        prior, info = load_prior_from(args.model)
        print(f"model: {info['source']} (step {info['step']}, {info['images_seen']} images seen)")

    rows = []
    for size, per_image in sizes.items():
        if per_image <= 0:
            continue
        crops, labels = held_out_crops(args.data, size, per_image, args.seed)
        for sigma in sigmas:
            noisy = noisy_versions(crops, sigma, args.seed, size)
            t0 = time.time()
            base = cached_baselines(crops, labels, noisy, size, sigma, args.seed, cache_path, cache)
            row = {"size": size, "sigma": sigma, "crops": len(crops),
                   "noisy": float(np.mean([psnr(n, c) for n, c in zip(noisy, crops)])),
                   "tv": base["tv"], "wavelet": base["wavelet"], "baseline_at_grid_edge": base["best_at_grid_edge"]}
            best = max(base["tv"]["psnr"], base["wavelet"]["psnr"])
            if prior is not None:
                est = prior_denoise(prior, noisy, sigma, batch=64 if size <= 64 else 4)
                row["prior"] = float(np.mean([psnr(e, c) for e, c in zip(est, crops)]))
                row["timestep"] = int(prior.nearest_timestep(sigma))
                row["margin"] = row["prior"] - best
            rows.append(row)
            print(f"  done {size}px sigma {sigma} in {time.time() - t0:.0f}s", file=sys.stderr)

    head = f"{'size':>5} {'sigma':>5} {'noisy':>6} {'TV':>6} {'wavelet':>7} {'prior':>6} {'t':>4} {'margin':>6}  bar"
    print(head)
    ok = True
    for r in rows:
        prior_s = f"{r['prior']:6.2f}" if "prior" in r else "     -"
        t_s = f"{r['timestep']:4d}" if "timestep" in r else "   -"
        margin_s = f"{r['margin']:+6.2f}" if "margin" in r else "     -"
        passed = "margin" in r and r["margin"] >= MARGIN_DB
        ok &= passed
        print(f"{r['size']:>5} {r['sigma']:>5} {r['noisy']:6.2f} {r['tv']['psnr']:6.2f} {r['wavelet']['psnr']:7.2f} "
              f"{prior_s} {t_s} {margin_s}  {'pass' if passed else ('-' if 'margin' not in r else 'MISS')}")
    print("baseline settings: " + "; ".join(
        f"{r['size']}px/{r['sigma']}: TV w={r['tv']['weight']:.3f}, wavelet {r['wavelet']['wavelet']} "
        f"x{r['wavelet']['sigma_scale']} ycbcr={r['wavelet']['ycbcr']}" for r in rows))
    edges = [f"{r['size']}px/{r['sigma']}:{','.join(r['baseline_at_grid_edge'])}" for r in rows if r["baseline_at_grid_edge"]]
    if edges:
        print("warning: baseline optimum at the edge of its grid (widen it): " + " ".join(edges))
    if prior is not None:
        print(f"bar (prior >= best baseline + {MARGIN_DB} dB everywhere): {'PASSED' if ok else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info, "rows": rows, "margin_db": MARGIN_DB, "passed": bool(ok and prior is not None)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

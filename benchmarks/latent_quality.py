"""Quality of a latent prior: autoencoder reconstruction and the decoded one-step x0 estimate,
against the tuned classical denoisers of benchmarks/denoise_quality.py.

    python benchmarks/latent_quality.py runs/gpu/export/latent            # a converted (shipped) latent folder
    python benchmarks/latent_quality.py src/diffstategrad/weights/latent --json out.json --data data/photos

Crops: exactly those of ``denoise_quality.py`` (its ``held_out_crops``: ``--crops-64`` 64x64 and
``--crops-256`` 256x256 crops per held-out image at native resolution, positions from
``--seed``), and the same noise draws (``noisy_versions``), so the cached baseline results
(``--baseline-cache``, shared with that script through ``cached_baselines``) apply unchanged.

(a) Reconstruction: PSNR of decode(encode(x)) on the clean crops. Bar: >= 25 dB.

(b) Denoising at sigma = 0.2 in [-1, 1] units (``--sigmas``). The issue states the bar in image
space, so the latent prior gets the same input as the baselines:

  1. y = x + sigma * n, the very noisy image TV and wavelet get;
  2. z_y = encode(y) (scaled latents, as the solvers see them);
  3. z_y is read as z_0 + sigma_z * eps, where sigma_z(sigma) -- the latent noise level that image
     noise sigma turns into -- is a property of the model, measured once on fixed *training*
     crops (never the held-out ones): the RMS over all latent elements of
     encode(x + sigma n) - encode(x) (``--calib-crops`` crops of ``--calib-size`` px);
  4. the estimate is decode(D(z_y, sigma_z)), D the prior's one-step Tweedie denoiser
     (``DiffusionPrior.denoise``: the timestep whose sigma_t = sqrt((1 - a_t) / a_t) is nearest to
     sigma_z, x_t = sqrt(a_t) z_y), clipped to [-1, 1].

  Bar: that PSNR beats the better of the tuned TV / wavelet baselines (margin > 0).

  Two more columns, for diagnosis only: ``AE(y)`` = decode(encode(y)), the autoencoder alone on
  the noisy image; ``gauss`` = decode(D(encode(x) + sigma_z * eps, sigma_z)), the latent model's
  own denoising when the latent noise is exactly the white Gaussian noise it was trained on (an
  upper reference: it starts from the clean image's latent).

PSNR on [-1, 1] with peak-to-peak 2, mean over crops (``denoise_quality.psnr``). One thread, low
priority, so that it can run beside a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise_quality as dq  # noqa: E402  (the crops, noise, PSNR and baselines of the pixel benchmark)

RECONSTRUCTION_BAR_DB = 25.0
SIGMAS = (0.2,)


def _to_torch(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


def _to_numpy(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).double().numpy()


def _batched(fn, array: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(array[i:i + batch]) for i in range(0, len(array), batch)])


@torch.no_grad()
def measure_latent_sigma(prior, data: str, sigma: float, crops: int, size: int, seed: int) -> float:
    """RMS of encode(x + sigma n) - encode(x) over fixed training crops (scaled latent units)."""
    from diffstategrad.data import RandomCrops

    ds = RandomCrops(data, "train", size=size, seed=seed + 7919)
    x = ds.batch(0, crops)
    gen = torch.Generator().manual_seed(seed + int(round(sigma * 1000)))
    n = torch.randn(x.shape, generator=gen)
    diffs = [prior.encode(x[i:i + 16] + sigma * n[i:i + 16]) - prior.encode(x[i:i + 16]) for i in range(0, crops, 16)]
    return float(torch.cat(diffs).double().square().mean().sqrt())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a converted latent folder (config.json + model.safetensors)")
    ap.add_argument("--data", default="data/photos", help="prepared dataset (val: the crops; train: the sigma_z calibration)")
    ap.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    ap.add_argument("--crops-64", type=int, default=8, help="64x64 crops per held-out image")
    ap.add_argument("--crops-256", type=int, default=2, help="256x256 crops per held-out image")
    ap.add_argument("--calib-crops", type=int, default=64, help="training crops for measuring sigma_z")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--baseline-cache", default="runs/denoise_baselines.json")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(args.threads)
    from diffstategrad.priors import load_prior

    prior = load_prior("converted", args.model)
    if prior.kind != "latent":
        ap.error(f"{args.model} holds a {prior.kind} prior; use benchmarks/denoise_quality.py")
    info = dict(getattr(prior, "info", {}))
    print(f"model: {args.model} ({info.get('parameters', '?')} parameters, step {info.get('steps', '?')}, "
          f"scale factor {getattr(prior, 'scale_factor', float('nan')):.4f})")
    sigmas = [float(s) for s in args.sigmas.split(",")]
    sigma_z = {s: measure_latent_sigma(prior, args.data, s, args.calib_crops, args.calib_size, args.seed) for s in sigmas}
    print("latent noise level per image noise level: " + ", ".join(
        f"sigma {s} -> sigma_z {z:.4f} (t = {int(prior.nearest_timestep(z))})" for s, z in sigma_z.items()))

    @torch.no_grad()
    def encode(b):
        return prior.encode(_to_torch(b))

    @torch.no_grad()
    def decode(z):
        return _to_numpy(prior.decode(z))

    recon_rows, rows = [], []
    for size, per_image in ((64, args.crops_64), (256, args.crops_256)):
        if per_image <= 0:
            continue
        t0 = time.time()
        batch = 16 if size <= 64 else 2
        crops, labels = dq.held_out_crops(args.data, size, per_image, args.seed)
        rec = _batched(lambda b: decode(encode(b)), crops, batch)
        recon = float(np.mean([dq.psnr(r, c) for r, c in zip(rec, crops)]))
        recon_rows.append({"size": size, "crops": len(crops), "psnr": recon, "passed": recon >= RECONSTRUCTION_BAR_DB})
        for sigma in sigmas:
            noisy = dq.noisy_versions(crops, sigma, args.seed, size)
            base = dq.cached_baselines(crops, labels, noisy, size, sigma, args.seed, Path(args.baseline_cache))
            best = max(base["tv"]["psnr"], base["wavelet"]["psnr"])
            sz = sigma_z[sigma]
            gen = torch.Generator().manual_seed(args.seed * 1000 + size + int(round(sigma * 1000)))

            def primary(b):
                return decode(prior.denoise(encode(b), sz))

            def gauss(b):
                z = encode(b)
                return decode(prior.denoise(z + sz * torch.randn(z.shape, generator=gen), sz))

            estimates = {
                "latent": _batched(primary, noisy, batch),
                "ae_noisy": _batched(lambda b: decode(encode(b)), noisy, batch),
                "gauss": _batched(gauss, crops, batch),
            }
            scores = {k: float(np.mean([dq.psnr(e, c) for e, c in zip(v, crops)])) for k, v in estimates.items()}
            rows.append({
                "size": size, "sigma": sigma, "crops": len(crops), "sigma_z": sz, "timestep": int(prior.nearest_timestep(sz)),
                "noisy": float(np.mean([dq.psnr(n, c) for n, c in zip(noisy, crops)])),
                "tv": base["tv"], "wavelet": base["wavelet"], **scores, "margin": scores["latent"] - best,
            })
        print(f"  done {size}px in {time.time() - t0:.0f}s", file=sys.stderr)

    print(f"\n(a) autoencoder reconstruction (bar >= {RECONSTRUCTION_BAR_DB} dB)")
    print(f"{'size':>5} {'crops':>5} {'PSNR':>6}  bar")
    for r in recon_rows:
        print(f"{r['size']:>5} {r['crops']:>5} {r['psnr']:6.2f}  {'pass' if r['passed'] else 'MISS'}")
    print("\n(b) decoded one-step x0 estimate from the encoded noisy image (bar: > best baseline)")
    print(f"{'size':>5} {'sigma':>5} {'sig_z':>6} {'t':>4} {'noisy':>6} {'TV':>6} {'wavelet':>7} {'AE(y)':>6} "
          f"{'latent':>6} {'gauss':>6} {'margin':>6}  bar")
    for r in rows:
        print(f"{r['size']:>5} {r['sigma']:>5} {r['sigma_z']:6.3f} {r['timestep']:4d} {r['noisy']:6.2f} {r['tv']['psnr']:6.2f} "
              f"{r['wavelet']['psnr']:7.2f} {r['ae_noisy']:6.2f} {r['latent']:6.2f} {r['gauss']:6.2f} {r['margin']:+6.2f}  "
              f"{'pass' if r['margin'] > 0 else 'MISS'}")
    recon_ok = all(r["passed"] for r in recon_rows)
    denoise_ok = all(r["margin"] > 0 for r in rows if abs(r["sigma"] - 0.2) < 1e-9)
    print(f"\nreconstruction bar: {'PASSED' if recon_ok else 'not met'};  latent denoising bar (sigma 0.2): "
          f"{'PASSED' if denoise_ok else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": {"path": str(args.model), **{k: info.get(k) for k in ("name", "parameters", "steps", "images_seen", "scale_factor")}},
            "sigma_z": {str(k): v for k, v in sigma_z.items()}, "reconstruction": recon_rows, "rows": rows,
            "reconstruction_bar_db": RECONSTRUCTION_BAR_DB, "passed": {"reconstruction": recon_ok, "denoising": denoise_ok},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

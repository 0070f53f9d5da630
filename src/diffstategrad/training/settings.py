"""The settings of a training run (RUNDIR/run.json): one builder per mode, and the rules of resuming.

``pixel_settings``, ``autoencoder_settings`` and ``latent_settings`` turn the command line's
values into the plain dict that run.json records and the other modules read. Resuming with
different settings is refused (``reconcile_settings``), except for the step budget, time box,
threads, device, workers and logging intervals; settings added after runs existed take the value
those runs had.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffstategrad.priors.small_autoencoder import AUTOENCODER_CONFIG
from diffstategrad.priors.unet import FASHION_UNET_CONFIG, LATENT_UNET_CONFIG, PIXEL_UNET_CONFIG
from diffstategrad.storage import atomic_write_text

__all__ = ["DATASETS", "T_SAMPLINGS", "pixel_settings", "autoencoder_settings", "latent_settings", "reconcile_settings"]

DATASETS = ("photos", "fashion-mnist")
T_SAMPLINGS = ("uniform", "lognormal")

# Settings added after runs existed: a run.json without them had these values.
_SETTING_DEFAULTS = {"dataset": "photos", "preconditioning": "none", "sigma_data": 0.5, "t_sampling": "uniform",
                     "init": None}

# Settings that may change between a run and its resumption (they do not change the maths).
_MUTABLE_SETTINGS = {"steps", "threads", "device", "workers", "checkpoint_minutes", "log_every", "snapshot_every",
                     "command", "max_minutes"}


def reconcile_settings(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """The settings of the run in ``out``: ``settings`` completed by ``_SETTING_DEFAULTS``, checked
    against the run.json of an earlier process there (only ``_MUTABLE_SETTINGS`` may differ; a
    ValueError names every other difference), then written to ``out/run.json``."""
    path = out / "run.json"
    settings = {**_SETTING_DEFAULTS, **settings}
    if path.is_file():
        saved = {**_SETTING_DEFAULTS, **json.loads(path.read_text())}
        diffs = {
            k: (saved.get(k), settings.get(k))
            for k in set(saved) | set(settings)
            if k not in _MUTABLE_SETTINGS and saved.get(k) != settings.get(k)
        }
        if diffs:
            lines = ", ".join(f"{k}: run has {a!r}, command gives {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise ValueError(f"{out} holds a run with other settings ({lines}); use another --out or the same settings")
    atomic_write_text(path, json.dumps(settings, indent=2))
    return settings


def _base_settings(mode, data, model, crop, batch, steps, lr, warmup, lr_schedule, ema_decay, weight_decay,
                   grad_clip, bf16, seed, threads, device, workers, scale_min, native_prob, checkpoint_minutes,
                   log_every, snapshot_every, max_minutes, command) -> dict[str, Any]:
    settings = {
        "mode": mode,
        "data": str(Path(data).resolve()),
        "model": dict(model),
        "crop": int(crop),
        "scale_range": [float(scale_min), 1.0],
        "native_prob": float(native_prob),
        "batch": int(batch),
        "steps": int(steps),
        "lr": float(lr),
        "warmup_steps": int(warmup),
        "lr_schedule": lr_schedule,
        "ema_decay": float(ema_decay),
        "weight_decay": float(weight_decay),
        "grad_clip": float(grad_clip),
        "bf16": bool(bf16),
        "seed": int(seed),
        "threads": int(threads),
        "device": device,
        "workers": int(workers),
        "checkpoint_minutes": float(checkpoint_minutes),
        "log_every": int(log_every),
        "snapshot_every": int(snapshot_every),
        "max_minutes": float(max_minutes) if max_minutes else None,
        "command": command,
    }
    return settings


def pixel_settings(data, crop=64, batch=32, steps=20000, lr=2e-4, warmup=500, lr_schedule="constant",
                   ema_decay=0.999, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                   device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                   log_every=50, snapshot_every=2500, command=None, max_minutes=None, dataset="photos",
                   preconditioning="none", sigma_data=0.5, t_sampling="uniform", init=None) -> dict[str, Any]:
    """A pixel run's settings; ``init`` (a pixel model folder or exported .safetensors) starts
    the network and its EMA from those weights instead of random ones (fine-tuning); its path
    and SHA-256 are recorded, so resuming from a changed file is refused."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
    if dataset == "fashion-mnist":
        model = model or FASHION_UNET_CONFIG
        if crop != 32:
            raise ValueError("Fashion-MNIST images are 32x32 after padding: use crop 32")
    s = _base_settings("pixel", data, model or PIXEL_UNET_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "schedule": "linear", "num_timesteps": 1000, "dataset": dataset, "preconditioning": preconditioning,
            "sigma_data": float(sigma_data), "t_sampling": t_sampling, "init": _init_record(init)}


def _init_record(init) -> dict[str, str] | None:
    """{"path", "sha256"} of a fine-tuning run's starting weights (the weights file's digest)."""
    if init is None:
        return None
    path = Path(init).resolve()
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"--init {init}: no such model folder or weights file")
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def autoencoder_settings(data, crop=128, batch=16, steps=20000, lr=2e-4, warmup=200, lr_schedule="constant",
                         ema_decay=0.998, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                         device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                         log_every=50, snapshot_every=0, command=None, max_minutes=None, kl_weight=1e-6,
                         l1_weight=1.0, mse_weight=1.0) -> dict[str, Any]:
    s = _base_settings("autoencoder", data, model or AUTOENCODER_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "kl_weight": float(kl_weight), "l1_weight": float(l1_weight), "mse_weight": float(mse_weight)}


def latent_settings(data, autoencoder, crop=128, batch=32, steps=20000, lr=2e-4, warmup=500, lr_schedule="constant",
                    ema_decay=0.999, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                    device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                    log_every=50, snapshot_every=0, command=None, max_minutes=None, scale_images=256) -> dict[str, Any]:
    s = _base_settings("latent", data, model or LATENT_UNET_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "schedule": "linear", "num_timesteps": 1000, "autoencoder": str(Path(autoencoder).resolve()),
            "scale_images": int(scale_images)}

"""What a run says about itself on a model card: its data, its training, its autoencoder.

A ``RunView`` is a run as its exports see it: the settings, the prepared task (on the CPU), the
EMA model (CPU, float32), the counters and the export info. ``Trainer.run_view`` and
``export.run_view`` (a run folder) make one; so does ``formats.load_autoencoder``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from diffstategrad.priors.unet import count_parameters

__all__ = ["RunView", "data_summary", "training_summary", "autoencoder_summary"]


def data_summary(settings: dict[str, Any]) -> dict[str, Any]:
    """Training data of a run for its model card: image lists from the prepared folder."""
    root = Path(settings["data"])
    if settings.get("dataset", "photos") == "fashion-mnist":
        return {"root": str(root), "dataset": "fashion-mnist",
                "description": "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), Debian package dataset-fashion-mnist; "
                               "the 60,000 training images, zero-padded from 28x28 to 32x32; the 10,000 test images held out",
                "train_images": 60000, "held_out_images": "the 10,000 test images", "crop": settings["crop"], "flip": True}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    def names(split):
        if split in manifest:
            return sorted(manifest[split])
        return sorted(p.stem for p in (root / split).glob("*.png")) if (root / split).is_dir() else []

    return {
        "root": str(root),
        "version": manifest.get("version"),
        "description": manifest.get("description"),
        "train_images": names("train"),
        "held_out_images": names("val"),
        "crop": settings["crop"],
        "scale_range": settings["scale_range"],
        "native_prob": settings["native_prob"],
        "flip": True,
    }


@dataclasses.dataclass
class RunView:
    """What an export needs: settings, the prepared task (on CPU), the EMA model (CPU, float32)."""

    settings: dict[str, Any]
    task: Any
    ema: nn.Module
    step: int
    images_seen: int
    wall_time: float
    info: dict[str, Any]
    source: str


def training_summary(view: RunView) -> dict[str, Any]:
    """How a model was trained, for its record / model card."""
    s = view.settings
    summary = {
        "steps": view.step,
        "images_seen": view.images_seen,
        "wall_time_s": round(view.wall_time, 1),
        "device": s["device"],
        "batch": s["batch"],
        "crop": s["crop"],
        "lr": s["lr"],
        "lr_schedule": s["lr_schedule"],
        "warmup_steps": s["warmup_steps"],
        "ema_decay": s["ema_decay"],
        "weight_decay": s["weight_decay"],
        "grad_clip": s["grad_clip"],
        "bf16": s["bf16"],
        "seed": s["seed"],
        "threads": s["threads"],
        "workers": s.get("workers", 0),
        "max_minutes": s.get("max_minutes"),
        "command": s.get("command"),
        "data": view.info["data"],
    }
    if s["mode"] == "autoencoder":
        summary.update(kl_weight=s["kl_weight"], l1_weight=s["l1_weight"], mse_weight=s["mse_weight"])
    if s["mode"] == "latent":
        summary["scale_images"] = s["scale_images"]
    return summary


def autoencoder_summary(view: RunView) -> dict[str, Any]:
    """The autoencoder part of a latent model's card."""
    ae = view.ema
    return {"parameters": count_parameters(ae), "architecture": dict(ae.config), "downsampling": ae.downsampling,
            "latent_channels": ae.latent_channels, "run": view.source, **training_summary(view)}

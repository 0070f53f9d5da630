"""The exported weight files: their records, and loading them back.

``export/pixel.safetensors`` (format ``diffstategrad-unet``) and ``export/autoencoder.safetensors``
(``diffstategrad-autoencoder``) hold EMA weights in float32; the record (architecture, parameter
count, how it was trained) is in the file's metadata under ``config`` and beside it as JSON (same
stem). ``load_autoencoder`` also reads an autoencoder run folder; it needs only the checkpoint
file and the autoencoder class, so the latent task (``tasks.py``) can use it from below the
exports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from diffstategrad.priors.small_autoencoder import SmallAutoencoder
from diffstategrad.priors.unet import UNet, count_parameters
from diffstategrad.storage import read_safetensors, read_safetensors_metadata
from diffstategrad.training.checkpoints import CHECKPOINT_NAME, load_checkpoint_file
from diffstategrad.training.summaries import RunView, autoencoder_summary, data_summary

__all__ = ["EXPORT_FORMAT", "AUTOENCODER_EXPORT_FORMAT", "pixel_record", "autoencoder_record", "read_record",
           "load_exported", "load_autoencoder", "read_init_weights"]

EXPORT_FORMAT = "diffstategrad-unet"
AUTOENCODER_EXPORT_FORMAT = "diffstategrad-autoencoder"


def pixel_record(settings: dict, task_info: dict, model: nn.Module, step: int, images_seen: int, wall_time: float) -> dict:
    """The record of a pixel export (``export/pixel.safetensors``)."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        **{k: task_info[k] for k in ("kind", "schedule", "prediction")},
        "architecture": dict(model.config),
        "parameters": count_parameters(model),
        "size_multiple": model.size_multiple,
        "data_range": [-1.0, 1.0],
        "weights": "ema",
        "training": {
            "steps": step,
            "images_seen": images_seen,
            "wall_time_s": round(wall_time, 1),
            "batch_size": settings["batch"],
            "lr": settings["lr"],
            "lr_schedule": settings["lr_schedule"],
            "warmup_steps": settings["warmup_steps"],
            "ema_decay": settings["ema_decay"],
            "weight_decay": settings["weight_decay"],
            "grad_clip": settings["grad_clip"],
            "bf16": settings["bf16"],
            "seed": settings["seed"],
            "threads": settings["threads"],
            "device": settings["device"],
            "command": settings.get("command"),
            "data": task_info["data"],
            **({"initialised_from": task_info["initialised_from"]} if "initialised_from" in task_info else {}),
        },
    }


def autoencoder_record(view: RunView) -> dict:
    ae = view.ema
    return {
        "format": AUTOENCODER_EXPORT_FORMAT,
        "format_version": 1,
        "kind": "autoencoder",
        "architecture": dict(ae.config),
        "parameters": count_parameters(ae),
        "downsampling": ae.downsampling,
        "latent_channels": ae.latent_channels,
        "data_range": [-1.0, 1.0],
        "weights": "ema",
        "objective": view.info.get("objective"),
        "summary": autoencoder_summary(view),
    }


def read_record(path: Path) -> dict:
    meta = read_safetensors_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no diffstategrad config in its metadata")
    return json.loads(meta["config"])


def load_exported(path: str | os.PathLike, device="cpu") -> tuple[UNet, dict]:
    """(UNet in eval mode, record) from an exported pixel .safetensors (record read from its metadata)."""
    path = Path(path)
    record = read_record(path)
    if record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file (format {record.get('format')!r})")
    model = UNet(record["architecture"])
    model.load_state_dict(read_safetensors(path), strict=True)
    return model.to(device).eval(), record


def read_init_weights(path: str | os.PathLike, architecture: dict) -> dict[str, torch.Tensor]:
    """The UNet weights a fine-tuning run starts from (``--init``): an exported pixel
    ``.safetensors`` (``export/pixel.safetensors`` of a run) or a shipped / converted model folder
    (``config.json`` + ``model.safetensors``, format ``builtin-pixel``, keys ``unet.*``). Its
    architecture must be ``architecture`` (the run's network); a ValueError says what differs."""
    path = Path(path)
    if path.is_dir():
        config_path, weights = path / "config.json", path / "model.safetensors"
        if not config_path.is_file() or not weights.is_file():
            raise ValueError(f"{path} is not a model folder (it needs config.json and model.safetensors)")
        config = json.loads(config_path.read_text())
        if config.get("format") != "builtin-pixel":
            raise ValueError(f"{path} holds a {config.get('format')!r} model; --init takes a pixel model (format 'builtin-pixel')")
        theirs = config["spec"]["unet"]
        state = {k[len("unet."):]: v for k, v in read_safetensors(weights).items() if k.startswith("unet.")}
    else:
        record = read_record(path)
        if record.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path} is not a {EXPORT_FORMAT} file (format {record.get('format')!r})")
        theirs = record["architecture"]
        state = read_safetensors(path)
    if dict(theirs) != dict(architecture):
        diffs = ", ".join(f"{k}: {theirs.get(k)!r} there, {architecture.get(k)!r} here"
                          for k in sorted(set(theirs) | set(architecture)) if theirs.get(k) != architecture.get(k))
        raise ValueError(f"--init {path} has another network ({diffs})")
    return state


def load_autoencoder(path: str | os.PathLike) -> tuple[SmallAutoencoder, dict]:
    """(autoencoder in eval mode with its EMA weights, summary) from an autoencoder run folder
    (its checkpoint), its export folder or an exported ``autoencoder.safetensors``."""
    p = Path(path)
    if p.is_dir() and (p / CHECKPOINT_NAME).is_file():
        return _autoencoder_from_checkpoint(p)
    if p.is_dir() and (p / "autoencoder.safetensors").is_file():
        p = p / "autoencoder.safetensors"
    elif p.is_dir() and (p / "export" / "autoencoder.safetensors").is_file():
        p = p / "export" / "autoencoder.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no autoencoder at {path}: give an autoencoder run folder or its export/autoencoder.safetensors")
    record = read_record(p)
    if record.get("format") != AUTOENCODER_EXPORT_FORMAT:
        raise ValueError(f"{p} is not a {AUTOENCODER_EXPORT_FORMAT} file (format {record.get('format')!r})")
    ae = SmallAutoencoder(record["architecture"])
    ae.load_state_dict(read_safetensors(p), strict=True)
    return ae.eval(), {**record["summary"], "export": str(p)}


def _autoencoder_from_checkpoint(rundir: Path) -> tuple[SmallAutoencoder, dict]:
    """The EMA autoencoder of an autoencoder run folder and its summary, read from its checkpoint
    (as ``export.run_view`` reads it: the autoencoder task has no frozen state)."""
    ckpt = load_checkpoint_file(rundir / CHECKPOINT_NAME)
    settings = ckpt["settings"]
    if settings["mode"] != "autoencoder":
        raise ValueError(f"{rundir} is a {settings['mode']} run, not an autoencoder run")
    ae = SmallAutoencoder(settings["model"])
    ae.load_state_dict({k: v.to(torch.float32) for k, v in ckpt["ema"].items()}, strict=True)
    info = ckpt.get("info") or {"data": data_summary(settings)}  # the summary reads only its data
    view = RunView(settings, None, ae.eval(), int(ckpt["step"]), int(ckpt["images_seen"]), float(ckpt["wall_time"]),
                   info, str(rundir))
    return ae, autoencoder_summary(view)

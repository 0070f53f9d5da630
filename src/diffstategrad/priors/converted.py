"""Converted folders: any loaded checkpoint as ``model.safetensors`` + ``config.json``.

A converted folder loads with no pickle at all: ``config.json`` (plain JSON) names the format
and the architecture, ``model.safetensors`` holds every weight plus the schedule
(``schedule.alphas_cumprod``, float64), so the prior is rebuilt exactly, whatever formula made
its schedule. ``load_prior("converted", FOLDER)`` loads one; :func:`diffstategrad.convert.convert`
writes one from any supported checkpoint.

config.json::

    {"diffstategrad_converted": 1, "format": "guided-diffusion" | "compvis-ldm" | "diffusers",
     "spec": {...architecture...}, "schedule_name": "linear", "source": "<original file>"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.storage import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    load_into,
    read_safetensors,
    save_safetensors,
)
from diffstategrad.priors.registry import get_format, list_formats, register_prior
from diffstategrad.schedules import VPSchedule

__all__ = ["save_converted", "load_converted", "CONFIG_FILE", "WEIGHTS_FILE", "FORMAT_VERSION"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
SCHEDULE_KEY = "schedule.alphas_cumprod"


def save_converted(prior: DiffusionPrior, out_dir, source: str = "", overwrite: bool = False) -> Path:
    """Write ``prior`` (one loaded from a supported format) to ``out_dir``."""
    export = getattr(prior, "export", None)
    fmt = getattr(prior, "format_name", None)
    known = [f.name for f in list_formats()]
    if export is None or fmt not in known:
        raise TypeError(f"{type(prior).__name__} cannot be converted (only priors of the registered formats can: {', '.join(known)})")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace its files")
    out.mkdir(parents=True, exist_ok=True)
    spec, tensors = export()
    if SCHEDULE_KEY in tensors:
        raise ValueError(f"{SCHEDULE_KEY} is reserved")
    tensors = {**tensors, SCHEDULE_KEY: prior.schedule.alphas_cumprod.to(torch.float64)}
    save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": fmt, "diffstategrad_converted": str(FORMAT_VERSION)})
    config: dict[str, Any] = {
        "diffstategrad_converted": FORMAT_VERSION,
        "format": fmt,
        "spec": spec,
        "schedule_name": prior.schedule.name,
        "source": str(source),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_converted(path, *, dtype: torch.dtype = torch.float32, device=None) -> DiffusionPrior:
    """Load a folder written by :func:`save_converted` (JSON + safetensors only)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"converted model folder {folder} does not exist")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"{folder} has no {CONFIG_FILE}; is it a folder written by diffstategrad convert?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("diffstategrad_converted") != FORMAT_VERSION:
        raise CheckpointFormatError(f"{config_path} is not a diffstategrad converted-model config (version {FORMAT_VERSION})")
    fmt = config.get("format")
    try:
        builder = get_format(str(fmt)).from_spec
    except ValueError:
        raise CheckpointFormatError(f"{config_path}: unknown format {fmt!r} (known: {', '.join(f.name for f in list_formats())})") from None
    tensors = read_safetensors(weights_path, what="converted weights")
    if SCHEDULE_KEY not in tensors:
        raise CheckpointFormatError(f"{weights_path} has no {SCHEDULE_KEY}")
    schedule = VPSchedule(tensors.pop(SCHEDULE_KEY), name=str(config.get("schedule_name", "converted")))
    prior = builder(config["spec"], schedule)
    load_into(prior, tensors, source=weights_path, what=f"{fmt} prior described by {CONFIG_FILE}", dtype=dtype)
    prior = prior.eval().requires_grad_(False)
    return prior.to(device) if device is not None else prior


register_prior(
    "converted", load_converted,
    "a folder written by diffstategrad convert (config.json + model.safetensors, no pickle): "
    "load_prior('converted', FOLDER)")

"""Exports of a run (a ``Trainer`` or a run folder): weight files and shipped model folders.

``export_weights`` writes the EMA weights of a pixel or autoencoder run as safetensors + JSON
(``formats.py``). ``export_builtin`` writes a pixel or latent run as a converted folder
(config.json + float32 model.safetensors) that ``load_prior("converted", FOLDER)`` loads and that
ships under ``diffstategrad/weights/``; ``build_builtin_prior`` is its prior in memory.
``run_view`` is the way in for all of them; ``load_checkpoint_model`` reads a run's network
without disturbing the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffstategrad.priors.builtin import BuiltinLatentPrior, BuiltinPixelPrior
from diffstategrad.priors.converted import save_converted
from diffstategrad.priors.unet import count_parameters
from diffstategrad.schedules import make_schedule
from diffstategrad.storage import atomic_write_text, save_safetensors
from diffstategrad.training.checkpoints import CHECKPOINT_NAME, load_checkpoint_file
from diffstategrad.training.formats import autoencoder_record, pixel_record
from diffstategrad.training.summaries import RunView, training_summary
from diffstategrad.training.tasks import TASKS

__all__ = ["run_view", "export_weights", "load_checkpoint_model", "builtin_info", "build_builtin_prior", "export_builtin"]


def run_view(source) -> RunView:
    """A ``RunView`` of a ``Trainer`` (its own ``run_view()``) or of a run folder (its checkpoint.pt,
    read safely)."""
    if hasattr(source, "run_view"):  # a Trainer
        return source.run_view()
    rundir = Path(source)
    ckpt = load_checkpoint_file(rundir / CHECKPOINT_NAME)
    settings = ckpt["settings"]
    task = TASKS[settings["mode"]](settings)
    if settings["mode"] == "latent" and not ckpt.get("task"):
        raise ValueError(f"{rundir / CHECKPOINT_NAME} holds no autoencoder weights; it was not written by this trainer")
    task.prepare(torch.device("cpu"), ckpt.get("task"), echo=lambda m: None)
    ema = task.build_model()
    ema.load_state_dict({k: v.to(torch.float32) for k, v in ckpt["ema"].items()}, strict=True)
    info = ckpt.get("info") or task.export_info()
    return RunView(settings, task, ema.eval(), int(ckpt["step"]), int(ckpt["images_seen"]), float(ckpt["wall_time"]),
                   info, str(rundir))


def export_weights(source, out: str | os.PathLike) -> Path:
    """Write the EMA weights of a pixel or autoencoder run (a ``Trainer`` or a run folder) as
    ``out`` (.safetensors, the record in its metadata) plus the record as JSON beside it (same
    stem). Returns the safetensors path. Latent runs export as a converted folder
    (``export_builtin``)."""
    view = run_view(source)
    mode = view.settings["mode"]
    if mode == "pixel":
        record = pixel_record(view.settings, view.info, view.ema, view.step, view.images_seen, view.wall_time)
    elif mode == "autoencoder":
        record = autoencoder_record(view)
    else:
        raise ValueError("a latent run exports as a converted folder: use export_builtin / `export-builtin`")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in view.ema.state_dict().items()}
    save_safetensors(tensors, out, metadata={"config": json.dumps(record)})
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    return out


def load_checkpoint_model(rundir: str | os.PathLike, which: str = "ema") -> tuple[nn.Module, dict]:
    """(network in eval mode, checkpoint summary) from RUNDIR/checkpoint.pt without disturbing
    it: the UNet of a pixel or latent run, the autoencoder of an autoencoder run."""
    ckpt = load_checkpoint_file(Path(rundir) / CHECKPOINT_NAME)
    model = TASKS[ckpt["settings"]["mode"]](ckpt["settings"]).build_model()
    model.load_state_dict(ckpt[which], strict=True)
    summary = {k: ckpt[k] for k in ("step", "images_seen", "wall_time")} | {"settings": ckpt["settings"]}
    return model.eval(), summary


def builtin_info(view: RunView, name: str) -> dict[str, Any]:
    """The ``info`` block of a shipped model: what ``diffstategrad models`` and the card show."""
    s = view.settings
    unet = view.ema
    info = {
        "name": name,
        "kind": s["mode"],
        "parameters": count_parameters(unet),
        "architecture": dict(unet.config),
        **view.info,
        **training_summary(view),
        "data_range": [-1.0, 1.0],
        "weights": "ema",
    }
    info["kind"] = s["mode"]
    if s.get("dataset") == "fashion-mnist":
        # a domain model: loaded by name, never the default for photographs; it was made for 32x32
        info.update(default=False, image_size=int(s["crop"]), channels=int(unet.config["in_channels"]),
                    description="Fashion-MNIST (60,000 training images, 28x28 zero-padded to 32x32, one channel); "
                                "the 10,000 test images are held out")
    if s["mode"] == "pixel":
        info["size_multiple"] = unet.size_multiple
    else:
        ae = view.task.autoencoder
        info.update(
            parameters=count_parameters(unet) + count_parameters(ae),
            unet_parameters=count_parameters(unet),
            autoencoder_parameters=count_parameters(ae),
            latent_channels=ae.latent_channels,
            downsampling=ae.downsampling,
            size_multiple=unet.size_multiple * ae.downsampling,
            scale_factor=float(view.task.scale_factor),
            autoencoder=view.task.autoencoder_summary,
        )
    return info


def build_builtin_prior(source, name: str = "builtin"):
    """The ``BuiltinPixelPrior`` / ``BuiltinLatentPrior`` (CPU, float32, EMA weights) of a pixel or
    latent run (a ``Trainer`` or a run folder)."""
    view = run_view(source)
    s = view.settings
    schedule = make_schedule(s["schedule"], s["num_timesteps"]) if "schedule" in s else None
    info = builtin_info(view, name) if schedule is not None else None
    if s["mode"] == "pixel":
        precond = {"kind": s.get("preconditioning", "none"), "sigma_data": s.get("sigma_data", 0.5)}
        prior = BuiltinPixelPrior(view.ema.config, schedule, info, precond)
    elif s["mode"] == "latent":
        ae = view.task.autoencoder
        prior = BuiltinLatentPrior(view.ema.config, ae.config, schedule, view.task.scale_factor, info)
        prior.autoencoder.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in ae.state_dict().items()}, strict=True)
    else:
        raise ValueError(f"a {s['mode']} run is not a diffusion prior; train a latent run on it "
                         "(python -m diffstategrad.training latent --autoencoder RUNDIR ...) and export that")
    prior.unet.load_state_dict(view.ema.state_dict(), strict=True)
    prior.info["size_rule"] = prior.size_rule()
    return prior.float().eval().requires_grad_(False)


def export_builtin(source, out: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
    """Write a pixel or latent run as a converted folder (config.json + float32 model.safetensors)
    that ``load_prior("converted", out)`` loads and that ships under ``diffstategrad/weights/``.
    The folder is written beside ``out`` and then moved into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    prior = build_builtin_prior(source, name or out.name)
    view_source = str(source.out) if hasattr(source, "run_view") else str(source)  # a Trainer or a folder
    steps = prior.info.get("steps")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_converted(prior, tmp, source=f"diffstategrad.training {prior.info['kind']} run {view_source} (step {steps}, EMA weights)")
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out

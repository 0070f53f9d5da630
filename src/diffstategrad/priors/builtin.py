"""The built-in priors: small models trained by this package, shipped inside it.

Each shipped model is a converted folder (``config.json`` + ``model.safetensors``, no pickle)
under ``diffstategrad/weights/<name>/``, loaded by name with no network:

    load_prior("builtin")               # the default pixel model
    load_prior("builtin", "pixel")      # by name
    load_prior("builtin-latent")        # the default latent model
    load_prior("fashion")               # every shipped model also loads by its name

A model whose info says ``"default": false`` (the Fashion-MNIST model, a domain model) loads
only by name.

Formats: ``builtin-pixel`` (an epsilon UNet on images) and ``builtin-latent`` (an epsilon UNet
on the latents of a small autoencoder), both on the DDPM linear 1000-step VP schedule. The
``info`` block of a folder's config carries the training summary shown by
``diffstategrad models``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffstategrad.priors.base import DiffusionPrior, LatentDiffusionPrior, as_timesteps
from diffstategrad.priors.registry import register_format, register_prior
from diffstategrad.priors.unet import PRECONDITIONINGS, UNet, network_eps
from diffstategrad.schedules import VPSchedule

__all__ = ["BuiltinPixelPrior", "BuiltinLatentPrior", "weights_dir", "list_builtin", "load_builtin"]


def weights_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "weights"


def _preconditioning(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = dict(spec or {"kind": "none"})
    if spec.get("kind", "none") not in PRECONDITIONINGS:
        raise ValueError(f"unknown preconditioning {spec.get('kind')!r}; known: {', '.join(PRECONDITIONINGS)}")
    return {"kind": spec.get("kind", "none"), "sigma_data": float(spec.get("sigma_data", 0.5))}


class BuiltinPixelPrior(DiffusionPrior):
    """A UNet on images in [-1, 1] (RGB or one channel), predicting epsilon directly or through
    EDM's preconditioning (``preconditioning={"kind": "edm", "sigma_data": 0.5}``)."""

    format_name = "builtin-pixel"

    def __init__(self, unet_config: Mapping[str, Any], schedule: VPSchedule, info: Mapping[str, Any] | None = None,
                 preconditioning: Mapping[str, Any] | None = None):
        super().__init__(schedule, channels=int(unet_config["in_channels"]))
        self.unet = UNet(unet_config)
        self.info = dict(info or {})
        self.preconditioning = _preconditioning(preconditioning)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = as_timesteps(t, x_t.shape[0], x_t.device)
        if self.preconditioning["kind"] == "none":
            return self.unet(x_t, t)
        a = self.alpha_bar(t, like=x_t)
        return network_eps(self.unet, x_t, t, a, self.preconditioning["kind"], self.preconditioning["sigma_data"])

    def check_size(self, height: int, width: int) -> None:
        self.unet.check_size(height, width)

    def size_rule(self) -> str:
        return f"height and width multiples of {self.unet.size_multiple} (trained on {self.info.get('crop', '?')}px crops)"

    def export(self):
        spec = {"unet": self.unet.config, "info": self.info}
        if self.preconditioning["kind"] != "none":
            spec["preconditioning"] = dict(self.preconditioning)
        return spec, dict(self.state_dict())

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], schedule: VPSchedule) -> "BuiltinPixelPrior":
        with torch.device("meta"):
            return cls(spec["unet"], schedule, spec.get("info"), spec.get("preconditioning"))


class BuiltinLatentPrior(LatentDiffusionPrior):
    """An epsilon-prediction UNet on the (scaled) latents of a small autoencoder."""

    format_name = "builtin-latent"

    def __init__(self, unet_config: Mapping[str, Any], autoencoder_config: Mapping[str, Any], schedule: VPSchedule,
                 scale_factor: float = 1.0, info: Mapping[str, Any] | None = None):
        from diffstategrad.priors.small_autoencoder import SmallAutoencoder

        self_ae = SmallAutoencoder(autoencoder_config)
        super().__init__(schedule, latent_channels=self_ae.latent_channels, downsampling=self_ae.downsampling,
                         image_channels=self_ae.image_channels)
        self.autoencoder = self_ae
        self.unet = UNet(unet_config)
        self.scale_factor = float(scale_factor)
        self.info = dict(info or {})

    def eps(self, z_t: torch.Tensor, t) -> torch.Tensor:
        return self.unet(z_t, as_timesteps(t, z_t.shape[0], z_t.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x) * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.scale_factor)

    def check_size(self, height: int, width: int) -> None:
        self.unet.check_size(height, width)

    def size_rule(self) -> str:
        m = self.unet.size_multiple * self.downsampling
        return f"image height and width multiples of {m} (latents multiples of {self.unet.size_multiple})"

    def export(self):
        spec = {"unet": self.unet.config, "autoencoder": self.autoencoder.config, "scale_factor": self.scale_factor, "info": self.info}
        return spec, dict(self.state_dict())

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], schedule: VPSchedule) -> "BuiltinLatentPrior":
        with torch.device("meta"):
            return cls(spec["unet"], spec["autoencoder"], schedule, spec.get("scale_factor", 1.0), spec.get("info"))


# ---------------------------------------------------------------------------------------------
# The shipped models
# ---------------------------------------------------------------------------------------------


def list_builtin() -> list[dict]:
    """The shipped models, pixel ones first, the default of each kind first: name, kind, parameters, size rule, path, info."""
    from diffstategrad.priors.converted import CONFIG_FILE

    rows = []
    folder = weights_dir()
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        cfg_path = sub / CONFIG_FILE
        if not cfg_path.is_file():
            continue
        cfg = json.loads(cfg_path.read_text())
        kind = "latent" if cfg.get("format") == BuiltinLatentPrior.format_name else "pixel"
        info = cfg.get("spec", {}).get("info", {})
        rows.append({"name": sub.name, "kind": kind, "parameters": int(info.get("parameters", 0)), "path": str(sub), "info": info,
                     "size_mb": round(sum(f.stat().st_size for f in sub.iterdir()) / 2**20, 2)})
    rows.sort(key=lambda r: (r["kind"] != "pixel", not r["info"].get("default", True), r["name"]))
    return rows


def load_builtin(name: str | None = None, kind: str = "pixel", device=None) -> DiffusionPrior:
    """A shipped model by name (or the first of ``kind``, the default)."""
    from diffstategrad.priors.converted import load_converted

    models = list_builtin()
    if name is None:  # the default of a kind: the first whose info does not say default: false
        candidates = [m for m in models if m["kind"] == kind and m["info"].get("default", True)]
        if not candidates:
            raise FileNotFoundError(f"no built-in {kind} model is shipped in {weights_dir()}")
        name = candidates[0]["name"]
    match = next((m for m in models if m["name"] == name), None)
    if match is None:
        raise ValueError(f"unknown built-in model {name!r}; shipped: {', '.join(m['name'] for m in models) or 'none'}")
    return load_converted(match["path"], device=device)


register_format(BuiltinPixelPrior.format_name, BuiltinPixelPrior.from_spec,
                description="a pixel UNet trained by diffstategrad.training (epsilon or EDM-preconditioned)")
register_format(BuiltinLatentPrior.format_name, BuiltinLatentPrior.from_spec,
                description="a latent UNet + small autoencoder trained by diffstategrad.training")
register_prior("builtin", load_builtin, "a model shipped with the package: load_prior('builtin'[, NAME]) (pixel by default)")
register_prior("builtin-latent", lambda name=None, device=None: load_builtin(name, kind="latent", device=device),
               "the shipped latent model: load_prior('builtin-latent'[, NAME])")

# every shipped model also loads by the name `diffstategrad models` lists: load_prior("pixel")
for _model in list_builtin():
    register_prior(_model["name"], lambda device=None, _name=_model["name"]: load_builtin(_name, device=device),
                   f"the shipped {_model['kind']} model {_model['name']!r} (diffstategrad models)")

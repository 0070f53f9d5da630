"""diffusers repositories (a local folder or a Hub ID) as priors.

Supported layouts:

- pixel: ``UNet2DModel`` + a VP scheduler config (``google/ddpm-ema-celebahq-256``, ...), either
  as a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or as a bare model folder
  (``config.json`` + weights + ``scheduler_config.json``);
- latent: ``UNet2DModel`` + ``VQModel`` or ``AutoencoderKL`` + scheduler
  (``CompVis/ldm-celebahq-256``).

The diffusers library is imported only here, when such a prior is loaded (an optional
dependency: ``pip install diffusers``). Weights are read by diffusers (safetensors, or
``torch.load(weights_only=True)`` for ``.bin``) and every missing, unexpected or mis-shaped key
it reports is turned into a :class:`~diffstategrad.storage.CheckpointMismatchError`.

The schedule comes from the scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``,
``num_train_timesteps`` or ``trained_betas``) through :mod:`diffstategrad.schedules`; epsilon,
v and sample predictions are turned into epsilon; a UNet with 2C output channels and
``variance_type: learned_range`` exposes its learned variance.

Scale-factor pitfall: latents are ``scaling_factor * encode(x)`` and decoded as
``decode(z / scaling_factor)``, with the factor from the autoencoder's config. ``VQModel``'s
default is Stable Diffusion's 0.18215, but the CompVis VQ-f4 models were trained with 1.0;
a VQ config that says 0.18215 triggers a warning (pass ``scaling_factor=`` to override).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffstategrad.priors.base import DiffusionPrior, LatentDiffusionPrior, as_timesteps
from diffstategrad.storage import CheckpointFormatError, CheckpointMismatchError, CheckpointNotFoundError, format_keys
from diffstategrad.priors.registry import register_format
from diffstategrad.schedules import VPSchedule, make_schedule, v_to_eps, x0_to_eps

__all__ = ["DiffusersPixelPrior", "DiffusersLatentPrior", "load_diffusers", "schedule_from_scheduler_config",
           "SD_SCALING_FACTOR"]

SD_SCALING_FACTOR = 0.18215  # diffusers' VQModel / AutoencoderKL default (Stable Diffusion's KL-f8 value)
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VAE_CLASSES = ("VQModel", "AutoencoderKL")


def _diffusers():
    try:
        import diffusers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_prior('diffusers', ...) needs the diffusers library: pip install diffusers "
            "(install torch first so that pip does not replace it)") from None
    return diffusers


# ---------------------------------------------------------------------------------------------
# Schedules and predictions
# ---------------------------------------------------------------------------------------------


def schedule_from_scheduler_config(cfg: Mapping[str, Any]) -> VPSchedule:
    """The VP schedule a diffusers scheduler config describes.

    diffusers' ``linear`` is betas evenly spaced (our ``linear`` without guided-diffusion's
    1000/T rescaling, undone here), ``scaled_linear`` is sqrt-linear (our ``sqrt_linear``) and
    ``squaredcos_cap_v2`` is the improved-DDPM cosine schedule."""
    name = str(cfg.get("_class_name", ""))
    if "Ve" in name or "Karras" in name or "EDM" in name:
        raise ValueError(f"scheduler {name} is not a discrete VP (DDPM-type) scheduler; it is not supported")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError("schedulers with rescale_betas_zero_snr (alpha_bar_T = 0) are not supported")
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return VPSchedule.from_betas(torch.tensor(cfg["trained_betas"], dtype=torch.float64), name="trained")
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 2e-2))
    if kind == "linear":
        return make_schedule("linear", T, beta_start=start, beta_end=end, rescale=False)
    if kind == "scaled_linear":
        return make_schedule("sqrt_linear", T, beta_start=start, beta_end=end)
    if kind == "squaredcos_cap_v2":
        return make_schedule("cosine", T)
    raise ValueError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


class _DiffusersUNet:
    """Shared by the pixel and latent priors: the UNet call and the conversion to epsilon."""

    unet: nn.Module
    prediction: str

    def _raw(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = as_timesteps(t, x_t.shape[0], device=x_t.device)
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x_t.to(dtype), t).sample.to(x_t.dtype), t

    def _to_eps(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return out
        a = self.schedule.alpha_bar(t, like=x_t)
        return v_to_eps(x_t, out, a) if self.prediction == "v" else x0_to_eps(x_t, out, a)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        out, t = self._raw(x_t, t)
        return self._to_eps(x_t, out[:, : self.channels], t)

    def eps_and_variance(self, x_t: torch.Tensor, t):
        out, t = self._raw(x_t, t)
        C = self.channels
        v = out[:, C:] if self.learned_variance else None
        return self._to_eps(x_t, out[:, :C], t), v

    def _levels(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        f = self._levels()
        if height % f or width % f:
            raise ValueError(f"this diffusers UNet needs H and W (of the diffusion state) that are multiples of {f}, "
                             f"got {height}x{width}")


class DiffusersPixelPrior(_DiffusersUNet, DiffusionPrior):
    """A diffusers ``UNet2DModel`` on images in [-1, 1]."""

    format_name = "diffusers"

    def __init__(self, unet: nn.Module, schedule: VPSchedule, prediction: str = "eps", learned_variance: bool = False):
        super().__init__(schedule, int(unet.config.in_channels))
        self.unet = unet
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)

    def size_rule(self) -> str:
        s = self.unet.config.sample_size
        return f"trained at {s}x{s}; any H, W that are multiples of {self._levels()} run"

    def export(self):
        spec = {"unet_class": type(self.unet).__name__, "unet_config": _plain(self.unet.config),
                "prediction": self.prediction, "learned_variance": self.learned_variance}
        return spec, self.state_dict()


class DiffusersLatentPrior(_DiffusersUNet, LatentDiffusionPrior):
    """A diffusers ``UNet2DModel`` in the latent space of a ``VQModel`` or ``AutoencoderKL``.

    ``encode(x) = scaling_factor * (latents - shift)`` with the VQ model's pre-quantisation
    latents or the KL posterior mean; ``decode(z) = vae.decode(z / scaling_factor + shift)``,
    which quantises (straight-through) for a VQ model."""

    format_name = "diffusers"

    def __init__(self, unet: nn.Module, vae: nn.Module, schedule: VPSchedule, prediction: str = "eps",
                 learned_variance: bool = False, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        block_channels = vae.config.block_out_channels
        super().__init__(schedule, int(unet.config.in_channels), 2 ** (len(block_channels) - 1),
                         int(vae.config.in_channels))
        self.unet = unet
        self.vae = vae
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.is_vq = type(vae).__name__ == "VQModel"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        if self.is_vq:
            h = self.vae.encode(x.to(dtype)).latents
        else:
            h = self.vae.encode(x.to(dtype)).latent_dist.mean
        return ((h - self.shift_factor) * self.scaling_factor).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        h = (z / self.scaling_factor + self.shift_factor).to(dtype)
        return self.vae.decode(h).sample.to(z.dtype)

    def size_rule(self) -> str:
        s, f = self.unet.config.sample_size, self.downsampling
        return (f"trained on {s}x{s} latents ({s * f}x{s * f} images); latents whose H, W are multiples of "
                f"{self._levels()} run")

    def export(self):
        spec = {"unet_class": type(self.unet).__name__, "unet_config": _plain(self.unet.config),
                "vae_class": type(self.vae).__name__, "vae_config": _plain(self.vae.config),
                "prediction": self.prediction, "learned_variance": self.learned_variance,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        return spec, self.state_dict()


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as JSON-able plain data."""
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def diffusers_prior_from_spec(spec: Mapping[str, Any], schedule: VPSchedule) -> DiffusionPrior:
    """Rebuild a diffusers prior's structure on the meta device (for converted folders)."""
    diffusers = _diffusers()
    with torch.device("meta"):
        unet = getattr(diffusers, spec["unet_class"]).from_config(spec["unet_config"])
        vae = getattr(diffusers, spec["vae_class"]).from_config(spec["vae_config"]) if "vae_class" in spec else None
    if vae is None:
        return DiffusersPixelPrior(unet, schedule, spec["prediction"], spec["learned_variance"])
    return DiffusersLatentPrior(unet, vae, schedule, spec["prediction"], spec["learned_variance"],
                                spec["scaling_factor"], spec.get("shift_factor", 0.0))


# ---------------------------------------------------------------------------------------------
# Reading a repository
# ---------------------------------------------------------------------------------------------


def _read_json(source: str, local: bool, filename: str, subfolder: str | None, revision, required: bool = True):
    if local:
        path = Path(source) / (subfolder or "") / filename
        if not path.is_file():
            if required:
                raise CheckpointNotFoundError(f"diffusers repository {source} has no {path.relative_to(source)}")
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(f"{path} is not valid JSON: {exc}") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        path = hf_hub_download(source, filename, subfolder=subfolder, revision=revision)
    except EntryNotFoundError:
        if required:
            raise CheckpointNotFoundError(f"Hub repository {source} has no {subfolder + '/' if subfolder else ''}{filename}") from None
        return None
    return json.loads(Path(path).read_text())


def _load_model(cls, source: str, subfolder: str | None, revision, what: str, dtype: torch.dtype) -> nn.Module:
    where = f"{source}/{subfolder}" if subfolder else source
    log = _diffusers().utils.logging
    verbosity = log.get_verbosity()
    log.set_verbosity_error()  # its "newly initialized ... TRAIN this model" advice: we refuse instead
    try:
        # low_cpu_mem_usage=False: diffusers then reports every key it could not fill
        model, info = cls.from_pretrained(source, subfolder=subfolder, revision=revision, output_loading_info=True,
                                          torch_dtype=dtype, low_cpu_mem_usage=False)
    except OSError as exc:
        if "unable to load weights" in str(exc).lower():
            raise CheckpointFormatError(f"the {what} weights of {where} are truncated or corrupt: {exc}") from None
        raise CheckpointNotFoundError(f"could not find the {what} weights of {where}: {exc}") from None
    except RuntimeError as exc:  # diffusers raises this for mis-shaped tensors
        names = re.findall(r"size mismatch for ([^:\s]+):", str(exc))
        detail = f"mis-shaped keys: {format_keys(names)}" if names else str(exc)
        raise CheckpointMismatchError(f"{where} does not match its {what} config ({cls.__name__}): {detail}") from None
    finally:
        log.set_verbosity(verbosity)
    problems = []
    for label, key in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"),
                       ("mis-shaped keys", "mismatched_keys"), ("errors", "error_msgs")):
        items = info.get(key) or []
        if items:
            problems.append(f"{label}: {format_keys(sorted(map(str, items)))}")
    if problems:
        raise CheckpointMismatchError(f"{where} does not match its {what} config ({cls.__name__}): " + "; ".join(problems))
    return model.eval().requires_grad_(False)


def _components(source: str, local: bool, revision) -> dict[str, str]:
    """component name -> class name (``unet``, ``vqvae`` / ``vae``, ``scheduler``), from
    model_index.json, or a bare model folder's config.json (component name "")."""
    index = _read_json(source, local, "model_index.json", None, revision, required=False)
    if index is not None:
        return {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                and v[1] is not None}
    config = _read_json(source, local, "config.json", None, revision, required=False)
    if config is None:
        raise CheckpointFormatError(f"{source} is not a diffusers repository: it has neither model_index.json "
                                    "nor config.json")
    return {"": config.get("_class_name", "?")}


def load_diffusers(
    source,
    *,
    revision: str | None = None,
    scaling_factor: float | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> DiffusionPrior:
    """Load a diffusers repository (local folder or Hub ID) as a pixel or latent prior.

    Args:
        source: a folder written by ``save_pretrained`` (pipeline or bare UNet2DModel folder)
            or a Hub ID such as ``"google/ddpm-ema-celebahq-256"`` or
            ``"CompVis/ldm-celebahq-256"`` (needs network access).
        revision: Hub revision (branch, tag or commit).
        scaling_factor: override the autoencoder's ``scaling_factor`` (latent repos).
        prediction_type: override the scheduler's ``prediction_type``
            (``epsilon``, ``v_prediction``, ``sample``).
        dtype, device: where the weights go.
    """
    diffusers = _diffusers()
    source = str(source)
    local = Path(source).expanduser().is_dir()
    if local:
        source = str(Path(source).expanduser())
    elif Path(source).expanduser().exists() or not _HUB_ID.match(source):
        raise CheckpointNotFoundError(f"{source} is neither a diffusers folder nor a Hub ID (owner/name)")

    parts = _components(source, local, revision)
    if "" in parts:  # a bare model folder: the UNet at the root, the scheduler config beside it
        unet_sub, unet_cls, vae_sub, vae_cls, sched_sub = None, parts[""], None, None, None
        sched_file = "scheduler_config.json"
    else:
        unet_sub = "unet" if "unet" in parts else None
        unet_cls = parts.get("unet", "?")
        vae_sub = next((k for k, c in parts.items() if c in _VAE_CLASSES), None)
        vae_cls = parts.get(vae_sub) if vae_sub else None
        sched_sub, sched_file = "scheduler", "scheduler_config.json"
    if unet_cls != "UNet2DModel":
        raise ValueError(f"{source}: the denoiser is {unet_cls}; only unconditional UNet2DModel repositories are "
                         "supported (text-conditional UNet2DConditionModel pipelines are not)")
    sched = _read_json(source, local, sched_file, sched_sub, revision)
    schedule = schedule_from_scheduler_config(sched)
    ptype = prediction_type or sched.get("prediction_type", "epsilon")
    if ptype not in _PREDICTIONS:
        raise ValueError(f"{source}: prediction_type {ptype!r} is not supported ({', '.join(_PREDICTIONS)})")

    unet = _load_model(diffusers.UNet2DModel, source, unet_sub, revision, "UNet", dtype)
    C_in, C_out = int(unet.config.in_channels), int(unet.config.out_channels)
    if C_out not in (C_in, 2 * C_in):
        raise ValueError(f"{source}: the UNet has {C_out} output channels for {C_in} input channels")
    learned = C_out == 2 * C_in and sched.get("variance_type") == "learned_range"
    if C_out == 2 * C_in and not learned:
        warnings.warn(f"{source}: the UNet predicts a variance (variance_type {sched.get('variance_type')!r}) that "
                      "is not guided-diffusion's learned_range; only its epsilon channels are used", stacklevel=2)

    if vae_cls is None:
        prior: DiffusionPrior = DiffusersPixelPrior(unet, schedule, _PREDICTIONS[ptype], learned)
    else:
        vae = _load_model(getattr(diffusers, vae_cls), source, vae_sub, revision, vae_cls, dtype)
        factor = getattr(vae.config, "scaling_factor", None)
        factor = 1.0 if factor is None else float(factor)
        if scaling_factor is not None:
            factor = float(scaling_factor)
        elif vae_cls == "VQModel" and abs(factor - SD_SCALING_FACTOR) < 1e-9:
            warnings.warn(
                f"{source}: the VQModel config has scaling_factor {SD_SCALING_FACTOR}, diffusers' default (Stable "
                "Diffusion's KL value); CompVis VQ-f4 latent diffusion models were trained with scale_factor 1.0. "
                "Check the model card and pass scaling_factor=1.0 if this is such a model.", stacklevel=2)
        shift = getattr(vae.config, "shift_factor", None)
        if int(vae.config.latent_channels if vae_cls == "AutoencoderKL" else vae.config.vq_embed_dim or
               vae.config.latent_channels) != C_in:
            raise ValueError(f"{source}: the UNet takes {C_in} channels but the {vae_cls} makes a different number")
        prior = DiffusersLatentPrior(unet, vae, schedule, _PREDICTIONS[ptype], learned, factor,
                                     0.0 if shift is None else float(shift))
    prior = prior.eval().requires_grad_(False)
    return prior.to(device) if device is not None else prior


register_format(
    "diffusers", diffusers_prior_from_spec, load=load_diffusers, convertible=True,
    description="diffusers repository (folder or Hub ID) with a UNet2DModel (+ VQModel / AutoencoderKL): "
    "load_prior('diffusers', PATH_OR_HUB_ID); needs pip install diffusers")

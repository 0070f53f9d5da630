"""CompVis latent diffusion checkpoints (``LatentDiffusion``: ``model.ckpt`` + its YAML), e.g.
the LDM-VQ-4 FFHQ model that ReSample, PSLD and DiffStateGrad use.

The YAML is read with plain PyYAML (``ldm`` and ``taming`` are never imported) and the
networks are this package's own: the openaimodel UNet is
:class:`~diffstategrad.priors.guided_diffusion.UNetModel` (the same network and parameter
names as guided-diffusion's), the first stages are in :mod:`diffstategrad.priors.autoencoders`.

Checkpoint layout (a Lightning file; the weights under ``state_dict``):

- ``model.diffusion_model.*``: the UNet's raw (trained) weights;
- ``model_ema.*``: their EMA copies, named as latent-diffusion's ``LitEma`` names its buffers,
  the wrapper-relative parameter name with the dots removed
  (``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``),
  plus ``model_ema.decay`` and ``model_ema.num_updates``;
- ``first_stage_model.*``: the autoencoder (``first_stage_model.loss.*`` if the loss had weights);
- the schedule buffers (``betas``, ``alphas_cumprod``, ...; checked against the YAML) and, with
  ``scale_by_std``, the ``scale_factor`` buffer.

Raw weights are the default because the official ReSample / DiffStateGrad code samples with
``model.model`` and never enters ``ema_scope``; ``weights="ema"`` takes the EMA copies.
The latent scale factor is the YAML's ``scale_factor`` (1.0 when absent, as for the VQ-f4 FFHQ
model), or the checkpoint's buffer where ``scale_by_std`` made one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from diffstategrad.priors.autoencoders import AutoencoderKL, VQModel
from diffstategrad.priors.base import LatentDiffusionPrior, as_timesteps
from diffstategrad.storage import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    build_on_meta,
    format_keys,
    load_into,
    read_checkpoint,
    extract_state_dict,
)
from diffstategrad.priors.guided_diffusion import UNetModel
from diffstategrad.priors.registry import register_format
from diffstategrad.schedules import VPSchedule, make_schedule, v_to_eps, x0_to_eps

__all__ = ["CompVisLatentPrior", "LDMConfig", "LDMConfigError", "read_ldm_config", "ldm_schedule", "load_compvis_ldm", "ema_key",
           "SCHEDULE_BUFFERS"]

# Buffers LatentDiffusion registers from its schedule (and logvar); checked or ignored, never loaded.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
)
EMA_PREFIX = "model_ema."
LOSS_PREFIXES = ("first_stage_model.loss.",)

_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_FIRST_STAGES = {
    "ldm.models.autoencoder.VQModelInterface": "vq",
    "ldm.models.autoencoder.VQModel": "vq",
    "ldm.models.autoencoder.AutoencoderKL": "kl",
}
# openaimodel.UNetModel arguments: (default, supported values or None for any)
_UNET_ARGS: dict[str, Any] = {
    "image_size": None, "in_channels": None, "model_channels": None, "out_channels": None,
    "num_res_blocks": None, "attention_resolutions": None, "dropout": 0.0, "channel_mult": (1, 2, 4, 8),
    "conv_resample": True, "num_heads": -1, "num_head_channels": -1, "num_heads_upsample": -1,
    "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
}
_UNET_UNSUPPORTED = {"use_spatial_transformer": False, "context_dim": None, "n_embed": None, "dims": 2, "num_classes": None}
_UNET_IGNORED = ("use_checkpoint", "use_fp16", "legacy", "transformer_depth")


class LDMConfigError(CheckpointError):
    """The YAML is not a supported CompVis LatentDiffusion configuration."""


def ema_key(name: str) -> str:
    """The LitEma buffer name of a LatentDiffusion parameter ``model.<name>``."""
    if not name.startswith("model."):
        raise ValueError(f"EMA copies exist only for model.* parameters, not {name}")
    return EMA_PREFIX + name[len("model."):].replace(".", "")


# ---------------------------------------------------------------------------------------------
# The YAML
# ---------------------------------------------------------------------------------------------


class LDMConfig(dict):
    """The parts of a LatentDiffusion YAML that define the prior (a plain, JSON-able dict):
    ``unet`` (UNetModel arguments), ``first_stage`` (``kind`` "vq"/"kl" and its arguments),
    ``schedule`` (beta_schedule, timesteps, linear_start, linear_end, cosine_s),
    ``scale_factor``, ``scale_by_std``, ``parameterization``, ``image_size``, ``channels``."""


def _params(node: Any, where: str) -> dict[str, Any]:
    if not isinstance(node, Mapping) or "target" not in node:
        raise LDMConfigError(f"{where} must be a mapping with a 'target'")
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise LDMConfigError(f"{where}.params must be a mapping")
    return dict(params)


def _schedule_from(params: Mapping[str, Any], source) -> dict[str, Any]:
    if params.get("given_betas") is not None:
        raise LDMConfigError(f"{source}: given_betas is not supported")
    return {
        "beta_schedule": str(params.get("beta_schedule", "linear")),
        "timesteps": int(params.get("timesteps", 1000)),
        "linear_start": float(params.get("linear_start", 1e-4)),  # DDPM's defaults
        "linear_end": float(params.get("linear_end", 2e-2)),
        "cosine_s": float(params.get("cosine_s", 8e-3)),
    }


def read_ldm_config(config) -> LDMConfig:
    """Parse a CompVis LatentDiffusion YAML (a path, YAML text or an already-parsed dict).

    Only unconditional models with an openaimodel UNet and a VQ or KL first stage are
    supported; anything else raises an error that says what is not supported."""
    source = "the LDM config"
    if isinstance(config, (str, Path)) and not (isinstance(config, str) and "\n" in config):
        path = Path(config).expanduser()
        if not path.is_file():
            raise CheckpointNotFoundError(f"LDM config {path} does not exist")
        source = str(path)
        try:
            config = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise LDMConfigError(f"{path} is not valid YAML: {exc}") from None
    elif isinstance(config, str):
        config = yaml.safe_load(config)
    if not isinstance(config, Mapping):
        raise LDMConfigError(f"{source} is not a YAML mapping")
    model = config.get("model", config)
    target = model.get("target", "") if isinstance(model, Mapping) else ""
    if not str(target).endswith("LatentDiffusion"):
        raise LDMConfigError(f"{source}: model.target is {target!r}, not ldm.models.diffusion.ddpm.LatentDiffusion")
    params = _params(model, "model")

    cond = params.get("cond_stage_config")
    if cond != "__is_unconditional__" or params.get("conditioning_key") is not None:
        raise LDMConfigError(
            f"{source}: conditional latent diffusion (cond_stage_config {cond!r}) is not supported; "
            "inverse problems here use the unconditional models (cond_stage_config: __is_unconditional__)")
    parameterization = str(params.get("parameterization", "eps"))
    if parameterization not in ("eps", "x0", "v"):
        raise LDMConfigError(f"{source}: parameterization {parameterization!r} is not supported")

    unet_node = params.get("unet_config")
    unet_params = _params(unet_node, "model.params.unet_config")
    if unet_node["target"] != _UNET_TARGET:
        raise LDMConfigError(f"{source}: unet_config.target {unet_node['target']!r} is not {_UNET_TARGET}")
    for key, ok in _UNET_UNSUPPORTED.items():
        if unet_params.get(key, ok) != ok:
            raise LDMConfigError(f"{source}: unet_config {key}={unet_params[key]!r} is not supported (only {ok!r})")
    unknown = set(unet_params) - set(_UNET_ARGS) - set(_UNET_UNSUPPORTED) - set(_UNET_IGNORED)
    if unknown:
        raise LDMConfigError(f"{source}: unknown unet_config arguments {sorted(unknown)}")
    missing = [k for k, d in _UNET_ARGS.items() if d is None and k not in unet_params]
    if missing:
        raise LDMConfigError(f"{source}: unet_config is missing {missing}")
    unet = {k: unet_params.get(k, d) for k, d in _UNET_ARGS.items()}
    unet["attention_resolutions"] = [int(a) for a in unet["attention_resolutions"]]
    unet["channel_mult"] = [int(m) for m in unet["channel_mult"]]
    unet["dropout"] = float(unet["dropout"])
    unet["num_classes"] = None
    if unet["channel_mult"][0] != 1:
        raise LDMConfigError(f"{source}: openaimodel UNets need channel_mult[0] == 1")

    fs_node = params.get("first_stage_config")
    fs_params = _params(fs_node, "model.params.first_stage_config")
    kind = _FIRST_STAGES.get(fs_node["target"])
    if kind is None:
        raise LDMConfigError(f"{source}: first stage {fs_node['target']!r} is not supported "
                             f"(supported: {', '.join(_FIRST_STAGES)})")
    if fs_params.get("remap") is not None or fs_params.get("colorize_nlabels") is not None:
        raise LDMConfigError(f"{source}: first stages with remap / colorize_nlabels are not supported")
    first_stage = {"kind": kind, "ddconfig": dict(fs_params["ddconfig"]), "embed_dim": int(fs_params["embed_dim"])}
    if kind == "vq":
        first_stage["n_embed"] = int(fs_params["n_embed"])

    return LDMConfig(
        unet=unet,
        first_stage=first_stage,
        schedule=_schedule_from(params, source),
        scale_factor=float(params.get("scale_factor", 1.0)),
        scale_by_std=bool(params.get("scale_by_std", False)),
        parameterization=parameterization,
        image_size=int(params.get("image_size", unet["image_size"])),
        channels=int(params.get("channels", unet["in_channels"])),
    )


def ldm_schedule(schedule: Mapping[str, Any]) -> VPSchedule:
    """The VP schedule of a LatentDiffusion config, through :mod:`diffstategrad.schedules`.

    CompVis names differ from ours: its ``linear`` is sqrt-linear (sqrt(beta) evenly spaced,
    our ``sqrt_linear``); its ``sqrt_linear`` is betas evenly spaced (our ``linear`` with
    ``rescale=False``)."""
    T, lo, hi = schedule["timesteps"], schedule["linear_start"], schedule["linear_end"]
    name = schedule["beta_schedule"]
    if name == "linear":
        return make_schedule("sqrt_linear", T, beta_start=lo, beta_end=hi)
    if name == "sqrt_linear":
        return make_schedule("linear", T, beta_start=lo, beta_end=hi, rescale=False)
    if name == "cosine":
        return make_schedule("cosine", T, s=schedule["cosine_s"])
    raise LDMConfigError(f"beta_schedule {name!r} is not supported (linear, sqrt_linear, cosine)")


# ---------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------


class _DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model``, so that parameter names match the checkpoint."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


def build_first_stage(spec: Mapping[str, Any]) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "vq":
        return VQModel(spec["ddconfig"], spec["n_embed"], spec["embed_dim"])
    if kind == "kl":
        return AutoencoderKL(spec["ddconfig"], spec["embed_dim"])
    raise ValueError(f"unknown first stage kind {kind!r}")


class CompVisLatentPrior(LatentDiffusionPrior):
    """A CompVis LatentDiffusion model as a latent prior.

    ``encode(x) = scale_factor * quant_conv(encoder(x))`` (no quantisation; the KL model's
    posterior mean); ``decode(z) = decoder(post_quant_conv(quantise(z / scale_factor)))`` with a
    straight-through quantiser (VQ) or without one (KL). Both are differentiable.
    """

    format_name = "compvis-ldm"

    def __init__(self, unet: UNetModel, first_stage: nn.Module, schedule: VPSchedule, scale_factor: float = 1.0,
                 parameterization: str = "eps"):
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"unknown parameterization {parameterization!r}")
        if first_stage.embed_dim != unet.in_channels:
            raise ValueError(f"the UNet takes {unet.in_channels} channels but the first stage makes {first_stage.embed_dim}")
        image_channels = first_stage.decoder.conv_out.out_channels
        super().__init__(schedule, unet.in_channels, first_stage.downsampling, image_channels)
        self.model = _DiffusionWrapper(unet)
        self.first_stage_model = first_stage
        self.scale_factor = float(scale_factor)
        self.parameterization = parameterization

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def eps(self, z_t: torch.Tensor, t) -> torch.Tensor:
        t = as_timesteps(t, z_t.shape[0], device=z_t.device)
        dtype = self.unet.out[2].weight.dtype
        out = self.unet(z_t.to(dtype), t).to(z_t.dtype)
        if self.parameterization == "eps":
            return out
        a = self.schedule.alpha_bar(t, like=z_t)
        return x0_to_eps(z_t, out, a) if self.parameterization == "x0" else v_to_eps(z_t, out, a)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.first_stage_model.quant_conv.weight.dtype
        return (self.scale_factor * self.first_stage_model.encode(x.to(dtype))).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.first_stage_model.quant_conv.weight.dtype
        return self.first_stage_model.decode((z / self.scale_factor).to(dtype)).to(z.dtype)

    def check_size(self, height: int, width: int) -> None:
        f = self.unet.size_multiple
        if height % f or width % f:
            raise ValueError(f"this LDM needs latent H and W that are multiples of {f} (images: multiples of "
                             f"{f * self.downsampling}), got latents {height}x{width}")

    def size_rule(self) -> str:
        s, f = self.unet.image_size, self.downsampling
        return (f"trained on {s}x{s} latents ({s * f}x{s * f} images); latents whose H, W are multiples of "
                f"{self.unet.size_multiple} (images: multiples of {self.unet.size_multiple * f}) run")

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        spec = {
            "unet": self.unet.config,
            "first_stage": {"kind": self.first_stage_model.kind, **self.first_stage_model.config},
            "scale_factor": self.scale_factor,
            "parameterization": self.parameterization,
        }
        return spec, self.state_dict()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], schedule: VPSchedule) -> "CompVisLatentPrior":
        unet = build_on_meta(UNetModel, **spec["unet"])
        first_stage = build_on_meta(build_first_stage, spec["first_stage"])
        return cls(unet, first_stage, schedule, spec["scale_factor"], spec.get("parameterization", "eps"))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_schedule(state: Mapping[str, torch.Tensor], schedule: VPSchedule, path) -> None:
    stored = state.get("alphas_cumprod")
    if stored is None:
        return
    ours = schedule.alphas_cumprod
    if stored.shape != ours.shape or (stored.double() - ours).abs().max().item() > 1e-5:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint's alphas_cumprod ({tuple(stored.shape)}) does not match the schedule of the "
            "config (beta_schedule / linear_start / linear_end / timesteps); is it the right YAML?")


def _select_unet_weights(state: dict[str, torch.Tensor], unet_keys, weights: str, path) -> dict[str, torch.Tensor]:
    """Put the chosen UNet weights (raw or EMA) under the model.diffusion_model.* names."""
    if weights == "raw":
        return state
    names = {k: ema_key(k) for k in unet_keys}
    if len(set(names.values())) != len(names):
        raise CheckpointMismatchError(f"{path}: EMA names collide after removing dots; cannot map them")
    if not any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in state):
        raise CheckpointMismatchError(f"{path} holds no EMA weights (model_ema.*); load it with weights='raw'")
    out = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}
    for key, ema in names.items():
        if ema in state:
            out[key] = state[ema]
    missing = [ema for ema in names.values() if ema not in state]
    if missing:
        raise CheckpointMismatchError(f"{path}: EMA weights missing: {format_keys(missing)}")
    return out


def load_compvis_ldm(
    checkpoint,
    config,
    *,
    weights: str = "raw",
    first_stage_checkpoint=None,
    scale_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> CompVisLatentPrior:
    """Load a CompVis LatentDiffusion checkpoint strictly.

    Args:
        checkpoint: the Lightning ``model.ckpt`` (weights under ``state_dict``).
        config: its YAML (e.g. ``configs/latent-diffusion/ffhq-ldm-vq-4.yaml``), a path or a dict.
        weights: ``"raw"`` (default; what the official ReSample / DiffStateGrad code samples
            with) or ``"ema"`` (the ``model_ema.*`` copies).
        first_stage_checkpoint: optionally a standalone first-stage Lightning checkpoint (e.g.
            ``vq-f4/model.ckpt``, keys ``encoder.*``, ``decoder.*``, ``quantize.*``, ...; its
            ``loss.*`` weights are ignored) to use instead of the ``first_stage_model.*`` copy.
        scale_factor: override the latent scale factor (default: the config's / checkpoint's).
        dtype, device: where the weights go.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    cfg = read_ldm_config(config)
    path = Path(checkpoint).expanduser()
    state = extract_state_dict(read_checkpoint(path, "LDM checkpoint"), path, "LDM checkpoint")
    schedule = ldm_schedule(cfg["schedule"])
    _check_schedule(state, schedule, path)

    factor = cfg["scale_factor"]
    if cfg["scale_by_std"]:
        if "scale_factor" not in state:
            raise CheckpointMismatchError(f"{path}: the config sets scale_by_std but the checkpoint has no scale_factor")
        factor = float(state["scale_factor"])
    if scale_factor is not None:
        factor = float(scale_factor)

    prior = CompVisLatentPrior.from_spec(
        {"unet": cfg["unet"], "first_stage": cfg["first_stage"], "scale_factor": factor,
         "parameterization": cfg["parameterization"]}, schedule)
    unet_keys = [f"model.diffusion_model.{k}" for k in prior.unet.state_dict()]
    state = _select_unet_weights(state, unet_keys, weights, path)
    ignore_prefixes = [EMA_PREFIX, *LOSS_PREFIXES]
    if first_stage_checkpoint is not None:
        fs_path = Path(first_stage_checkpoint).expanduser()
        fs_state = extract_state_dict(read_checkpoint(fs_path, "first-stage checkpoint"), fs_path, "first-stage checkpoint")
        load_into(prior.first_stage_model, fs_state, source=fs_path, what=f"{cfg['first_stage']['kind'].upper()} first stage",
                  ignore_prefixes=["loss."], dtype=dtype)
        ignore_prefixes.append("first_stage_model.")
        load_into(prior.model, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                  source=path, what="LDM UNet (model.*)", dtype=dtype)
        leftover = [k for k in state if not k.startswith(("model.", *ignore_prefixes)) and k not in SCHEDULE_BUFFERS]
        if leftover:
            raise CheckpointMismatchError(f"{path} does not match the LDM: unexpected keys: {format_keys(leftover)}")
    else:
        load_into(prior, state, source=path, what=f"LDM ({cfg['first_stage']['kind'].upper()} first stage, {weights} weights)",
                  ignore_prefixes=ignore_prefixes, ignore_keys=SCHEDULE_BUFFERS, dtype=dtype)
    prior = prior.eval().requires_grad_(False)
    return prior.to(device) if device is not None else prior


register_format(
    CompVisLatentPrior.format_name, CompVisLatentPrior.from_spec, load=load_compvis_ldm, convertible=True,
    description="CompVis LatentDiffusion checkpoint: load_prior('compvis-ldm', checkpoint=PATH, config=YAML, weights='raw' | 'ema')")

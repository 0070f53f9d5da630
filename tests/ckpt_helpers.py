"""Helpers for the checkpoint tests: tiny checkpoints in the real file layouts, and key maps
from the original layouts to diffusers' (an independent implementation of the same networks,
used as the second forward path)."""

from __future__ import annotations

import math
import re
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Tiny architectures (all GroupNorms have 32 groups, so widths are multiples of 32)
# ---------------------------------------------------------------------------------------------

# guided-diffusion create_model arguments: 2 levels, attention with 4 legacy heads at 16 px
TINY_ADM_ARGS = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
    "attention_resolutions": "16", "num_heads": 4, "num_head_channels": 16, "num_heads_upsample": -1,
    "learn_sigma": True, "use_scale_shift_norm": True, "resblock_updown": True,
    "use_new_attention_order": False, "dropout": 0.0, "class_cond": False,
}

TINY_LDM_YAML = """\
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    image_size: 8
    channels: 3
    monitor: val/loss_simple_ema
{extra}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions:
        - 2
        num_res_blocks: 1
        channel_mult:
        - 1
        - 2
        num_head_channels: 16
    first_stage_config:
      target: {first_stage_target}
      params:
        embed_dim: 3
{n_embed}
        ddconfig:
          double_z: {double_z}
          z_channels: 3
          resolution: 16
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult:
          - 1
          - 2
          num_res_blocks: 1
          attn_resolutions:
          - 8
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: __is_unconditional__
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 4
"""


def tiny_ldm_yaml(first_stage: str = "vq", extra: str = "") -> str:
    if first_stage == "vq":
        return TINY_LDM_YAML.format(first_stage_target="ldm.models.autoencoder.VQModelInterface",
                                    n_embed="        n_embed: 64", double_z="false", extra=extra)
    return TINY_LDM_YAML.format(first_stage_target="ldm.models.autoencoder.AutoencoderKL", n_embed="",
                                double_z="true", extra=extra)


def random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a sensible scale for every (name -> tensor-with-shape) entry:
    fan-in scaled matrices and kernels, norm gains near 1, small biases, N(0,1) codebooks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in shapes.items():
        shape = tuple(ref.shape)
        if len(shape) >= 2 and "embedding" in name:
            value = torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        out[name] = value
    return out


def ldm_schedule_buffers(timesteps=1000, start=0.0015, end=0.0195) -> dict[str, torch.Tensor]:
    """The schedule buffers LatentDiffusion stores, computed here with numpy (float32 as saved)."""
    betas = np.linspace(start**0.5, end**0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {
        "betas": f32(betas), "alphas_cumprod": f32(alphas_cumprod), "alphas_cumprod_prev": f32(prev),
        "sqrt_alphas_cumprod": f32(np.sqrt(alphas_cumprod)),
        "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1 - alphas_cumprod)),
        "log_one_minus_alphas_cumprod": f32(np.log(1 - alphas_cumprod)),
        "sqrt_recip_alphas_cumprod": f32(np.sqrt(1 / alphas_cumprod)),
        "sqrt_recipm1_alphas_cumprod": f32(np.sqrt(1 / alphas_cumprod - 1)),
        "posterior_variance": f32(betas * (1 - prev) / (1 - alphas_cumprod)),
        "posterior_log_variance_clipped": f32(np.log(np.maximum(betas * (1 - prev) / (1 - alphas_cumprod), 1e-20))),
        "posterior_mean_coef1": f32(betas * np.sqrt(prev) / (1 - alphas_cumprod)),
        "posterior_mean_coef2": f32((1 - prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod)),
    }


def litema_name(param: str) -> str:
    """latent-diffusion's LitEma buffer name for LatentDiffusion parameter ``model.<rest>``."""
    return "model_ema." + param.split(".", 1)[1].replace(".", "")


@contextmanager
def fake_lightning_modules():
    """Make ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` importable so that
    a checkpoint can be pickled with it as a dict key, as PL 1.x does (callback states keyed by
    class). Yields the class; the fake modules are removed afterwards."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    try:
        yield cls
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def lightning_checkpoint(state_dict: dict, path) -> None:
    """Save ``state_dict`` as a Lightning checkpoint with the usual training metadata."""
    import argparse
    import collections

    with fake_lightning_modules() as model_checkpoint:
        ckpt = {
            "epoch": 12,
            "global_step": 34567,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": {model_checkpoint: {"monitor": "val/loss_simple_ema", "best_model_score": torch.tensor(0.12),
                                             "best_model_path": "logs/x.ckpt", "current_score": np.float64(0.13)}},
            "optimizer_states": [{"state": {0: {"step": 3, "exp_avg": torch.zeros(4)}},
                                  "param_groups": [{"lr": 2e-6, "betas": (0.9, 0.999), "params": [0]}]}],
            "lr_schedulers": [],
            "hparams": argparse.Namespace(base_lr=2e-6),
            "loops": collections.defaultdict(dict, {"fit_loop": {"epoch_progress": {"total": {"ready": 13}}}}),
        }
        torch.save(ckpt, path)


# ---------------------------------------------------------------------------------------------
# Original layouts -> diffusers layouts (test-side, written from the two codebases' structure)
# ---------------------------------------------------------------------------------------------

_RES_KEYS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _adm_resblock(rest: str) -> str:
    for ours, theirs in _RES_KEYS.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def _adm_attention(prefix: str, rest: str, value: torch.Tensor, heads: int, legacy: bool, out: dict) -> None:
    if rest.startswith("norm."):
        out[prefix + "group_norm." + rest[5:]] = value
    elif rest.startswith("proj_out."):
        out[prefix + "to_out.0." + rest[9:]] = value.reshape(value.shape[0], -1) if value.ndim == 3 else value
    elif rest.startswith("qkv."):
        kind = rest[4:]
        C = value.shape[0] // 3
        v = value.reshape(3 * C, -1) if value.ndim == 3 else value.reshape(3 * C, 1)
        # legacy: rows grouped per head as [q_h; k_h; v_h]; new order: [q; k; v], heads inside each
        parts = v.reshape(heads, 3, C // heads, -1).transpose(0, 1) if legacy else v.reshape(3, C, -1)
        for name, part in zip(("to_q", "to_k", "to_v"), parts):
            part = part.reshape(C, -1)
            out[f"{prefix}{name}.{kind}"] = part if kind == "weight" else part.reshape(C)
    else:
        raise KeyError(rest)


def adm_to_diffusers(state: dict, cfg: dict) -> tuple[dict, dict]:
    """(diffusers UNet2DModel kwargs, its state_dict) for an ADM UNet state_dict and config."""
    mults, mc, nrb = cfg["channel_mult"], cfg["model_channels"], cfg["num_res_blocks"]
    attn_levels = [2**i in cfg["attention_resolutions"] for i in range(len(mults))]
    updown = cfg["resblock_updown"]
    down = ["AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if updown else "DownBlock2D") for a in attn_levels]
    up = ["AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if updown else "UpBlock2D") for a in reversed(attn_levels)]
    kwargs = dict(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        down_block_types=tuple(down), up_block_types=tuple(up), block_out_channels=tuple(int(m * mc) for m in mults),
        layers_per_block=nrb, downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv", downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
        attention_head_dim=cfg["num_head_channels"], norm_num_groups=32, norm_eps=1e-5, attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if cfg["use_scale_shift_norm"] else "default",
    )
    legacy = not cfg["use_new_attention_order"]
    heads_of = lambda ch: ch // cfg["num_head_channels"]  # noqa: E731
    levels = len(mults)
    # which ADM block index is what
    in_map = {0: "conv_in"}
    idx = 1
    for i in range(levels):
        for j in range(nrb):
            in_map[idx] = (i, j)
            idx += 1
        if i != levels - 1:
            in_map[idx] = (i, "down")
            idx += 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("time_embed."):
            layer, rest = key.split(".", 2)[1:]
            out[f"time_embedding.linear_{1 if layer == '0' else 2}.{rest}"] = value
        elif key.startswith("out."):
            layer, rest = key.split(".", 2)[1:]
            out[f"{'conv_norm_out' if layer == '0' else 'conv_out'}.{rest}"] = value
        elif key.startswith("input_blocks."):
            _, n, m, rest = key.split(".", 3)
            where = in_map[int(n)]
            if where == "conv_in":
                out["conv_in." + rest] = value
            elif where[1] == "down":
                p = f"down_blocks.{where[0]}.downsamplers.0."
                out[p + ("conv." + rest[3:] if rest.startswith("op.") else _adm_resblock(rest))] = value
            elif m == "0":
                out[f"down_blocks.{where[0]}.resnets.{where[1]}." + _adm_resblock(rest)] = value
            else:
                ch = int(mults[where[0]] * mc)
                _adm_attention(f"down_blocks.{where[0]}.attentions.{where[1]}.", rest, value, heads_of(ch), legacy, out)
        elif key.startswith("middle_block."):
            _, m, rest = key.split(".", 2)
            if m == "1":
                _adm_attention("mid_block.attentions.0.", rest, value, heads_of(int(mults[-1] * mc)), legacy, out)
            else:
                out[f"mid_block.resnets.{0 if m == '0' else 1}." + _adm_resblock(rest)] = value
        elif key.startswith("output_blocks."):
            _, n, m, rest = key.split(".", 3)
            u, j = divmod(int(n), nrb + 1)
            p = f"up_blocks.{u}."
            layer_keys = {k.split(".", 3)[3].split(".")[0] for k in state if k.startswith(f"output_blocks.{n}.{m}.")}
            if m == "0":
                out[p + f"resnets.{j}." + _adm_resblock(rest)] = value
            elif "qkv" in layer_keys:
                ch = int(mults[levels - 1 - u] * mc)
                _adm_attention(p + f"attentions.{j}.", rest, value, heads_of(ch), legacy, out)
            else:
                out[p + "upsamplers.0." + ("conv." + rest[5:] if rest.startswith("conv.") else _adm_resblock(rest))] = value
        else:
            raise KeyError(key)
    return kwargs, out


_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def _vae_attn(prefix: str, rest: str, value: torch.Tensor, out: dict) -> None:
    name, kind = rest.split(".")
    target = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[name]
    if kind == "weight" and value.ndim == 4:
        value = value[:, :, 0, 0]
    out[f"{prefix}{target}.{kind}"] = value


def vae_to_diffusers(state: dict, ddconfig: dict, levels: int) -> dict:
    """A CompVis first-stage state_dict (encoder.*, decoder.*, quant_conv, ...) in diffusers'
    VQModel / AutoencoderKL layout."""
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        if part not in ("encoder", "decoder"):
            out[key] = value  # quantize.embedding, quant_conv, post_quant_conv
            continue
        m = re.match(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", rest)
        if m:
            kind, level, sub, tail = m.groups()
            level = int(level) if kind == "down" else levels - 1 - int(level)
            p = f"{part}.{kind}_blocks.{level}."
            if sub in ("downsample", "upsample"):
                out[p + f"{sub}rs.0.{tail}"] = value
            elif sub == "block":
                j, name, kind2 = tail.split(".")
                out[p + f"resnets.{j}.{_VAE_RES[name]}.{kind2}"] = value
            else:
                j, tail2 = tail.split(".", 1)
                _vae_attn(p + f"attentions.{j}.", tail2, value, out)
        elif rest.startswith("mid.attn_1."):
            _vae_attn(f"{part}.mid_block.attentions.0.", rest[len("mid.attn_1."):], value, out)
        elif rest.startswith("mid.block_"):
            n, name, kind2 = rest[len("mid.block_"):].split(".")
            out[f"{part}.mid_block.resnets.{int(n) - 1}.{_VAE_RES[name]}.{kind2}"] = value
        elif rest.startswith("norm_out."):
            out[f"{part}.conv_norm_out.{rest[9:]}"] = value
        else:  # conv_in, conv_out
            out[key] = value
    return out


def vae_diffusers_kwargs(ddconfig: dict) -> dict:
    res = ddconfig["resolution"]
    down, up_rev = [], []
    for i in range(len(ddconfig["ch_mult"])):
        a = (res // 2**i) in ddconfig["attn_resolutions"]
        down.append("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D")
        up_rev.append("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D")
    return dict(in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"], down_block_types=tuple(down),
                up_block_types=tuple(reversed(up_rev)),
                block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
                layers_per_block=ddconfig["num_res_blocks"], latent_channels=ddconfig["z_channels"],
                norm_num_groups=32, sample_size=res)


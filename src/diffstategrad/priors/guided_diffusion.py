"""The ADM UNet (Dhariwal & Nichol 2021) with guided-diffusion's parameter names, and the prior
that wraps its checkpoints (DPS / DAPS ``ffhq_10m.pt``, OpenAI ``256x256_diffusion_uncond.pt``).

Architecture (guided-diffusion ``UNetModel``; CompVis ``openaimodel.UNetModel`` is the same
network, see :mod:`diffstategrad.priors.compvis`):

- sinusoidal timestep embedding of width ``model_channels`` (cos half first) -> ``time_embed``
  (Linear, SiLU, Linear) to ``4 * model_channels``; optional ``label_emb`` for class labels;
- ``input_blocks``: a 3x3 stem conv, then per level ``num_res_blocks`` ResBlocks (each followed
  by an AttentionBlock where the downsampling factor ``ds`` is in ``attention_resolutions``)
  and, except at the last level, a downsampling block (a ResBlock with ``down=True`` when
  ``resblock_updown``, else a stride-2 conv or average pool named ``op``);
- ``middle_block``: ResBlock, AttentionBlock, ResBlock;
- ``output_blocks``: per level (coarsest first) ``num_res_blocks + 1`` ResBlocks on the
  concatenation with the matching encoder activation, attention as above, and an upsampling
  block after the last one (a ResBlock with ``up=True`` or nearest x2 + conv ``conv``);
- ``out``: GroupNorm, SiLU, 3x3 conv.

ResBlock: ``in_layers`` (GroupNorm, SiLU, conv3x3), ``emb_layers`` (SiLU, Linear to 2C for
scale-shift or C), ``out_layers`` (GroupNorm, SiLU, Dropout, conv3x3), ``skip_connection``
(identity or 1x1 conv). With scale-shift norm the output GroupNorm is modulated as
``norm(h) * (1 + scale) + shift`` (FiLM). AttentionBlock: ``norm``, ``qkv`` (1x1 Conv1d to 3C),
``proj_out``; multi-head attention with the "legacy" head layout (the qkv channels are grouped
per head, then split into q, k, v) unless ``use_new_attention_order``. GroupNorms have 32 groups
and run in float32 (guided-diffusion's GroupNorm32).

The prior: epsilon is the first C output channels; with ``learn_sigma`` the other C channels
are guided-diffusion's ``model_var_values`` v in [-1, 1], exposed through
:meth:`GuidedDiffusionPrior.eps_and_variance` (DDPM samplers then use
log var = (v+1)/2 log beta + (1-v)/2 log beta-tilde). Schedule: 1000 linear betas (DDPM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from diffstategrad.priors.base import DiffusionPrior, as_timesteps
from diffstategrad.storage import build_on_meta, load_into, read_state_dict
from diffstategrad.priors.registry import register_format
from diffstategrad.priors.unet import timestep_embedding
from diffstategrad.schedules import VPSchedule, make_schedule

__all__ = [
    "UNetModel",
    "GuidedDiffusionPrior",
    "GUIDED_DIFFUSION_PRESETS",
    "guided_diffusion_unet_config",
    "load_guided_diffusion",
]


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (guided-diffusion, LDM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (with ``use_conv``) a 3x3 conv named ``conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv (``use_conv``) or a 2x2 average pool, named ``op``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """The ADM residual block; ``up`` / ``down`` resample both paths between the first
    normalisation and the first convolution (BigGAN style, ``resblock_updown``)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions, residual. Heads: ``channels // num_head_channels``
    when ``num_head_channels`` is set, else ``num_heads``."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention width {channels} is not a multiple of num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"cannot split {channels} attention channels into {self.num_heads} heads")
        self.new_order = use_new_attention_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, *spatial = x.shape
        flat = x.reshape(B, C, -1)
        qkv = self.qkv(self.norm(flat))
        T, H = flat.shape[-1], self.num_heads
        if self.new_order:  # split q, k, v first, then heads
            q, k, v = (part.reshape(B * H, C // H, T) for part in qkv.chunk(3, dim=1))
        else:  # legacy: heads first, each head's channels hold its q, k, v
            q, k, v = qkv.reshape(B * H, 3 * C // H, T).chunk(3, dim=1)
        # softmax(q^T k / sqrt(d)) v, in the (length, channels) layout SDPA takes
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(a.transpose(1, 2).reshape(B, C, T))
        return (flat + h).reshape(B, C, *spatial)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """guided-diffusion's / CompVis's ``UNetModel`` (2-D, no gradient checkpointing), with the
    same constructor arguments and parameter names.

    ``attention_resolutions`` are downsampling factors (1, 2, 4, ...), as the class takes them;
    ``config`` holds the constructor arguments (JSON-able) to rebuild the network.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels must be set")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(int(a) for a in attention_resolutions)
        channel_mult = tuple(channel_mult)
        self.config = {
            "image_size": int(image_size), "in_channels": int(in_channels), "model_channels": int(model_channels),
            "out_channels": int(out_channels), "num_res_blocks": int(num_res_blocks),
            "attention_resolutions": list(attention_resolutions), "dropout": float(dropout),
            "channel_mult": list(channel_mult), "conv_resample": bool(conv_resample), "num_classes": num_classes,
            "num_heads": int(num_heads), "num_head_channels": int(num_head_channels),
            "num_heads_upsample": int(num_heads_upsample), "use_scale_shift_norm": bool(use_scale_shift_norm),
            "resblock_updown": bool(resblock_updown), "use_new_attention_order": bool(use_new_attention_order),
        }
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.model_channels = int(model_channels)
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        ch = stem = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(stem, out_channels, 3, padding=1))

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (self.num_levels - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError("class labels y must be given exactly when the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# guided-diffusion's create_model arguments and the presets of the published checkpoints
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 1000  # guided-diffusion's ImageNet class count (class_cond=True)

GUIDED_DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    # DPS / DAPS ffhq_10m.pt (DPS configs/model_config.yaml)
    "ffhq256": {
        "image_size": 256, "num_channels": 128, "num_res_blocks": 1, "channel_mult": "",
        "attention_resolutions": "16", "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
        "learn_sigma": True, "use_scale_shift_norm": True, "resblock_updown": True,
        "use_new_attention_order": False, "dropout": 0.0, "class_cond": False,
    },
    # OpenAI 256x256_diffusion_uncond.pt (guided-diffusion README flags)
    "imagenet256": {
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "",
        "attention_resolutions": "32,16,8", "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
        "learn_sigma": True, "use_scale_shift_norm": True, "resblock_updown": True,
        "use_new_attention_order": False, "dropout": 0.0, "class_cond": False,
    },
}

# create_model's defaults for the arguments a caller may leave out
_CREATE_MODEL_DEFAULTS: dict[str, Any] = {
    "channel_mult": "", "learn_sigma": False, "class_cond": False, "attention_resolutions": "16",
    "num_heads": 1, "num_head_channels": -1, "num_heads_upsample": -1, "use_scale_shift_norm": False,
    "dropout": 0.0, "resblock_updown": False, "use_new_attention_order": False,
}
_REQUIRED = ("image_size", "num_channels", "num_res_blocks")
_IGNORED = ("use_fp16", "use_checkpoint")  # precision / memory switches, not architecture
_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _int_list(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(v) for v in value]


def guided_diffusion_unet_config(**args) -> dict[str, Any]:
    """Translate guided-diffusion ``create_model`` arguments (by their original names) into
    :class:`UNetModel` arguments, as ``create_model`` does: ``channel_mult=""`` picks the
    default for the image size, ``attention_resolutions`` are pixel resolutions ("32,16,8")
    turned into downsampling factors, ``learn_sigma`` doubles the output channels."""
    unknown = sorted(set(args) - set(_CREATE_MODEL_DEFAULTS) - set(_REQUIRED) - set(_IGNORED))
    if unknown:
        raise TypeError(f"unknown guided-diffusion model arguments: {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in args]
    if missing:
        raise TypeError(f"guided-diffusion model arguments missing: {', '.join(missing)} (or give a preset: "
                        f"{', '.join(GUIDED_DIFFUSION_PRESETS)})")
    a = {**_CREATE_MODEL_DEFAULTS, **{k: v for k, v in args.items() if k not in _IGNORED}}
    size = int(a["image_size"])
    mult = a["channel_mult"]
    if mult in ("", None):
        if size not in _DEFAULT_MULT:
            raise ValueError(f"no default channel_mult for image_size {size}; give channel_mult explicitly")
        mult = _DEFAULT_MULT[size]
    elif isinstance(mult, str):
        mult = tuple(float(m) if "." in m else int(m) for m in mult.split(","))
    attention_ds = [size // r for r in _int_list(a["attention_resolutions"])]
    return {
        "image_size": size, "in_channels": 3, "model_channels": int(a["num_channels"]),
        "out_channels": 6 if a["learn_sigma"] else 3, "num_res_blocks": int(a["num_res_blocks"]),
        "attention_resolutions": attention_ds, "dropout": float(a["dropout"]), "channel_mult": list(mult),
        "num_classes": NUM_CLASSES if a["class_cond"] else None, "num_heads": int(a["num_heads"]),
        "num_head_channels": int(a["num_head_channels"]), "num_heads_upsample": int(a["num_heads_upsample"]),
        "use_scale_shift_norm": bool(a["use_scale_shift_norm"]), "resblock_updown": bool(a["resblock_updown"]),
        "use_new_attention_order": bool(a["use_new_attention_order"]),
    }


# ---------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------


class GuidedDiffusionPrior(DiffusionPrior):
    """A guided-diffusion UNet as a pixel prior on images in [-1, 1].

    ``eps`` is the first C output channels; with a learned variance (6 output channels)
    ``eps_and_variance`` also returns guided-diffusion's ``model_var_values``. A
    class-conditional network is used with one fixed ``class_label`` for every sample.
    The network's timestep input is the integer t of the 1000-step schedule (guided-diffusion
    with ``rescale_timesteps=False``, as DPS and DAPS run it).
    """

    format_name = "guided-diffusion"

    def __init__(self, unet: UNetModel, schedule: VPSchedule | None = None, class_label: int | None = None):
        super().__init__(schedule if schedule is not None else make_schedule("linear", 1000), unet.in_channels)
        if unet.out_channels not in (unet.in_channels, 2 * unet.in_channels):
            raise ValueError(f"a guided-diffusion UNet has C or 2C output channels, got {unet.out_channels}")
        if (unet.num_classes is not None) != (class_label is not None):
            raise ValueError("a class-conditional checkpoint needs class_label (and only such a checkpoint takes one)")
        if class_label is not None and not 0 <= int(class_label) < unet.num_classes:
            raise ValueError(f"class_label must be in [0, {unet.num_classes}), got {class_label}")
        self.unet = unet
        self.class_label = None if class_label is None else int(class_label)
        self.learned_variance = unet.out_channels == 2 * unet.in_channels

    def _forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        B = x_t.shape[0]
        t = as_timesteps(t, B, device=x_t.device)
        y = None if self.class_label is None else torch.full((B,), self.class_label, dtype=torch.long, device=x_t.device)
        dtype = self.unet.out[2].weight.dtype
        return self.unet(x_t.to(dtype), t, y).to(x_t.dtype)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self._forward(x_t, t)[:, : self.channels]

    def eps_and_variance(self, x_t: torch.Tensor, t):
        out = self._forward(x_t, t)
        C = self.channels
        return out[:, :C], (out[:, C:] if self.learned_variance else None)

    def check_size(self, height: int, width: int) -> None:
        f = self.unet.size_multiple
        if height % f or width % f:
            raise ValueError(f"this guided-diffusion UNet needs H and W that are multiples of {f}, got {height}x{width}")

    def size_rule(self) -> str:
        s = self.unet.image_size
        return (f"trained at {s}x{s}; any H, W that are multiples of {self.unet.size_multiple} run "
                f"(other sizes are outside the training distribution)")

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(spec, tensors) for :func:`diffstategrad.convert.convert`."""
        return {"unet": self.unet.config, "class_label": self.class_label}, self.state_dict()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], schedule: VPSchedule) -> "GuidedDiffusionPrior":
        """The prior's structure on the meta device, to be filled by a strict load."""
        unet = build_on_meta(UNetModel, **spec["unet"])
        return cls(unet, schedule, spec.get("class_label"))


def load_guided_diffusion(
    checkpoint,
    preset: str | None = None,
    *,
    class_label: int | None = None,
    diffusion_steps: int = 1000,
    noise_schedule: str = "linear",
    dtype: torch.dtype = torch.float32,
    device=None,
    **model_args,
) -> GuidedDiffusionPrior:
    """Load a guided-diffusion checkpoint (a plain state_dict) strictly.

    Args:
        checkpoint: the ``.pt`` file (e.g. ``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``).
        preset: ``"ffhq256"`` or ``"imagenet256"``; explicit ``model_args`` override its values.
        class_label: the fixed label for a class-conditional checkpoint (``class_cond=True``).
        diffusion_steps, noise_schedule: the training schedule (1000 linear betas for both
            published checkpoints).
        dtype, device: where the weights go (float32 on CPU by default).
        **model_args: guided-diffusion ``create_model`` arguments by their original names
            (image_size, num_channels, num_res_blocks, channel_mult, attention_resolutions,
            num_heads, num_head_channels, num_heads_upsample, learn_sigma, use_scale_shift_norm,
            resblock_updown, use_new_attention_order, dropout, class_cond).
    """
    if preset is not None:
        if preset not in GUIDED_DIFFUSION_PRESETS:
            raise ValueError(f"unknown guided-diffusion preset {preset!r}; choose one of {sorted(GUIDED_DIFFUSION_PRESETS)}")
        model_args = {**GUIDED_DIFFUSION_PRESETS[preset], **model_args}
    config = guided_diffusion_unet_config(**model_args)
    path = Path(checkpoint).expanduser()
    state = read_state_dict(path, what="guided-diffusion checkpoint")
    unet = build_on_meta(UNetModel, **config)
    what = f"guided-diffusion UNet ({'preset ' + preset if preset else 'given arguments'})"
    load_into(unet, state, source=path, what=what, dtype=dtype)
    schedule = make_schedule(noise_schedule, int(diffusion_steps))
    prior = GuidedDiffusionPrior(unet, schedule, class_label).eval().requires_grad_(False)
    return prior.to(device) if device is not None else prior


register_format(
    GuidedDiffusionPrior.format_name, GuidedDiffusionPrior.from_spec, load=load_guided_diffusion, convertible=True,
    description="guided-diffusion / ADM checkpoint: load_prior('guided-diffusion', checkpoint=PATH, preset='ffhq256' | 'imagenet256')")

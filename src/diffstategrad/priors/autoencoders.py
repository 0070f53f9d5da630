"""The CompVis first-stage autoencoders (taming-transformers / latent-diffusion), with their
parameter names: the VQ model (``VQModel`` / ``VQModelInterface`` with ``VectorQuantizer2``)
and the KL model (``AutoencoderKL``).

Encoder (``ddconfig``: ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, double_z):
``conv_in``; per level ``down.{i}.block.{j}`` ResnetBlocks (``down.{i}.attn.{j}`` where the
current resolution is in ``attn_resolutions``) and, except at the last level,
``down.{i}.downsample.conv`` (stride 2 after zero-padding right/bottom by one);
``mid.block_1``, ``mid.attn_1``, ``mid.block_2``; ``norm_out``, SiLU, ``conv_out`` to z_channels
(twice that with ``double_z``). The decoder mirrors it (``up.{i}`` stored finest first, run
coarsest first, ``num_res_blocks + 1`` blocks per level, ``up.{i}.upsample.conv`` after nearest
x2). ResnetBlock: ``norm1``, SiLU, ``conv1``, ``norm2``, SiLU, dropout, ``conv2`` and a 1x1
``nin_shortcut`` where widths change. AttnBlock: single-head attention with 1x1 convs ``q``,
``k``, ``v``, ``proj_out``. All GroupNorms have 32 groups and eps 1e-6.

VQ: ``quant_conv`` (z_channels -> embed_dim) and ``post_quant_conv`` around the codebook
``quantize.embedding`` (n_embed x embed_dim). Following ``VQModelInterface`` (the class the LDM
configs use), ``encode`` stops before quantisation and ``decode`` quantises to the nearest code
with a straight-through estimator (the forward value is the code, the gradient passes to the
input unchanged), as taming's ``VectorQuantizer2`` does.
KL: ``quant_conv`` gives the mean and log-variance (2 x embed_dim); ``encode`` returns the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Encoder", "Decoder", "VectorQuantizer", "VQModel", "AutoencoderKL", "DDCONFIG_KEYS"]

# The ddconfig entries that shape the networks (others, like dropout, are accepted too).
DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                 "z_channels", "double_z", "dropout", "resamp_with_conv", "attn_type", "give_pre_end", "tanh_out",
                 "use_linear_attn")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.reshape = in_channels != out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.reshape else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(a.transpose(2, 3).reshape(B, C, H, W))


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming / LDM


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_ddconfig(cfg: Mapping[str, Any]) -> None:
    if not cfg.get("resamp_with_conv", True):
        raise ValueError("ddconfig resamp_with_conv=False is not supported")
    if cfg.get("attn_type", "vanilla") != "vanilla" or cfg.get("use_linear_attn", False):
        raise ValueError("only vanilla attention autoencoders are supported (attn_type='vanilla')")
    if cfg.get("give_pre_end", False) or cfg.get("tanh_out", False):
        raise ValueError("ddconfig give_pre_end / tanh_out are not supported")


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, dropout: float = 0.0,
                 **other):
        super().__init__()
        _check_ddconfig(other)
        self.num_res_blocks = num_res_blocks
        res = resolution
        block_in = ch
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = _Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, dropout: float = 0.0, **other):
        super().__init__()
        _check_ddconfig(other)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = _Upsample(block_in)
                res *= 2
            stages.insert(0, stage)  # stored finest level first, as the checkpoints name them
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a straight-through gradient (``VectorQuantizer2``)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for every position of z (B, D, H, W) -> (B, H, W)."""
        B, D, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()  # distances in float32 whatever the dtype
        codes = self.embedding.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return dist.argmin(dim=1).reshape(B, H, W)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            zq = self.embedding(self.indices(z.detach())).permute(0, 3, 1, 2).to(z.dtype)
        return z + (zq - z).detach()


def _ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(ddconfig)
    cfg["ch_mult"] = [int(m) for m in cfg["ch_mult"]]
    cfg["attn_resolutions"] = [int(r) for r in cfg.get("attn_resolutions", [])]
    return cfg


class VQModel(nn.Module):
    """``VQModelInterface``: encode = encoder + quant_conv (no quantisation), decode = quantise
    (straight-through) + post_quant_conv + decoder."""

    kind = "vq"

    def __init__(self, ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int):
        super().__init__()
        ddconfig = _ddconfig(ddconfig)
        if ddconfig.get("double_z", True):
            raise ValueError("a VQ first stage has ddconfig double_z: false")
        self.config = {"ddconfig": ddconfig, "n_embed": int(n_embed), "embed_dim": int(embed_dim)}
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = int(embed_dim)
        self.downsampling = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)
        return self.decoder(self.post_quant_conv(quant))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder; ``encode`` returns the posterior mean."""

    kind = "kl"

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int):
        super().__init__()
        ddconfig = _ddconfig(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("a KL first stage has ddconfig double_z: true")
        self.config = {"ddconfig": ddconfig, "embed_dim": int(embed_dim)}
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = int(embed_dim)
        self.downsampling = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, _logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

"""The built-in epsilon-prediction network: a small, fully convolutional DDPM-style UNet.

Architecture (Ho et al. 2020, Sec. 4 / Appendix B, without the self-attention layers):

- sinusoidal timestep embedding (Transformer style, as in DDPM) -> Linear -> SiLU -> Linear;
- ``conv_in`` (3x3) to ``channels[0]``;
- encoder: at each of ``len(channels)`` levels, ``blocks_per_level`` residual blocks, then a
  stride-2 3x3 convolution (none after the last level), so ``len(channels) - 1`` halvings;
- middle: ``middle_blocks`` residual blocks at the coarsest level;
- decoder: at each level, ``blocks_per_level + 1`` residual blocks that each take one encoder
  activation as a skip (concatenated), then nearest-neighbour x2 + 3x3 convolution;
- GroupNorm -> SiLU -> zero-initialised 3x3 ``conv_out``.

Residual blocks are GroupNorm -> SiLU -> conv -> GroupNorm -> FiLM (scale-shift from the
timestep embedding, guided-diffusion's ``use_scale_shift_norm``) -> SiLU -> conv (zero
initialised, so every block starts as the identity) plus a 1x1 skip where widths change.

There is no attention or other global layer: every output pixel depends on a bounded window
of the input, so a model trained on 64x64 crops runs unchanged on any H, W that is a multiple
of ``2 ** (len(channels) - 1)``. GroupNorm statistics are per sample, so a sample's output
does not depend on the rest of the batch.

``UNet.config`` is a plain dict that fully describes the architecture; it is stored as JSON
next to the weights and ``UNet.from_config`` rebuilds the network from it. The same class,
with other channel counts, serves as the latent-diffusion network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNet", "PIXEL_UNET_CONFIG", "LATENT_UNET_CONFIG", "TINY_UNET_CONFIG", "FASHION_UNET_CONFIG", "timestep_embedding",
           "count_parameters", "PRECONDITIONINGS", "edm_scalings", "network_eps", "network_target"]

# The shipped pixel prior: 5,187,491 parameters. Widths (32, 64, 96, 128) with two blocks per
# level were chosen over wider one-block variants (48-96-144-192: 7.3M, 64-128-192-256: 14M)
# for the 6M budget and CPU training speed (~12 img/s at 64x64, 1 thread, bf16).
PIXEL_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "channels": [32, 64, 96, 128],
    "blocks_per_level": 2,
    "middle_blocks": 2,
    "max_groups": 32,
    "time_embed_dim": 128,
    "dropout": 0.0,
}

# The shipped latent prior's network, on the 3-channel latents of the small autoencoder
# (priors/small_autoencoder.py, f4): 4,456,419 parameters, so that autoencoder (1,522,121) +
# UNet = 5,978,540 <= 6.0M. Latents are 4x smaller than images, so the top level can afford
# 64 channels; one block per level (two on the way up) and three halvings: latents must be
# multiples of 8, images multiples of 32 (trained on 128x128 crops = 32x32 latents).
LATENT_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "channels": [64, 96, 96, 128],
    "blocks_per_level": 1,
    "middle_blocks": 1,
    "max_groups": 32,
    "time_embed_dim": 256,
    "dropout": 0.0,
}

# The Fashion-MNIST prior (1 x 32 x 32): two halvings (32 -> 16 -> 8), wide levels.
# Small on purpose: on the 2-core development CPU (AVX2, ~35 GFLOP/s per core) it trains at
# ~46 images/s on one core and costs 7.4 ms per forward pass per image, so that the robustness
# study's tens of thousands of solves stay within hours (widths 32-64-128: 13 images/s, 3x the
# cost per solve).
FASHION_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64],
    "blocks_per_level": 1,
    "middle_blocks": 1,
    "max_groups": 8,
    "time_embed_dim": 64,
    "dropout": 0.0,
}

# For tests and smoke runs only.
TINY_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "channels": [8, 16, 16, 16],
    "blocks_per_level": 1,
    "middle_blocks": 1,
    "max_groups": 4,
    "time_embed_dim": 32,
    "dropout": 0.0,
}

_DEFAULTS = {"blocks_per_level": 1, "middle_blocks": 2, "max_groups": 32, "time_embed_dim": None, "dropout": 0.0}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (DDPM / guided-diffusion): [cos(t w_k), sin(t w_k)]
    with w_k = max_period ** (-k / (dim / 2)). Returns (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int, max_groups: int) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, GroupNorm with FiLM scale-shift from the time embedding, SiLU-conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, max_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch, max_groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch, max_groups), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Epsilon-prediction UNet: ``forward(x, t) -> eps`` with x (B, C_in, H, W), t (B,) integer
    timesteps; H and W must be multiples of ``size_multiple`` (= 2 ** number of halvings)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        cfg = {**_DEFAULTS, **dict(config)}
        unknown = set(cfg) - set(_DEFAULTS) - {"in_channels", "out_channels", "channels"}
        if unknown:
            raise ValueError(f"unknown UNet config keys: {sorted(unknown)}")
        chs = [int(c) for c in cfg["channels"]]
        if not chs:
            raise ValueError("UNet config needs at least one entry in 'channels'")
        if cfg["time_embed_dim"] is None:
            cfg["time_embed_dim"] = 4 * chs[0]
        cfg["channels"] = chs
        self.config = cfg
        nb, emb_dim, g, p = int(cfg["blocks_per_level"]), int(cfg["time_embed_dim"]), int(cfg["max_groups"]), float(cfg["dropout"])
        self.size_multiple = 2 ** (len(chs) - 1)
        self.in_channels, self.out_channels = int(cfg["in_channels"]), int(cfg["out_channels"])

        self.base_dim = chs[0]
        self.time_mlp = nn.Sequential(nn.Linear(chs[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(self.in_channels, chs[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [chs[0]]
        ch = chs[0]
        for level, width in enumerate(chs):
            for _ in range(nb):
                self.down.append(ResBlock(ch, width, emb_dim, g, p))
                ch = width
                skip_chs.append(ch)
            if level < len(chs) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim, g, p) for _ in range(int(cfg["middle_blocks"]))])

        self.up = nn.ModuleList()
        for level in reversed(range(len(chs))):
            width = chs[level]
            for _ in range(nb + 1):
                self.up.append(ResBlock(ch + skip_chs.pop(), width, emb_dim, g, p))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(_groups(ch, g), ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UNet":
        return cls(config)

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ValueError(
                f"the UNet needs height and width that are positive multiples of {m}, got {height}x{width}; "
                f"pad or crop the image to a multiple of {m}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self.check_size(x.shape[2], x.shape[3])
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(t.shape)}")

        emb = self.time_mlp(timestep_embedding(t, self.base_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, ResBlock) else module(h)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for module in self.up:
            if isinstance(module, ResBlock):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# Preconditioning: what the network's output means
# ---------------------------------------------------------------------------------------------
#
# "none": the network predicts epsilon directly (DDPM).
# "edm":  Karras et al. 2022 (EDM, Table 1 and Eq. 7), written for a discrete VP schedule. With
#         alpha_bar a, sigma^2 = (1 - a) / a and x_sigma = x_t / sqrt(a) = x0 + sigma * eps:
#             D(x_sigma) = c_skip x_sigma + c_out F(c_in x_sigma, t)
#             c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
#             c_in = 1 / sqrt(sigma^2 + s_d^2)
#         (s_d = sigma_data), the network conditioned on the integer timestep t (a bijection of
#         sigma). Training regresses F on (x0 - c_skip x_sigma) / c_out with unit weight, which
#         is EDM's loss weighting lambda(sigma) = 1 / c_out^2 on D; every noise level then has a
#         unit-variance input and target. The epsilon the solvers use follows from D without a
#         division by sigma:
#             eps = (x_sigma - D) / sigma = sigma / (sigma^2 + s_d^2) x_sigma - s_d / sqrt(sigma^2 + s_d^2) F.

PRECONDITIONINGS = ("none", "edm")


def edm_scalings(alpha_bar: torch.Tensor, sigma_data: float):
    """(sigma, c_skip, c_out, c_in) of EDM's preconditioning at VP level ``alpha_bar``."""
    sigma2 = (1 - alpha_bar) / alpha_bar
    denom = sigma2 + sigma_data**2
    sigma = sigma2.sqrt()
    return sigma, sigma_data**2 / denom, sigma * sigma_data / denom.sqrt(), 1 / denom.sqrt()


def network_eps(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, preconditioning: str = "none",
                sigma_data: float = 0.5) -> torch.Tensor:
    """The epsilon prediction of ``net`` at x_t (VP), whatever its preconditioning."""
    if preconditioning == "none":
        return net(x_t, t)
    if preconditioning != "edm":
        raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
    sigma, _, _, c_in = edm_scalings(alpha_bar, sigma_data)
    x_sigma = x_t / alpha_bar.sqrt()
    out = net((c_in * x_sigma).to(x_t.dtype), t)
    return (sigma / (sigma**2 + sigma_data**2) * x_sigma - sigma_data * c_in * out).to(out.dtype)


def network_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, preconditioning: str = "none",
                   sigma_data: float = 0.5):
    """(network input scaling of x_t, regression target) for training with ``preconditioning``:
    the network sees ``scale * x_t`` and regresses on the target with unit weight."""
    if preconditioning == "none":
        return torch.ones_like(alpha_bar), noise
    sigma, _, _, c_in = edm_scalings(alpha_bar, sigma_data)
    # F* = (x0 - c_skip x_sigma) / c_out = (sigma x0 - s_d^2 eps) / (s_d sqrt(sigma^2 + s_d^2))
    target = (sigma * x0 - sigma_data**2 * noise) * c_in / sigma_data
    return c_in / alpha_bar.sqrt(), target

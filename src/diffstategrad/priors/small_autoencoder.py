"""The built-in latent prior's autoencoder: small, fully convolutional, KL-regularised, f4 x 3.

Geometry: the LDM paper's VQ-f4 model that ReSample and DiffStateGrad run on (Rombach et al.
2022, Tab. 8): images (B, 3, H, W) in [-1, 1] <-> latents (B, 3, H/4, W/4).

Why KL and not VQ: the latent solvers (PSLD, ReSample, latent DAPS) differentiate through
``decode`` (and PSLD also through ``encode``) with respect to the latent. A vector quantiser
in the decoder path is piecewise constant, so its true gradient is zero almost everywhere and
training needs a straight-through estimator; the LDM's VQ models sidestep that by decoding
unquantised latents at inference anyway. A KL-regularised (diagonal Gaussian posterior)
autoencoder gives a smooth decoder everywhere the solvers look, with the same geometry. The KL
weight is tiny (LDM's 1e-6), so the posterior is nearly deterministic: ``encode`` returns its
mean, and the latent diffusion is trained on ``scale_factor * mean``.

Architecture (LDM's ``Encoder`` / ``Decoder`` without attention, much narrower):

- encoder: ``conv_in`` 3x3 -> at each of the ``len(channels)`` levels ``encoder_blocks``
  residual blocks, then a stride-2 3x3 convolution (none after the last level) -> ``middle_blocks``
  residual blocks -> GroupNorm, SiLU, 3x3 conv to ``2 * latent_channels`` (mean, log-variance);
- decoder: 3x3 ``conv_in`` from the latent -> ``middle_blocks`` residual blocks -> at each level,
  coarsest first, ``decoder_blocks`` residual blocks, then nearest-neighbour x2 + 3x3 conv (none
  after the finest level) -> GroupNorm, SiLU, 3x3 conv to 3 channels. The output is not clipped
  (it is approximately in [-1, 1]);
- residual block: GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3 (zero
  initialised, so each block starts as the identity), plus a 1x1 skip where widths change.

No attention and no other global layer, so every size that is a multiple of ``downsampling``
(= 2 ** (len(channels) - 1) = 4) works, and one sample's output never depends on the rest of the
batch (GroupNorm is per sample).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SmallAutoencoder", "AUTOENCODER_CONFIG", "TINY_AUTOENCODER_CONFIG", "kl_divergence"]

# The shipped autoencoder: 1,522,121 parameters (encoder 0.51M, decoder 1.01M). The decoder
# gets twice the blocks of the encoder (LDM gives its decoder num_res_blocks + 1), since
# reconstruction quality is limited by the decoder; no middle blocks at the latent level, where
# the decoder's first level already works. 64 channels at full resolution; with the latent
# UNet (LATENT_UNET_CONFIG, 4,456,419) the latent prior has 5,978,540 parameters (< 6.0M,
# 23.9 MB as float32).
AUTOENCODER_CONFIG: dict[str, Any] = {
    "image_channels": 3,
    "latent_channels": 3,
    "channels": [64, 96, 96],
    "encoder_blocks": 1,
    "decoder_blocks": 2,
    "middle_blocks": 0,
    "max_groups": 32,
}

# For tests and smoke runs only.
TINY_AUTOENCODER_CONFIG: dict[str, Any] = {
    "image_channels": 3,
    "latent_channels": 3,
    "channels": [8, 16, 16],
    "encoder_blocks": 1,
    "decoder_blocks": 1,
    "middle_blocks": 1,
    "max_groups": 4,
}

_DEFAULTS = {"image_channels": 3, "latent_channels": 3, "encoder_blocks": 1, "decoder_blocks": 2,
             "middle_blocks": 1, "max_groups": 32}


def _groups(channels: int, max_groups: int) -> int:
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent elements: (B,).

    0.5 * sum(mean^2 + var - 1 - logvar); zero exactly when mean = 0 and logvar = 0, positive
    otherwise (LDM's ``DiagonalGaussianDistribution.kl``)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * torch.sum(mean**2 + logvar.exp() - 1.0 - logvar, dim=tuple(range(1, mean.ndim)))


class _Block(nn.Module):
    """GroupNorm-SiLU-conv3x3, GroupNorm-SiLU-conv3x3 (zero init), + skip."""

    def __init__(self, in_ch: int, out_ch: int, max_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch, max_groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch, max_groups), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SmallAutoencoder(nn.Module):
    """KL-regularised convolutional autoencoder; see the module docstring.

    ``config`` is a plain JSON-serialisable dict (``self.config``, with defaults filled in)
    that rebuilds the network: ``SmallAutoencoder(ae.config)``.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        cfg = {**_DEFAULTS, **dict(config)}
        unknown = set(cfg) - set(_DEFAULTS) - {"channels"}
        if unknown:
            raise ValueError(f"unknown SmallAutoencoder config keys: {sorted(unknown)}")
        chs = [int(c) for c in cfg["channels"]]
        if len(chs) < 1:
            raise ValueError("SmallAutoencoder config needs at least one entry in 'channels'")
        cfg["channels"] = chs
        for key in ("image_channels", "latent_channels", "encoder_blocks", "decoder_blocks", "middle_blocks", "max_groups"):
            cfg[key] = int(cfg[key])
        self.config = cfg
        self.image_channels = cfg["image_channels"]
        self.latent_channels = cfg["latent_channels"]
        self.downsampling = 2 ** (len(chs) - 1)
        g = cfg["max_groups"]

        # encoder
        self.enc_in = nn.Conv2d(self.image_channels, chs[0], 3, padding=1)
        enc: list[nn.Module] = []
        ch = chs[0]
        for level, width in enumerate(chs):
            for _ in range(cfg["encoder_blocks"]):
                enc.append(_Block(ch, width, g))
                ch = width
            if level < len(chs) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [_Block(ch, ch, g) for _ in range(cfg["middle_blocks"])]
        self.encoder = nn.Sequential(*enc)
        self.enc_norm = nn.GroupNorm(_groups(ch, g), ch)
        self.enc_out = nn.Conv2d(ch, 2 * self.latent_channels, 3, padding=1)

        # decoder
        ch = chs[-1]
        self.dec_in = nn.Conv2d(self.latent_channels, ch, 3, padding=1)
        dec: list[nn.Module] = [_Block(ch, ch, g) for _ in range(cfg["middle_blocks"])]
        for level in reversed(range(len(chs))):
            for _ in range(cfg["decoder_blocks"]):
                dec.append(_Block(ch, chs[level], g))
                ch = chs[level]
            if level > 0:
                dec.append(_Upsample(ch))
        self.decoder = nn.Sequential(*dec)
        self.dec_norm = nn.GroupNorm(_groups(ch, g), ch)
        self.dec_out = nn.Conv2d(ch, self.image_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SmallAutoencoder":
        return cls(config)

    def check_size(self, height: int, width: int) -> None:
        f = self.downsampling
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"the autoencoder needs image height and width that are positive multiples of {f}, got "
                f"{height}x{width}; pad or crop the image to a multiple of {f}"
            )

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"expected {what} of shape (B, {channels}, H, W), got {tuple(x.shape)}")

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the diagonal Gaussian posterior, each (B, latent_channels, H/f, W/f).

        logvar is clamped to [-30, 20] as in LDM's ``DiagonalGaussianDistribution``."""
        self._check_input(x, self.image_channels, "images")
        self.check_size(x.shape[2], x.shape[3])
        h = self.encoder(self.enc_in(x))
        mean, logvar = self.enc_out(F.silu(self.enc_norm(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (deterministic, differentiable): (B, 3, H/4, W/4)."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 4h, 4w), unclipped, approximately in [-1, 1] (differentiable)."""
        self._check_input(z, self.latent_channels, "latents")
        h = self.decoder(self.dec_in(z))
        return self.dec_out(F.silu(self.dec_norm(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

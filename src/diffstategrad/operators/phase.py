"""Phase retrieval: the Fourier magnitude of the zero-padded image, as in DiffStateGrad.

A(x) = |F_c(pad((x + 1) / 2))| per channel, where F_c is the centred orthonormal 2-D DFT
(ifftshift, FFT with norm='ortho', fftshift: fastMRI's ``fft2c``) and ``pad`` zero-pads
int(oversample / 8 * n) pixels on both sides of an axis of length n (64 at 256 with
oversample 2.0, giving 384x384). The rescaling to [0, 1] first follows the official code
("rescale like DAPS"); DPS's own operator skips it.

The magnitude is not differentiable where a Fourier coefficient is exactly zero; torch returns a
zero gradient there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffstategrad.operators.base import Operator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, Size, register_operator

__all__ = ["PhaseRetrieval", "centered_fft2", "oversample_padding"]


def oversample_padding(length: int, oversample: float = 2.0) -> int:
    """Zero padding on each side of an axis of ``length`` pixels: int(oversample / 8 * length)."""
    return int(float(oversample) / 8.0 * int(length))


def centered_fft2(x: torch.Tensor) -> torch.Tensor:
    """The centred orthonormal 2-D DFT over the last two axes (complex output)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.fft2(x, norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


class PhaseRetrieval(Operator):
    """y = |F_c(pad((x + 1) / 2))|, shape (B, C, H + 2 p_h, W + 2 p_w).

    Args:
        pad: p or (p_h, p_w), the zero padding per side; None derives it from each input's size
            with :func:`oversample_padding`.
        oversample: used when ``pad`` is None (2.0 in the preset).
    """

    def __init__(self, pad=None, oversample: float = 2.0):
        super().__init__()
        if pad is not None:
            pad = (int(pad), int(pad)) if not isinstance(pad, (tuple, list)) else (int(pad[0]), int(pad[1]))
            if min(pad) < 0:
                raise ValueError(f"padding must be non-negative, got {pad}")
        self.pad = pad
        self.oversample = float(oversample)

    def padding_for(self, size) -> tuple[int, int]:
        if self.pad is not None:
            return self.pad
        return oversample_padding(size[0], self.oversample), oversample_padding(size[1], self.oversample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        pad_h, pad_w = self.padding_for(x.shape[-2:])
        padded = F.pad((x + 1.0) / 2.0, (pad_w, pad_w, pad_h, pad_h))
        return centered_fft2(padded).abs()

    def extra_repr(self) -> str:
        return f"pad={self.pad}" if self.pad is not None else f"oversample={self.oversample}"


def _scale(params: dict, size: Size) -> dict:
    """Padding int(oversample / 8 * n) for each axis length n (from the reference size when the
    preset does not scale)."""
    lengths = (size.height, size.width) if size.scale_with_size else (size.reference, size.reference)
    return {**params, "pad": tuple(oversample_padding(n, params["oversample"]) for n in lengths)}


register_operator(OperatorSpec("phase_retrieval", {"oversample": 2.0}, lambda params, image_shape, seeds: PhaseRetrieval(pad=params["pad"]),
                               _scale, description="Fourier magnitude of the zero-padded image"))

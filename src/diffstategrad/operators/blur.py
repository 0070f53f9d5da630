"""Blur: reflection padding followed by a depthwise convolution, as the official ``Blurkernel``.

A(x) = conv(reflect_pad(x, k // 2), K) per channel, one (k, k) kernel K shared by all channels
(the official operator is a 3-group Conv2d with the same kernel in each group). Conv2d is a
cross-correlation; the kernel is used as stored, like the official code.

The adjoint is written out: the transposed convolution followed by the adjoint of reflection
padding, which adds every padded border pixel back onto the pixel it was copied from.

Kernels are stored as (1, 1, k, k) (one kernel for the batch) or (B, 1, k, k) (one per sample);
see :mod:`diffstategrad.operators.kernels` for the Gaussian and motion kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffstategrad.operators.base import LinearOperator, check_image_batch
from diffstategrad.operators.kernels import gaussian_kernel, motion_blur_kernel
from diffstategrad.operators.registry import OperatorSpec, Size, ceil_tolerant, operator_rng, register_operator

__all__ = ["Blur", "reflect_pad", "reflect_pad_adjoint"]


def _reflect_source(n: int, pad: int, device) -> torch.Tensor:
    """For each of the n + 2 pad positions of a reflect-padded axis, the index it copies."""
    index = torch.arange(-pad, n + pad, device=device)
    index = torch.where(index < 0, -index, index)
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def _check_pad(x: torch.Tensor, pad: int) -> None:
    h, w = x.shape[-2:]
    if pad >= min(h, w):
        raise ValueError(f"reflection padding of {pad} needs images larger than {pad} pixels on each "
                         f"side, got {h}x{w}; use a smaller kernel (kernel size < 2 * side)")


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """torch.nn.ReflectionPad2d(pad) on the last two axes."""
    _check_pad(x, pad)
    return F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x


def reflect_pad_adjoint(y: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`reflect_pad`: (…, h + 2p, w + 2p) -> (…, h, w)."""
    if pad == 0:
        return y
    h, w = y.shape[-2] - 2 * pad, y.shape[-1] - 2 * pad
    if pad >= min(h, w):
        raise ValueError(f"padded size {tuple(y.shape[-2:])} is too small for padding {pad}")
    rows = _reflect_source(h, pad, y.device)
    cols = _reflect_source(w, pad, y.device)
    out = y.new_zeros(*y.shape[:-2], h, y.shape[-1]).index_add(-2, rows, y)
    return out.new_zeros(*y.shape[:-2], h, w).index_add(-1, cols, out)


class Blur(LinearOperator):
    """Depthwise blur with reflection padding, differentiable in x, with an explicit adjoint.

    Args:
        kernel: a (k, k) array/tensor, or (1, 1, k, k) shared by the batch, or (B, 1, k, k) with
            one kernel per sample. Square, odd k as in the official presets (even k works too:
            padding k // 2 then gives an output one pixel larger per axis, like the official code).
    """

    def __init__(self, kernel):
        super().__init__()
        if not isinstance(kernel, torch.Tensor):
            kernel = torch.from_numpy(np.array(kernel, dtype=np.float64))
        if kernel.ndim == 2:
            kernel = kernel[None, None]
        if kernel.ndim != 4 or kernel.shape[1] != 1 or kernel.shape[2] != kernel.shape[3]:
            raise ValueError(f"kernel must be (k, k), (1, 1, k, k) or (B, 1, k, k), got {tuple(kernel.shape)}")
        self.register_buffer("kernel", kernel.clone())

    @property
    def kernel_size(self) -> int:
        return int(self.kernel.shape[-1])

    @property
    def pad(self) -> int:
        return self.kernel_size // 2

    def _weights(self, x: torch.Tensor):
        """Depthwise conv weights and the number of groups for a batch shaped like x."""
        b, c = x.shape[:2]
        kernel = self.kernel.to(x)
        if kernel.shape[0] == 1:
            return kernel.expand(c, 1, -1, -1), c, False
        if kernel.shape[0] != b:
            raise ValueError(f"the operator holds {kernel.shape[0]} per-sample kernels, batch has {b}")
        return kernel.repeat_interleave(c, dim=0), b * c, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        weight, groups, per_sample = self._weights(x)
        padded = reflect_pad(x, self.pad)
        if per_sample:  # fold the batch into channels so each sample meets its own kernel
            b, c = x.shape[:2]
            out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=groups)
            return out.reshape(b, c, *out.shape[-2:])
        return F.conv2d(padded, weight, groups=groups)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        check_image_batch(y, "y")
        weight, groups, per_sample = self._weights(y)
        if per_sample:
            b, c = y.shape[:2]
            padded = F.conv_transpose2d(y.reshape(1, b * c, *y.shape[-2:]), weight, groups=groups)
            padded = padded.reshape(b, c, *padded.shape[-2:])
        else:
            padded = F.conv_transpose2d(y, weight, groups=groups)
        return reflect_pad_adjoint(padded, self.pad)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, kernels={self.kernel.shape[0]}"


def _scale_kernel(params: dict, size: Size) -> dict:
    """Kernel size 2 ceil((k // 2) s) + 1 (61 -> 31 at 128, 17 at 64), Gaussian sigma times s;
    the reflection padding must stay smaller than the image."""
    kernel_size = 2 * ceil_tolerant((params["kernel_size"] // 2) * size.s) + 1
    out = {**params, "kernel_size": kernel_size}
    if "sigma" in params:
        out["sigma"] = float(params["sigma"]) * size.s
    if kernel_size // 2 >= min(size.height, size.width):
        raise ValueError(f"a {kernel_size}x{kernel_size} kernel needs reflection padding {kernel_size // 2}, "
                         f"which must be smaller than the image sides {size.height}x{size.width}")
    return out


def _build_gaussian(params: dict, image_shape, seeds) -> Blur:
    return Blur(gaussian_kernel(params["kernel_size"], params["sigma"]))


def _build_motion(params: dict, image_shape, seeds) -> Blur:
    kernels = [motion_blur_kernel(params["kernel_size"], params["intensity"], operator_rng(s)) for s in seeds]
    return Blur(np.stack(kernels)[:, None])


register_operator(OperatorSpec("gaussian_blur", {"kernel_size": 61, "sigma": 3.0}, _build_gaussian, _scale_kernel,
                               description="Gaussian blur after reflection padding"))
register_operator(OperatorSpec("motion_blur", {"kernel_size": 61, "intensity": 0.5}, _build_motion, _scale_kernel,
                               description="a random motion-blur kernel per seed, after reflection padding"))

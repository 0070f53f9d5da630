"""Inpainting: y = x * M with a 0/1 mask M shared by the channels; A is its own adjoint.

Masks follow the official ``mask_generator`` (DPS / ReSample / DiffStateGrad util/img_utils.py):

* box: a (h, w) box of zeros whose top-left corner (t, l) is drawn uniformly with
  t in {margin_h, ..., H - margin_h - h - 1} and l likewise (NumPy's ``randint(margin, H - margin
  - h)``, whose upper end is exclusive): at 256 with a 128 box and margin 16, t, l in {16..111}.
* random: a fraction p ~ U[lo, hi) of the H*W pixel locations, exactly floor(H*W*p) of them,
  drawn without replacement, are zero in every channel.

Masks are 2-D float64 arrays with 1 = observed, 0 = missing.
"""

from __future__ import annotations

import numpy as np
import torch

from diffstategrad.operators.base import LinearOperator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, Size, as_pair, operator_rng, register_operator, round_half_up

__all__ = ["Inpaint", "box_mask", "random_mask"]


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def box_mask(size, box_size, margin, rng: np.random.Generator) -> np.ndarray:
    """An (H, W) mask, 0 inside a randomly placed (h, w) box, 1 elsewhere.

    Args:
        size: (H, W).
        box_size: h or (h, w), the box sides (128 at 256).
        margin: m or (m_h, m_w), the smallest distance of the box from the top/left border and
            the exclusive bound on the bottom/right side (16 at 256).
        rng: NumPy generator; the top offset is drawn first, then the left one.
    """
    height, width = int(size[0]), int(size[1])
    box_h, box_w = _pair(box_size, "box_size")
    margin_h, margin_w = _pair(margin, "margin")
    top_end, left_end = height - margin_h - box_h, width - margin_w - box_w
    if box_h < 1 or box_w < 1 or top_end <= margin_h or left_end <= margin_w:
        raise ValueError(f"a {box_h}x{box_w} box with margins {margin_h}/{margin_w} does not fit in a "
                         f"{height}x{width} image (need side > box + 2 * margin)")
    top = int(rng.integers(margin_h, top_end))
    left = int(rng.integers(margin_w, left_end))
    mask = np.ones((height, width))
    mask[top:top + box_h, left:left + box_w] = 0.0
    return mask


def random_mask(size, missing_fraction, rng: np.random.Generator) -> np.ndarray:
    """An (H, W) mask with floor(H*W*p) zeros at random locations, p ~ U[lo, hi).

    Args:
        size: (H, W).
        missing_fraction: (lo, hi), the range of the missing fraction ((0.7, 0.71) in the preset),
            or one number for a fixed fraction.
        rng: NumPy generator; p is drawn first, then the locations.
    """
    height, width = int(size[0]), int(size[1])
    if isinstance(missing_fraction, (list, tuple)):
        lo, hi = float(missing_fraction[0]), float(missing_fraction[1])
    else:
        lo = hi = float(missing_fraction)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"missing_fraction must satisfy 0 <= lo <= hi <= 1, got {missing_fraction!r}")
    fraction = rng.uniform(lo, hi) if hi > lo else lo
    total = height * width
    missing = rng.choice(total, int(total * fraction), replace=False)
    mask = np.ones(total)
    mask[missing] = 0.0
    return mask.reshape(height, width)


class Inpaint(LinearOperator):
    """y = x * M, M broadcast over channels.

    Args:
        mask: (H, W), (1, 1, H, W) shared by the batch, or (B, 1, H, W) one mask per sample.
    """

    def __init__(self, mask):
        super().__init__()
        if not isinstance(mask, torch.Tensor):
            mask = torch.from_numpy(np.array(mask, dtype=np.float64))
        if mask.ndim == 2:
            mask = mask[None, None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be (H, W), (1, 1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        self.register_buffer("mask", mask.clone())

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        if tuple(x.shape[-2:]) != tuple(self.mask.shape[-2:]):
            raise ValueError(f"mask is {tuple(self.mask.shape[-2:])}, images are {tuple(x.shape[-2:])}")
        if self.mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"the operator holds {self.mask.shape[0]} per-sample masks, batch has {x.shape[0]}")
        return self.mask.to(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._mask_for(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._mask_for(y)

    def extra_repr(self) -> str:
        return f"size={tuple(self.mask.shape[-2:])}, masks={self.mask.shape[0]}"


def _scale_box(params: dict, size: Size) -> dict:
    """Box sides round(b s_h) x round(b s_w), margins round(m s_h) / round(m s_w) (half up)."""
    box_h, box_w = as_pair(params["box_size"])
    margin_h, margin_w = as_pair(params["margin"])
    box = (round_half_up(box_h * size.s_h), round_half_up(box_w * size.s_w))
    margin = (round_half_up(margin_h * size.s_h), round_half_up(margin_w * size.s_w))
    (bh, bw), (mh, mw) = box, margin
    if bh < 1 or bw < 1 or size.height - mh - bh <= mh or size.width - mw - bw <= mw:
        raise ValueError(f"box_inpainting: a {bh}x{bw} box with margins {mh}/{mw} does not fit a {size.height}x{size.width} image")
    return {**params, "box_size": box, "margin": margin}


def _build_box(params: dict, image_shape, seeds) -> Inpaint:
    masks = [box_mask(image_shape[1:], params["box_size"], params["margin"], operator_rng(s)) for s in seeds]
    return Inpaint(np.stack(masks)[:, None])


def _build_random(params: dict, image_shape, seeds) -> Inpaint:
    masks = [random_mask(image_shape[1:], params["missing_fraction"], operator_rng(s)) for s in seeds]
    return Inpaint(np.stack(masks)[:, None])


register_operator(OperatorSpec("box_inpainting", {"box_size": 128, "margin": 16}, _build_box, _scale_box,
                               description="a box of missing pixels at a random position"))
register_operator(OperatorSpec("random_inpainting", {"missing_fraction": [0.7, 0.71]}, _build_random,
                               lambda params, size: {**params, "missing_fraction": tuple(params["missing_fraction"])},
                               description="a random fraction of missing pixel locations (does not scale with size)"))

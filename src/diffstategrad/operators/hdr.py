"""High dynamic range: y = clip(scale * x, -1, 1) (DiffStateGrad's ``high_dynamic_range``, scale 2).

The gradient is zero wherever |scale * x| > 1: those pixels carry no information.
"""

from __future__ import annotations

import torch

from diffstategrad.operators.base import Operator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, register_operator

__all__ = ["HighDynamicRange"]


class HighDynamicRange(Operator):
    """y = clip(scale * x, -1, 1).

    Args:
        scale: the exposure gain (2.0 in the preset).
    """

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        return torch.clamp(x * self.scale, -1.0, 1.0)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


register_operator(OperatorSpec("high_dynamic_range", {"scale": 2.0}, lambda params, image_shape, seeds: HighDynamicRange(scale=params["scale"]),
                               description="exposure gain then clipping to [-1, 1]"))

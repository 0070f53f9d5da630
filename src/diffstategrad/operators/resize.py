"""Super-resolution: antialiased bicubic downsampling (Shocher's resizer, as used by DPS/ReSample).

Along one axis of length n, downscaling by an integer factor f (scale s = 1/f) gives
m = ceil(n / f) outputs. Output o (0-based) sits at input coordinate

    c_o = (o + 0.5 - delta) / s - 0.5,   delta = (m - n s) / 2,

where delta is Shocher's centring shift (zero when n s is an integer). Its weights are
s * cubic(s (c_o - j)) over input positions j (Keys cubic, a = -0.5, support |x| <= 2, so the
antialiased kernel is 4 / s = 4 f pixels wide), normalised to sum 1, and positions outside the
image are mirrored half-sample symmetrically (-1 -> 0, n -> n - 1). The operator is separable:
A(X) = R_h X R_w^T per channel with dense (m, n) matrices, so the adjoint is the exact transpose.

Credit: Assaf Shocher's ``resizer`` (github.com/assafshocher/resizer, a port of MATLAB's
imresize), vendored by DPS, ReSample and DiffStateGrad as util/resizer.py; re-implemented here
from its formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffstategrad.operators.base import LinearOperator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, register_operator

__all__ = ["Resize", "cubic", "resize_matrix"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB imresize, PIL BICUBIC)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric extension: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def resize_matrix(in_length: int, factor: int) -> np.ndarray:
    """The (ceil(in_length / factor), in_length) float64 matrix that downscales one axis."""
    n, f = int(in_length), int(factor)
    if n < 1 or f < 1:
        raise ValueError(f"need a positive length and factor, got {in_length} and {factor}")
    if f == 1:
        return np.eye(n)
    scale = 1.0 / f
    m = -(-n // f)  # ceil(n / f) in integers: no float fuzz in the output size
    shift = (m - n / f) / 2.0
    half_width = 2.0 * f  # the cubic's support |x| <= 2, stretched by 1 / scale
    matrix = np.zeros((m, n))
    for o in range(m):
        centre = (o + 0.5 - shift) * f - 0.5
        taps = np.arange(math.floor(centre - half_width), math.ceil(centre + half_width) + 1)
        weights = scale * cubic(scale * (centre - taps))
        weights /= weights.sum()
        np.add.at(matrix[o], _mirror(taps, n), weights)
    return matrix


class Resize(LinearOperator):
    """y = antialiased bicubic downsampling of x by an integer ``factor`` (per channel).

    Args:
        in_size: (H, W) of the images it acts on; the output is (ceil(H / f), ceil(W / f)).
        factor: the integer downscaling factor (4 in the super-resolution preset).
    """

    def __init__(self, in_size, factor: int = 4):
        super().__init__()
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"the super-resolution factor must be a positive integer, got {factor}")
        self.factor = int(factor)
        self.in_size = (int(in_size[0]), int(in_size[1]))
        self.out_size = tuple(-(-s // self.factor) for s in self.in_size)
        # float64 buffers; ``.to(dtype)`` or the per-call cast gives the working precision
        self.register_buffer("rows", torch.from_numpy(resize_matrix(self.in_size[0], self.factor)))
        self.register_buffer("cols", torch.from_numpy(resize_matrix(self.in_size[1], self.factor)))

    def _check(self, x: torch.Tensor, size, what: str) -> None:
        check_image_batch(x, what)
        if tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"{type(self).__name__} was built for {what} of size {tuple(size)}, "
                             f"got {tuple(x.shape[-2:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.in_size, "x")
        rows, cols = self.rows.to(x), self.cols.to(x)
        return rows @ x @ cols.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.out_size, "y")
        rows, cols = self.rows.to(y), self.cols.to(y)
        return rows.T @ y @ cols

    def extra_repr(self) -> str:
        return f"factor={self.factor}, in_size={self.in_size}, out_size={self.out_size}"


def _build(params: dict, image_shape, seeds) -> Resize:
    return Resize(image_shape[1:], factor=params["factor"])


register_operator(OperatorSpec("super_resolution", {"factor": 4}, _build,
                               description="bicubic downsampling by an integer factor (the factor does not scale with size)"))

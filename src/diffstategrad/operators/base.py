"""The operator contract: a differentiable forward model A, with an adjoint when it is linear.

Images are batches (B, C, H, W) in [-1, 1]. Operator parameters that are random (masks, blur
kernels) are drawn per sample from that sample's seed and stored with a leading batch dimension
of 1 (shared by the whole batch) or B (one per sample), so that a sample's measurement never
depends on the rest of the batch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Operator", "LinearOperator", "MatrixOperator", "check_image_batch"]


def check_image_batch(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")


class Operator(nn.Module):
    """A forward model y = A(x). Subclasses implement ``forward``."""

    linear: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not linear and has no adjoint")

    def extra_repr(self) -> str:
        return "linear" if self.linear else "nonlinear"


class LinearOperator(Operator):
    """A linear forward model; subclasses implement ``forward`` and ``adjoint``."""

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^T A x."""
        return self.adjoint(self.forward(x))


class MatrixOperator(LinearOperator):
    """y = A vec(x) for a dense (m, d) matrix A, d = C*H*W; y has shape (B, m).

    Small problems only: the exact posterior oracles of the tests and the docs.
    """

    def __init__(self, matrix: torch.Tensor, input_shape):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        d = 1
        for s in self.input_shape:
            d *= s
        if matrix.ndim != 2 or matrix.shape[1] != d:
            raise ValueError(f"matrix must be (m, {d}) for inputs of shape {self.input_shape}")
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        return x.reshape(x.shape[0], -1) @ self.matrix.to(x.dtype).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.matrix.to(y.dtype)).reshape(y.shape[0], *self.input_shape)

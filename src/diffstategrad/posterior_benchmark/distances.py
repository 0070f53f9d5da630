"""Distances between two sample sets, and the benchmark's per-measurement metrics.

- Sliced Wasserstein-2 (Rabin, Peyre, Delon & Bernot 2011; Bonneel et al. 2015):
  SW2(X, Y)^2 = mean over unit directions theta of W2^2(theta^T X, theta^T Y), each 1-D W2
  computed exactly from the sorted projections of two equal-size sets. The directions are a
  fixed seeded set, the same for every pair compared.
- Energy distance (Szekely & Rizzo 2013), the plug-in (V-statistic) estimate
  2 E||X - Y|| - E||X - X'|| - E||Y - Y'||, >= 0.

Both plug-in estimates are positive even for two sets from one distribution; the benchmark
reports that noise floor, measured on two independent exact posterior sample sets of the same
size, beside every value.
"""

from __future__ import annotations

import torch

__all__ = ["energy_distance", "random_directions", "sliced_wasserstein"]


def random_directions(dim: int, count: int, seed: int) -> torch.Tensor:
    """``count`` unit vectors in R^dim, uniformly distributed, from ``seed``: (count, dim) float64."""
    g = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(count, dim, generator=g, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_wasserstein(X: torch.Tensor, Y: torch.Tensor, directions: torch.Tensor) -> float:
    """SW2 between the equal-size sample sets X, Y (n, d) along ``directions`` (L, d)."""
    if X.shape != Y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(X.shape)} and {tuple(Y.shape)}")
    px = (X.to(torch.float64) @ directions.T).sort(dim=0).values
    py = (Y.to(torch.float64) @ directions.T).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def energy_distance(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The plug-in energy distance between sample sets X (n, d) and Y (m, d)."""
    X, Y = X.to(torch.float64), Y.to(torch.float64)
    value = 2 * torch.cdist(X, Y).mean() - torch.cdist(X, X).mean() - torch.cdist(Y, Y).mean()
    return float(value.clamp(min=0))

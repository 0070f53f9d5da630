"""``load_prior``: the one entry point to every prior the package can build or load, and the
catalogue of checkpoint formats.

A source is a registered name (``list_priors()``): an analytic oracle, a checkpoint format, or
a shipped model by the name ``diffstategrad models`` lists. Each format module registers itself
here with ``register_format``: the loader ``load_prior(FORMAT, ...)`` calls, the builder that
rebuilds it from a converted folder's spec, and whether ``diffstategrad convert FORMAT`` reads
its checkpoints. Converted folders, the CLI and user code read the catalogue, so a new format
is one module that registers itself (and its import in ``priors/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffstategrad.priors.analytic import GaussianMixturePrior, GaussianPrior
from diffstategrad.priors.base import DiffusionPrior

__all__ = ["load_prior", "register_prior", "list_priors", "PriorEntry", "PriorFormat", "register_format", "get_format", "list_formats"]


@dataclass(frozen=True)
class PriorEntry:
    name: str
    factory: Callable[..., DiffusionPrior]
    description: str


@dataclass(frozen=True)
class PriorFormat:
    """A checkpoint format: ``from_spec(spec, schedule)`` rebuilds a prior (on the meta device)
    from a converted folder's spec; ``convertible``: ``convert`` reads its original checkpoints."""

    name: str
    from_spec: Callable
    convertible: bool
    description: str


_REGISTRY: dict[str, PriorEntry] = {}
_FORMATS: dict[str, PriorFormat] = {}


def register_format(name: str, from_spec: Callable, *, load: Callable[..., DiffusionPrior] | None = None,
                    convertible: bool = False, description: str = "") -> None:
    """Register a checkpoint format (and, with ``load``, its ``load_prior(name, ...)`` entry)."""
    _FORMATS[name] = PriorFormat(name, from_spec, convertible, description)
    if load is not None:
        register_prior(name, load, description)


def get_format(name: str) -> PriorFormat:
    if name not in _FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def list_formats(convertible: bool | None = None) -> list[PriorFormat]:
    """The registered formats (only the ones ``convert`` reads, with ``convertible=True``)."""
    return [f for f in _FORMATS.values() if convertible is None or f.convertible == convertible]


def register_prior(name: str, factory: Callable[..., DiffusionPrior], description: str = "") -> None:
    """Register ``factory(**kwargs) -> DiffusionPrior`` under ``name`` (replacing any older one)."""
    _REGISTRY[name] = PriorEntry(name, factory, description)


def list_priors() -> list[PriorEntry]:
    return list(_REGISTRY.values())


def load_prior(source: str, *args, **kwargs) -> DiffusionPrior:
    """Build or load a prior.

    ``source`` names a registered prior or format (see ``list_priors()``); the remaining
    arguments go to its factory. Unknown names raise a ValueError listing the known ones.
    """
    if isinstance(source, DiffusionPrior):
        return source
    entry = _REGISTRY.get(str(source))
    if entry is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown prior {source!r}; known priors and formats: {known}")
    prior = entry.factory(*args, **kwargs)
    if not isinstance(prior, DiffusionPrior):
        raise TypeError(f"the factory of {source!r} returned {type(prior).__name__}, not a DiffusionPrior")
    return prior


def _gaussian(shape=(3, 16, 16), rank: int | None = None, perp_var: float = 1e-4, seed: int = 0, mean: float = 0.0):
    """A random Gaussian prior: isotropic (rank None) or low-rank-plus-isotropic."""
    if rank is None:
        return GaussianPrior.isotropic(shape, mean, 1.0)
    d = 1
    for s in shape:
        d *= int(s)
    factor = torch.randn(d, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / rank**0.5
    return GaussianPrior.low_rank(shape, mean, factor, perp_var)


def _gaussian_mixture(shape=(3, 16, 16), components: int = 4, var: float = 0.05, seed: int = 0):
    """Equal-weight isotropic Gaussians with random means in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(components, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    return GaussianMixturePrior.empirical(means, var)


register_prior("gaussian", _gaussian, "analytic Gaussian prior (exact denoiser; a test oracle)")
register_prior("gaussian-mixture", _gaussian_mixture, "analytic Gaussian mixture prior (exact denoiser; a test oracle)")

"""Measurement noise models: y_noisy = noise(y, generators).

Every draw for sample b comes from generator b of a :class:`~diffstategrad.rng.SampleGenerators`
(CPU generators, moved to y's device), so a sample's noise depends only on its own seed.
Noise models are separate from operators (DESIGN contract 2) and follow the official ones:

* ``gaussian``: y + sigma * N(0, I), sigma in the units of y ([-1, 1] images: 0.01 in all
  DiffStateGrad presets);
* ``poisson``: map y to [0, 1], clamp, draw Poisson(255 * rate * y) / (255 * rate), map back to
  [-1, 1], clamp (the DPS "version 3" model; unused by the presets);
* ``none`` (alias ``clean``): y unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstategrad.rng import SampleGenerators

__all__ = ["GaussianNoise", "NoNoise", "Noise", "PoissonNoise", "make_noise", "NOISE_MODELS"]


class Noise:
    """Base class: ``noise(y, generators) -> y_noisy``."""

    name = "noise"

    def __call__(self, y: torch.Tensor, generators: SampleGenerators) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({params})"


class GaussianNoise(Noise):
    """y + sigma * N(0, I)."""

    name = "gaussian"

    def __init__(self, sigma: float):
        if float(sigma) < 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, y, generators):
        return y + self.sigma * generators.randn_like(y)

    def to_dict(self):
        return {"name": self.name, "sigma": self.sigma}


class PoissonNoise(Noise):
    """Poisson counts at ``255 * rate`` counts per unit intensity, in [-1, 1] image units."""

    name = "poisson"

    def __init__(self, rate: float = 1.0):
        if not float(rate) > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)

    def __call__(self, y, generators):
        peak = 255.0 * self.rate
        intensity = ((y + 1.0) / 2.0).clamp(0.0, 1.0)
        counts = generators.poisson(intensity * peak)
        return (counts / peak * 2.0 - 1.0).clamp(-1.0, 1.0)

    def to_dict(self):
        return {"name": self.name, "rate": self.rate}


class NoNoise(Noise):
    """The identity: noiseless measurements."""

    name = "none"

    def __call__(self, y, generators):
        return y


NOISE_MODELS = {"gaussian": GaussianNoise, "poisson": PoissonNoise, "none": NoNoise, "clean": NoNoise}


def make_noise(config: Mapping | None) -> Noise:
    """A noise model from a dict such as {"name": "gaussian", "sigma": 0.01}; None gives NoNoise."""
    if config is None:
        return NoNoise()
    config = dict(config)
    name = config.pop("name", None)
    if name not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {name!r}; choose one of {sorted(NOISE_MODELS)}")
    try:
        return NOISE_MODELS[name](**config)
    except TypeError as err:
        raise ValueError(f"bad parameters {config} for noise model {name!r}: {err}") from None

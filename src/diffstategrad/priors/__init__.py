"""Diffusion priors: the contract, analytic oracles and ``load_prior``."""

from diffstategrad.priors.analytic import GaussianMixturePrior, GaussianPrior, LinearAutoencoderPrior, linear_gaussian_posterior
from diffstategrad.priors.base import DiffusionPrior, LatentDiffusionPrior, NetworkCalls, as_timesteps, count_network_calls
from diffstategrad.priors.registry import list_priors, load_prior, register_prior

# Checkpoint formats register themselves with load_prior when imported.
from diffstategrad.priors import builtin, compvis, converted, diffusers_loader, guided_diffusion  # noqa: E402,F401  isort: skip

__all__ = [
    "DiffusionPrior",
    "LatentDiffusionPrior",
    "GaussianPrior",
    "GaussianMixturePrior",
    "LinearAutoencoderPrior",
    "linear_gaussian_posterior",
    "as_timesteps",
    "count_network_calls",
    "NetworkCalls",
    "load_prior",
    "register_prior",
    "list_priors",
]

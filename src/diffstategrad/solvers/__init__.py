"""Solvers with one signature; ``solve(name, ...)`` dispatches by name."""

from diffstategrad.solvers.base import SolveResult
from diffstategrad.solvers.daps import daps, latent_daps
from diffstategrad.solvers.dps import dps
from diffstategrad.solvers.psld import psld
from diffstategrad.solvers.resample import resample

SOLVERS = {"dps": dps, "psld": psld, "resample": resample, "daps": daps, "latent-daps": latent_daps}

__all__ = ["SOLVERS", "SolveResult", "daps", "dps", "latent_daps", "psld", "resample", "solve"]


def solve(name: str, prior, operator, y, **kwargs) -> SolveResult:
    """Run the solver called ``name`` (see ``SOLVERS``) with the shared keyword signature."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name](prior, operator, y, **kwargs)

"""Solvers with one signature; ``solve(name, ...)`` dispatches by name.

Each solver module registers itself in the catalogue (``solvers/registry.py``) with the prior
kinds it runs on; importing it here is all a new solver needs.
"""

from diffstategrad.solvers.base import CALLBACK_KEYS, SolveResult
from diffstategrad.solvers.classical import pseudo_inverse, tv
from diffstategrad.solvers.daps import daps, latent_daps
from diffstategrad.solvers.diffpir import diffpir
from diffstategrad.solvers.dps import dps
from diffstategrad.solvers.psld import psld
from diffstategrad.solvers.registry import SOLVERS, SolverSpec, solver_names, solver_spec
from diffstategrad.solvers.resample import resample

__all__ = ["CALLBACK_KEYS", "SOLVERS", "SolveResult", "SolverSpec", "daps", "diffpir", "dps", "latent_daps", "pseudo_inverse", "psld", "resample", "solve",
           "solver_names", "solver_spec", "tv"]


def solve(name: str, prior, operator, y, **kwargs) -> SolveResult:
    """Run the solver called ``name`` (see ``solver_names()``) with the shared keyword signature."""
    return solver_spec(name).fn(prior, operator, y, **kwargs)

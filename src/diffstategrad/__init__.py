"""diffstategrad: DiffStateGrad (Zirvi, Tolooshams, Anandkumar, ICLR 2025) for imaging inverse
problems with diffusion priors: the projector, task operators, priors and solvers."""

__version__ = "0.1.0"

from diffstategrad.projection import (  # noqa: E402
    DiffStateGrad,
    StateBasis,
    apply_diffstategrad,
    compute_rank_for_explained_variance,
    compute_svd_and_adaptive_rank,
)

__all__ = [
    "__version__",
    "DiffStateGrad",
    "StateBasis",
    "apply_diffstategrad",
    "compute_rank_for_explained_variance",
    "compute_svd_and_adaptive_rank",
]

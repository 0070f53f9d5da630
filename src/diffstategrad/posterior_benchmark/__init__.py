"""The exact-posterior benchmark (``diffstategrad benchmark posterior``): solvers with and
without DiffStateGrad against the closed-form posterior of a Gaussian-mixture prior fitted to
image patches, under the linear task presets with Gaussian noise. See
docs/posterior-benchmark.md.

- ``prior``: the patch-fitted mixture with exact scores (:func:`fit_patch_mixture`).
- ``exact``: the closed-form mixture posterior and the operators' dense matrices.
- ``distances``: sliced Wasserstein and energy distances.
- ``solvers``: how each solver runs here (settings, base guidance values, the batched projector).
- ``run``: the benchmark loop and its metrics; ``report``: tables and figures;
  ``command``: the click command.
"""

from diffstategrad.posterior_benchmark.distances import (
    energy_distance,
    random_directions,
    sliced_wasserstein,
)
from diffstategrad.posterior_benchmark.exact import (
    MixturePosterior,
    dense_matrix,
    mixture_posterior,
    prior_moments,
)
from diffstategrad.posterior_benchmark.prior import PatchMixturePrior, fit_patch_mixture
from diffstategrad.posterior_benchmark.run import TASKS, BenchmarkConfig, run_benchmark
from diffstategrad.posterior_benchmark.solvers import BatchedDiffStateGrad, solver_setup

__all__ = [
    "TASKS",
    "BatchedDiffStateGrad",
    "BenchmarkConfig",
    "MixturePosterior",
    "PatchMixturePrior",
    "dense_matrix",
    "energy_distance",
    "fit_patch_mixture",
    "mixture_posterior",
    "prior_moments",
    "random_directions",
    "run_benchmark",
    "sliced_wasserstein",
    "solver_setup",
]

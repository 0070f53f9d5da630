"""diffstategrad: DiffStateGrad (Zirvi, Tolooshams, Anandkumar, ICLR 2025) for imaging inverse
problems with diffusion priors: the projector, task operators, priors and solvers.

The entry points a user types first::

    from diffstategrad import load_prior, load_task, solve, DiffStateGrad

    prior = load_prior("pixel")                      # a name that `diffstategrad models` lists
    problem = load_task("box_inpainting").build((3, 64, 64), seeds=[0])
    y = problem.measure(x)                           # x: (B, 3, 64, 64) in [-1, 1]
    result = solve("dps", prior, problem.operator, y, shape=problem.image_shape, projector=DiffStateGrad())

``load_prior``, ``load_task`` and ``solve`` are imported on first use, so ``import diffstategrad``
stays light (the command line starts without loading the solvers).
"""

__version__ = "0.1.0"

from diffstategrad.projection import (  # noqa: E402
    DiffStateGrad,
    StateBasis,
    apply_diffstategrad,
    compute_rank_for_explained_variance,
    compute_svd_and_adaptive_rank,
)

_LAZY = {
    "load_prior": ("diffstategrad.priors", "load_prior"),
    "load_task": ("diffstategrad.operators", "load_task"),
    "solve": ("diffstategrad.solvers", "solve"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffstategrad' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "DiffStateGrad",
    "StateBasis",
    "apply_diffstategrad",
    "compute_rank_for_explained_variance",
    "compute_svd_and_adaptive_rank",
    "load_prior",
    "load_task",
    "solve",
]

"""The solver catalogue: every solver registers itself here with the prior kinds it runs on.

    register_solver("dps", dps, priors=("pixel", "latent"))   # at the bottom of solvers/dps.py

``priors`` lists the prior kinds the solver accepts, the default kind first (the built-in model
the CLI picks when no ``--model`` is given); an empty tuple means the solver needs no diffusion
prior at all (the classical baselines). The CLI, the pipeline and the evaluation read this
catalogue, so a new solver is one module that registers itself plus its line in
``solvers/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SolverSpec", "register_solver", "solver_spec", "solver_names", "SOLVERS"]


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable
    priors: tuple[str, ...]
    description: str = ""
    linear_only: bool = False  # runs on linear operators only (the pseudo-inverse)

    @property
    def needs_prior(self) -> bool:
        return bool(self.priors)

    @property
    def default_prior(self) -> str | None:
        return self.priors[0] if self.priors else None


_SPECS: dict[str, SolverSpec] = {}
SOLVERS: dict[str, Callable] = {}  # name -> solver function (a view of the catalogue)


def register_solver(name: str, fn: Callable, *, priors: tuple[str, ...] = ("pixel",), description: str = "",
                    linear_only: bool = False) -> None:
    unknown = set(priors) - {"pixel", "latent"}
    if unknown:
        raise ValueError(f"prior kinds are 'pixel' and 'latent', got {sorted(unknown)}")
    _SPECS[name] = SolverSpec(name, fn, tuple(priors), description or (fn.__doc__ or "").strip().split("\n")[0], linear_only)
    SOLVERS[name] = fn


def solver_spec(name: str) -> SolverSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(solver_names())}")
    return _SPECS[name]


def solver_names() -> list[str]:
    return sorted(_SPECS)

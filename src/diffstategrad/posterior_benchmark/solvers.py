"""How the benchmark runs each solver: its settings, its base guidance value, the projector.

Every solver of ``diffstategrad.solvers.SOLVERS`` that works in pixel space runs by name. The
benchmark's own settings (``SETTINGS``) exist for DPS and DAPS; any other pixel solver (one
added later) runs with its preset defaults (``configs/solvers.yaml``, the ``builtin`` profile
where it has one), its preset guidance scale as the base value, ``clip_x0=False`` where it takes
that argument, and the true measurement noise passed to a ``noise_sigma`` argument if it has
one. ``--base-scale NAME=VALUE`` overrides a base value.

The settings (docs/posterior-benchmark.md, "Solvers"):

- ``dps``: 100 ancestral (DDPM) steps, no clipping of the Tweedie estimate (the exact
  denoiser needs none, and clipping would change the prior), DiffStateGrad on the SVD of x_t
  (the package default). Base step zeta = ``DPS_BASE``.
- ``daps``: 25 annealing steps, 3 ODE steps, 20 Langevin steps each, no clipping. DAPS's data
  term is ||A x - y||^2 / tau^2; tau = sqrt(2) sigma_y makes it the true log-likelihood, so
  DAPS targets the exact posterior in its limit. The Langevin step is then measured in units of
  the data term's curvature 1 / sigma_y^2: base lr = ``DAPS_BASE`` * sigma_y^2.

The base values were chosen on tuning draws (``--seed 1000``, not the reported seed) as the
multiple of a coarse grid at which the plain solver had the smallest sliced Wasserstein distance
averaged over tasks and noise levels (docs/posterior-benchmark.md, "Base step sizes").

:class:`BatchedDiffStateGrad` is the package's projector with ``project`` computed for the whole
batch in one masked batched product instead of a loop over samples (identical results up to
float rounding; the tests check it): the benchmark projects batches of hundreds of samples
thousands of times.
"""

from __future__ import annotations

import inspect
import math

import torch

from diffstategrad.presets import solver_defaults, solver_table
from diffstategrad.projection import DiffStateGrad, StateBasis
from diffstategrad.solvers import SOLVERS

__all__ = ["DAPS_BASE", "DPS_BASE", "LATENT_SOLVERS", "BatchedDiffStateGrad", "SolverSetup", "solver_setup"]

LATENT_SOLVERS = ("psld", "resample", "latent-daps")
DPS_BASE = 1.0
DAPS_BASE = 1.5


class BatchedDiffStateGrad(DiffStateGrad):
    """:class:`DiffStateGrad` with a vectorised ``project``: columns beyond each sample's rank
    are zeroed, then U_r U_r^T G V_r V_r^T is one batched product."""

    def project(self, grad: torch.Tensor, basis: StateBasis) -> torch.Tensor:
        B, C, H, W = grad.shape if grad.ndim == 4 else (None,) * 4
        U, Vh = basis.U, basis.Vh
        if grad.ndim != 4 or U.shape[0] not in (1, B) or U.shape[1] != C or U.shape[2] != H or Vh.shape[3] != W:
            return super().project(grad, basis)  # raises the package's error
        R = U.shape[-1]
        keep = (torch.arange(R, device=U.device) < basis.ranks.to(U.device)[:, None]).to(U.dtype)  # (B', R)
        U = U * keep[:, None, None, :]
        Vh = Vh * keep[:, None, :, None]
        core = U.transpose(-1, -2) @ grad.to(U.dtype) @ Vh.transpose(-1, -2)
        return (U @ core @ Vh).to(grad.dtype)


class SolverSetup:
    """One solver as the benchmark runs it: ``run(prior, operator, y, scale, projector, seeds)``
    with the step ``scale`` = multiplier * ``base(noise_sigma)``."""

    def __init__(self, name: str, kwargs: dict, base: float, base_unit: str = "", noise_kwargs=None):
        self.name = name
        self.kwargs = kwargs
        self.base_value = float(base)
        self.base_unit = base_unit  # "" or "sigma_y^2"
        self.noise_kwargs = noise_kwargs or (lambda sigma: {})

    def base(self, noise_sigma: float) -> float:
        return self.base_value * (noise_sigma**2 if self.base_unit == "sigma_y^2" else 1.0)

    def describe(self) -> dict:
        return {"solver": self.name, "base": self.base_value, "base_unit": self.base_unit or "1", "settings": dict(self.kwargs)}

    def run(self, prior, operator, y, *, shape, scale: float, projector, seeds, noise_sigma: float):
        fn = SOLVERS[self.name]
        return fn(prior, operator, y, shape=shape, guidance_scale=scale, projector=projector, seeds=seeds,
                  **self.kwargs, **self.noise_kwargs(noise_sigma))


def _own_setups(quick: bool) -> dict:
    dps = {"steps": 10 if quick else 100, "sampler": "ddpm", "clip_x0": False}
    daps = {"steps": 4 if quick else 25, "ode_steps": 2 if quick else 3, "mcmc_steps": 5 if quick else 20, "clip_x0": False}
    return {
        "dps": SolverSetup("dps", dps, DPS_BASE),
        "daps": SolverSetup("daps", daps, DAPS_BASE, "sigma_y^2", lambda sigma: {"tau": math.sqrt(2.0) * sigma}),
    }


def solver_setup(name: str, quick: bool = False, base: float | None = None) -> SolverSetup:
    """The setup for solver ``name``; ``base`` overrides its base guidance value."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    if name in LATENT_SOLVERS:
        raise ValueError(f"{name} is a latent solver; the exact-posterior benchmark runs pixel solvers ({', '.join(s for s in SOLVERS if s not in LATENT_SOLVERS)})")
    own = _own_setups(quick)
    setup = own[name] if name in own else _generic_setup(name, quick)
    if base is not None:
        if base <= 0:
            raise ValueError(f"the base scale of {name} must be positive, got {base}")
        setup.base_value = float(base)
    return setup


def _generic_setup(name: str, quick: bool) -> SolverSetup:
    """A pixel solver without benchmark settings: its preset defaults (see the module docstring)."""
    profile = "builtin" if name in solver_table() and "builtin" in solver_table()[name] else None
    kwargs = solver_defaults(name, profile=profile) if name in solver_table() else {}
    base = kwargs.pop("guidance_scale", 1.0)
    params = inspect.signature(SOLVERS[name]).parameters
    if "clip_x0" in params:
        kwargs["clip_x0"] = False
    if quick and "steps" in kwargs:
        kwargs["steps"] = min(int(kwargs["steps"]), 10)
    noise = (lambda sigma: {"noise_sigma": sigma}) if "noise_sigma" in params else None
    return SolverSetup(name, kwargs, base, "", noise)

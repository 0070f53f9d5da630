"""Decoupled Annealing Posterior Sampling (Zhang, Chu, Berner, Meng, Anandkumar, Song, CVPR 2025)
with DiffStateGrad, in pixel space (``daps``) and latent space (``latent_daps``).

DAPS works in the sigma (variance-exploding) parameterisation: x_sigma = x0 + sigma * n. A VP
model enters through its denoiser D(x, sigma) (``DiffusionPrior.denoise``: x_t = x / sqrt(1 +
sigma^2)). With an annealing schedule sigma_0 = sigma_max > ... > sigma_{N-1} (EDM's polynomial
schedule, rho = 7), one annealing step i is (DAPS Alg. 1):

    1. x0_hat   = PF-ODE from sigma_i down to sigma_ode (a few Euler steps of
                  dx/dsigma = (x - D(x, sigma)) / sigma; no gradient through the network)
    2. x0_y     = MCMC on p(x0 | x_i, y) ~ exp(-||A(x0) - y||^2 / tau^2 - ||x0 - x0_hat||^2 / (2 sigma_i^2))
                  Langevin: x <- x + eta * s(x) + sqrt(2 eta) n
                  HMC:      v <- m v + sqrt(eta) s(x) + sqrt(2 (1 - m)) n,  x <- x + sqrt(eta) v
                  with eta annealed linearly from lr to lr * lr_min_ratio over the annealing steps
    3. x_{i+1}  = x0_y + sigma_{i+1} * n          (x_N = x0_y: the output)

The data term is DAPS's: the squared residual (not halved) divided by tau^2, so tau is a
temperature, not the measurement noise (the official configs use tau = 0.01 with noise 0.05).

DiffStateGrad (insertion point): in every MCMC iteration k with ``projector.applies_at(k)``,
the data-term gradient grad_x ||A(x) - y||^2 is replaced by its projection onto the low-rank
subspace of x0_hat, the clean-manifold state of the current annealing step (the paper's
Figure 1); the basis is computed once per annealing step. The Gaussian term is not projected.

For a latent prior everything above runs on latents z with the data term ||A(D(z)) - y||^2
through the differentiable decoder; the official LatentDAPS settings (50 annealing steps,
sigma_max 10, 2 ODE steps to sigma 0.001, HMC) are the defaults of ``latent_daps``.

Defaults of ``daps`` follow the official pixel configs (configs/sampler/edm_daps.yaml and the
``pixel`` Langevin settings of configs/task/*.yaml, commit 098df6b).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from diffstategrad.operators.base import Operator
from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.projection import DiffStateGrad
from diffstategrad.schedules import edm_sigmas
from diffstategrad.solvers.base import SolveResult, SolveRun, initial_state, solver_generators
from diffstategrad.solvers.registry import register_solver

__all__ = ["DAPSConfig", "PIXEL", "LATENT", "daps", "latent_daps"]


def _pf_ode(prior: DiffusionPrior, x: torch.Tensor, sigma: float, sigma_end: float, steps: int, rho: float, clip: bool) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, with the
    denoiser's output optionally clipped to the data range [-1, 1]."""
    sig = edm_sigmas(sigma, sigma_end, steps, rho)
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = prior.denoise(x, s)
        if clip:
            d = d.clamp(-1, 1)
        x = x + (s_next - s) * (x - d) / s
    return x


@dataclass(frozen=True)
class DAPSConfig:
    """Every DAPS setting but the step size (``guidance_scale``) and the annealing step count."""

    sigma_max: float = 100.0
    sigma_min: float = 0.1
    ode_steps: int = 5
    ode_sigma_min: float = 0.01
    rho: float = 7.0
    mcmc: str = "langevin"
    mcmc_steps: int = 100
    tau: float = 0.01
    lr_min_ratio: float = 0.01
    momentum: float = 0.9
    clip_x0: bool = True
    latent: bool = False


# The official pixel DAPS-1K (configs/sampler/edm_daps.yaml, Langevin) and LatentDAPS
# (latent_edm_daps.yaml: sigma_max 10, 2 ODE steps to 0.001, HMC; MCMC values typical of the
# official ``ldm`` task configs, which the task table then sets per task).
PIXEL = DAPSConfig()
LATENT = DAPSConfig(sigma_max=10.0, ode_steps=2, ode_sigma_min=0.001, mcmc="hmc", mcmc_steps=50, lr_min_ratio=0.1, momentum=0.7,
                    clip_x0=False, latent=True)


def _run(prior, operator, y, cfg: DAPSConfig, *, shape, steps, guidance_scale, projector, seeds, callback, progress, x_init,
         divergence_factor):
    sigma_max, sigma_min, ode_steps, ode_sigma_min, rho = cfg.sigma_max, cfg.sigma_min, cfg.ode_steps, cfg.ode_sigma_min, cfg.rho
    mcmc, mcmc_steps, tau, lr_min_ratio, momentum = cfg.mcmc, cfg.mcmc_steps, cfg.tau, cfg.lr_min_ratio, cfg.momentum
    latent, clip_x0 = cfg.latent, cfg.clip_x0
    if mcmc not in ("langevin", "hmc"):
        raise ValueError(f"mcmc must be 'langevin' or 'hmc', got {mcmc!r}")
    if guidance_scale <= 0:
        raise ValueError(f"the DAPS step size (guidance_scale) must be positive, got {guidance_scale}")
    if latent and prior.kind != "latent":
        raise ValueError("latent_daps needs a latent prior")
    B = y.shape[0]
    gens = solver_generators(seeds, B)
    x = initial_state(prior, y, shape, x_init, gens, "DAPS", scale=sigma_max)

    sigmas = edm_sigmas(sigma_max, sigma_min, steps, rho)
    sigmas = sigmas[:-1] + [0.0]  # as the official scheduler: the last forward step adds no noise
    run = SolveRun("Latent DAPS" if latent else "DAPS", y, steps, projector, progress, divergence_factor, callback)

    def data_loss(x0):
        return ((operator(prior.to_image(x0)) - y) ** 2).reshape(B, -1).sum(1)

    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. x0_hat by the PF-ODE, no gradient through the network
        with torch.no_grad():
            x0_hat = _pf_ode(prior, x, sigma, ode_sigma_min, ode_steps, rho, clip_x0 and not latent)
        basis = projector.basis(x0_hat) if projector is not None and projector.period != 0 else None

        # 2. MCMC on x0 (annealed step size: lr * (1 + ratio * (lr_min_ratio - 1)), ratio = i / (N + 1))
        eta = guidance_scale * (1 + i / (steps + 1) * (lr_min_ratio - 1))
        x0 = x0_hat.clone()
        velocity = gens.randn_like(x0) if mcmc == "hmc" else None
        for k in range(mcmc_steps):
            x0 = x0.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(data_loss(x0).sum(), x0)
            x0 = x0.detach()
            if basis is not None and projector.applies_at(k):
                grad = projector.project(grad, basis)  # DiffStateGrad
            score = -grad / tau**2 + (x0_hat - x0) / sigma**2
            noise = gens.randn_like(x0)
            if mcmc == "langevin":
                x0 = x0 + eta * score + (2 * eta) ** 0.5 * noise
            else:
                velocity = momentum * velocity + eta**0.5 * score + (2 * (1 - momentum)) ** 0.5 * noise
                x0 = x0 + eta**0.5 * velocity

        # 3. forward diffusion to the next annealing level
        x = x0 + sigma_next * gens.randn_like(x0) if sigma_next > 0 else x0
        with torch.no_grad():
            residual = data_loss(x0).sqrt()
        x = run.step(i, x, residual, None if basis is None else basis.ranks, x0=x0_hat, t=int(prior.nearest_timestep(sigma)),
                     sigma=sigma, x0_y=x0)

    return run.finish(prior, operator, y, x)


def _configured(base: DAPSConfig, overrides: dict) -> DAPSConfig:
    unknown = set(overrides) - {f.name for f in fields(DAPSConfig)} | ({"latent"} & set(overrides))
    if unknown:
        raise ValueError(f"unknown DAPS settings: {sorted(unknown)}")
    return replace(base, **overrides)


def daps(prior: DiffusionPrior, operator: Operator, y: torch.Tensor, *, shape=None, steps: int = 200, guidance_scale: float = 5e-5,
         projector: DiffStateGrad | None = None, seeds=None, callback=None, progress: bool = False, x_init: torch.Tensor | None = None,
         divergence_factor: float = 1e3, **overrides) -> SolveResult:
    """Pixel-space DAPS (DAPS-1K defaults, :data:`PIXEL`: 200 annealing steps x 5 ODE steps, 100
    Langevin steps); any field of :class:`DAPSConfig` overrides it. ``guidance_scale`` is the
    MCMC step size lr (official pixel default 5e-5; the task table gives per-task values).
    ``clip_x0`` clips the denoiser's output to [-1, 1] inside the ODE (guided-diffusion's
    clip_denoised; the official DAPS does not clip, which small models do not tolerate at high
    noise)."""
    return _run(prior, operator, y, _configured(PIXEL, overrides), shape=shape, steps=steps, guidance_scale=guidance_scale,
                projector=projector, seeds=seeds, callback=callback, progress=progress, x_init=x_init, divergence_factor=divergence_factor)


def latent_daps(prior: DiffusionPrior, operator: Operator, y: torch.Tensor, *, shape=None, steps: int = 50, guidance_scale: float = 1e-5,
                projector: DiffStateGrad | None = None, seeds=None, callback=None, progress: bool = False, x_init: torch.Tensor | None = None,
                divergence_factor: float = 1e3, **overrides) -> SolveResult:
    """Latent DAPS (:data:`LATENT`, the official ``latent_edm_daps``); any field of
    :class:`DAPSConfig` overrides it. ``shape`` is the image shape."""
    return _run(prior, operator, y, _configured(LATENT, overrides), shape=shape, steps=steps, guidance_scale=guidance_scale,
                projector=projector, seeds=seeds, callback=callback, progress=progress, x_init=x_init, divergence_factor=divergence_factor)


register_solver("daps", daps, priors=("pixel",), description="DAPS in pixel space (Zhang et al., CVPR 2025)")
register_solver("latent-daps", latent_daps, priors=("latent",), description="Latent DAPS (Zhang et al., CVPR 2025)")

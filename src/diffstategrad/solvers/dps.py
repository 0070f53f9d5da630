"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023) with DiffStateGrad.

Algorithm 1 of DPS, one step from t to t_prev (the timesteps of a respaced schedule):

    eps, x0_hat  = prior(x_t, t)                                   Tweedie estimate (clipped)
    x'_prev      = DDPM ancestral step (Alg. 1 l. 4-6)  or  DDIM step (Song et al. Eq. 12)
    G            = grad_{x_t} || y - A(x0_hat(x_t)) ||_2           non-squared norm (Alg. 1 l. 7)
    G            = P_state(G)                                      DiffStateGrad (when it applies)
    x_prev       = x'_prev - zeta * G

The norm is taken per sample, so batch members never couple (the official code takes it over
the whole batch tensor). DiffStateGrad projects G onto the low-rank subspace of ``state``
(``"x_t"``, the state the gradient is applied to, as in the official README's pattern; or
``"x0"``, the Tweedie estimate), every ``projector.period`` steps (step 0 is the first step).
The basis of x_t is started before the network pass (``DiffStateGrad.basis_async``), so that
on an accelerator the host computes it while the device runs the network.
For a latent prior the measurement is compared with A(decode(z0_hat)) (latent DPS) and the
result is decoded.
"""

from __future__ import annotations

import torch

from diffstategrad.operators.base import Operator
from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.projection import DiffStateGrad
from diffstategrad.schedules import ddim_step, ddpm_posterior, eps_to_x0, timestep_spacing, x0_to_eps
from diffstategrad.solvers.base import SolveResult, SolveRun, initial_state, per_sample_residual, solver_generators, step_pairs
from diffstategrad.solvers.registry import register_solver

__all__ = ["dps"]

PROJECTOR_STATES = ("x_t", "x0")


def dps(
    prior: DiffusionPrior,
    operator: Operator,
    y: torch.Tensor,
    *,
    shape: tuple[int, int, int] | None = None,
    steps: int = 1000,
    guidance_scale: float = 1.0,
    projector: DiffStateGrad | None = None,
    projector_state: str = "x_t",
    sampler: str = "ddpm",
    eta: float = 0.0,
    variance: str = "auto",
    spacing: str = "uniform",
    clip_x0: bool = True,
    seeds=None,
    x_init: torch.Tensor | None = None,
    callback=None,
    progress: bool = False,
    divergence_factor: float = 1e3,
) -> SolveResult:
    """Run DPS (optionally with DiffStateGrad) on a batch of measurements.

    Args:
        prior: a pixel or latent :class:`DiffusionPrior`.
        operator: the forward model A (differentiable).
        y: measurements (B, ...).
        shape: image shape (C, H, W) of the unknown x (not needed with ``x_init``).
        steps: number of sampler steps (respaced over the prior's T timesteps).
        guidance_scale: zeta, the step size of the measurement gradient.
        projector: a DiffStateGrad projector, or None for plain DPS.
        projector_state: ``"x_t"`` or ``"x0"``: whose SVD gives the subspace.
        sampler: ``"ddpm"`` (ancestral, as DPS) or ``"ddim"``.
        eta: DDIM's eta (0 = deterministic).
        variance: DDPM variance: ``"fixed_small"`` (posterior beta-tilde), ``"fixed_large"``
            (beta), ``"learned"`` (the prior's learned range) or ``"auto"`` (learned when the
            prior has it, else fixed_small).
        spacing: timestep spacing, see :func:`~diffstategrad.schedules.timestep_spacing`.
        clip_x0: clip the Tweedie estimate to [-1, 1] (guided-diffusion / DPS default; pixel
            priors only).
        seeds: per-sample seeds or SampleGenerators (see ``solver_generators``).
        x_init: initial state x_T (B, C', H', W'); drawn from N(0, I) when None.
        callback: called after every step with the dict of ``base.CALLBACK_KEYS`` (info:
            grad_norm (B,)).
        progress: show a progress bar with the mean residual.
        divergence_factor: residuals above factor * max(||y||, 1) mark a sample failed.
    """
    if projector_state not in PROJECTOR_STATES:
        raise ValueError(f"projector_state must be one of {PROJECTOR_STATES}, got {projector_state!r}")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if variance == "auto":
        variance = "learned" if prior.learned_variance else "fixed_small"
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"unknown variance {variance!r}")
    if variance == "learned" and not prior.learned_variance:
        raise ValueError("variance='learned' needs a prior with a learned variance")

    B = y.shape[0]
    gens = solver_generators(seeds, B)
    latent = prior.kind == "latent"
    x = initial_state(prior, y, shape, x_init, gens, "DPS")

    timesteps = timestep_spacing(prior.num_timesteps, steps, spacing)
    run = SolveRun("DPS", y, len(timesteps), projector, progress, divergence_factor, callback)

    for i, t, t_prev in step_pairs(timesteps):
        a_t = prior.schedule.alpha_bar(t, like=x)
        a_prev = prior.schedule.alpha_bar(t_prev, like=x)

        # the subspace of x_t is known before the network runs: start its basis now (on the host
        # in a background thread when the state is on an accelerator, see DiffStateGrad.basis_async)
        projecting = projector is not None and projector.applies_at(i)
        pending = projector.basis_async(x) if projecting and projector_state == "x_t" else None

        # Tweedie estimate with the graph back to x_t (DPS Alg. 1 l. 3)
        x = x.detach().requires_grad_(True)
        eps, v = prior.eps_and_variance(x, t)
        x0 = eps_to_x0(x, eps, a_t)
        if clip_x0 and not latent:
            x0 = x0.clamp(-1, 1)
        residual = per_sample_residual(y, operator(prior.to_image(x0)))
        (grad,) = torch.autograd.grad(residual.sum(), x)
        x0, x, residual = x0.detach(), x.detach(), residual.detach()

        # unconditional step from x_t with the (clipped) estimate (Alg. 1 l. 4-6)
        eps_used = x0_to_eps(x, x0, a_t)
        if sampler == "ddpm":
            mean, var_small, var_large = ddpm_posterior(x, x0, a_t, a_prev)
            var = _ddpm_variance(variance, var_small, var_large, v)
            x_prev = mean + var.sqrt() * gens.randn_like(x) if t_prev >= 0 else mean
        else:
            noise = gens.randn_like(x) if eta > 0 and t_prev >= 0 else None
            x_prev = ddim_step(x0, eps_used, a_t, a_prev, eta if t_prev >= 0 else 0.0, noise)

        # DiffStateGrad: project the guidance gradient on the state's low-rank subspace
        rank = None
        if projecting:
            basis = pending.result() if pending is not None else projector.basis(x0)
            grad = projector.project(grad, basis)
            rank = basis.ranks
        x = x_prev - guidance_scale * grad  # Alg. 1 l. 7

        x = run.step(i, x, residual, rank, x0=x0, t=t, sigma=float(((1 - a_t) / a_t).sqrt().flatten()[0]),
                     grad_norm=grad.reshape(B, -1).norm(dim=1))

    return run.finish(prior, operator, y, x)


def _ddpm_variance(kind: str, var_small: torch.Tensor, var_large: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    if kind == "fixed_small":
        return var_small
    if kind == "fixed_large":
        return var_large
    # guided-diffusion "learned_range": interpolate the log variances with frac = (v + 1) / 2
    frac = (v + 1) / 2
    log_small = var_small.clamp(min=1e-20).log()
    return torch.exp(frac * var_large.log() + (1 - frac) * log_small)


register_solver("dps", dps, priors=("pixel", "latent"), description="Diffusion Posterior Sampling (Chung et al., ICLR 2023)")

"""DiffPIR: Denoising Diffusion Models for Plug-and-Play Image Restoration (Zhu, Zhang, Liang,
Cao, Wen, Timofte, Van Gool, CVPR Workshops 2023), with DiffStateGrad at its data step.

Half-quadratic splitting with the diffusion model as the denoiser (Alg. 1 of the paper), one
step from t to t_prev of a respaced schedule, sigma_t = sqrt((1 - a_t) / a_t):

    x0_pred = D(x_t, t)                                    the network's Tweedie estimate (clipped)
    x0_hat  = argmin_x ||y - A(x)||^2 + rho_t ||x - x0_pred||^2,   rho_t = 1 / (guidance_scale sigma_t^2)
    eps_hat = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)
    x_prev  = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) (sqrt(1 - zeta) eps_hat + sqrt(zeta) eps)

The paper writes rho_t = lambda sigma_n^2 / sigma_t^2; here ``guidance_scale`` = 1 / (lambda
sigma_n^2) is the weight of the data term (larger = a stronger pull to the measurements), so
that it is a step size like the other solvers' and the robustness grid scales it alike (the
official lambda = 7 at noise 0.05 on [0, 1] is guidance_scale 1 / (7 * 0.1^2) = 14.3 on [-1, 1]).

The data step (the paper's sub-problem 1): for a linear A the normal equations
(A^T A + rho_t I) d = A^T (y - A x0_pred), x0_hat = x0_pred + d, solved by conjugate gradients
(``data_iters`` iterations, per sample); for a nonlinear A (phase retrieval, HDR, the nonlinear
blur) and for latent priors (A(decode(z)) on latents) ``data_iters`` gradient steps on the same
objective, step 1 / (L + rho_t) with L = ||J||^2 estimated once by power iteration at the first
x0_pred (times 2, a safety margin: J changes along the trajectory).

DiffStateGrad (insertion point): at the steps where ``projector.applies_at(i)``, the data step's
correction d = x0_hat - x0_pred is confined to the low-rank subspace of x0_pred, the clean
estimate the correction is added to (P(G) = U_r U_r^T G V_r V_r^T per channel, an orthogonal
projection): CG then solves (P A^T A P + rho_t P) d = P A^T (y - A x0_pred) within range(P),
the exact minimiser over the subspace, and the gradient steps use P(grad). Without a projector
(or P = I) this is DiffPIR as published.

Defaults follow the official code (yuanzhi-zhu/DiffPIR, main_ddpir_*.py: 100 steps, zeta 0.3
for deblurring, ...); ``configs/solvers.yaml`` gives the per-task values.
"""

from __future__ import annotations

import torch

from diffstategrad.operators.base import Operator
from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.projection import DiffStateGrad
from diffstategrad.schedules import eps_to_x0, timestep_spacing
from diffstategrad.solvers.base import SolveResult, SolveRun, initial_state, per_sample_residual, solver_generators, step_pairs
from diffstategrad.solvers.classical import operator_norm_squared
from diffstategrad.solvers.registry import register_solver

__all__ = ["diffpir", "conjugate_gradient"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))


def conjugate_gradient(apply, b: torch.Tensor, iters: int, project=None, tol: float = 1e-6) -> torch.Tensor:
    """Solve apply(d) = b per sample by CG from d = 0; with ``project`` (an orthogonal projector)
    the iteration stays in its range and solves the projected system there."""
    P = project or (lambda v: v)
    r = P(b)
    d = torch.zeros_like(b)
    p = r.clone()
    rr = _dot(r, r)
    stop = tol**2 * rr.clamp(min=1e-30)
    for _ in range(iters):
        active = rr > stop
        if not active.any():
            break
        Ap = P(apply(p))
        alpha = torch.where(active, rr / _dot(p, Ap).clamp(min=1e-30), torch.zeros_like(rr))
        d = d + alpha * p
        r = r - alpha * Ap
        rr_new = _dot(r, r)
        p = torch.where(active, r + rr_new / rr.clamp(min=1e-30) * p, p)
        rr = torch.where(active, rr_new, rr)
    return d


def diffpir(
    prior: DiffusionPrior,
    operator: Operator,
    y: torch.Tensor,
    *,
    shape: tuple[int, int, int] | None = None,
    steps: int = 100,
    guidance_scale: float = 14.3,
    projector: DiffStateGrad | None = None,
    zeta: float = 0.3,
    data_iters: int = 20,
    spacing: str = "uniform",
    clip_x0: bool = True,
    seeds=None,
    x_init: torch.Tensor | None = None,
    callback=None,
    progress: bool = False,
    divergence_factor: float = 1e3,
) -> SolveResult:
    """Run DiffPIR (optionally with DiffStateGrad at its data step) on a batch of measurements.

    Args:
        steps: diffusion steps (respaced over the prior's T timesteps).
        guidance_scale: 1 / (lambda sigma_n^2), the data term's weight (module docstring).
        zeta: the share of fresh noise in each step (0: DDIM-like, 1: all new noise).
        data_iters: CG iterations (linear A) or gradient steps (nonlinear A, latent priors) of the
            data step.
        clip_x0: clip the network's estimate to [-1, 1] (pixel priors).
        See :func:`~diffstategrad.solvers.dps.dps` for the shared arguments.
    """
    if guidance_scale <= 0:
        raise ValueError(f"the DiffPIR data weight (guidance_scale) must be positive, got {guidance_scale}")
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}")
    B = y.shape[0]
    gens = solver_generators(seeds, B)
    latent = prior.kind == "latent"
    x = initial_state(prior, y, shape, x_init, gens, "DiffPIR")
    linear = getattr(operator, "linear", False) and not latent
    timesteps = timestep_spacing(prior.num_timesteps, steps, spacing)
    run = SolveRun("DiffPIR", y, len(timesteps), projector, progress, divergence_factor, callback)

    def forward(v):
        return operator(prior.to_image(v)) if latent else operator(v)

    lipschitz = None
    for i, t, t_prev in step_pairs(timesteps):
        a_t = prior.schedule.alpha_bar(t, like=x)
        a_prev = prior.schedule.alpha_bar(t_prev, like=x)
        sigma2 = (1 - a_t) / a_t
        rho = 1.0 / (guidance_scale * sigma2)
        with torch.no_grad():
            x0_pred = eps_to_x0(x, prior.eps(x, t), a_t)
            if clip_x0 and not latent:
                x0_pred = x0_pred.clamp(-1, 1)

        # the data step, with the correction confined to x0_pred's subspace where DiffStateGrad applies
        rank, P = None, None
        if projector is not None and projector.applies_at(i):
            basis = projector.basis(x0_pred)
            rank = basis.ranks

            def P(v, basis=basis):
                return projector.project(v, basis)

        if linear:
            with torch.no_grad():
                b = operator.adjoint(y - operator(x0_pred)).reshape(x0_pred.shape)
                d = conjugate_gradient(lambda v: operator.adjoint(operator(v)).reshape(v.shape) + rho * v, b, data_iters, P)
                x0_hat = x0_pred + d
        else:
            if lipschitz is None:
                lipschitz = 2.0 * operator_norm_squared(forward, x0_pred, iters=10).view(-1, *[1] * (x.ndim - 1))
            eta = 1.0 / (lipschitz + rho)
            x0_hat = x0_pred.clone()
            for _ in range(data_iters):
                with torch.enable_grad():
                    v = x0_hat.detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(0.5 * (forward(v) - y).square().sum(), v)
                if P is not None:
                    g = P(g)
                x0_hat = (x0_hat - eta * (g + rho * (x0_hat - x0_pred))).detach()
        if clip_x0 and not latent:
            x0_hat = x0_hat.clamp(-1, 1)

        # back to x_prev with a mix of the implied and fresh noise (Alg. 1, l. 6-7)
        with torch.no_grad():
            residual = per_sample_residual(y, forward(x0_hat))
            if t_prev < 0:
                x = x0_hat
            else:
                eps_hat = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
                noise = gens.randn_like(x)
                x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * ((1 - zeta) ** 0.5 * eps_hat + zeta**0.5 * noise)
        x = run.step(i, x, residual, rank, x0=x0_hat, t=t, sigma=float(sigma2.flatten()[0].sqrt()))

    return run.finish(prior, operator, y, x)


register_solver("diffpir", diffpir, priors=("pixel", "latent"), description="DiffPIR (Zhu et al., CVPRW 2023)")

"""ReSample (Song, Kwon, Zhang, Hu, Qu, Shen, "Solving Inverse Problems with Latent Diffusion
Models via Hard Data Consistency", ICLR 2024) with DiffStateGrad as the official DiffStateGrad
code places it.

Latent DDIM with, at every step, a DPS-like latent step, and at every ``hdc_every``-th step of
the last two thirds of the trajectory a hard-data-consistency (HDC) call:

    time travel   z_tt = ``time_travel`` unconditional DDIM steps from z (discarded), giving z0_hat
    optimise      pixel stage (first of the two thirds):  x* = argmin_x ||y - A(x)||^2 from D(z0_hat)
                                                         (AdamW, ``pixel_lr``, <= ``pixel_iters``),
                                                         z0* = E(x*)
                  latent stage (last third):             z0* = argmin_z ||y - A(D(z))||^2 from z0_hat
                                                         (AdamW, ``latent_lr``, <= ``latent_iters``,
                                                         early stop when the loss rises over a
                                                         ``early_stop_window``-iteration window)
    resample      z ~ N((g sqrt(a) z0* + (1 - a) x_t) / (g + 1 - a), g (1 - a) / (g + 1 - a))
                  with a = alpha_bar_prev, g = gamma_scale (1 - a_prev)/(1 - a_t)(1 - a_t/a_prev)

plus one final latent optimisation after the loop (reference doc, section 2).

DiffStateGrad (insertion point, exactly as the official code): inside each HDC optimisation the
AdamW gradient is replaced by its projection before every ``optimizer.step()`` whose iteration
index passes ``projector.applies_at``; the basis is computed once per call, from the decoded
time-travelled latent D(z_tt) in the pixel stage and from z_tt in the latent stage (the final
optimisation uses the final z). The per-step DPS-like gradient is not projected.

Two settings (``setting=``):
- ``"reference"`` reproduces the official constants and quirks (Anima-Lab/DiffStateGrad
  ``ldm/models/diffusion/diffstategrad_ddim.py`` at c2a6a11, itself soominkwon/resample): the
  "pseudo" x0 = (z - (1 - a) eps) / sqrt(a) everywhere, the network timestep one DDIM step below
  the alpha index in time travel, alpha_bar_prev of the last step = alpha_bar(0), and the inner
  loops' order: each AdamW step is taken before its stop test (a stop returns one step more).
- ``"default"`` fixes the quirks (the standard Tweedie x0, consistent timesteps, a final step to
  alpha_bar = 1, the stop test before the step, so a stopped sample keeps the iterate its rule
  judged) and keeps every constant as a parameter.

``guidance_scale`` multiplies both AdamW learning rates (1.0 = the official 1e-2 / 5e-3): the
step size of the gradient DiffStateGrad projects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from diffstategrad.operators.base import Operator
from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.projection import DiffStateGrad, StateBasis
from diffstategrad.schedules import eps_to_x0, timestep_spacing
from diffstategrad.solvers.base import SolveResult, SolveRun, initial_state, per_sample_residual, solver_generators
from diffstategrad.solvers.registry import register_solver

__all__ = ["ReSampleConfig", "REFERENCE", "DEFAULT", "resample", "hdc_stage", "resample_gamma", "stochastic_resample"]


@dataclass(frozen=True)
class ReSampleConfig:
    steps: int = 500
    spacing: str = "ldm"
    dps_scale: float = 0.5  # the per-step DPS-like step is dps_scale * alpha_bar_t
    hdc_every: int = 10
    splits: int = 3
    time_travel: int = 5
    gamma_scale: float = 40.0
    pixel_lr: float = 1e-2
    pixel_iters: int = 2000
    latent_lr: float = 5e-3
    latent_iters: int = 500
    early_stop_window: int = 200
    loss_tol: float = 1e-6
    weight_decay: float = 0.01
    final_optimization: bool = True
    pseudo_x0: bool = False  # reference quirk: (z - (1 - a) eps) / sqrt(a)
    time_travel_offset: bool = False  # reference quirk: network timestep one DDIM step below the alpha index
    last_alpha_prev_is_t0: bool = False  # reference: alpha_bar_prev of DDIM index 0 is alpha_bar(0), not 1
    step_then_stop: bool = False  # reference order: take the AdamW step, then test the stop rules on the loss before it


DEFAULT = ReSampleConfig()
REFERENCE = replace(DEFAULT, pseudo_x0=True, time_travel_offset=True, last_alpha_prev_is_t0=True, step_then_stop=True)


def hdc_stage(index: int, num_steps: int, hdc_every: int = 10, splits: int = 3) -> str | None:
    """Which hard-data-consistency stage runs at DDIM index ``index`` (N-1 first, 0 last):
    ``"pixel"``, ``"latent"`` or None. HDC runs when 0 < index <= N - N // splits and
    index % hdc_every == 0; pixel while index >= N // splits, latent below."""
    split = num_steps // splits
    if index <= 0 or index > num_steps - split or index % hdc_every:
        return None
    return "pixel" if index >= split else "latent"


def resample_gamma(alpha_bar_t, alpha_bar_prev, scale: float = 40.0):
    """ReSample's resampling variance gamma = scale (1 - a_prev)/(1 - a_t) (1 - a_t / a_prev)."""
    return scale * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)


def stochastic_resample(z0: torch.Tensor, x_t: torch.Tensor, alpha_bar, gamma, noise: torch.Tensor) -> torch.Tensor:
    """Sample N((g sqrt(a) z0 + (1 - a) x_t) / (g + 1 - a), g (1 - a) / (g + 1 - a)) (ReSample Eq. 13)."""
    a = torch.as_tensor(alpha_bar, dtype=z0.dtype, device=z0.device)
    g = torch.as_tensor(gamma, dtype=z0.dtype, device=z0.device)
    mean = (g * a.sqrt() * z0 + (1 - a) * x_t) / (g + 1 - a)
    std = (g * (1 - a) / (g + 1 - a)).sqrt()
    return mean + std * noise


def _per_sample_mse(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    return ((y - y_hat) ** 2).reshape(y.shape[0], -1).mean(1)


def _optimize(variable: torch.Tensor, loss_fn, lr: float, iters: int, cfg: ReSampleConfig, projector, basis, early_stop: bool) -> torch.Tensor:
    """AdamW on a batch variable with per-sample stopping (the official loops, batched).

    Each sample stops when its MSE falls below ``loss_tol`` or (latent stage) when its loss
    exceeds the loss ``early_stop_window`` iterations earlier; a stopped sample is frozen.
    AdamW is elementwise, so batching does not couple the samples.

    Order of the stop test: with ``cfg.step_then_stop`` (the reference profile) the iteration
    takes its AdamW step and then tests the loss computed before that step, as the official
    loops do, so a stop at iteration k returns the iterate after k + 1 steps. Otherwise (the
    default profile) the test comes first and a stopped sample keeps the iterate whose loss met
    the rule: the returned variable is the one the rule judged.
    """
    x = variable.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=lr, weight_decay=cfg.weight_decay)
    B = x.shape[0]
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    losses = []

    def stop_rule(it: int, loss: torch.Tensor) -> torch.Tensor:
        done = loss < cfg.loss_tol
        if early_stop and it >= cfg.early_stop_window:
            done |= loss > losses[it - cfg.early_stop_window]
        losses.append(loss)
        return done

    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)  # (B,)
        if not cfg.step_then_stop:
            active &= ~stop_rule(it, loss.detach())
            if not active.any():
                break
        loss.sum().backward()
        if projector is not None and projector.applies_at(it):
            x.grad = projector.project(x.grad, basis)  # DiffStateGrad, once per inner iteration
        frozen = x.detach()[~active].clone()
        opt.step()
        if frozen.numel():
            with torch.no_grad():
                x[~active] = frozen
        if cfg.step_then_stop:
            active &= ~stop_rule(it, loss.detach())
            if not active.any():
                break
    return x.detach()


def resample(
    prior: DiffusionPrior,
    operator: Operator,
    y: torch.Tensor,
    *,
    shape=None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    projector: DiffStateGrad | None = None,
    seeds=None,
    callback=None,
    progress: bool = False,
    setting: str = "default",
    x_init: torch.Tensor | None = None,
    divergence_factor: float = 1e3,
    **overrides,
) -> SolveResult:
    """Run ReSample (latent priors only). ``setting`` is ``"default"`` or ``"reference"``;
    ``steps`` and any field of :class:`ReSampleConfig` override it."""
    if setting not in ("default", "reference"):
        raise ValueError(f"setting must be 'default' or 'reference', got {setting!r}")
    if prior.kind != "latent":
        raise ValueError("ReSample needs a latent prior (encode / decode)")
    unknown = set(overrides) - {f.name for f in fields(ReSampleConfig)}
    if unknown:
        raise ValueError(f"unknown ReSample settings: {sorted(unknown)}")
    cfg = replace(REFERENCE if setting == "reference" else DEFAULT, **overrides)
    if steps is not None:
        cfg = replace(cfg, steps=steps)

    B = y.shape[0]
    gens = solver_generators(seeds, B)
    z = initial_state(prior, y, shape, x_init, gens, "ReSample")

    taus = timestep_spacing(prior.num_timesteps, cfg.steps, cfg.spacing)[::-1]  # taus[j]: DDIM index j
    N = len(taus)
    sched = prior.schedule
    last_prev = sched.alpha_bar(0).item() if cfg.last_alpha_prev_is_t0 else 1.0

    def abar(j):  # alpha_bar of DDIM index j
        return sched.alpha_bar(taus[j]).item()

    def abar_prev(j):
        return abar(j - 1) if j > 0 else last_prev

    def ddim(z, t, j):
        """One unconditional DDIM step (eta = 0) at network timestep t with alpha index j;
        returns (z_prev, x0 estimate used by ReSample)."""
        a, ap = abar(j), abar_prev(j)
        eps = prior.eps(z, t)
        x0 = eps_to_x0(z, eps, torch.tensor(a, dtype=z.dtype))
        z_prev = ap**0.5 * x0 + (1 - ap) ** 0.5 * eps
        z0 = (z - (1 - a) * eps) / a**0.5 if cfg.pseudo_x0 else x0
        return z_prev, z0

    def latent_loss(zz):
        return _per_sample_mse(y, operator(prior.decode(zz)))

    def basis_of(state):
        return projector.basis(state) if projector is not None and projector.period != 0 else None

    run = SolveRun("ReSample", y, N, projector, progress, divergence_factor, callback, logged=("hdc",))

    for i in range(N):
        index = N - 1 - i
        t = taus[index]
        # 1-2. DDIM step and the DPS-like latent step (not projected)
        z = z.detach().requires_grad_(True)
        z_prev, z0 = ddim(z, t, index)
        residual = per_sample_residual(y, operator(prior.decode(z0)))
        (grad,) = torch.autograd.grad(residual.sum(), z)
        z = (z_prev - cfg.dps_scale * abar(index) * grad).detach()
        residual = residual.detach()

        # 3-8. hard data consistency
        stage = hdc_stage(index, N, cfg.hdc_every, cfg.splits)
        rank = None
        if stage is not None and not run.failed.all():
            x_t = z.clone()
            z_tt, z0_hat = z, None
            with torch.no_grad():
                for k in range(cfg.time_travel):
                    j = index - k if cfg.time_travel_offset else index - k - 1
                    if j < 0:
                        break
                    z_tt, z0_hat = ddim(z_tt, taus[index - k - 1], j)
            a_t, a_p = abar(index), abar_prev(index)
            gamma = resample_gamma(a_t, a_p, cfg.gamma_scale)
            if stage == "pixel":
                with torch.no_grad():
                    x_start = prior.decode(z0_hat)
                    basis = basis_of(prior.decode(z_tt))
                x_star = _optimize(x_start, lambda xx: _per_sample_mse(y, operator(xx)), cfg.pixel_lr * guidance_scale, cfg.pixel_iters, cfg, projector, basis, early_stop=False)
                with torch.no_grad():
                    z0_star = prior.encode(x_star)
            else:
                basis = basis_of(z_tt)
                z0_star = _optimize(z0_hat, latent_loss, cfg.latent_lr * guidance_scale, cfg.latent_iters, cfg, projector, basis, early_stop=True)
            z = stochastic_resample(z0_star, x_t, a_p, gamma, gens.randn_like(z))
            rank = None if basis is None else basis.ranks

        a_i = float(abar(index))
        z = run.step(i, z, residual, rank, x0=z0.detach(), t=t, sigma=((1 - a_i) / a_i) ** 0.5, hdc=stage)

    if cfg.final_optimization:
        z = _optimize(z, latent_loss, cfg.latent_lr * guidance_scale, cfg.latent_iters, cfg, projector, basis_of(z), early_stop=True)
        z = run.tracker.update(N, z, per_sample_residual(y, operator(prior.decode(z))).detach())
    return run.finish(prior, operator, y, z)


register_solver("resample", resample, priors=("latent",), description="ReSample (Song et al., ICLR 2024)")

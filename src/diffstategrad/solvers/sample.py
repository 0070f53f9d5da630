"""Unconditional sampling from a prior (DDPM ancestral or DDIM), for sample grids and checks."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffstategrad.priors.base import DiffusionPrior
from diffstategrad.schedules import ddim_step, ddpm_posterior, eps_to_x0, timestep_spacing, x0_to_eps
from diffstategrad.solvers.base import solver_generators

__all__ = ["sample"]


@torch.no_grad()
def sample(prior: DiffusionPrior, shape, n: int | None = None, *, steps: int = 250, sampler: str = "ddpm", eta: float = 1.0,
           clip_x0: bool = True, seeds=None, progress: bool = False) -> torch.Tensor:
    """Draw images (B, C, H, W) from ``prior`` for images of ``shape`` (C, H, W); latent priors
    are decoded. DDPM uses the posterior variance; DDIM uses ``eta``."""
    batch = n if n is not None else (len(seeds) if seeds is not None else 1)
    gens = solver_generators(seeds, batch)
    device = next((b.device for b in prior.buffers()), None) or next((p.device for p in prior.parameters()), torch.device("cpu"))
    x = gens.randn(prior.state_shape(tuple(shape)), device=device)
    clip = clip_x0 and prior.kind == "pixel"
    timesteps = timestep_spacing(prior.num_timesteps, steps)
    for i, t in enumerate(tqdm(timesteps, disable=not progress, leave=False, desc="sample")):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = prior.schedule.alpha_bar(t, like=x), prior.schedule.alpha_bar(t_prev, like=x)
        x0 = eps_to_x0(x, prior.eps(x, t), a_t)
        x0 = x0.clamp(-1, 1) if clip else x0
        if t_prev < 0:
            x = x0
        elif sampler == "ddpm":
            mean, var, _ = ddpm_posterior(x, x0, a_t, a_prev)
            x = mean + var.sqrt() * gens.randn_like(x)
        else:
            x = ddim_step(x0, x0_to_eps(x, x0, a_t), a_t, a_prev, eta, gens.randn_like(x) if eta > 0 else None)
    return prior.to_image(x)

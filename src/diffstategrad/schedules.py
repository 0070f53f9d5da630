"""Variance-preserving (VP) diffusion schedules and the update rules that use them.

Everything here is a pure function of the cumulative signal level alpha_bar_t, the one number a
discrete VP model is defined by:

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,     eps ~ N(0, I).

Conventions (shared by every prior, solver and loader of the package):
- timesteps are integers t in {0, ..., T-1}; ``alphas_cumprod[t]`` is alpha_bar_t, as in DDPM,
  guided-diffusion, CompVis LDM and diffusers;
- schedules are stored in float64 and coefficients are cast to the state's dtype when used;
- the conversions between epsilon, x0, score and v live here and nowhere else.

References: Ho et al. 2020 (DDPM, linear betas, Eq. 6-7 posterior), Song et al. 2021 (DDIM,
Eq. 12), Nichol & Dhariwal 2021 (cosine schedule, timestep respacing), Rombach et al. 2022
(the LDM "sqrt-linear" schedule), Karras et al. 2022 (sigma parameterisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "VPSchedule",
    "linear_betas",
    "sqrt_linear_betas",
    "cosine_betas",
    "make_schedule",
    "timestep_spacing",
    "eps_to_x0",
    "x0_to_eps",
    "eps_to_score",
    "score_to_eps",
    "v_to_eps",
    "v_to_x0",
    "alpha_bar_to_sigma",
    "sigma_to_alpha_bar",
    "ddpm_posterior",
    "ddim_step",
    "edm_sigmas",
]


# ---------------------------------------------------------------------------------------------
# Beta schedules
# ---------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, rescale: bool = True) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4): betas evenly spaced in [beta_start, beta_end].

    With ``rescale`` (guided-diffusion) the end points are multiplied by 1000 / T so that other
    lengths keep the same overall noise, which leaves T = 1000 untouched; diffusers and CompVis
    (their ``sqrt_linear``) use the end points as given (``rescale=False``).
    """
    scale = 1000.0 / num_timesteps if rescale else 1.0
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def sqrt_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> torch.Tensor:
    """CompVis LDM's "linear" schedule: sqrt(beta) evenly spaced, then squared."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""

    def f(t: float) -> float:
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1.0 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


_BETA_SCHEDULES = {"linear": linear_betas, "sqrt_linear": sqrt_linear_betas, "cosine": cosine_betas}


@dataclass(frozen=True)
class VPSchedule:
    """A discrete VP schedule: ``alphas_cumprod[t]`` for t = 0..T-1 (float64, CPU)."""

    alphas_cumprod: torch.Tensor
    name: str = "custom"

    def __post_init__(self):
        a = self.alphas_cumprod
        if a.ndim != 1 or a.numel() < 1:
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor")
        if not torch.all((a > 0) & (a <= 1)):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if a.numel() > 1 and not torch.all(a[1:] <= a[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        object.__setattr__(self, "alphas_cumprod", a.detach().to(torch.float64).cpu())

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom") -> "VPSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0), name=name)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> torch.Tensor:
        a = self.alphas_cumprod
        prev = torch.cat([a.new_ones(1), a[:-1]])
        return 1.0 - a / prev

    def alpha_bar(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar at integer timestep(s) t; ``t = -1`` means the clean end (alpha_bar = 1).

        With ``like`` the result is cast to its dtype/device and shaped (B, 1, 1, ...) so that it
        broadcasts against a batch ``like`` of shape (B, ...).
        """
        t = torch.as_tensor(t, dtype=torch.long)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        value = padded[t.cpu() + 1]
        if like is None:
            return value
        value = value.to(device=like.device, dtype=_float_dtype(like))
        if value.ndim == 0:
            return value
        return value.reshape(-1, *([1] * (like.ndim - 1)))

    def sigma(self, t) -> torch.Tensor:
        """The equivalent variance-exploding noise level sqrt((1 - a) / a) (Karras et al. 2022)."""
        return alpha_bar_to_sigma(self.alpha_bar(t))

    def timestep_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep whose sigma equals ``sigma``, by log-sigma interpolation (k-diffusion)."""
        log_sigmas = torch.log(alpha_bar_to_sigma(self.alphas_cumprod))
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64)).clamp(log_sigmas[0], log_sigmas[-1])
        idx = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, log_sigmas.numel() - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        frac = (log_sigma.reshape(-1) - lo) / (hi - lo)
        return (idx - 1 + frac).reshape(log_sigma.shape)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def make_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> VPSchedule:
    """Build a named VP schedule: ``linear`` (DDPM / guided-diffusion), ``sqrt_linear`` (CompVis
    LDM) or ``cosine`` (improved DDPM)."""
    if name not in _BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(_BETA_SCHEDULES)}")
    return VPSchedule.from_betas(_BETA_SCHEDULES[name](num_timesteps, **kwargs), name=name)


def timestep_spacing(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Timesteps a sampler with ``num_steps`` steps visits, in decreasing order.

    - ``uniform``: guided-diffusion's ``space_timesteps`` for one section: evenly spaced over
      [0, T-1], both ends included (T-1 first, 0 last).
    - ``leading``: DDIM / diffusers "leading": 0, c, 2c, ... with c = T // num_steps.
    - ``ldm``: CompVis ``make_ddim_timesteps(..., 'uniform')``: ``leading`` shifted by +1,
      e.g. 1, 3, ..., 999 for 500 of 1000 (the spacing ReSample and DiffStateGrad use).
    - ``trailing``: diffusers "trailing": T-1, T-1-c, ... (round(T - c*i) - 1).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "uniform":
        if num_steps == 1:
            steps = [num_timesteps - 1]
        else:
            stride = (num_timesteps - 1) / (num_steps - 1)
            steps = [round(i * stride) for i in range(num_steps)]
    elif spacing in ("leading", "ldm"):
        c = num_timesteps // num_steps
        steps = [i * c for i in range(num_steps)]
        if spacing == "ldm":
            steps = [s + 1 for s in steps]
    elif spacing == "trailing":
        c = num_timesteps / num_steps
        steps = sorted(round(num_timesteps - c * i) - 1 for i in range(num_steps))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose uniform, leading, ldm or trailing")
    if len(set(steps)) != len(steps) or max(steps) >= num_timesteps:
        raise ValueError(f"spacing {spacing!r} gives invalid timesteps for {num_steps} of {num_timesteps}")
    return sorted(steps, reverse=True)


# ---------------------------------------------------------------------------------------------
# Parameterisation conversions (the one place they live)
# ---------------------------------------------------------------------------------------------


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Tweedie / DDIM Eq. 12 estimate: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def eps_to_score(eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """grad_x log p_t(x) = -eps / sqrt(1 - a)."""
    return -eps / (1 - alpha_bar).sqrt()


def score_to_eps(score: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return -score * (1 - alpha_bar).sqrt()


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v-prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1 - a) x0."""
    return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """VP -> VE: x_t / sqrt(a) = x0 + sigma * eps with sigma = sqrt((1 - a) / a)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + sigma**2)


# ---------------------------------------------------------------------------------------------
# Update rules
# ---------------------------------------------------------------------------------------------


def ddpm_posterior(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor):
    """Mean and variances of q(x_prev | x_t, x0) for a (possibly respaced) pair of levels.

    DDPM Eq. 6-7 with beta replaced by the effective beta between the two levels,
    1 - a_t / a_prev (guided-diffusion's respacing). Returns ``(mean, var_small, var_large)``:
    var_small is the true posterior variance (DDPM's sigma^2 = beta-tilde), var_large is beta
    (DDPM's other fixed choice). Both are tensors broadcastable against x_t.
    """
    beta = 1 - alpha_bar_t / alpha_bar_prev
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar_t)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    mean = coef_x0 * x0 + coef_xt * x_t
    var_small = beta * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return mean, var_small, beta


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM update (Song et al. 2021, Eq. 12) from the level of alpha_bar_t to alpha_bar_prev.

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,
    s = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev).
    eta = 0 is deterministic; eta = 1 matches the DDPM posterior variance.
    """
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def edm_sigmas(sigma_max: float, sigma_min: float, num: int, rho: float = 7.0) -> list[float]:
    """``num`` + 1 sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, Eq. 5)."""
    if num < 1:
        raise ValueError("at least one step is needed")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / num * (lo - hi)) ** rho for i in range(num + 1)]

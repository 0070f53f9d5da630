"""The prior contract: a discrete-time VP diffusion model.

A prior is a schedule (``alphas_cumprod``) plus an epsilon prediction ``eps(x_t, t)``; the x0
estimate and the score are derived here, once. A latent prior adds ``encode`` / ``decode``
between images (B, 3, H, W) in [-1, 1] and latents. Every checkpoint format (built-in,
guided-diffusion, CompVis LDM, diffusers) and every analytic oracle is an adapter to this one
contract, so solvers never see where a model came from.

Every subclass's ``eps``, ``eps_and_variance``, ``encode`` and ``decode`` are wrapped when the
class is defined (``__init_subclass__``), so that ``diffstategrad.precision.configure_network``
can run all network passes of a prior in reduced precision / channels-last / compiled without
any solver or adapter knowing; an unconfigured prior calls its methods directly.

The same wrapper counts the network passes: ``prior.network_calls`` (the denoiser's passes:
``eps`` / ``eps_and_variance``) and ``prior.autoencoder_calls`` (``encode`` / ``decode``), each a
running total per prior instance (all threads); ``count_network_calls(prior)`` counts those of
a block, made by the calling thread. A call made inside another pass (the default
``eps_and_variance`` calls ``eps``) is part of that pass and is not counted again. A pass is one
call over the whole batch; a VJP through it (DPS) is no extra call. Concurrent jobs sharing one
prior instance in threads (``serve --concurrency`` > 1) each count their own passes, and one
job's pass never makes another's look nested.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from diffstategrad.schedules import VPSchedule, eps_to_score, eps_to_x0

__all__ = ["DiffusionPrior", "LatentDiffusionPrior", "as_timesteps", "NETWORK_METHODS", "NetworkCalls", "count_network_calls"]

NETWORK_METHODS = ("eps", "eps_and_variance", "encode", "decode")
_AUTOENCODER_METHODS = ("encode", "decode")


_THREAD = threading.local()


def _pass_state(prior) -> list:
    """This thread's [inside a pass?, denoiser passes, autoencoder passes] for ``prior``: a pass
    nested in another is recognised, and a block counted, per thread, so that two threads sharing
    one prior (the web page's sessions) neither skip each other's network configuration nor count
    each other's passes."""
    table = getattr(_THREAD, "priors", None)
    if table is None:
        table = _THREAD.priors = {}
    return table.setdefault(id(prior), [False, 0, 0])


def _network_pass(fn, name: str):
    """``fn`` (a prior method) counted and routed through the prior's network configuration,
    if any. A call nested in another pass of the same prior (in the same thread) runs plainly and
    is not counted."""
    autoencoder = name in _AUTOENCODER_METHODS

    @functools.wraps(fn)
    def method(self, x, *args, **kwargs):
        state = _pass_state(self)
        if state[0]:
            return fn(self, x, *args, **kwargs)
        if autoencoder:
            self.autoencoder_calls += 1
            state[2] += 1
        else:
            self.network_calls += 1
            state[1] += 1
        state[0] = True
        try:
            if self._network_config is None:
                return fn(self, x, *args, **kwargs)
            from diffstategrad.precision import run_network

            return run_network(self, name, fn, x, args, kwargs)
        finally:
            state[0] = False

    method.network_pass = True
    return method


@dataclass
class NetworkCalls:
    """Network passes counted by :func:`count_network_calls` (final once its block has ended)."""

    network: int = 0  # denoiser passes (eps / eps_and_variance)
    autoencoder: int = 0  # encode / decode passes (latent priors)


@contextmanager
def count_network_calls(prior):
    """``with count_network_calls(prior) as calls: ...`` counts the passes of ``prior`` in the
    block (``calls.network``, ``calls.autoencoder``), made by this thread; ``prior`` None counts
    nothing."""
    calls = NetworkCalls()
    if prior is None:
        yield calls
        return
    state = _pass_state(prior)  # this thread's passes only
    network, autoencoder = state[1], state[2]
    try:
        yield calls
    finally:
        calls.network = state[1] - network
        calls.autoencoder = state[2] - autoencoder


def as_timesteps(t, batch_size: int, device=None) -> torch.Tensor:
    """Normalise an int, a 0-d or a (B,) tensor of timesteps to a (B,) int64 tensor."""
    t = torch.as_tensor(t, device=device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError("discrete priors take integer timesteps")
        t = t.long()
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"timesteps must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}")
    return t


class DiffusionPrior(nn.Module):
    """Base class of all priors. Subclasses set ``self.schedule`` and implement ``eps``.

    Attributes:
        kind: ``"pixel"`` or ``"latent"``.
        schedule: the model's VP schedule.
        channels: channel count of the space the diffusion runs in (image or latent).
        learned_variance: whether ``eps_and_variance`` returns guided-diffusion's learned
            variance interpolation (then ``variance="learned"`` is available to DDPM samplers).
    """

    kind = "pixel"
    learned_variance = False
    _network_config = None  # a diffstategrad.precision.NetworkConfig once configured
    network_calls = 0  # denoiser passes so far (eps / eps_and_variance), counted per instance
    autoencoder_calls = 0  # encode / decode passes so far

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in NETWORK_METHODS:
            fn = getattr(cls, name, None)
            if fn is not None and not getattr(fn, "network_pass", False):
                setattr(cls, name, _network_pass(fn, name))

    def __init__(self, schedule: VPSchedule, channels: int):
        super().__init__()
        self.schedule = schedule
        self.channels = channels

    # -- what subclasses implement ------------------------------------------------------------

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eps_and_variance(self, x_t: torch.Tensor, t):
        """(eps, v) where v in [-1, 1] is guided-diffusion's learned-range interpolation between
        log beta-tilde (v = -1) and log beta (v = +1), or None for fixed-variance models."""
        return self.eps(x_t, t), None

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError if the model cannot run on states of this spatial size."""

    def size_rule(self) -> str:
        """A one-line description of the spatial sizes the model accepts."""
        return "any size"

    # -- derived, in one place -------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def alpha_bar(self, t, like: torch.Tensor) -> torch.Tensor:
        return self.schedule.alpha_bar(as_timesteps(t, like.shape[0]), like=like)

    def x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's estimate E[x0 | x_t] from the epsilon prediction."""
        return eps_to_x0(x_t, self.eps(x_t, t), self.alpha_bar(t, x_t))

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """grad log p_t(x_t) = -eps / sqrt(1 - alpha_bar_t)."""
        return eps_to_score(self.eps(x_t, t), self.alpha_bar(t, x_t))

    def state_shape(self, image_shape) -> tuple[int, int, int]:
        """Shape (C, H, W) of the diffusion state for an image of shape (C, H, W)."""
        _, H, W = image_shape
        return (self.channels, H, W)

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        """The image a diffusion state stands for: itself for pixel priors, its decoding for
        latent priors (differentiable)."""
        return state

    # -- the sigma (variance-exploding) view, for samplers written in EDM form ----------------

    def nearest_timestep(self, sigma) -> torch.Tensor:
        """The discrete timestep whose sigma = sqrt((1 - a) / a) is nearest to ``sigma`` in
        log space (k-diffusion's quantised DiscreteSchedule); sigmas outside the schedule's
        range map to its ends."""
        t = self.schedule.timestep_for_sigma(torch.as_tensor(sigma, dtype=torch.float64))
        return t.round().long()

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x0 + sigma * n = x]: the model as an EDM-style denoiser D(x, sigma).

        A VP model sees x_t = sqrt(a) x with a = 1 / (1 + sigma^2) (Karras et al. 2022,
        Eq. 4-5). Discrete models are evaluated at the nearest timestep, whose sigma is then
        used for the scaling so that the input noise level matches what the network expects;
        priors that can take any sigma (the analytic ones) override this exactly.
        ``sigma`` is a float or a (B,) tensor.
        """
        B = x.shape[0]
        t = self.nearest_timestep(torch.as_tensor(sigma, dtype=torch.float64).expand(B) if torch.as_tensor(sigma).ndim == 0 else sigma)
        a = self.schedule.alpha_bar(t, like=x)
        return self.x0(x * a.sqrt(), t)


class LatentDiffusionPrior(DiffusionPrior):
    """A diffusion prior in the latent space of an autoencoder.

    ``encode`` maps images (B, C, H, W) in [-1, 1] to (scaled) latents, ``decode`` maps latents
    back; both are differentiable. ``downsampling`` is the spatial factor between them.
    """

    kind = "latent"

    def __init__(self, schedule: VPSchedule, latent_channels: int, downsampling: int, image_channels: int = 3):
        super().__init__(schedule, latent_channels)
        self.downsampling = downsampling
        self.image_channels = image_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        return self.decode(state)

    def state_shape(self, image_shape) -> tuple[int, int, int]:
        _, H, W = image_shape
        f = self.downsampling
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} is not a multiple of the autoencoder factor {f}")
        return (self.channels, H // f, W // f)

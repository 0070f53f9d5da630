"""What every solver shares: the result type, per-sample residuals, failure tracking, seeds.

Solvers are functions with one keyword signature (k-diffusion style):

    solver(prior, operator, y, *, shape, steps, guidance_scale, projector, seeds, callback, ...)
        -> SolveResult

``projector`` is a :class:`~diffstategrad.projection.DiffStateGrad` or None; each solver
documents the one place where the measurement-guidance gradient passes through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from diffstategrad.rng import SampleGenerators, derive_seed

__all__ = ["CALLBACK_KEYS", "SolveResult", "SolveRun", "FailureTracker", "per_sample_residual", "solver_generators", "Stopwatch", "initial_state", "step_pairs"]


# What every solver's callback receives after each step, whatever the solver:
#   step      the step index (0 first), steps: the number of steps
#   t         the discrete timestep of the state (DAPS: the timestep nearest to its sigma)
#   sigma     the state's noise level in the sigma (VE) parameterisation, sqrt((1 - a) / a)
#   x         the solver's state after the step (a latent for latent priors)
#   x0        the clean estimate of this step, in the state's space (prior.to_image decodes it)
#   residual  (B,) ||y - A(x0)||, rank: (B,) DiffStateGrad ranks or None where it did not apply
#   info      solver-specific extras (DPS: grad_norm; DAPS: x0_y; ReSample: hdc)
CALLBACK_KEYS = ("step", "steps", "t", "sigma", "x", "x0", "residual", "rank", "info")


@dataclass
class SolveResult:
    """The output of a solver for a batch.

    x: (B, C, H, W) reconstructions in image space ([-1, 1] units, not clipped).
    failed: (B,) bool; a failed sample keeps its last finite state.
    failed_step: (B,) int64, the step at which a sample failed, -1 if it did not.
    residual: (B,) ||y - A(x)|| of the returned reconstructions.
    seconds: wall time of the whole batch.
    history: per-step diagnostics, each a list over steps of (B,) tensors
        (``residual``, ``rank`` where a projector ran).
    state: the final diffusion state (latent for latent priors), or None.
    """

    x: torch.Tensor
    failed: torch.Tensor
    failed_step: torch.Tensor
    residual: torch.Tensor
    seconds: float
    history: dict = field(default_factory=dict)
    state: torch.Tensor | None = None

    @property
    def failure_rate(self) -> float:
        return float(self.failed.float().mean()) if self.failed.numel() else 0.0


def per_sample_residual(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """||y_b - y_hat_b||_2 for every sample b: (B,). Batch members never couple."""
    return (y - y_hat).reshape(y.shape[0], -1).norm(dim=1)


def solver_generators(seeds, batch_size: int) -> SampleGenerators:
    """One generator per sample for the solver's own draws.

    ``seeds`` may be SampleGenerators (used as given), None (seeds 0..B-1), an int s (seeds
    s..s+B-1) or a list of B ints; integer seeds are mapped to the ``solver`` stream of
    :func:`~diffstategrad.rng.derive_seed`, so the solver never reuses the measurement noise.
    """
    if isinstance(seeds, SampleGenerators):
        if len(seeds) != batch_size:
            raise ValueError(f"{len(seeds)} generators for a batch of {batch_size}")
        return seeds
    if seeds is None:
        seeds = list(range(batch_size))
    elif isinstance(seeds, int):
        seeds = list(range(seeds, seeds + batch_size))
    seeds = list(seeds)
    if len(seeds) != batch_size:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch_size}")
    return SampleGenerators([derive_seed(s, "solver") for s in seeds])


RESIDUAL_FLOOR = 0.05  # RMS of y - A(x) below which rule 4 of FailureTracker never fires
WORSE_THAN_GREY = 1.25  # rule 4: a residual this many times the grey image's is a failure


class FailureTracker:
    """Marks samples that diverge. A sample fails at step k when

    1. its state turns non-finite, or its residual is non-finite;
    2. its residual explodes: r_k > ``divergence_factor`` * max(||y||, 1);
    3. its residual grows back: r_k > ``growth_factor`` * min_{j<k} r_j and r_k > ||y|| / 2
       (it had fitted the data and then lost it; the second condition ignores growth at the
       noise floor);

    and, checked by :meth:`SolveRun.finish` on the returned reconstruction,
    4. it explains the data clearly worse than the grey image does: ||y - A(x)|| >
       ``WORSE_THAN_GREY`` (1.25) * ||y - A(0)|| and
       the residual's RMS is above ``RESIDUAL_FLOOR`` (0.05 in [-1, 1] units, far above the
       presets' noise; it spares images whose truth is grey): a bounded but useless result, e.g.
       DPS with a step size a million times too large, whose clipped estimates keep the
       residual finite.

    A failed sample keeps its last finite state (the state before it failed for rules 1-3), and
    the solver keeps running on a harmless placeholder (zeros) in its slot so the rest of the
    batch is unaffected.
    """

    def __init__(self, y: torch.Tensor, divergence_factor: float = 1e3, growth_factor: float = 10.0):
        B = y.shape[0]
        self.failed = torch.zeros(B, dtype=torch.bool, device=y.device)
        self.failed_step = torch.full((B,), -1, dtype=torch.long, device=y.device)
        y_norm = y.reshape(B, -1).norm(dim=1)
        self.limit = divergence_factor * y_norm.clamp(min=1.0)
        self.growth_factor = float(growth_factor)
        self.growth_floor = y_norm / 2
        self.best = torch.full((B,), float("inf"), device=y.device, dtype=y_norm.dtype)
        self.last_good: torch.Tensor | None = None
        self.steps = 0

    def mark(self, bad: torch.Tensor, step: int) -> None:
        new = bad & ~self.failed
        if new.any():
            self.failed_step[new] = step
            self.failed |= new

    def update(self, step: int, state: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Check ``state`` after ``step``; returns the state with failed slots zeroed."""
        B = state.shape[0]
        self.steps = step + 1
        bad = ~torch.isfinite(state.reshape(B, -1)).all(dim=1)
        if residual is not None:
            r = residual.detach().to(self.best.dtype)
            bad |= ~torch.isfinite(r) | (r > self.limit)
            bad |= (r > self.growth_factor * self.best) & (r > self.growth_floor)
            self.best = torch.where(torch.isfinite(r), torch.minimum(self.best, r), self.best)
        if self.last_good is None:
            self.last_good = torch.zeros_like(state)
        self.mark(bad, step)
        keep = ~self.failed
        self.last_good[keep] = state[keep].detach()
        if self.failed.any():
            state = torch.where(self.failed.view(-1, *([1] * (state.ndim - 1))), torch.zeros_like(state), state)
        return state

    def finalize(self, state: torch.Tensor) -> torch.Tensor:
        """The final states, failed samples replaced by their last finite state."""
        if self.last_good is None or not self.failed.any():
            return state
        return torch.where(self.failed.view(-1, *([1] * (state.ndim - 1))), self.last_good, state)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def initial_state(prior, y: torch.Tensor, shape, x_init, gens: SampleGenerators, name: str, scale: float = 1.0) -> torch.Tensor:
    """The starting state: ``x_init`` if given, else ``scale`` * N(0, I) of the prior's state
    shape for images of ``shape`` (C, H, W), drawn per sample."""
    if x_init is not None:
        return x_init.detach().clone()
    if shape is None:
        raise ValueError(f"{name} needs the image shape (C, H, W) or an initial state x_init")
    state_shape = prior.state_shape(tuple(shape))
    prior.check_size(*state_shape[1:])
    return gens.randn(state_shape, device=y.device, dtype=y.dtype) * scale


class SolveRun:
    """Per-solve bookkeeping shared by every solver: failure tracking, per-step history
    (residual, rank, and the step-info keys named in ``logged``), the callback, the progress
    bar and the timer."""

    def __init__(self, name: str, y: torch.Tensor, total: int, projector=None, progress: bool = False,
                 divergence_factor: float = 1e3, callback=None, logged: tuple[str, ...] = ()):
        from tqdm.auto import tqdm

        self.tracker = FailureTracker(y, divergence_factor)
        self.history: dict = {"residual": [], "rank": [], **{key: [] for key in logged}}
        self.callback = callback
        self.total = int(total)
        self.clock = Stopwatch()
        self.bar = tqdm(total=total, desc=name + (" + DiffStateGrad" if projector is not None else ""), disable=not progress, leave=False)

    @property
    def failed(self) -> torch.Tensor:
        return self.tracker.failed

    def step(self, i: int, state: torch.Tensor, residual: torch.Tensor, rank=None, *, x0: torch.Tensor, t=None, sigma=None,
             **info) -> torch.Tensor:
        """Record step ``i`` (after its update): check for failures, log, call back (with the
        keys of ``CALLBACK_KEYS``), advance the bar. Returns the state with failed samples'
        slots zeroed."""
        state = self.tracker.update(i, state, residual)
        self.history["residual"].append(residual.detach().cpu())
        self.history["rank"].append(rank)
        for key in self.history.keys() - {"residual", "rank"}:
            self.history[key].append(info.get(key))
        if self.callback is not None:
            self.callback({"step": i, "steps": self.total, "t": None if t is None else int(t),
                           "sigma": None if sigma is None else float(sigma), "x": state, "x0": x0, "residual": residual,
                           "rank": rank, "info": info})
        self.bar.set_postfix(residual=f"{float(residual.mean()):.4g}", failed=int(self.tracker.failed.sum()))
        self.bar.update()
        return state

    def finish(self, prior, operator, y: torch.Tensor, state: torch.Tensor) -> SolveResult:
        """Decode the final state (latent priors), measure its residual and pack the result."""
        self.bar.close()
        state = self.tracker.finalize(state)
        with torch.no_grad():
            image = prior.to_image(state)
            final_residual = per_sample_residual(y, operator(image))
            zero_residual = per_sample_residual(y, operator(torch.zeros_like(image)))
        floor = RESIDUAL_FLOOR * (y[0].numel() ** 0.5)
        worse = (final_residual > WORSE_THAN_GREY * zero_residual) & (final_residual > floor)
        self.tracker.mark(worse, max(self.tracker.steps - 1, 0))  # rule 4
        return SolveResult(
            x=image,
            failed=self.tracker.failed.cpu(),
            failed_step=self.tracker.failed_step.cpu(),
            residual=final_residual.cpu(),
            seconds=self.clock.seconds,
            history=self.history,
            state=state,
        )


def step_pairs(timesteps: list[int]):
    """(i, t, t_prev) over a decreasing timestep list; t_prev = -1 (clean) after the last."""
    for i, t in enumerate(timesteps):
        yield i, t, (timesteps[i + 1] if i + 1 < len(timesteps) else -1)

"""Classical baselines with the solvers' signature: total variation and the Tikhonov
pseudo-inverse. They need no diffusion prior (``prior`` is ignored and may be None) and have no
guidance gradient for DiffStateGrad to project; they sit in the same tables so that every
diffusion result has the simplest thing that works beside it.

``tv`` -- total-variation regularised least squares on any operator, linear or not:

    min_x  1/2 ||A(x) - y||^2  +  lam * TV(x)   subject to  x in [-1, 1]^n
    TV(x) = sum_pixels ||(D_h x, D_v x)_{channels}||_2     (isotropic, colour-coupled)

solved by the primal-dual algorithm of Condat (2013) and Vu (2013) (a Chambolle-Pock iteration
that takes the smooth data term through its gradient, so A only needs autograd):

    x_{k+1} = clip(x_k - tau (grad_x 1/2 ||A(x_k) - y||^2 + D^T u_k), -1, 1)
    u_{k+1} = P_{||.||_2 <= lam}(u_k + sigma D(2 x_{k+1} - x_k))       (per pixel)

with D the forward differences (Neumann boundary, ||D||^2 <= 8), converging when
1/tau - 8 sigma >= L/2 for the Lipschitz constant L of the data gradient: L = ||A||^2 is
estimated by power iteration on J^T J at the start point (exact for linear operators; for
nonlinear ones a local value, used with a safety factor of 2); tau = 0.99 / L, sigma = 1 / (16 tau).
Start: A^T y (clipped) for linear operators, mid-grey (0) otherwise.

``pseudo_inverse`` -- Tikhonov-regularised least squares on linear operators,

    x = argmin ||A x - y||^2 + mu ||x||^2  =  (A^T A + mu I)^{-1} A^T y,

by conjugate gradients (per sample; ``steps`` iterations at most, stopping at a relative
residual of ``tol``). Nonlinear operators are refused with a clear error.

``lam`` / ``mu`` and the iteration counts per task preset live in ``configs/solvers.yaml``
(tuned on the tuning photographs, see the comments there).
"""

from __future__ import annotations

import torch

from diffstategrad.solvers.base import SolveResult, SolveRun, per_sample_residual
from diffstategrad.solvers.registry import register_solver

__all__ = ["tv", "pseudo_inverse", "total_variation", "finite_differences", "operator_norm_squared"]


def finite_differences(x: torch.Tensor) -> torch.Tensor:
    """D x: (B, C, H, W) -> (B, 2, C, H, W) forward differences (vertical, horizontal), zero at the
    far boundary (Neumann)."""
    dv = torch.zeros_like(x)
    dh = torch.zeros_like(x)
    dv[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dh[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([dv, dh], dim=1)


def _finite_differences_adjoint(u: torch.Tensor) -> torch.Tensor:
    """D^T u for u (B, 2, C, H, W): minus the discrete divergence."""
    uv, uh = u[:, 0], u[:, 1]
    out = torch.zeros_like(uv)
    out[..., :-1, :] -= uv[..., :-1, :]
    out[..., 1:, :] += uv[..., :-1, :]
    out[..., :, :-1] -= uh[..., :, :-1]
    out[..., :, 1:] += uh[..., :, :-1]
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(B,) isotropic, colour-coupled TV: the sum over pixels of the l2 norm of the gradients of
    all channels."""
    return finite_differences(x).square().sum(dim=(1, 2)).sqrt().flatten(1).sum(1)


def _data_gradient(operator, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x 1/2 ||A(x) - y||^2, per-sample residual ||A(x) - y||)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        r = operator(x) - y
        (g,) = torch.autograd.grad(0.5 * r.square().sum(), x)
    return g, r.detach().flatten(1).norm(dim=1)


def operator_norm_squared(operator, x: torch.Tensor, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """(B,) largest eigenvalue of J^T J at ``x`` (J the Jacobian of A; ||A||^2 for linear A), by
    power iteration with a fixed start."""
    # the same start for every sample, so that a sample's estimate does not depend on the batch
    v = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=x.dtype).to(x.device).expand_as(x).clone()
    lam = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        v = v / v.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, *[1] * (x.ndim - 1))
        _, jv = torch.func.jvp(operator, (x.detach(),), (v,))
        _, vjp = torch.func.vjp(operator, x.detach())
        (w,) = vjp(jv)
        lam = (w * v).flatten(1).sum(1)
        v = w
    return lam.clamp(min=1e-12)


def _check_no_projector(name: str, projector) -> None:
    if projector is not None:
        raise ValueError(f"{name} is a classical solver with no guidance gradient: it takes no DiffStateGrad projector")


def _start(operator, y: torch.Tensor, shape, x_init) -> torch.Tensor:
    if x_init is not None:
        return x_init.detach().clone()
    if shape is None:
        raise ValueError("a classical solver needs the image shape (C, H, W) or x_init")
    if getattr(operator, "linear", False):
        return operator.adjoint(y).reshape(y.shape[0], *shape).clamp(-1, 1)
    return torch.zeros(y.shape[0], *shape, dtype=y.dtype, device=y.device)


def tv(prior, operator, y: torch.Tensor, *, shape=None, steps: int = 300, lam: float = 0.01, projector=None, seeds=None,
       callback=None, progress: bool = False, x_init: torch.Tensor | None = None, divergence_factor: float = 1e3,
       **unused) -> SolveResult:
    """TV-regularised least squares by the Condat-Vu primal-dual iteration (module docstring).

    Args:
        prior: ignored (None is fine).
        steps: primal-dual iterations.
        lam: the TV weight (in [-1, 1] image units; the data term is 1/2 ||A(x) - y||^2).
    """
    _check_no_projector("tv", projector)
    _reject_unused("tv", unused)
    x = _start(operator, y, shape, x_init)
    B = x.shape[0]
    L = operator_norm_squared(operator, x) * (1.0 if getattr(operator, "linear", False) else 2.0)
    tau = (0.99 / L).view(-1, 1, 1, 1)
    sigma = 1.0 / (16.0 * tau)
    u = torch.zeros(B, 2, *x.shape[1:], dtype=x.dtype, device=x.device)
    run = SolveRun("TV", y, steps, None, progress, divergence_factor, callback)
    for i in range(steps):
        g, residual = _data_gradient(operator, x, y)
        x_new = (x - tau * (g + _finite_differences_adjoint(u))).clamp(-1, 1)
        u = u + sigma.unsqueeze(1) * finite_differences(2 * x_new - x)
        norm = u.square().sum(dim=(1, 2), keepdim=True).sqrt()  # per pixel, over directions and channels
        u = u / (norm / lam).clamp(min=1.0)
        x = run.step(i, x_new, residual, None, x0=x_new, sigma=0.0)
    return run.finish(_Identity(), operator, y, x)


def pseudo_inverse(prior, operator, y: torch.Tensor, *, shape=None, steps: int = 200, mu: float = 1e-3, tol: float = 1e-6,
                   projector=None, seeds=None, callback=None, progress: bool = False, x_init: torch.Tensor | None = None,
                   divergence_factor: float = 1e3, **unused) -> SolveResult:
    """Tikhonov least squares (A^T A + mu I) x = A^T y by conjugate gradients, linear operators only.

    Args:
        prior: ignored (None is fine).
        steps: at most this many CG iterations.
        mu: the Tikhonov weight (mu > 0 makes the system positive definite).
        tol: stop a sample when ||r_k|| <= tol ||A^T y||.
    """
    _check_no_projector("pseudo-inverse", projector)
    _reject_unused("pseudo-inverse", unused)
    if not getattr(operator, "linear", False):
        raise ValueError(f"pseudo-inverse needs a linear operator; {type(operator).__name__} is nonlinear (use the tv solver)")
    if mu <= 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if shape is None and x_init is None:
        raise ValueError("pseudo-inverse needs the image shape (C, H, W) or x_init")

    def normal(v):
        return operator.adjoint(operator(v)) + mu * v

    def dot(a, b):
        return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))

    b = operator.adjoint(y).reshape(y.shape[0], *(shape or x_init.shape[1:]))
    x = torch.zeros_like(b) if x_init is None else x_init.detach().clone()
    r = b - normal(x)
    p = r.clone()
    rr = dot(r, r)
    stop = (tol * b.flatten(1).norm(dim=1)).view_as(rr).square()
    run = SolveRun("pseudo-inverse", y, steps, None, progress, divergence_factor, callback)
    with torch.no_grad():
        for i in range(steps):
            active = rr > stop
            Ap = normal(p)
            alpha = torch.where(active, rr / dot(p, Ap).clamp(min=1e-30), torch.zeros_like(rr))
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = dot(r, r)
            p = torch.where(active, r + rr_new / rr.clamp(min=1e-30) * p, p)
            rr = torch.where(active, rr_new, rr)
            x = run.step(i, x, per_sample_residual(y, operator(x)), None, x0=x, sigma=0.0)
            if not (rr > stop).any():
                break
    return run.finish(_Identity(), operator, y, x)


def _reject_unused(name: str, unused: dict) -> None:
    """The pipeline passes the shared keywords; anything else is a typo worth an error."""
    unknown = set(unused) - {"guidance_scale"}
    if unknown:
        raise TypeError(f"{name} got unexpected arguments: {', '.join(sorted(unknown))}")


class _Identity:
    """``SolveRun.finish`` decodes through a prior; images are their own state here."""

    @staticmethod
    def to_image(x):
        return x


register_solver("tv", tv, priors=(), description="total-variation regularised least squares (Condat-Vu primal-dual)")
register_solver("pseudo-inverse", pseudo_inverse, priors=(), description="Tikhonov least squares by conjugate gradients (linear tasks)",
                linear_only=True)

"""Analytic priors with exact denoisers, used as test oracles.

A Gaussian N(mu, Sigma) over images of shape (C, H, W) (flattened to d = C*H*W) has, under
x_t = sqrt(a) x0 + sqrt(1 - a) eps, the exact posterior mean

    E[x0 | x_t] = mu + sqrt(a) Sigma (a Sigma + (1 - a) I)^{-1} (x_t - sqrt(a) mu),

so its epsilon prediction is exact. Covariances are held in eigen form,
Sigma = Q diag(lam) Q^T + s^2 (I - Q Q^T) with Q (d, k) orthonormal, which covers a full
covariance (k = d), a low-rank-plus-isotropic one (k << d) and a point mass (k = 0, s = 0) at no
extra cost. A mixture of such Gaussians has exact responsibilities and hence an exact
denoiser too. All arithmetic is float64; results are returned in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffstategrad.priors.base import DiffusionPrior, as_timesteps
from diffstategrad.schedules import VPSchedule, make_schedule, x0_to_eps

__all__ = ["GaussianPrior", "GaussianMixturePrior", "linear_gaussian_posterior"]


class GaussianPrior(DiffusionPrior):
    """Gaussian prior in eigen form: Sigma = Q diag(eigvals) Q^T + perp_var (I - Q Q^T)."""

    def __init__(
        self,
        shape: Sequence[int],
        mean: torch.Tensor | float = 0.0,
        eigvecs: torch.Tensor | None = None,
        eigvals: torch.Tensor | None = None,
        perp_var: float = 1.0,
        schedule: VPSchedule | None = None,
    ):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        super().__init__(schedule or make_schedule("linear"), shape[0])
        self.shape = shape
        d = math.prod(shape)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if mean.numel() not in (1, d):
            raise ValueError(f"mean must be a scalar or have {d} elements")
        mean = mean.reshape(-1).expand(d).clone()
        if eigvecs is None:
            eigvecs = torch.zeros(d, 0, dtype=torch.float64)
            eigvals = torch.zeros(0, dtype=torch.float64)
        eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64)
        eigvals = torch.as_tensor(eigvals, dtype=torch.float64)
        if eigvecs.shape[0] != d or eigvecs.shape[1] != eigvals.numel():
            raise ValueError(f"eigvecs must be ({d}, k) with k = len(eigvals)")
        if (eigvals < 0).any() or perp_var < 0:
            raise ValueError("variances must be non-negative")
        gram = eigvecs.T @ eigvecs
        if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-8):
            raise ValueError("eigvecs must have orthonormal columns")
        self.register_buffer("mean", mean)
        self.register_buffer("eigvecs", eigvecs)
        self.register_buffer("eigvals", eigvals)
        self.perp_var = float(perp_var)

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def isotropic(cls, shape, mean=0.0, var: float = 1.0, schedule=None) -> "GaussianPrior":
        return cls(shape, mean, perp_var=var, schedule=schedule)

    @classmethod
    def full(cls, shape, mean, cov: torch.Tensor, schedule=None) -> "GaussianPrior":
        cov = torch.as_tensor(cov, dtype=torch.float64)
        cov = (cov + cov.T) / 2
        lam, Q = torch.linalg.eigh(cov)
        return cls(shape, mean, Q, lam.clamp(min=0), perp_var=0.0, schedule=schedule)

    @classmethod
    def low_rank(cls, shape, mean, factor: torch.Tensor, perp_var: float = 0.0, schedule=None) -> "GaussianPrior":
        """Sigma = F F^T + perp_var I for a (d, k) factor F."""
        factor = torch.as_tensor(factor, dtype=torch.float64)
        Q, w, _ = torch.linalg.svd(factor, full_matrices=False)
        return cls(shape, mean, Q, w**2 + perp_var, perp_var=perp_var, schedule=schedule)

    @classmethod
    def low_rank_images(cls, shape, rank: int, var: float = 4.0, perp_var: float = 1e-4, seed: int = 0, schedule=None) -> "GaussianPrior":
        """Images whose channels are U0 Z V0^T with fixed random orthonormal U0 (H, rank) and
        V0 (W, rank) and Gaussian Z (variance ``var``), plus an isotropic floor ``perp_var``:
        the simplest "data manifold" DiffStateGrad's row/column-space projection targets.
        ``eigvecs`` spans the C * rank^2 dimensional subspace."""
        C, H, W = (int(s) for s in shape)
        gen = torch.Generator().manual_seed(seed)
        U0 = torch.linalg.qr(torch.randn(H, rank, generator=gen, dtype=torch.float64))[0]
        V0 = torch.linalg.qr(torch.randn(W, rank, generator=gen, dtype=torch.float64))[0]
        block = torch.einsum("hi,wj->ijhw", U0, V0).reshape(rank * rank, H * W)  # vec(u_i v_j^T)
        Q = torch.zeros(C * rank * rank, C * H * W, dtype=torch.float64)
        for c in range(C):
            Q[c * rank * rank : (c + 1) * rank * rank, c * H * W : (c + 1) * H * W] = block
        lam = torch.full((C * rank * rank,), float(var), dtype=torch.float64)
        return cls((C, H, W), 0.0, Q.T.contiguous(), lam, perp_var=perp_var, schedule=schedule)

    def distance_to_subspace(self, x: torch.Tensor) -> torch.Tensor:
        """||(I - Q Q^T)(x - mu)|| per sample: how far x lies from the prior's principal subspace."""
        r = self._flat(x) - self.mean
        return (r - (r @ self.eigvecs) @ self.eigvecs.T).norm(dim=1)

    # -- moments -----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def covariance(self) -> torch.Tensor:
        Q, lam = self.eigvecs, self.eigvals
        P = Q @ Q.T
        return Q @ torch.diag(lam) @ Q.T + self.perp_var * (torch.eye(self.dim, dtype=torch.float64) - P)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws (n, C, H, W) in float64."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        Q, lam = self.eigvecs, self.eigvals
        par = Q.T @ z.T
        x = Q @ (lam.sqrt()[:, None] * par) + math.sqrt(self.perp_var) * (z.T - Q @ par)
        return (self.mean[:, None] + x).T.reshape(n, *self.shape)

    # -- the exact denoiser ------------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.shape:
            raise ValueError(f"prior over {self.shape}, got states of shape {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for float64 alpha_bar of shape (B,); returns (B, d) float64."""
        a = alpha_bar.to(torch.float64)[:, None]
        r = self._flat(x_t) - a.sqrt() * self.mean
        Q, lam = self.eigvecs, self.eigvals
        par = r @ Q  # (B, k)
        gain_par = a.sqrt() * lam / (a * lam + 1 - a)
        gain_perp = a.sqrt() * self.perp_var / (a * self.perp_var + 1 - a)
        return self.mean + (gain_par * par) @ Q.T + gain_perp * (r - par @ Q.T)

    def log_marginal(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """log N(x_t; sqrt(a) mu, a Sigma + (1 - a) I), shape (B,)."""
        a = alpha_bar.to(torch.float64)[:, None]
        r = self._flat(x_t) - a.sqrt() * self.mean
        par = r @ self.eigvecs
        var_par = a * self.eigvals + 1 - a
        var_perp = a * self.perp_var + 1 - a
        k, d = self.eigvals.numel(), self.dim
        maha = (par**2 / var_par).sum(-1) + ((r**2).sum(-1) - (par**2).sum(-1)) / var_perp[:, 0]
        logdet = var_par.log().sum(-1) + (d - k) * var_perp[:, 0].log()
        return -0.5 * (maha + logdet + d * math.log(2 * math.pi))

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        a = self.schedule.alpha_bar(as_timesteps(t, x_t.shape[0]))
        x0 = self.posterior_mean(x_t, a).reshape(x_t.shape)
        return x0_to_eps(x_t.to(torch.float64), x0, a.reshape(-1, 1, 1, 1)).to(x_t.dtype)


class GaussianMixturePrior(DiffusionPrior):
    """sum_i w_i N(mu_i, Sigma_i) with exact responsibilities and denoiser."""

    def __init__(self, weights: Sequence[float], components: Sequence[GaussianPrior]):
        if len(weights) != len(components) or not components:
            raise ValueError("one weight per component is needed")
        shapes = {c.shape for c in components}
        if len(shapes) != 1:
            raise ValueError("all components must have the same shape")
        super().__init__(components[0].schedule, components[0].channels)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if (w <= 0).any():
            raise ValueError("weights must be positive")
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.components = torch.nn.ModuleList(components)
        self.shape = components[0].shape

    @classmethod
    def empirical(cls, points: torch.Tensor, var: float = 0.0, schedule=None) -> "GaussianMixturePrior":
        """Equal-weight point masses (var = 0) or small isotropic blobs at the given images."""
        comps = [GaussianPrior.isotropic(points.shape[1:], p, var, schedule) for p in points]
        return cls([1.0] * len(comps), comps)

    def responsibilities(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([c.log_marginal(x_t, alpha_bar) for c in self.components], dim=-1)
        return torch.softmax(logp + self.log_weights, dim=-1)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        resp = self.responsibilities(x_t, alpha_bar)  # (B, n)
        means = torch.stack([c.posterior_mean(x_t, alpha_bar) for c in self.components], dim=1)
        return (resp[..., None] * means).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        draws = [self.components[int(i)].sample(1, generator) for i in idx]
        return torch.cat(draws)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        a = self.schedule.alpha_bar(as_timesteps(t, x_t.shape[0]))
        x0 = self.posterior_mean(x_t, a).reshape(x_t.shape)
        return x0_to_eps(x_t.to(torch.float64), x0, a.reshape(-1, 1, 1, 1)).to(x_t.dtype)


def linear_gaussian_posterior(prior: GaussianPrior, A: torch.Tensor, y: torch.Tensor, noise_sigma: float):
    """Exact posterior of x ~ N(mu, Sigma), y = A x + sigma n: returns (mean (d,), cov (d, d)).

    mean = mu + Sigma A^T (A Sigma A^T + sigma^2 I)^{-1} (y - A mu),
    cov  = Sigma - Sigma A^T (A Sigma A^T + sigma^2 I)^{-1} A Sigma.
    """
    A = torch.as_tensor(A, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    S = prior.covariance()
    mu = prior.mean
    gram = A @ S @ A.T + noise_sigma**2 * torch.eye(A.shape[0], dtype=torch.float64)
    gain = torch.linalg.solve(gram, A @ S).T  # Sigma A^T gram^{-1}
    mean = mu + gain @ (y - A @ mu)
    cov = S - gain @ A @ S
    return mean, (cov + cov.T) / 2

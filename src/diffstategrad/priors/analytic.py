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

from diffstategrad.priors.base import DiffusionPrior, LatentDiffusionPrior, as_timesteps
from diffstategrad.schedules import VPSchedule, make_schedule, x0_to_eps

__all__ = ["GaussianPrior", "GaussianMixturePrior", "LinearAutoencoderPrior", "linear_gaussian_posterior"]


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
        return _exact_eps(self, x_t, t)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return _exact_denoise(self, x, sigma)


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
        return _exact_eps(self, x_t, t)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return _exact_denoise(self, x, sigma)


class LinearAutoencoderPrior(LatentDiffusionPrior):
    """An exactly solvable latent model: a Gaussian latent prior and a linear autoencoder with
    orthonormal decoder columns, D(z) = W vec(z), E(x) = W^T vec(x) (so E(D(z)) = z).

    The implied image prior is Gaussian on range(W), so linear inverse problems have an exact
    posterior: ``image_prior()`` returns it as a (degenerate) :class:`GaussianPrior`.
    """

    def __init__(self, latent_prior: GaussianPrior, image_shape, downsampling: int, decoder: torch.Tensor | None = None, seed: int = 0):
        C, H, W = (int(s) for s in image_shape)
        c, h, w = latent_prior.shape
        if H != h * downsampling or W != w * downsampling:
            raise ValueError(f"image {H}x{W} is not the latent {h}x{w} times {downsampling}")
        super().__init__(latent_prior.schedule, latent_channels=c, downsampling=downsampling, image_channels=C)
        dx, dz = C * H * W, c * h * w
        if decoder is None:
            gen = torch.Generator().manual_seed(seed)
            decoder = torch.linalg.qr(torch.randn(dx, dz, generator=gen, dtype=torch.float64))[0]
        decoder = torch.as_tensor(decoder, dtype=torch.float64)
        if decoder.shape != (dx, dz):
            raise ValueError(f"decoder must be ({dx}, {dz})")
        self.latent_prior = latent_prior
        self.image_shape = (C, H, W)
        self.register_buffer("decoder", decoder)

    def eps(self, z_t, t):
        return self.latent_prior.eps(z_t, t)

    def denoise(self, z, sigma):
        return self.latent_prior.denoise(z, sigma)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1).to(torch.float64) @ self.decoder
        return z.reshape(x.shape[0], *self.latent_prior.shape).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = z.reshape(z.shape[0], -1).to(torch.float64) @ self.decoder.T
        return x.reshape(z.shape[0], *self.image_shape).to(z.dtype)

    def image_prior(self) -> GaussianPrior:
        """The image-space prior N(W mu_z, W Sigma_z W^T) (zero variance off range(W))."""
        lp = self.latent_prior
        Qz = lp.eigvecs
        # latent covariance = Qz diag(lam) Qz^T + s^2 (I - Qz Qz^T); map both parts through W
        full = Qz @ torch.diag(lp.eigvals) @ Qz.T + lp.perp_var * (torch.eye(lp.dim, dtype=torch.float64) - Qz @ Qz.T)
        lam, V = torch.linalg.eigh(full)
        return GaussianPrior(self.image_shape, self.decoder @ lp.mean, self.decoder @ V, lam.clamp(min=0), perp_var=0.0, schedule=lp.schedule)


def _exact_eps(prior, x_t: torch.Tensor, t) -> torch.Tensor:
    a = prior.schedule.alpha_bar(as_timesteps(t, x_t.shape[0])).to(x_t.device)
    x0 = prior.posterior_mean(x_t, a).reshape(x_t.shape)
    return x0_to_eps(x_t.to(torch.float64), x0, a.reshape(-1, 1, 1, 1)).to(x_t.dtype)


def _exact_denoise(prior, x: torch.Tensor, sigma) -> torch.Tensor:
    """Exact E[x0 | x0 + sigma n = x] at any sigma (no timestep quantisation)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
    a = 1.0 / (1.0 + sigma**2)
    return prior.posterior_mean(x.to(torch.float64) * a.sqrt().view(-1, 1, 1, 1), a).reshape(x.shape).to(x.dtype)


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

"""The exact posterior of a Gaussian mixture under a linear measurement with Gaussian noise.

Prior sum_k w_k N(m_k, S_k), measurement y = A x + n, n ~ N(0, s^2 I). Each component is
conditioned with the usual Gaussian formulas (e.g. Bishop, PRML, Eq. 2.113-2.117):

    G_k  = A S_k A^T + s^2 I
    m'_k = m_k + S_k A^T G_k^{-1} (y - A m_k)
    S'_k = S_k - S_k A^T G_k^{-1} A S_k
    w'_k proportional to w_k N(y; A m_k, G_k)

and the posterior is the mixture sum_k w'_k N(m'_k, S'_k), sampled exactly (component by w',
then m'_k + L_k z with L_k the Cholesky factor of S'_k). Everything is float64 on flat vectors
(d = C * H * W), so the same code serves images and the few-dimensional cases of the tests.
Operators enter as dense matrices (:func:`dense_matrix`: the operator applied to the identity
basis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MixturePosterior", "dense_matrix", "mixture_posterior", "prior_moments"]


@dataclass
class MixturePosterior:
    """sum_k w_k N(means_k, covs_k): log_weights (K,), means (K, d), covs (K, d, d), float64."""

    log_weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self):
        self._chol = [_psd_factor(c) for c in self.covs]

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def mean(self) -> torch.Tensor:
        """The posterior mean sum_k w_k m_k (d,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """The posterior covariance: sum_k w_k (S_k + m_k m_k^T) - mean mean^T (d, d)."""
        mu = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws (n, d) and the component each came from (n,)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        out = torch.empty_like(z)
        for k in labels.unique().tolist():
            rows = labels == k
            out[rows] = self.means[k] + z[rows] @ self._chol[k].T
        return out, labels


def _psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = cov: Cholesky, or the eigen factor where round-off made cov singular."""
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    lam, V = torch.linalg.eigh(cov)
    return V * lam.clamp(min=0).sqrt()


def mixture_posterior(log_weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, A: torch.Tensor, y: torch.Tensor,
                      noise_sigma: float) -> MixturePosterior:
    """The exact posterior of the mixture (log_weights (K,), means (K, d), covs (K, d, d)) given
    y = A x + noise_sigma n, A (m, d), y (m,). See the module docstring for the formulas."""
    A = torch.as_tensor(A, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if A.ndim != 2 or A.shape[0] != y.numel() or A.shape[1] != means.shape[1]:
        raise ValueError(f"A must be ({y.numel()}, {means.shape[1]}), got {tuple(A.shape)}")
    if noise_sigma <= 0:
        raise ValueError("the measurement noise must be positive for a proper posterior")
    m = A.shape[0]
    new_logw, new_means, new_covs = [], [], []
    for logw, mu, S in zip(log_weights.to(torch.float64), means.to(torch.float64), covs.to(torch.float64)):
        AS = A @ S
        G = AS @ A.T + noise_sigma**2 * torch.eye(m, dtype=torch.float64)
        L = torch.linalg.cholesky(G)
        resid = y - A @ mu
        gain = torch.cholesky_solve(AS, L).T  # S A^T G^{-1}
        alpha = torch.cholesky_solve(resid[:, None], L)[:, 0]
        cov = S - gain @ AS
        new_means.append(mu + gain @ resid)
        new_covs.append((cov + cov.T) / 2)
        log_evidence = -0.5 * (resid @ alpha + 2 * L.diagonal().log().sum() + m * math.log(2 * math.pi))
        new_logw.append(logw + log_evidence)
    logw = torch.stack(new_logw)
    return MixturePosterior(logw - torch.logsumexp(logw, 0), torch.stack(new_means), torch.stack(new_covs))


def prior_moments(prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_weights (K,), means (K, d), covs (K, d, d)) of a GaussianMixturePrior."""
    means = torch.stack([c.mean for c in prior.components])
    covs = torch.stack([c.covariance() for c in prior.components])
    return prior.log_weights.clone(), means, covs


def dense_matrix(operator, image_shape) -> torch.Tensor:
    """The (m, d) matrix of a linear operator on images of ``image_shape``: column j is
    A(e_j), so A vec(x) = vec(operator(x)). The operator should be built in float64 with one
    (shared) set of random parameters."""
    d = math.prod(image_shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *image_shape)
    with torch.no_grad():
        columns = torch.cat([operator(basis[i : i + 256]).reshape(min(256, d - i), -1) for i in range(0, d, 256)])
    return columns.T.contiguous()

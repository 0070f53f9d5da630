import math

import pytest
import torch

from diffstategrad.priors import (
    DiffusionPrior,
    GaussianMixturePrior,
    GaussianPrior,
    linear_gaussian_posterior,
    list_priors,
    load_prior,
)

SHAPE = (1, 3, 3)
D = 9


def _random_cov(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, d, generator=g, dtype=torch.float64)
    return F @ F.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _dense_posterior_mean(mu, cov, x_t, a):
    # E[x0 | x_t] by direct Gaussian conditioning of the joint (x0, x_t)
    C = a * cov + (1 - a) * torch.eye(cov.shape[0], dtype=torch.float64)
    return mu + math.sqrt(a) * cov @ torch.linalg.solve(C, x_t - math.sqrt(a) * mu)


def test_full_gaussian_denoiser_is_exact():
    cov = _random_cov()
    mu = torch.linspace(-0.5, 0.5, D, dtype=torch.float64)
    prior = GaussianPrior.full(SHAPE, mu, cov)
    x_t = torch.randn(2, *SHAPE, dtype=torch.float64)
    t = torch.tensor([100, 700])
    x0 = prior.x0(x_t, t)
    for b in range(2):
        a = prior.schedule.alpha_bar(int(t[b])).item()
        torch.testing.assert_close(x0[b].flatten(), _dense_posterior_mean(mu, cov, x_t[b].flatten(), a))
    torch.testing.assert_close(prior.covariance(), cov)


def test_low_rank_gaussian_matches_its_dense_covariance():
    F = torch.randn(D, 2, dtype=torch.float64)
    prior = GaussianPrior.low_rank(SHAPE, 0.3, F, perp_var=0.01)
    cov = F @ F.T + 0.01 * torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(prior.covariance(), cov)
    x_t = torch.randn(1, *SHAPE, dtype=torch.float64)
    a = prior.schedule.alpha_bar(400).item()
    torch.testing.assert_close(prior.x0(x_t, 400)[0].flatten(), _dense_posterior_mean(torch.full((D,), 0.3, dtype=torch.float64), cov, x_t.flatten(), a))


def test_log_marginal_matches_torch_distributions():
    cov = _random_cov(1)
    prior = GaussianPrior.full(SHAPE, 0.2, cov)
    x_t = torch.randn(3, *SHAPE, dtype=torch.float64)
    a = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for b in range(3):
        dist = torch.distributions.MultivariateNormal(a[b].sqrt() * 0.2 * torch.ones(D, dtype=torch.float64), a[b] * cov + (1 - a[b]) * torch.eye(D, dtype=torch.float64))
        assert prior.log_marginal(x_t[b : b + 1], a[b : b + 1]).item() == pytest.approx(dist.log_prob(x_t[b].flatten()).item(), rel=1e-9)


def test_gaussian_samples_have_the_prior_moments():
    cov = _random_cov(2)
    prior = GaussianPrior.full(SHAPE, 1.0, cov)
    xs = prior.sample(20000, torch.Generator().manual_seed(0)).reshape(20000, D)
    assert (xs.mean(0) - 1.0).abs().max() < 0.05
    assert (torch.cov(xs.T) - cov).abs().max() < 0.08


def test_mixture_denoiser_matches_dense_computation():
    comps = [GaussianPrior.full(SHAPE, m, _random_cov(s)) for s, m in ((0, -1.0), (1, 1.0))]
    gmm = GaussianMixturePrior([0.3, 0.7], comps)
    x_t = torch.randn(2, *SHAPE, dtype=torch.float64)
    a = gmm.schedule.alpha_bar(300).item()
    for b in range(2):
        x = x_t[b].flatten()
        logs, means = [], []
        for w, c in zip((0.3, 0.7), comps):
            C = a * c.covariance() + (1 - a) * torch.eye(D, dtype=torch.float64)
            logs.append(math.log(w) + torch.distributions.MultivariateNormal(math.sqrt(a) * c.mean, C).log_prob(x))
            means.append(_dense_posterior_mean(c.mean, c.covariance(), x, a))
        r = torch.softmax(torch.stack(logs), 0)
        expected = r[0] * means[0] + r[1] * means[1]
        torch.testing.assert_close(gmm.x0(x_t[b : b + 1], 300)[0].flatten(), expected)


def test_empirical_prior_denoises_to_the_nearest_point_at_low_noise():
    points = torch.tensor([[[[-1.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [-1.0, 0.0]]]], dtype=torch.float64)
    prior = GaussianMixturePrior.empirical(points)
    a = prior.schedule.alpha_bar(0)
    x_t = a.sqrt() * points[1:] + 0.01
    torch.testing.assert_close(prior.x0(x_t, 0), points[1:], atol=1e-6, rtol=0)


def test_linear_gaussian_posterior_is_bayes():
    cov = _random_cov(3)
    prior = GaussianPrior.full(SHAPE, 0.0, cov)
    A = torch.randn(4, D, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    mean, post = linear_gaussian_posterior(prior, A, y, 0.1)
    # information form: post^-1 = cov^-1 + A^T A / s^2, mean = post A^T y / s^2
    info = torch.linalg.inv(cov) + A.T @ A / 0.01
    torch.testing.assert_close(post, torch.linalg.inv(info))
    torch.testing.assert_close(mean, torch.linalg.solve(info, A.T @ y / 0.01))


def test_prior_validation_and_batch_input():
    with pytest.raises(ValueError):
        GaussianPrior((3, 4), 0.0)
    with pytest.raises(ValueError):
        GaussianPrior(SHAPE, 0.0, torch.ones(D, 2, dtype=torch.float64), torch.ones(2))  # not orthonormal
    prior = GaussianPrior.isotropic(SHAPE)
    with pytest.raises(ValueError):
        prior.eps(torch.zeros(1, 1, 4, 4), 10)
    with pytest.raises(ValueError):
        prior.eps(torch.zeros(2, *SHAPE), torch.tensor([1, 2, 3]))
    assert prior.eps(torch.zeros(2, *SHAPE, dtype=torch.float32), 5).dtype == torch.float32


def test_load_prior_registry():
    names = {e.name for e in list_priors()}
    assert {"gaussian", "gaussian-mixture"} <= names
    p = load_prior("gaussian", shape=(3, 8, 8), rank=4)
    assert isinstance(p, DiffusionPrior) and p.eigvecs.shape == (192, 4)
    assert load_prior(p) is p
    with pytest.raises(ValueError, match="unknown prior"):
        load_prior("no-such-model")

"""DiffPIR: the data step on problems with known answers, DiffStateGrad at that step."""

import torch

from diffstategrad import DiffStateGrad
from diffstategrad.operators import load_task
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import GaussianPrior, linear_gaussian_posterior
from diffstategrad.solvers import solve
from diffstategrad.solvers.diffpir import conjugate_gradient


def test_projected_conjugate_gradient_solves_the_subspace_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 24, generator=g, dtype=torch.float64)
    rho, b = 0.3, torch.randn(2, 1, 4, 6, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(24, 5, generator=g, dtype=torch.float64))
    P = Q @ Q.T  # an orthogonal projector onto a 5-dimensional subspace

    def project(v):
        return (v.reshape(2, -1) @ P).reshape(v.shape)

    def apply(v):
        return (v.reshape(2, -1) @ (A.T @ A + rho * torch.eye(24, dtype=torch.float64))).reshape(v.shape)

    d = conjugate_gradient(apply, b, 50, project, tol=1e-14)
    # the minimiser over range(P): d = Q (Q^T M Q)^{-1} Q^T b
    M = A.T @ A + rho * torch.eye(24, dtype=torch.float64)
    exact = (Q @ torch.linalg.solve(Q.T @ M @ Q, Q.T @ b.reshape(2, -1).T)).T.reshape(b.shape)
    torch.testing.assert_close(d, exact, rtol=1e-9, atol=1e-10)
    full = conjugate_gradient(apply, b, 50, tol=1e-14)
    torch.testing.assert_close(full, torch.linalg.solve(M, b.reshape(2, -1).T).T.reshape(b.shape), rtol=1e-9, atol=1e-10)


def _gaussian_problem(sigma=0.05):
    shape = (1, 4, 4)
    prior = GaussianPrior.low_rank_images(shape, rank=3, var=1.0)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 16, generator=g) / 4
    op = MatrixOperator(A, shape)
    x = prior.sample(1, g).float()
    y = op(x) + sigma * torch.randn(1, 8, generator=g)
    return prior, op, A, y, shape, sigma


def test_diffpir_on_a_gaussian_prior_lands_near_the_posterior():
    prior, op, A, y, shape, sigma = _gaussian_problem()
    mean, cov = linear_gaussian_posterior(prior, A.double(), y[0].double(), sigma)
    n = 256
    r = solve("diffpir", prior, op, y.expand(n, -1), shape=shape, steps=100, guidance_scale=1 / sigma**2, zeta=1.0, seeds=range(n),
              clip_x0=False)
    xs = r.x.reshape(n, -1).double()
    # measured: mean error 0.22, variance ratio 0.84 (DiffPIR is not an exact posterior sampler)
    assert float((xs.mean(0) - mean).norm() / mean.norm()) < 0.35
    assert 0.5 < float(xs.var(0).sum() / cov.diag().sum()) < 1.5
    assert not r.failed.any()


def test_a_strong_data_term_inverts_an_invertible_operator():
    prior = GaussianPrior.isotropic((1, 3, 3), 0.0, 0.25)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(9, 9, generator=g, dtype=torch.float64) + 3 * torch.eye(9, dtype=torch.float64)
    x = 0.5 * torch.rand(1, 9, generator=g, dtype=torch.float64) - 0.25
    op = MatrixOperator(A, (1, 3, 3))
    y = x @ A.T
    r = solve("diffpir", prior, op, y, shape=(1, 3, 3), steps=20, guidance_scale=1e8, zeta=0.3, data_iters=30, seeds=[0])
    torch.testing.assert_close(r.x.reshape(1, 9).double(), x, rtol=0, atol=1e-4)


def test_a_full_rank_projector_changes_nothing_and_a_low_rank_one_does():
    prior, op, A, y, shape, sigma = _gaussian_problem()
    kw = dict(shape=shape, steps=20, guidance_scale=400.0, seeds=[0, 1], clip_x0=False)
    plain = solve("diffpir", prior, op, y.expand(2, -1), **kw)
    full = solve("diffpir", prior, op, y.expand(2, -1), projector=DiffStateGrad(rank=4), **kw)
    torch.testing.assert_close(full.x, plain.x, rtol=1e-4, atol=1e-4)
    low = solve("diffpir", prior, op, y.expand(2, -1), projector=DiffStateGrad(rank=1), **kw)
    assert not torch.allclose(low.x, plain.x, atol=1e-3)


def test_the_nonlinear_data_step_fits_the_measurement():
    prior = GaussianPrior.isotropic((3, 8, 8), 0.0, 0.1)
    problem = load_task("hdr", {"noise.sigma": 0.0}).build((3, 8, 8), seeds=[0, 1])
    x = prior.sample(2, torch.Generator().manual_seed(3)).float().clamp(-0.45, 0.45)
    y = problem.measure(x, seeds=[0, 1])
    weak = solve("diffpir", prior, problem.operator, y, shape=(3, 8, 8), steps=20, guidance_scale=1.0, seeds=[0, 1])
    strong = solve("diffpir", prior, problem.operator, y, shape=(3, 8, 8), steps=20, guidance_scale=1e4, seeds=[0, 1])
    assert (strong.residual < 0.3 * weak.residual).all()

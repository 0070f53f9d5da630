"""The exact-posterior benchmark: the closed-form mixture posterior against Monte Carlo, the fast
mixture prior and the batched projector against the package's own, the distance estimators,
the operators' dense matrices and the CLI's quick JSON run."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from diffstategrad.cli import main
from diffstategrad.operators import load_task
from diffstategrad.posterior_benchmark import (
    BatchedDiffStateGrad,
    dense_matrix,
    energy_distance,
    fit_patch_mixture,
    mixture_posterior,
    random_directions,
    sliced_wasserstein,
    solver_setup,
)
from diffstategrad.priors import GaussianMixturePrior
from diffstategrad.projection import DiffStateGrad


def _tiny_mixture():
    """Two 3-d Gaussians with different means and full covariances."""
    means = torch.tensor([[1.0, -0.5, 0.0], [-1.0, 0.5, 0.8]], dtype=torch.float64)
    L = torch.tensor([[[0.6, 0, 0], [0.2, 0.5, 0], [0.1, -0.2, 0.4]], [[0.4, 0, 0], [-0.1, 0.7, 0], [0.3, 0.1, 0.5]]], dtype=torch.float64)
    covs = L @ L.transpose(-1, -2)
    log_w = torch.tensor([0.35, 0.65], dtype=torch.float64).log()
    return log_w, means, covs


def test_mixture_posterior_matches_importance_sampling():
    log_w, means, covs = _tiny_mixture()
    A = torch.tensor([[1.0, 0.5, 0.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0.2, 0.4], dtype=torch.float64)
    sigma = 0.5
    post = mixture_posterior(log_w, means, covs, A, y, sigma)

    # Monte Carlo: prior draws weighted by the likelihood N(y; A x, sigma^2 I)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    labels = torch.multinomial(log_w.exp(), n, replacement=True, generator=g)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = means[labels] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(covs)[labels], z)
    logl = -0.5 * ((x @ A.T - y) ** 2).sum(1) / sigma**2
    w = torch.softmax(logl, 0)
    ess = 1 / (w**2).sum()
    assert ess > 20_000
    mc_mean = w @ x
    mc_cov = (w[:, None] * (x - mc_mean)).T @ (x - mc_mean)
    mc_weights = torch.stack([w[labels == k].sum() for k in range(2)])

    tol = 4 / math.sqrt(float(ess))
    assert torch.allclose(post.mean(), mc_mean, atol=tol)
    assert torch.allclose(post.covariance(), mc_cov, atol=3 * tol)
    assert torch.allclose(post.weights, mc_weights, atol=tol)
    # the components are not both trivially kept: the measurement moved the weights
    assert (post.weights - log_w.exp()).abs().max() > 0.05

    # the exact sampler draws from that mixture
    draws, draw_labels = post.sample(200_000, torch.Generator().manual_seed(1))
    assert torch.allclose(draws.mean(0), post.mean(), atol=0.01)
    assert torch.allclose(torch.cov(draws.T), post.covariance(), atol=0.01)
    assert torch.allclose(torch.bincount(draw_labels, minlength=2).double() / 200_000, post.weights, atol=0.01)


def test_mixture_posterior_rejects_bad_input():
    log_w, means, covs = _tiny_mixture()
    with pytest.raises(ValueError, match="noise must be positive"):
        mixture_posterior(log_w, means, covs, torch.eye(3, dtype=torch.float64), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="A must be"):
        mixture_posterior(log_w, means, covs, torch.eye(2, dtype=torch.float64), torch.zeros(2), 0.1)


@pytest.fixture(scope="module")
def small_prior():
    return fit_patch_mixture((3, 8, 8), components=3, rank=4, seed=0)


def test_patch_mixture_is_the_package_mixture(small_prior):
    prior = small_prior
    reference = GaussianMixturePrior(prior.log_weights.exp().tolist(), list(prior.components))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    for a in (0.999, 0.5, 0.02):
        alpha = torch.full((5,), a, dtype=torch.float64)
        assert torch.allclose(prior.posterior_mean(x, alpha), reference.posterior_mean(x, alpha), atol=1e-10)
        assert torch.allclose(prior.responsibilities(x, alpha), reference.responsibilities(x, alpha), atol=1e-10)
    assert torch.allclose(prior.eps(x.float(), 500), reference.eps(x.float(), 500), atol=1e-5)
    # clean-data quantities
    draws, labels = prior.sample_with_labels(20, torch.Generator().manual_seed(2))
    assert (prior.component_labels(draws) == labels).double().mean() >= 0.9
    nearest = torch.stack([c.distance_to_subspace(x) for c in prior.components]).min(0).values
    assert torch.allclose(prior.off_manifold(x), nearest, atol=1e-8)
    # draws lie on the manifold up to the floor (std 0.01 in each of the d - rank directions)
    assert prior.off_manifold(draws).mean() < 0.02 * math.sqrt(prior.dim)
    assert prior.off_manifold(x).mean() > 10 * prior.off_manifold(draws).mean()


def test_patch_mixture_is_reproducible():
    a = fit_patch_mixture((1, 8, 8), components=2, rank=3, seed=4)
    b = fit_patch_mixture((1, 8, 8), components=2, rank=3, seed=4)
    assert torch.equal(a.means, b.means) and torch.equal(a.stacked_eigvals, b.stacked_eigvals)


@pytest.mark.parametrize("task", ["box_inpainting", "rand_inpainting", "super_resolution", "gaussian_deblur"])
def test_dense_matrix_is_the_operator(task):
    shape = (3, 16, 16)
    problem = load_task(task).build(shape, seeds=[3], dtype=torch.float64)
    A = dense_matrix(problem.operator, shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    assert torch.allclose(x.reshape(2, -1) @ A.T, problem.operator(x).reshape(2, -1), atol=1e-12)


def test_batched_projector_equals_the_package_projector():
    g = torch.Generator().manual_seed(0)
    state = torch.randn(6, 3, 16, 16, generator=g)
    state[:3] = state[:3, :, :, :1] * state[:3, :, :1, :]  # rank-1 channels: small ranks for half the batch
    state[:3] += 0.01 * torch.randn(3, 3, 16, 16, generator=g)
    grad = torch.randn(6, 3, 16, 16, generator=g)
    for rule in ("reference", "per_channel"):
        mine, package = BatchedDiffStateGrad(rank_rule=rule), DiffStateGrad(rank_rule=rule)
        basis = package.basis(state)
        assert len(set(basis.ranks.tolist())) > 1
        assert torch.allclose(mine.project(grad, basis), package.project(grad, basis), atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        BatchedDiffStateGrad().project(torch.randn(6, 3, 8, 8), basis)


def test_distance_estimators():
    d, n = 20, 256
    dirs = random_directions(d, 128, seed=0)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(128, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    X, Y = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
    assert sliced_wasserstein(X, X, dirs) == 0.0 and energy_distance(X, X) == 0.0
    floor_sw, floor_e = sliced_wasserstein(X, Y, dirs), energy_distance(X, Y)
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 4.0
    shifted_sw, shifted_e = sliced_wasserstein(X, Y + shift, dirs), energy_distance(X, Y + shift)
    assert shifted_sw > 3 * floor_sw and shifted_e > 3 * floor_e
    # a pure shift delta: SW2^2 = floor^2 + E_theta (theta . delta)^2 = floor^2 + |delta|^2 / d, roughly
    assert shifted_sw == pytest.approx(math.sqrt(floor_sw**2 + 16.0 / d), rel=0.35)
    # the floor shrinks with the sample size (plug-in estimates: about 1 / sqrt(n))
    big = [torch.randn(16 * n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    assert sliced_wasserstein(*big, dirs) < 0.5 * floor_sw
    with pytest.raises(ValueError, match="equal-size"):
        sliced_wasserstein(X, Y[:10], dirs)


def test_solver_setups():
    assert solver_setup("daps").base(0.1) == pytest.approx(solver_setup("daps").base_value * 0.01)
    assert solver_setup("dps").base(0.1) == solver_setup("dps").base(0.01)
    with pytest.raises(ValueError, match="latent solver"):
        solver_setup("psld")
    with pytest.raises(ValueError, match="unknown solver"):
        solver_setup("nope")


def test_cli_quick_json(tmp_path):
    out = tmp_path / "bench"
    args = ["benchmark", "posterior", "--quick", "--json", "--quiet", "--tasks", "box_inpainting", "--noise-levels", "0.1",
            "--shapes", "1x8x8", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(data) == {"config", "solvers", "records", "seconds", "cpu_seconds"}
    records = data["records"]
    assert len(records) == 2 * 2 * 2  # solvers x with/without x multipliers
    expected = {"shape", "task", "noise_sigma", "solver", "diffstategrad", "multiplier", "guidance_scale", "sw", "sw_floor", "energy",
                "energy_floor", "mean_error", "mean_error_floor", "correct_mass", "correct_mass_exact", "off_manifold",
                "off_manifold_exact", "failure_rate", "sw_ratio", "mean_rank", "seconds", "cpu_seconds"}
    assert expected <= set(records[0])
    assert {(r["solver"], r["diffstategrad"]) for r in records} == {("dps", False), ("dps", True), ("daps", False), ("daps", True)}
    for r in records:
        assert r["sw_floor"] > 0 and 0 <= r["correct_mass_exact"] <= 1
        assert (r["mean_rank"] is None) == (not r["diffstategrad"])
    assert (out / "posterior_box_inpainting.png").stat().st_size > 1000
    paired = (out / "paired.md").read_text().splitlines()
    assert len(paired) == 2 + 2 * 2 and paired[2].startswith("| daps | 1 |")  # header, rule, solvers x multipliers
    assert json.loads((out / "results.json").read_text())["records"] == records
    # the same seed gives the same numbers
    again = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "again")])
    assert [r["sw"] for r in json.loads(again.output)["records"]] == [r["sw"] for r in records]


@pytest.mark.parametrize("args, message", [
    (["--solvers", "psld"], "latent solver"),
    (["--solvers", "nope"], "unknown solver"),
    (["--tasks", "hdr"], "not in the benchmark"),
    (["--shapes", "3x16"], "CxHxW"),
    (["--base-scale", "dps=abc"], "SOLVER=VALUE"),
])
def test_cli_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(main, ["benchmark", "posterior", "--quick", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code != 0
    assert message in result.output and result.output.count("\n") == 1

"""The classical baselines on problems with known answers."""

import numpy as np
import pytest
import torch

from diffstategrad.operators import load_task
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.solvers import solve
from diffstategrad.solvers.classical import finite_differences, operator_norm_squared, total_variation


class Identity(torch.nn.Module):
    linear = True

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y


def test_finite_differences_adjoint_and_tv():
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 2, 3, 5, 7, generator=g)
    from diffstategrad.solvers.classical import _finite_differences_adjoint

    torch.testing.assert_close((finite_differences(x) * u).sum(), (x * _finite_differences_adjoint(u)).sum(), rtol=1e-5, atol=1e-5)
    step = torch.zeros(1, 1, 4, 6)
    step[..., 3:] = 1.0
    assert float(total_variation(step)) == pytest.approx(4.0)  # one unit jump in each of 4 rows


def test_power_iteration_finds_the_operator_norm():
    A = torch.randn(30, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    op = MatrixOperator(A, (3, 4, 4))
    est = operator_norm_squared(op, torch.zeros(2, 3, 4, 4, dtype=torch.float64), iters=100)
    torch.testing.assert_close(est, torch.full((2,), torch.linalg.matrix_norm(A, 2).item() ** 2, dtype=torch.float64), rtol=1e-4, atol=0)


def test_tv_denoising_matches_scikit_image_chambolle():
    """With A = I both solve the ROF problem 1/2 ||x - y||^2 + lam TV(x) with the same discrete TV."""
    from skimage.restoration import denoise_tv_chambolle

    rng = np.random.default_rng(0)
    clean = np.zeros((24, 24))
    clean[6:18, 6:18] = 0.6
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), -1, 1)
    ref = denoise_tv_chambolle(noisy, weight=0.08, eps=1e-8, max_num_iter=5000)
    y = torch.from_numpy(noisy)[None, None]
    ours = solve("tv", None, Identity(), y, shape=(1, 24, 24), steps=3000, lam=0.08).x[0, 0].numpy()
    assert np.abs(ours - ref).max() < 2e-3
    assert np.abs(ours - clean).mean() < np.abs(noisy - clean).mean() / 2


def test_tv_recovers_a_piecewise_constant_image_from_random_inpainting():
    x = torch.full((1, 3, 32, 32), -0.5)
    x[..., 8:24, 8:24] = 0.5
    problem = load_task("rand_inpainting", {"noise.sigma": 0.0}).build((3, 32, 32), seeds=[0])
    y = problem.measure(x, seeds=[0])
    r = solve("tv", None, problem.operator, y, shape=(3, 32, 32), steps=800, lam=0.02)
    assert float((r.x - x).abs().mean()) < 0.02 and not r.failed.any()
    assert float((problem.operator.adjoint(y) - x).abs().mean()) > 0.3  # the measurement alone is far off


def test_tv_runs_on_a_nonlinear_operator():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.6
    problem = load_task("hdr", {"noise.sigma": 0.0}).build((3, 16, 16), seeds=[0, 1])
    y = problem.measure(x, seeds=[0, 1])
    r = solve("tv", None, problem.operator, y, shape=(3, 16, 16), steps=300, lam=1e-3)
    assert float((problem.operator(r.x) - y).abs().mean()) < 0.02
    one = solve("tv", None, problem.operator, y[1:], shape=(3, 16, 16), steps=300, lam=1e-3)
    torch.testing.assert_close(one.x[0], r.x[1], rtol=1e-4, atol=1e-4)  # per-sample results


def test_pseudo_inverse_matches_the_closed_form():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(20, 27, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, (3, 3, 3))
    y = torch.randn(2, 20, generator=g, dtype=torch.float64)
    mu = 0.1
    exact = torch.linalg.solve(A.T @ A + mu * torch.eye(27, dtype=torch.float64), A.T @ y.T).T.reshape(2, 3, 3, 3)
    r = solve("pseudo-inverse", None, op, y, shape=(3, 3, 3), steps=200, mu=mu, tol=1e-12)
    torch.testing.assert_close(r.x, exact, rtol=1e-8, atol=1e-8)


def test_classical_solvers_refuse_what_they_cannot_do():
    from diffstategrad import DiffStateGrad

    problem = load_task("phase_retrieval").build((1, 16, 16), seeds=[0])
    y = problem.measure(torch.zeros(1, 1, 16, 16), seeds=[0])
    with pytest.raises(ValueError, match="linear"):
        solve("pseudo-inverse", None, problem.operator, y, shape=(1, 16, 16))
    with pytest.raises(ValueError, match="projector"):
        solve("tv", None, problem.operator, y, shape=(1, 16, 16), projector=DiffStateGrad())
    with pytest.raises(TypeError, match="lamb"):
        solve("tv", None, problem.operator, y, shape=(1, 16, 16), lamb=1.0)


def test_evaluate_skips_the_pseudo_inverse_on_nonlinear_tasks(tmp_path):
    """A linear-only solver on a nonlinear task is left out of the grid with a note, not a traceback."""
    import json

    from click.testing import CliRunner

    from diffstategrad.cli import main
    from diffstategrad.evaluate import unsupported_cells

    assert unsupported_cells(["box_inpainting", "hdr", "phase_retrieval"], ["tv", "pseudo-inverse"], 32) == [
        ("hdr", "pseudo-inverse"), ("phase_retrieval", "pseudo-inverse")]
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", "--images", "fashion-examples", "--tasks", "box_inpainting,hdr", "--solvers",
                                  "tv,pseudo-inverse", "--size", "32", "--lpips", "none", "--out", str(out)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "pseudo-inverse skipped on hdr" in r.output
    cells = {(rec["task"], rec["solver"]) for rec in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert cells == {("box_inpainting", "tv"), ("box_inpainting", "pseudo-inverse"), ("hdr", "tv")}

import math

import pytest
import torch

from diffstategrad.schedules import (
    VPSchedule,
    alpha_bar_to_sigma,
    ddim_step,
    ddpm_posterior,
    eps_to_score,
    eps_to_x0,
    make_schedule,
    score_to_eps,
    sigma_to_alpha_bar,
    timestep_spacing,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
)


def test_linear_schedule_closed_form():
    s = make_schedule("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    torch.testing.assert_close(s.betas, betas)
    assert s.alpha_bar(999).item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert s.alpha_bar(-1).item() == 1.0


@pytest.mark.parametrize("t,expected", [(999, 1.42e-4), (661, 0.0247), (341, 0.331), (321, 0.367), (201, 0.612), (21, 0.966)])
def test_ldm_sqrt_linear_schedule_matches_reference_table(t, expected):
    # values of the reference doc, section 2.1 (CompVis ffhq-ldm-vq-4 betas)
    assert make_schedule("sqrt_linear").alpha_bar(t).item() == pytest.approx(expected, rel=0.01)


def test_cosine_schedule_closed_form():
    s = make_schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alpha_bar(t).item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert (s.betas <= 0.999 + 1e-12).all()


def test_schedule_validation_and_broadcasting():
    with pytest.raises(ValueError):
        VPSchedule(torch.tensor([0.5, 0.9]))  # increasing
    with pytest.raises(ValueError):
        make_schedule("nope")
    s = make_schedule("linear")
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    a = s.alpha_bar(torch.tensor([0, 10, 999]), like=x)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32


def test_timestep_spacing():
    assert timestep_spacing(1000, 500, "ldm")[:3] == [999, 997, 995] and timestep_spacing(1000, 500, "ldm")[-1] == 1
    assert timestep_spacing(1000, 1000, "uniform") == list(range(999, -1, -1))
    u = timestep_spacing(1000, 10, "uniform")
    assert u[0] == 999 and u[-1] == 0 and len(u) == 10
    assert timestep_spacing(1000, 4, "leading") == [750, 500, 250, 0]
    assert timestep_spacing(1000, 4, "trailing") == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        timestep_spacing(1000, 0)


def test_parameterisation_round_trips():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = torch.tensor([0.3, 0.9], dtype=torch.float64).view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(eps_to_x0(x_t, eps, a), x0)
    torch.testing.assert_close(x0_to_eps(x_t, x0, a), eps)
    torch.testing.assert_close(score_to_eps(eps_to_score(eps, a), a), eps)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(v_to_eps(x_t, v, a), eps)
    torch.testing.assert_close(v_to_x0(x_t, v, a), x0)
    sig = alpha_bar_to_sigma(a)
    torch.testing.assert_close(x_t / a.sqrt(), x0 + sig * eps)
    torch.testing.assert_close(sigma_to_alpha_bar(sig), a)


def test_ddpm_posterior_matches_gaussian_conditioning():
    # x_prev ~ N(sqrt(a_p) x0, 1 - a_p), x_t = sqrt(a_t/a_p) x_prev + sqrt(1 - a_t/a_p) n
    a_t, a_p = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    x0, x_t = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    cov = (a_t / a_p).sqrt() * (1 - a_p)
    mean = a_p.sqrt() * x0 + cov / (1 - a_t) * (x_t - a_t.sqrt() * x0)
    var = (1 - a_p) - cov**2 / (1 - a_t)
    m, v_small, v_large = ddpm_posterior(x_t, x0, a_t, a_p)
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(v_small, var)
    torch.testing.assert_close(v_large, 1 - a_t / a_p)


def test_ddim_step_closed_forms():
    x0, eps = torch.randn(1, 1, 3, 3, dtype=torch.float64), torch.randn(1, 1, 3, 3, dtype=torch.float64)
    a_t, a_p = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    # eta = 0: deterministic, and it lands exactly on the x0/eps pair's point at level a_p
    torch.testing.assert_close(ddim_step(x0, eps, a_t, a_p), a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps)
    # eta = 1: the added variance is the DDPM posterior variance
    z = torch.zeros_like(x0)
    _, v_small, _ = ddpm_posterior(torch.zeros_like(x0), x0, a_t, a_p)
    deterministic = ddim_step(x0, eps, a_t, a_p, eta=1.0, noise=z)
    torch.testing.assert_close(ddim_step(x0, eps, a_t, a_p, eta=1.0, noise=torch.ones_like(x0)) - deterministic, v_small.sqrt() * torch.ones_like(x0))
    with pytest.raises(ValueError):
        ddim_step(x0, eps, a_t, a_p, eta=0.5)


def test_timestep_for_sigma_inverts_sigma():
    s = make_schedule("linear")
    t = s.timestep_for_sigma(s.sigma(torch.tensor([10, 250, 900])))
    torch.testing.assert_close(t, torch.tensor([10.0, 250.0, 900.0], dtype=torch.float64), atol=1e-6, rtol=0)

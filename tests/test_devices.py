"""Every solver gives the same result on every available device (CPU always; CUDA where present):
all random draws come from per-sample CPU generators, so a seed means the same numbers everywhere."""

import pytest
import torch

from diffstategrad import DiffStateGrad
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import GaussianPrior, LinearAutoencoderPrior
from diffstategrad.solvers import solve

SETTINGS = {
    "dps": dict(steps=20, guidance_scale=0.5),
    "daps": dict(steps=5, mcmc_steps=5, guidance_scale=1e-4, tau=0.1),
    "psld": dict(steps=20, guidance_scale=0.3),
    "resample": dict(steps=30, pixel_iters=20, latent_iters=20),
    "latent-daps": dict(steps=5, mcmc_steps=5, guidance_scale=1e-4, tau=0.1),
}


def _setup(name):
    g = torch.Generator().manual_seed(0)
    if name in ("dps", "daps"):
        prior, shape = GaussianPrior.low_rank_images((3, 8, 8), rank=2), (3, 8, 8)
    else:
        latent = GaussianPrior.low_rank_images((3, 4, 4), rank=2)
        prior, shape = LinearAutoencoderPrior(latent, (3, 8, 8), downsampling=2), (3, 8, 8)
    op = MatrixOperator(torch.randn(60, 192, generator=g) / 8, shape)
    y = torch.randn(2, 60, generator=g) * 0.3
    return prior, op, y, shape


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_solver_results_agree_across_devices(name, device):
    prior, op, y, shape = _setup(name)
    kw = dict(shape=shape, seeds=[0, 1], projector=DiffStateGrad(var_cutoff=0.9), **SETTINGS[name])
    ref = solve(name, prior, op, y, **kw)
    out = solve(name, prior.to(device), op.to(device), y.to(device), **kw)
    assert out.x.device.type == device.type
    torch.testing.assert_close(out.x.cpu(), ref.x, rtol=1e-3, atol=1e-3)

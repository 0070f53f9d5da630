"""The small KL autoencoder of the built-in latent prior: budget, shapes, size errors, batch
independence, differentiability, the KL term."""

import json

import pytest
import torch

from diffstategrad.priors.small_autoencoder import (
    AUTOENCODER_CONFIG,
    TINY_AUTOENCODER_CONFIG,
    SmallAutoencoder,
    kl_divergence,
)
from diffstategrad.priors.unet import LATENT_UNET_CONFIG, UNet, count_parameters
from net_helpers import randomise_zero_inits


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return randomise_zero_inits(SmallAutoencoder(AUTOENCODER_CONFIG)).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomise_zero_inits(SmallAutoencoder(TINY_AUTOENCODER_CONFIG)).eval()


def test_geometry_and_parameter_budget(shipped):
    assert (shipped.image_channels, shipped.latent_channels, shipped.downsampling) == (3, 3, 4)
    n_ae = count_parameters(shipped)
    assert 1_000_000 <= n_ae <= 2_000_000
    assert n_ae == 1_522_121  # update the comments in small_autoencoder.py / unet.py if this changes
    n_unet = count_parameters(UNet(LATENT_UNET_CONFIG))
    assert n_ae + n_unet <= 6_000_000
    assert 4 * (n_ae + n_unet) < 25_000_000  # the shipped float32 folder stays under 25 MB


def test_config_is_plain_json_and_rebuilds_the_net(shipped):
    cfg = json.loads(json.dumps(shipped.config))
    assert cfg == shipped.config
    rebuilt = SmallAutoencoder(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}
    with pytest.raises(ValueError, match="unknown"):
        SmallAutoencoder({**cfg, "attention": True})


@pytest.mark.parametrize("hw", [(64, 64), (128, 96), (256, 256)])
def test_shapes(shipped, hw):
    x = torch.rand(1, 3, *hw) * 2 - 1
    with torch.no_grad():
        mean, logvar = shipped.posterior(x)
        z = shipped.encode(x)
        rec = shipped.decode(z)
    assert mean.shape == logvar.shape == z.shape == (1, 3, hw[0] // 4, hw[1] // 4)
    assert torch.equal(z, mean)
    assert rec.shape == x.shape and torch.isfinite(rec).all()


@pytest.mark.parametrize("hw", [(30, 32), (64, 62), (2, 4)])
def test_non_multiple_of_4_gives_a_clear_error(tiny, hw):
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny.encode(torch.zeros(1, 3, *hw))


def test_wrong_channel_counts_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(torch.zeros(1, 4, 4, 4))


def test_samples_are_independent_of_the_batch(tiny):
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z_batch = tiny.encode(x)
        z_single = torch.cat([tiny.encode(x[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(z_batch, z_single, rtol=1e-5, atol=1e-6)
        rec_batch = tiny.decode(z_batch)
        rec_single = torch.cat([tiny.decode(z_batch[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(rec_batch, rec_single, rtol=1e-5, atol=1e-6)
        # changing one sample leaves the others untouched
        x2 = x.clone()
        x2[1] = -x2[1]
        torch.testing.assert_close(tiny.encode(x2)[[0, 2]], z_batch[[0, 2]], rtol=1e-5, atol=1e-6)


def test_encode_and_decode_are_differentiable(tiny):
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    z = tiny.encode(x)
    z.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    tiny.decode(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_kl_term_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(2, 3, 4, 4)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(2))
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    kl = kl_divergence(mean, logvar)
    assert kl.shape == (2,) and torch.all(kl > 0)
    # closed form for one element: mean 1, var e -> 0.5 * (1 + e - 1 - 1)
    one = kl_divergence(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(one, torch.tensor([0.5 * (torch.e - 1)]))
    # mean-only and variance-only departures both cost
    assert kl_divergence(torch.full((1, 1, 1, 1), 0.1), torch.zeros(1, 1, 1, 1)) > 0
    assert kl_divergence(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -2.0)) > 0

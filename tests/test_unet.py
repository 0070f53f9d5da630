"""The built-in UNet: parameter budget, any multiple-of-8 size, batch independence, config round trip."""

import json

import pytest
import torch

from diffstategrad.priors.unet import PIXEL_UNET_CONFIG, TINY_UNET_CONFIG, UNet, count_parameters, timestep_embedding
from net_helpers import randomise_zero_inits


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return UNet(PIXEL_UNET_CONFIG).eval()


def test_shipped_config_is_under_the_parameter_budget(shipped):
    n = count_parameters(shipped)
    assert n <= 6_000_000
    assert n == 5_187_491  # update docs/models.md if this changes


@pytest.mark.parametrize("hw", [(64, 64), (128, 96), (256, 256)])
def test_output_shape_equals_input_shape(shipped, hw):
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = shipped(x, torch.tensor([500]))
    assert out.shape == x.shape


def test_output_starts_at_zero_and_is_finite(shipped):
    with torch.no_grad():
        out = shipped(torch.randn(2, 3, 64, 64), torch.tensor([0, 999]))
    assert torch.all(out == 0)


@pytest.mark.parametrize("hw", [(60, 64), (64, 36), (4, 8)])
def test_non_multiple_of_8_input_gives_a_clear_error(shipped, hw):
    with pytest.raises(ValueError, match="multiples of 8"):
        shipped(torch.randn(1, 3, *hw), torch.tensor([10]))


def test_bad_timestep_shape_is_rejected(shipped):
    with pytest.raises(ValueError, match="timesteps"):
        shipped(torch.randn(2, 3, 64, 64), torch.tensor([1, 2, 3]))


def test_sample_alone_equals_sample_in_batch():
    torch.manual_seed(0)
    model = randomise_zero_inits(UNet(TINY_UNET_CONFIG | {"channels": [16, 32, 32, 32], "max_groups": 8})).eval()
    x = torch.randn(4, 3, 32, 48)
    t = torch.tensor([3, 250, 600, 999])
    with torch.no_grad():
        batched = model(x, t)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    assert batched.abs().max() > 1e-3
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_only_convolutional_layers():
    """No attention or other layer tied to the training size: convolutions, GroupNorm, the time MLP.
    (GroupNorm statistics are taken over the whole image, as in every DDPM UNet.)"""
    from torch import nn

    from diffstategrad.priors import unet

    allowed = (nn.Conv2d, nn.GroupNorm, nn.Linear, nn.SiLU, nn.Identity, nn.Dropout, nn.Sequential, nn.ModuleList,
               unet.UNet, unet.ResBlock, unet.Downsample, unet.Upsample)
    for name, module in UNet(PIXEL_UNET_CONFIG).named_modules():
        assert isinstance(module, allowed), name


def test_config_round_trips_through_json():
    model = UNet(PIXEL_UNET_CONFIG)
    again = UNet.from_config(json.loads(json.dumps(model.config)))
    assert again.config == model.config
    assert count_parameters(again) == count_parameters(model)


def test_generic_channels_for_latent_use():
    model = UNet({"in_channels": 3, "out_channels": 3, "channels": [16, 32], "blocks_per_level": 1, "max_groups": 8})
    assert model.size_multiple == 2
    assert model(torch.randn(2, 3, 10, 6), torch.tensor([1, 2])).shape == (2, 3, 10, 6)
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNet({"in_channels": 3, "out_channels": 3, "channels": [8], "attention": True})


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))

"""Noise models: statistics, per-sample reproducibility, the factory."""

import pytest
import torch

from diffstategrad.operators import GaussianNoise, NoNoise, PoissonNoise, make_noise
from diffstategrad.rng import SampleGenerators


def test_gaussian_statistics():
    noise = GaussianNoise(0.05)
    assert noise.sigma == 0.05
    y = torch.zeros(4, 3, 64, 64)
    residual = noise(y, SampleGenerators([1, 2, 3, 4])) - y
    assert abs(float(residual.mean())) < 5 * 0.05 / residual.numel() ** 0.5  # 5 standard errors
    assert abs(float(residual.std()) / 0.05 - 1) < 0.02
    for b in range(4):  # every sample has its own, full-strength noise
        assert abs(float(residual[b].std()) / 0.05 - 1) < 0.05


def test_gaussian_per_sample_reproducibility():
    noise = GaussianNoise(0.1)
    y = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    batch = noise(y, SampleGenerators([5, 6, 7]))
    alone = noise(y[1:2], SampleGenerators([6]))
    assert torch.equal(batch[1:2], alone)
    assert batch.dtype == torch.float64
    again = noise(y, SampleGenerators([5, 6, 7]))
    assert torch.equal(batch, again)
    other = noise(y, SampleGenerators([8, 6, 7]))
    assert not torch.equal(batch[0], other[0]) and torch.equal(batch[1:], other[1:])


def test_poisson_mean_and_range():
    noise = PoissonNoise(rate=1.0)
    value = 0.2  # [-1, 1] units -> intensity 0.6 -> mean count 153
    y = torch.full((2, 3, 64, 64), value)
    out = noise(y, SampleGenerators([0, 1]))
    assert out.min() >= -1 and out.max() <= 1
    # counts / 255 are multiples of 1/255 in [0, 1] units
    counts = (out + 1) / 2 * 255
    assert torch.allclose(counts, counts.round(), atol=1e-3)
    assert abs(float(out.mean()) - value) < 0.005
    # variance of Poisson(153) / 255, times 2 in [-1, 1] units
    expected_std = 2 * (0.6 * 255) ** 0.5 / 255
    assert abs(float(out.std()) / expected_std - 1) < 0.05
    alone = noise(y[1:], SampleGenerators([1]))
    assert torch.equal(out[1:], alone)


def test_poisson_rate_scales_noise():
    y = torch.zeros(1, 1, 64, 64)
    low = PoissonNoise(0.1)(y, SampleGenerators([0])).std()
    high = PoissonNoise(10.0)(y, SampleGenerators([0])).std()
    assert low > 5 * high


def test_no_noise_and_factory():
    y = torch.randn(2, 3, 4, 4)
    assert torch.equal(NoNoise()(y, SampleGenerators([0, 1])), y)
    assert isinstance(make_noise({"name": "gaussian", "sigma": 0.01}), GaussianNoise)
    assert make_noise({"name": "gaussian", "sigma": 0.01}).sigma == 0.01
    assert make_noise({"name": "poisson", "rate": 2.0}).rate == 2.0
    assert isinstance(make_noise({"name": "none"}), NoNoise)
    assert isinstance(make_noise({"name": "clean"}), NoNoise)
    assert isinstance(make_noise(None), NoNoise)
    assert make_noise({"name": "gaussian", "sigma": 0.02}).to_dict() == {"name": "gaussian", "sigma": 0.02}
    with pytest.raises(ValueError, match="unknown noise model"):
        make_noise({"name": "laplace"})
    with pytest.raises(ValueError, match="bad parameters"):
        make_noise({"name": "gaussian", "rate": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        GaussianNoise(-1.0)


def test_generator_count_must_match_batch():
    with pytest.raises(ValueError, match="generators"):
        GaussianNoise(0.1)(torch.zeros(2, 1, 4, 4), SampleGenerators([0]))

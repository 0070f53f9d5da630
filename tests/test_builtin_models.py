"""The shipped built-in models load by name, with no network, and run at several sizes."""

import json

import pytest
import torch
from click.testing import CliRunner

from diffstategrad.cli import main
from diffstategrad.priors import load_prior
from diffstategrad.priors.builtin import list_builtin


@pytest.fixture(scope="module")
def pixel():
    return load_prior("builtin")


@pytest.fixture(scope="module")
def latent():
    return load_prior("builtin-latent")


def test_both_models_are_shipped_and_listed():
    rows = list_builtin()
    kinds = [r["kind"] for r in rows]
    assert "pixel" in kinds and "latent" in kinds and kinds.index("pixel") < kinds.index("latent")
    for r in rows:
        assert r["parameters"] <= 6_000_000 and r["size_mb"] <= 25.0
        if r["info"].get("default", True):  # the photo models (fashion holds out its test split)
            assert len(r["info"]["data"]["held_out_images"]) == 8
    data = json.loads(CliRunner().invoke(main, ["models", "--json"]).output)
    assert [d["kind"] for d in data][0] == "pixel"
    for d in data:
        assert {"name", "kind", "parameters"} <= set(d)
    assert next(d for d in data if d["kind"] == "latent")["name"] == "latent"


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (256, 256)])
def test_pixel_prior_runs_at_several_sizes(pixel, shape):
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = pixel.eps(x, torch.tensor([10, 700]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert pixel.kind == "pixel" and pixel.learned_variance is False


def test_pixel_prior_denoises(pixel):
    from diffstategrad.images import load_example

    x = load_example("chelsea", 64)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = pixel.denoise(noisy, 0.2)
    mse = lambda a: float(((a - x) ** 2).mean())  # noqa: E731
    assert mse(clean) < 0.35 * mse(noisy)


@pytest.mark.parametrize("shape", [(64, 64), (128, 96)])
def test_latent_prior_runs_at_several_sizes(latent, shape):
    x = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = latent.encode(x)
        assert z.shape == (1, 3, shape[0] // 4, shape[1] // 4)
        assert latent.eps(z, 100).shape == z.shape
        assert latent.decode(z).shape == x.shape
    assert latent.state_shape((3, *shape)) == tuple(z.shape[1:])
    with pytest.raises(ValueError):
        latent.check_size(12, 12)  # latents must be multiples of 8


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match="unknown built-in model"):
        load_prior("builtin", "nope")

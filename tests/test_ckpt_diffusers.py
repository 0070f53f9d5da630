"""diffusers repositories: folders written by save_pretrained from tiny models."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import load_prior
from diffstategrad.storage import CheckpointFormatError, CheckpointMismatchError, CheckpointNotFoundError
from diffstategrad.priors.diffusers_loader import DiffusersLatentPrior, DiffusersPixelPrior
from diffstategrad.solvers import dps

diffusers = pytest.importorskip("diffusers")


def _unet(size, out_channels=3, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=out_channels, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16)


def _vq(scaling_factor=None, seed=1):
    torch.manual_seed(seed)
    extra = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    return diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1, latent_channels=3,
        num_vq_embeddings=64, norm_num_groups=32, sample_size=16, **extra)


def _kl(seed=2):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1, latent_channels=3,
        norm_num_groups=32, sample_size=16, scaling_factor=0.5)


def _latent_repo(folder, vae, vae_name="vqvae"):
    unet = _unet(8, seed=3)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                        clip_sample=False)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / vae_name)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "LDMPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DModel"], vae_name: ["diffusers", type(vae).__name__],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return unet, vae, scheduler


@pytest.fixture(scope="module")
def pixel_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm")
    unet = _unet(16)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder, unet, scheduler


def test_pixel_pipeline_folder(pixel_repo):
    folder, unet, scheduler = pixel_repo
    prior = load_prior("diffusers", folder)
    assert isinstance(prior, DiffusersPixelPrior) and not prior.learned_variance
    assert (prior.schedule.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max() < 1e-6
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([4, 600])
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(x, t), unet(x, t).sample, atol=1e-5, rtol=1e-5)
        assert torch.equal(prior.eps(x, t), prior.eps(x, t))
    assert "trained at 16x16" in prior.size_rule()
    with pytest.raises(ValueError, match="multiples of 2"):
        prior.check_size(15, 16)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_predictions_become_epsilon(tmp_path, prediction):
    unet = _unet(16, seed=4)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction)
    unet.save_pretrained(tmp_path)  # a bare model folder, the scheduler config beside it
    scheduler.save_pretrained(tmp_path)
    prior = load_prior("diffusers", tmp_path)
    assert (prior.schedule.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max() < 1e-6
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([300])
    a = scheduler.alphas_cumprod[300].double()
    with torch.no_grad():
        out = unet(x, t).sample.double()
    if prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        expected = a.sqrt() * out + (1 - a).sqrt() * x.double()
    else:
        expected = (x.double() - a.sqrt() * out) / (1 - a).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(x, t).double(), expected, atol=1e-4, rtol=1e-4)


def test_learned_range_variance(tmp_path):
    unet = _unet(16, out_channels=6, seed=5)
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    prior = load_prior("diffusers", tmp_path)
    assert prior.learned_variance
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        eps, v = prior.eps_and_variance(x, 10)
        out = unet(x, torch.tensor([10])).sample
    torch.testing.assert_close(eps, out[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, out[:, 3:], atol=1e-5, rtol=1e-5)


def test_vq_latent_repo_and_the_scale_factor_warning(tmp_path):
    unet, vq, _ = _latent_repo(tmp_path, _vq())
    assert vq.config.scaling_factor == pytest.approx(0.18215)  # diffusers' default
    with pytest.warns(UserWarning, match="scale_factor 1.0"):
        prior = load_prior("diffusers", tmp_path)
    assert isinstance(prior, DiffusersLatentPrior) and prior.scaling_factor == pytest.approx(0.18215)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = load_prior("diffusers", tmp_path, scaling_factor=1.0)
    assert fixed.scaling_factor == 1.0 and fixed.downsampling == 2 and fixed.state_shape((3, 16, 16)) == (3, 8, 8)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(prior.encode(x), 0.18215 * vq.encode(x).latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fixed.decode(z), vq.decode(z).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior.decode(z), vq.decode(z / 0.18215).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fixed.eps(z, 7), unet(z, torch.tensor([7])).sample, atol=1e-5, rtol=1e-5)
    reference = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    assert (fixed.schedule.alphas_cumprod - torch.cumprod(1 - reference, 0)).abs().max() < 1e-9


def test_vq_config_with_factor_one_does_not_warn(tmp_path):
    _latent_repo(tmp_path, _vq(scaling_factor=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_prior("diffusers", tmp_path).scaling_factor == 1.0


def test_kl_latent_repo(tmp_path):
    _, kl, _ = _latent_repo(tmp_path, _kl(), vae_name="vae")
    prior = load_prior("diffusers", tmp_path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(prior.encode(x), 0.5 * kl.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)


def test_diffusers_errors(tmp_path, pixel_repo):
    folder, _, _ = pixel_repo
    with pytest.raises(CheckpointNotFoundError):
        load_prior("diffusers", tmp_path / "nowhere" / "deeper")
    with pytest.raises(CheckpointFormatError, match="neither model_index.json"):
        load_prior("diffusers", tmp_path)
    # a config that does not fit the weights
    broken = tmp_path / "broken"
    _unet(16).save_pretrained(broken / "unet")
    diffusers.DDPMScheduler().save_pretrained(broken / "scheduler")
    (broken / "model_index.json").write_text((folder / "model_index.json").read_text())
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    down_types = cfg["down_block_types"]
    cfg["down_block_types"] = ["AttnDownBlock2D", "AttnDownBlock2D"]  # an attention the weights lack
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"broken/unet .*missing keys: down_blocks\.0\.attentions"):
        load_prior("diffusers", broken)
    cfg["down_block_types"], cfg["block_out_channels"] = down_types, [32, 96]
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys: "):
        load_prior("diffusers", broken)
    # a truncated weights file
    cut = tmp_path / "cut"
    diffusers.DDPMPipeline(unet=_unet(16), scheduler=diffusers.DDPMScheduler()).save_pretrained(cut)
    weights = cut / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load_prior("diffusers", cut)
    # text-conditional pipelines are not priors here
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    cond = tmp_path / "cond"
    cond.mkdir()
    (cond / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        load_prior("diffusers", cond)


@pytest.mark.parametrize("latent", [False, True])
def test_diffusers_priors_run_dps(tmp_path, pixel_repo, latent):
    if latent:
        _latent_repo(tmp_path, _vq(scaling_factor=1.0))
        prior = load_prior("diffusers", tmp_path)
    else:
        prior = load_prior("diffusers", pixel_repo[0])
    shape = (3, 16, 16)
    d = math.prod(shape)
    op = MatrixOperator(torch.randn(16, d, generator=torch.Generator().manual_seed(0)) / d**0.5, shape)
    y = op(torch.rand(1, *shape) * 2 - 1)
    result = dps(prior, op, y, shape=shape, steps=3, guidance_scale=0.5, seeds=[0])
    assert result.x.shape == (1, *shape) and torch.isfinite(result.x).all()

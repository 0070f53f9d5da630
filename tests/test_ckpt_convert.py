"""convert(): every supported checkpoint to model.safetensors + config.json, which then loads
with no pickle at all and reproduces the original prior exactly."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from ckpt_helpers import TINY_ADM_ARGS, ldm_schedule_buffers, lightning_checkpoint, random_state, tiny_ldm_yaml
from diffstategrad.convert import convert
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import load_prior
from diffstategrad.storage import CheckpointFormatError, CheckpointMismatchError, build_on_meta
from diffstategrad.priors.compvis import CompVisLatentPrior, ldm_schedule, read_ldm_config
from diffstategrad.priors.guided_diffusion import UNetModel, guided_diffusion_unet_config
from diffstategrad.solvers import dps


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(format, checkpoint, loader kwargs, state shape) for one tiny file of each format."""
    root = tmp_path_factory.mktemp("sources")
    gd = root / "adm.pt"
    cfg = guided_diffusion_unet_config(**TINY_ADM_ARGS)
    torch.save(random_state(build_on_meta(UNetModel, **cfg).state_dict(), 0), gd)
    yaml_path = root / "ldm.yaml"
    yaml_path.write_text(tiny_ldm_yaml("vq"))
    ldm_cfg = read_ldm_config(yaml_path)
    meta = CompVisLatentPrior.from_spec({"unet": ldm_cfg["unet"], "first_stage": ldm_cfg["first_stage"],
                                         "scale_factor": 1.0}, ldm_schedule(ldm_cfg["schedule"]))
    ldm = root / "model.ckpt"
    lightning_checkpoint({**random_state(meta.state_dict(), 1), **ldm_schedule_buffers()}, ldm)
    cases = [("guided-diffusion", gd, dict(TINY_ADM_ARGS), (3, 32, 32)),
             ("compvis-ldm", ldm, {"config": yaml_path}, (3, 8, 8))]
    try:
        import diffusers
    except ImportError:
        return cases
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16)
    repo = root / "ddpm"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction")).save_pretrained(repo)
    cases.append(("diffusers", repo, {}, (3, 16, 16)))
    return cases


@pytest.mark.parametrize("index", [0, 1, 2], ids=["guided-diffusion", "compvis-ldm", "diffusers"])
def test_convert_round_trip_without_pickle(sources, index, tmp_path, monkeypatch):
    if index >= len(sources):
        pytest.skip("diffusers is not installed")
    fmt, checkpoint, kwargs, shape = sources[index]
    out = convert(fmt, checkpoint, tmp_path / "converted", **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == fmt and config["diffstategrad_converted"] == 1
    original = load_prior(fmt, checkpoint, **kwargs)

    def no_pickle(*args, **kw):
        raise AssertionError("a converted folder must load without pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    again = load_prior("converted", out)
    monkeypatch.undo()
    assert type(again) is type(original)
    for k, v in original.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert torch.equal(again.schedule.alphas_cumprod, original.schedule.alphas_cumprod)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original.eps(x, torch.tensor([3, 800])), again.eps(x, torch.tensor([3, 800])))
        if original.kind == "latent":
            assert torch.equal(original.decode(x), again.decode(x)) and again.scale_factor == original.scale_factor
    # a converted prior is a prior like any other
    image_shape = (3, 16, 16) if original.kind == "latent" else shape
    d = math.prod(image_shape)
    op = MatrixOperator(torch.randn(12, d, generator=torch.Generator().manual_seed(1)) / d**0.5, image_shape)
    y = op(torch.rand(1, *image_shape) * 2 - 1)
    result = dps(again, op, y, shape=image_shape, steps=2, guidance_scale=0.3, seeds=[0])
    assert torch.isfinite(result.x).all()


def test_resaving_a_loaded_state_dict_round_trips(sources, tmp_path):
    fmt, checkpoint, kwargs, _ = sources[0]
    prior = load_prior(fmt, checkpoint, **kwargs)
    resaved = tmp_path / "resaved.pt"
    torch.save(prior.unet.state_dict(), resaved)
    again = load_prior(fmt, resaved, **kwargs)
    for k, v in prior.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_convert_refuses_to_overwrite_and_checks_its_inputs(sources, tmp_path):
    fmt, checkpoint, kwargs, _ = sources[0]
    out = convert(fmt, checkpoint, tmp_path / "c", **kwargs)
    with pytest.raises(FileExistsError):
        convert(fmt, checkpoint, out, **kwargs)
    convert(fmt, checkpoint, out, overwrite=True, **kwargs)
    with pytest.raises(ValueError, match="cannot convert"):
        convert("gaussian", checkpoint, tmp_path / "g")
    with pytest.raises(CheckpointMismatchError):  # the source is checked completely
        convert(fmt, checkpoint, tmp_path / "d", preset="ffhq256")


def test_tampered_converted_folders_are_refused(sources, tmp_path):
    fmt, checkpoint, kwargs, _ = sources[0]
    out = convert(fmt, checkpoint, tmp_path / "c", **kwargs)
    config = json.loads((out / "config.json").read_text())
    config["spec"]["unet"]["model_channels"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="model.safetensors"):
        load_prior("converted", out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load_prior("converted", out)
    other = convert(fmt, checkpoint, tmp_path / "p", **kwargs)
    torch.save({"w": torch.zeros(1)}, other / "model.safetensors")  # a pickle under the safetensors name
    with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
        load_prior("converted", other)
    with pytest.raises(FileNotFoundError):
        load_prior("converted", tmp_path / "absent")

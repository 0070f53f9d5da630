"""CompVis latent diffusion checkpoints: tiny Lightning files in the real layout
(model.diffusion_model.*, model_ema.*, first_stage_model.*, loss and schedule buffers) and
the full-size LDM-VQ-4 FFHQ architecture on the meta device."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import yaml

from ckpt_helpers import (
    adm_to_diffusers,
    ldm_schedule_buffers,
    lightning_checkpoint,
    litema_name,
    random_state,
    tiny_ldm_yaml,
    vae_diffusers_kwargs,
    vae_to_diffusers,
)
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import load_prior
from diffstategrad.storage import CheckpointMismatchError, CheckpointNotFoundError, UnsafeCheckpointError
from diffstategrad.priors.compvis import CompVisLatentPrior, LDMConfigError, ema_key, ldm_schedule, read_ldm_config
from diffstategrad.solvers import dps

# The published configs/latent-diffusion/ffhq-ldm-vq-4.yaml, as the reference document states it
FFHQ_LDM_VQ4 = {
    "model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 8192,
            "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
                         "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": "__is_unconditional__"}}}


def _meta_prior(config) -> CompVisLatentPrior:
    cfg = read_ldm_config(config)
    return CompVisLatentPrior.from_spec({"unet": cfg["unet"], "first_stage": cfg["first_stage"], "scale_factor": 1.0},
                                        ldm_schedule(cfg["schedule"]))


def _write_ldm(folder, first_stage="vq", ema=True, extra_yaml="", extra_state=None, seed=1):
    """A tiny LatentDiffusion checkpoint + YAML. Returns (ckpt, yaml, raw weights, ema weights)."""
    yaml_path = folder / f"ldm-{first_stage}.yaml"
    yaml_path.write_text(tiny_ldm_yaml(first_stage, extra_yaml))
    shapes = _meta_prior(yaml_path).state_dict()
    raw = random_state(shapes, seed)
    ema_w = random_state({k: v for k, v in shapes.items() if k.startswith("model.")}, seed + 100)
    state = dict(raw)
    if ema:
        state.update({litema_name(k): v for k, v in ema_w.items()})
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    state.update(ldm_schedule_buffers())
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # ignored explicitly
    state.update(extra_state or {})
    ckpt = folder / f"ldm-{first_stage}.ckpt"
    lightning_checkpoint(state, ckpt)
    return ckpt, yaml_path, raw, ema_w


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory):
    return _write_ldm(tmp_path_factory.mktemp("ldm"), "vq")


@pytest.fixture(scope="module")
def tiny_ldm_kl(tmp_path_factory):
    return _write_ldm(tmp_path_factory.mktemp("ldmkl"), "kl")


# ---------------------------------------------------------------------------------------------
# Full size (meta device)
# ---------------------------------------------------------------------------------------------


def _signature(state) -> str:
    return hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]


def test_ffhq_ldm_vq4_parameter_counts_and_keys():
    prior = _meta_prior(FFHQ_LDM_VQ4)
    unet = prior.model.state_dict()
    n_unet = sum(v.numel() for v in unet.values())
    assert n_unet == 274_056_163
    assert f"{n_unet * 1e-6:.2f}" == "274.06"  # LDM's count_params log: "DiffusionWrapper has 274.06 M params."
    assert len(unet) == 368 and _signature(unet) == "ffd8592cfec3ca02"
    assert tuple(unet["diffusion_model.input_blocks.4.1.qkv.weight"].shape) == (1344, 448, 1)  # 14 heads of 32
    assert tuple(unet["diffusion_model.out.2.weight"].shape) == (3, 224, 3, 3)
    first = prior.first_stage_model.state_dict()
    assert sum(v.numel() for v in first.values()) == 55_322_782  # VQ-f4 (no published figure found)
    assert len(first) == 205 and _signature(first) == "72f90befd6717568"
    assert tuple(first["quantize.embedding.weight"].shape) == (8192, 3)
    assert tuple(first["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)  # mid attention at 512 channels
    assert not any(".attn.0." in k for k in first)  # attn_resolutions: []
    assert prior.downsampling == 4 and prior.channels == 3
    assert prior.state_shape((3, 256, 256)) == (3, 64, 64)


def test_official_yaml_structure_is_parsed(tmp_path):
    path = tmp_path / "ffhq-ldm-vq-4.yaml"
    path.write_text(yaml.safe_dump(FFHQ_LDM_VQ4))
    cfg = read_ldm_config(path)
    assert cfg["scale_factor"] == 1.0 and not cfg["scale_by_std"] and cfg["parameterization"] == "eps"
    assert cfg["unet"]["num_heads"] == -1 and cfg["unet"]["num_head_channels"] == 32
    assert cfg["first_stage"]["kind"] == "vq" and cfg["first_stage"]["n_embed"] == 8192
    schedule = ldm_schedule(cfg["schedule"])
    reference = ldm_schedule_buffers()["alphas_cumprod"].double()
    assert (schedule.alphas_cumprod - reference).abs().max() < 1e-6


def test_ema_key_naming():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert ema_key("model.diffusion_model.out.2.bias") == litema_name("model.diffusion_model.out.2.bias")


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------------


def test_raw_weights_by_default_and_ema_on_request(tiny_ldm):
    ckpt, cfg, raw, ema = tiny_ldm
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg)
    for k, v in prior.state_dict().items():
        assert torch.equal(v, raw[k]), k
    ema_prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, weights="ema")
    for k, v in ema_prior.state_dict().items():
        assert torch.equal(v, ema[k] if k.startswith("model.") else raw[k]), k
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(prior.eps(z, 50), ema_prior.eps(z, 50))
    with pytest.raises(ValueError, match="weights"):
        load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, weights="average")


def test_schedule_scale_factor_and_sizes(tiny_ldm):
    ckpt, cfg, _, _ = tiny_ldm
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg)
    assert prior.scale_factor == 1.0 and prior.parameterization == "eps"
    reference = ldm_schedule_buffers()["alphas_cumprod"].double()
    assert (prior.schedule.alphas_cumprod - reference).abs().max() < 1e-6
    assert prior.state_shape((3, 16, 16)) == (3, 8, 8)
    prior.check_size(8, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        prior.check_size(7, 8)
    assert "8x8 latents (16x16 images)" in prior.size_rule()


@pytest.mark.parametrize("first_stage", ["vq", "kl"])
def test_ldm_matches_diffusers_networks(first_stage, tiny_ldm, tiny_ldm_kl):
    """Independent forward: diffusers' UNet2DModel, VQModel and AutoencoderKL with the same weights."""
    diffusers = pytest.importorskip("diffusers")
    ckpt, cfg, raw, _ = tiny_ldm if first_stage == "vq" else tiny_ldm_kl
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg)
    unet_state = {k[len("model.diffusion_model."):]: v for k, v in raw.items() if k.startswith("model.diffusion_model.")}
    kwargs, theirs = adm_to_diffusers(unet_state, prior.unet.config)
    unet = diffusers.UNet2DModel(**kwargs)
    unet.load_state_dict(theirs, strict=True)
    ddconfig = read_ldm_config(cfg)["first_stage"]["ddconfig"]
    fs_state = {k[len("first_stage_model."):]: v for k, v in raw.items() if k.startswith("first_stage_model.")}
    if first_stage == "vq":
        vae = diffusers.VQModel(**vae_diffusers_kwargs(ddconfig), num_vq_embeddings=64, vq_embed_dim=3, scaling_factor=1.0)
    else:
        vae = diffusers.AutoencoderKL(**vae_diffusers_kwargs(ddconfig))
    vae.load_state_dict(vae_to_diffusers(fs_state, ddconfig, levels=2), strict=True)
    unet.eval(), vae.eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.tensor([3, 910])
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(z, t), unet(z, t).sample, atol=2e-5, rtol=1e-4)
        h = vae.encode(x).latents if first_stage == "vq" else vae.encode(x).latent_dist.mean
        torch.testing.assert_close(prior.encode(x), h, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(prior.decode(z), vae.decode(z).sample, atol=5e-5, rtol=1e-4)


def test_vq_decode_quantises_with_straight_through_gradient(tiny_ldm):
    ckpt, cfg, raw, _ = tiny_ldm
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg)
    vq = prior.first_stage_model
    codebook = raw["first_stage_model.quantize.embedding.weight"]
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    zq = codebook[torch.cdist(flat, codebook).argmin(1)].reshape(1, 8, 8, 3).permute(0, 3, 1, 2)
    out = prior.decode(z)
    torch.testing.assert_close(out, vq.decoder(vq.post_quant_conv(zq)), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), z)
    h = zq.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(vq.decoder(vq.post_quant_conv(h)).square().sum(), h)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_scale_factor_from_config_and_from_scale_by_std_buffer(tmp_path, tiny_ldm):
    base_ckpt, base_cfg, _, _ = tiny_ldm
    base = load_prior("compvis-ldm", checkpoint=base_ckpt, config=base_cfg)
    ckpt, cfg, _, _ = _write_ldm(tmp_path, extra_yaml="    scale_factor: 0.5")
    half = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg)
    assert half.scale_factor == 0.5
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(half.encode(x), 0.5 * base.encode(x))
        torch.testing.assert_close(half.decode(z), base.decode(z / 0.5))
    ckpt, cfg, _, _ = _write_ldm(tmp_path, extra_yaml="    scale_by_std: true",
                                 extra_state={"scale_factor": torch.tensor(0.7)})
    assert load_prior("compvis-ldm", checkpoint=ckpt, config=cfg).scale_factor == pytest.approx(0.7)
    assert load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, scale_factor=1.0).scale_factor == 1.0


def test_standalone_first_stage_checkpoint_with_loss_weights(tmp_path, tiny_ldm):
    ckpt, cfg, raw, _ = tiny_ldm
    fs = random_state({k[len("first_stage_model."):]: v for k, v in raw.items() if k.startswith("first_stage_model.")}, 9)
    fs["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # vq-f4/model.ckpt carries its GAN loss
    fs["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    fs_path = tmp_path / "vq-f4.ckpt"
    lightning_checkpoint(fs, fs_path)
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, first_stage_checkpoint=fs_path)
    for k, v in prior.first_stage_model.state_dict().items():
        assert torch.equal(v, fs[k])
    for k, v in prior.model.state_dict().items():
        assert torch.equal(v, raw["model." + k])
    del fs["quant_conv.weight"]
    lightning_checkpoint(fs, fs_path)
    with pytest.raises(CheckpointMismatchError, match="vq-f4.ckpt.*quant_conv.weight"):
        load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, first_stage_checkpoint=fs_path)


def test_mismatches_are_errors(tmp_path, tiny_ldm):
    ckpt, cfg, raw, _ = tiny_ldm
    # a key nobody expects (e.g. a conditional model's encoder)
    bad, bad_cfg, _, _ = _write_ldm(tmp_path, extra_state={"cond_stage_model.transformer.w": torch.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: cond_stage_model.transformer.w"):
        load_prior("compvis-ldm", checkpoint=bad, config=bad_cfg)
    # no EMA in the file
    no_ema, no_ema_cfg, _, _ = _write_ldm(tmp_path, ema=False)
    load_prior("compvis-ldm", checkpoint=no_ema, config=no_ema_cfg)
    with pytest.raises(CheckpointMismatchError, match="no EMA weights"):
        load_prior("compvis-ldm", checkpoint=no_ema, config=no_ema_cfg, weights="ema")
    # a YAML whose schedule disagrees with the checkpoint's buffers
    other = tmp_path / "other.yaml"
    other.write_text(cfg.read_text().replace("linear_end: 0.0195", "linear_end: 0.012"))
    with pytest.raises(CheckpointMismatchError, match="alphas_cumprod"):
        load_prior("compvis-ldm", checkpoint=ckpt, config=other)
    # a YAML of another architecture
    wider = tmp_path / "wider.yaml"
    wider.write_text(cfg.read_text().replace("model_channels: 32", "model_channels: 64"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_prior("compvis-ldm", checkpoint=ckpt, config=wider)
    assert str(ckpt) in str(err.value) and "model.diffusion_model." in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match="missing.yaml"):
        load_prior("compvis-ldm", checkpoint=ckpt, config=tmp_path / "missing.yaml")


def test_unsupported_configs_are_refused(tmp_path):
    cond = tiny_ldm_yaml().replace("cond_stage_config: __is_unconditional__",
                                   "cond_stage_config:\n      target: ldm.modules.encoders.modules.ClassEmbedder")
    with pytest.raises(LDMConfigError, match="conditional"):
        read_ldm_config(cond)
    with pytest.raises(LDMConfigError, match="LatentDiffusion"):
        read_ldm_config(tiny_ldm_yaml().replace("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.DDPM"))
    with pytest.raises(LDMConfigError, match="use_spatial_transformer"):
        read_ldm_config(tiny_ldm_yaml().replace("num_head_channels: 16", "num_head_channels: 16\n        use_spatial_transformer: true"))


def test_malicious_ldm_checkpoint_is_refused(tmp_path, tiny_ldm):
    import os

    _, cfg, raw, _ = tiny_ldm
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": raw, "callbacks": {"x": Evil()}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_prior("compvis-ldm", checkpoint=path, config=cfg)
    assert not marker.exists()


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_ldm_prior_runs_dps(tiny_ldm, weights):
    ckpt, cfg, _, _ = tiny_ldm
    prior = load_prior("compvis-ldm", checkpoint=ckpt, config=cfg, weights=weights)
    shape = (3, 16, 16)
    d = math.prod(shape)
    op = MatrixOperator(torch.randn(16, d, generator=torch.Generator().manual_seed(0)) / d**0.5, shape)
    y = op(torch.rand(2, *shape) * 2 - 1)
    result = dps(prior, op, y, shape=shape, steps=3, guidance_scale=0.5, seeds=[0, 1])
    assert result.x.shape == (2, *shape) and result.state.shape == (2, 3, 8, 8)
    assert torch.isfinite(result.x).all()


def test_convert_command_and_solve_with_the_folder(tmp_path, tiny_ldm):
    """A user's LDM checkpoint through the command line: convert, then solve with --model."""
    from click.testing import CliRunner

    from diffstategrad.cli import main

    ckpt, yaml_path, _, _ = tiny_ldm
    folder = tmp_path / "ldm"
    r = CliRunner().invoke(main, ["convert", "compvis-ldm", str(ckpt), str(folder), "--config", str(yaml_path)])
    assert r.exit_code == 0, r.output
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    again = CliRunner().invoke(main, ["convert", "compvis-ldm", str(ckpt), str(folder), "--config", str(yaml_path)])
    assert again.exit_code != 0 and "error:" in again.output  # no silent overwrite
    assert load_prior("converted", folder).kind == "latent"
    out = tmp_path / "solve"
    r = CliRunner().invoke(main, ["solve", "--task", "box_inpainting", "--solver", "psld", "--model", str(folder), "--steps", "3",
                                  "--size", "32", "--out", str(out), "--quiet"])
    # the tiny LDM has random weights: its reconstruction may be judged diverged (exit 3), but it must run and write
    assert r.exit_code in (0, 3) and "Traceback" not in r.output, r.output
    assert (out / "reconstruction.png").is_file() and (out / "metrics.json").is_file()
    bad = CliRunner().invoke(main, ["convert", "compvis-ldm", str(tmp_path / "missing.ckpt"), str(tmp_path / "x"), "--config", str(yaml_path)])
    assert bad.exit_code != 0 and "missing.ckpt" in bad.output and "Traceback" not in bad.output

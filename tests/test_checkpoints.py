"""Safe reading, strict matching and the guided-diffusion loader (tiny checkpoints in the real
layout; the full-size architectures on the meta device only)."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys

import pytest
import torch
from torch import nn

from ckpt_helpers import TINY_ADM_ARGS, adm_to_diffusers, fake_lightning_modules, lightning_checkpoint, random_state
from diffstategrad.operators.base import MatrixOperator
from diffstategrad.priors import load_prior
from diffstategrad.storage import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    OpaqueObject,
    RestrictedUnpickler,
    UnsafeCheckpointError,
    build_on_meta,
    load_into,
    load_state_dict_file,
    match_state_dict,
    read_checkpoint,
    read_state_dict,
)
from diffstategrad.priors.guided_diffusion import (
    GUIDED_DIFFUSION_PRESETS,
    AttentionBlock,
    GuidedDiffusionPrior,
    UNetModel,
    guided_diffusion_unet_config,
)
from diffstategrad.schedules import make_schedule
from diffstategrad.solvers import dps


def _signature(state) -> str:
    return hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]


def _tiny_state(seed=0, **overrides):
    cfg = guided_diffusion_unet_config(**{**TINY_ADM_ARGS, **overrides})
    return cfg, random_state(build_on_meta(UNetModel, **cfg).state_dict(), seed)


@pytest.fixture(scope="module")
def tiny_gd(tmp_path_factory):
    """A tiny guided-diffusion checkpoint: a plain state_dict, as ffhq_10m.pt."""
    path = tmp_path_factory.mktemp("gd") / "tiny_adm.pt"
    cfg, state = _tiny_state()
    torch.save(state, path)
    return path, cfg, state


class _Evil:
    """A pickle payload that would create a marker file if it ever ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# Reading files safely
# ---------------------------------------------------------------------------------------------


def test_plain_state_dict_is_read_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "plain.pt"
    torch.save({"a.weight": torch.randn(2, 3), "b": torch.arange(4)}, path)

    def refuse(self, module, name):  # the restricted fallback must not even be needed
        raise AssertionError("fallback used")

    monkeypatch.setattr(RestrictedUnpickler, "find_class", refuse)
    state = read_state_dict(path)
    assert set(state) == {"a.weight", "b"} and state["b"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_lightning_metadata_becomes_inert(tmp_path, legacy):
    path = tmp_path / "light.ckpt"
    weights = {"model.w": torch.randn(3)}
    if legacy:
        with fake_lightning_modules() as cls:
            torch.save({"state_dict": weights, "callbacks": {cls: {"best": torch.tensor(1.0)}}}, path,
                       _use_new_zipfile_serialization=False)
    else:
        lightning_checkpoint(weights, path)
    assert "pytorch_lightning" not in sys.modules
    ckpt = read_checkpoint(path)
    assert "pytorch_lightning" not in sys.modules  # never imported
    assert torch.equal(ckpt["state_dict"]["model.w"], weights["model.w"])
    (key,) = ckpt["callbacks"]
    assert issubclass(key, OpaqueObject) and "ModelCheckpoint" in key._global_name
    if not legacy:
        assert isinstance(ckpt["hparams"], OpaqueObject) and ckpt["global_step"] == 34567
    assert torch.equal(read_state_dict(path)["model.w"], weights["model.w"])  # unwraps state_dict


@pytest.mark.parametrize("layout", ["lightning-zip", "plain-zip", "torch-legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, layout):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "extra": _Evil(marker)}
    if layout == "lightning-zip":
        torch.save(payload, path)
    elif layout == "plain-zip":
        torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    elif layout == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({"x": _Evil(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="system") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_prior("guided-diffusion", checkpoint=path, **TINY_ADM_ARGS)
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins_that_run_code(tmp_path):
    for name in ("eval", "exec", "getattr", "__import__"):
        data = b"\x80\x02cbuiltins\n" + name.encode() + b"\nX\x01\x00\x00\x001\x85R."
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(UnsafeCheckpointError, match=name):
            read_checkpoint(path)


def test_missing_empty_truncated_and_wrong_format_files(tmp_path, tiny_gd):
    src, _, _ = tiny_gd
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load_prior("guided-diffusion", checkpoint=tmp_path / "nope.pt", preset="ffhq256")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        read_checkpoint(empty)
    data = src.read_bytes()
    for name, cut in (("half.pt", len(data) // 2), ("tail.pt", len(data) - 40)):
        bad = tmp_path / name
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as err:
            load_prior("guided-diffusion", checkpoint=bad, **TINY_ADM_ARGS)
        assert name in str(err.value)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(100)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pt").write_bytes(legacy.read_bytes()[:300])
    with pytest.raises(CheckpointFormatError, match="legacy_cut.pt"):
        read_checkpoint(tmp_path / "legacy_cut.pt")
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch"):
        read_checkpoint(yaml_file)
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, str(st))
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-20])
    with pytest.raises(CheckpointFormatError, match="cut.safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")
    assert torch.equal(read_checkpoint(st)["w"], torch.zeros(64))


def test_files_that_are_not_state_dicts(tmp_path):
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(CheckpointFormatError, match="not a dict"):
        read_state_dict(lst)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 3}, mixed)
    with pytest.raises(CheckpointFormatError, match="step"):
        read_state_dict(mixed)


# ---------------------------------------------------------------------------------------------
# Strict matching
# ---------------------------------------------------------------------------------------------


def test_match_state_dict_names_file_and_first_offending_keys():
    expected = {f"layer{i}.weight": torch.empty(2, 2, device="meta") for i in range(8)}
    found = {f"layer{i}.weight": torch.zeros(2, 2) for i in range(1, 8)}
    found["layer3.weight"] = torch.zeros(3, 2)
    found["extra.weight"] = torch.zeros(1)
    found["loss.discriminator.w"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        match_state_dict(expected, found, source="some/file.ckpt", what="net", ignore_prefixes=["loss."])
    msg = str(err.value)
    assert "some/file.ckpt" in msg and "missing keys: layer0.weight (1 in all)" in msg
    assert "unexpected keys: extra.weight" in msg and "layer3.weight (3, 2) (network (2, 2))" in msg
    assert "loss." not in msg  # explicitly ignored
    many = {f"k{i}": torch.zeros(1) for i in range(20)}
    with pytest.raises(CheckpointMismatchError, match=r"k0, k1, k2, k3, k4, \.\.\. \(20 in all\)"):
        match_state_dict({}, many, source="f", what="net")


def test_load_into_meta_module_casts_and_leaves_nothing_random(tmp_path):
    net = build_on_meta(lambda: nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)))
    assert all(p.is_meta for p in net.parameters())
    state = {k: torch.randn(v.shape, dtype=torch.float16) for k, v in net.state_dict().items()}
    load_into(net, state, source="x.pt", what="net")
    for k, v in net.state_dict().items():
        assert v.dtype == torch.float32 and not v.is_meta and torch.equal(v, state[k].float())
    state["0.weight"] += 1  # the module owns its copies
    assert not torch.equal(net[0].weight, state["0.weight"].float())


def test_load_state_dict_file_strips_dataparallel_prefix(tmp_path):
    """The shared entry point for single-network files (e.g. bkse's GOPRO_wVAE.pth)."""
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    path = tmp_path / "net.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    net = build_on_meta(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert all(p.is_meta for p in net.parameters())
    load_state_dict_file(net, path, what="test net", strip_prefixes=["module."])
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(net(x), ref(x))
    wrong = build_on_meta(lambda: nn.Sequential(nn.Conv2d(3, 5, 3)))
    with pytest.raises(CheckpointMismatchError, match="net.pth"):
        load_state_dict_file(wrong, path, what="test net", strip_prefixes=["module."])


# ---------------------------------------------------------------------------------------------
# guided-diffusion: full-size architectures (meta device)
# ---------------------------------------------------------------------------------------------


def test_ffhq256_preset_has_the_published_parameter_count_and_keys():
    unet = build_on_meta(UNetModel, **guided_diffusion_unet_config(**GUIDED_DIFFUSION_PRESETS["ffhq256"]))
    state = unet.state_dict()
    assert sum(v.numel() for v in state.values()) == 93_563_910  # ffhq_10m.pt (DPS / DAPS)
    assert len(state) == 362
    assert list(state)[:2] == ["time_embed.0.weight", "time_embed.0.bias"] and list(state)[-1] == "out.2.bias"
    shapes = {"input_blocks.9.1.qkv.weight": (1536, 512, 1), "time_embed.0.weight": (512, 128),
              "input_blocks.2.0.in_layers.2.weight": (128, 128, 3, 3), "middle_block.1.proj_out.weight": (512, 512, 1),
              "out.2.weight": (6, 128, 3, 3), "input_blocks.0.0.weight": (128, 3, 3, 3)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}
    assert sum(k.startswith("input_blocks.") for k in state) == 122
    assert sum(k.startswith("output_blocks.") for k in state) == 206
    assert _signature(state) == "300de3b2bc75a925"  # the full (name, shape) list, frozen


def test_imagenet256_preset_parameter_count():
    unet = build_on_meta(UNetModel, **guided_diffusion_unet_config(**GUIDED_DIFFUSION_PRESETS["imagenet256"]))
    state = unet.state_dict()
    # 256x256_diffusion_uncond.pt; the ADM paper's 554M for the class-conditional model adds
    # the 1000 x 1024 label embedding: 552,814,086 + 1,024,000 = 553.8M
    assert sum(v.numel() for v in state.values()) == 552_814_086
    assert len(state) == 566 and _signature(state) == "7851a44e799b06ac"
    cond = build_on_meta(UNetModel, **guided_diffusion_unet_config(**{**GUIDED_DIFFUSION_PRESETS["imagenet256"],
                                                                     "class_cond": True}))
    assert sum(p.numel() for p in cond.parameters()) - 552_814_086 == 1000 * 1024


def test_create_model_argument_translation():
    cfg = guided_diffusion_unet_config(**GUIDED_DIFFUSION_PRESETS["ffhq256"])
    assert cfg["channel_mult"] == [1, 1, 2, 2, 4, 4] and cfg["attention_resolutions"] == [16]
    assert cfg["out_channels"] == 6 and cfg["num_classes"] is None
    cfg = guided_diffusion_unet_config(image_size=64, num_channels=64, num_res_blocks=2, attention_resolutions="32,16,8")
    assert cfg["channel_mult"] == [1, 2, 3, 4] and cfg["attention_resolutions"] == [2, 4, 8] and cfg["out_channels"] == 3
    assert guided_diffusion_unet_config(image_size=32, num_channels=32, num_res_blocks=1,
                                        channel_mult=(1, 2))["channel_mult"] == [1, 2]
    with pytest.raises(TypeError, match="num_res_blocks"):
        guided_diffusion_unet_config(image_size=256, num_channels=128)
    with pytest.raises(TypeError, match="unknown"):
        guided_diffusion_unet_config(image_size=256, num_channels=128, num_res_blocks=1, num_channel=3)


# ---------------------------------------------------------------------------------------------
# guided-diffusion: tiny checkpoints
# ---------------------------------------------------------------------------------------------


def test_tiny_guided_checkpoint_loads_strictly_and_deterministically(tiny_gd):
    path, cfg, state = tiny_gd
    prior = load_prior("guided-diffusion", checkpoint=path, **TINY_ADM_ARGS)
    assert isinstance(prior, GuidedDiffusionPrior) and prior.learned_variance
    for k, v in prior.unet.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(prior.schedule.alphas_cumprod, make_schedule("linear", 1000).alphas_cumprod)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 499, 999])
    with torch.no_grad():
        eps, v = prior.eps_and_variance(x, t)
        again = prior.eps(x, t)
        alone = prior.eps(x[1:2], 499)
    assert eps.shape == v.shape == (3, 3, 32, 32) and torch.isfinite(eps).all()
    assert torch.equal(eps, again)
    torch.testing.assert_close(alone, eps[1:2], atol=1e-5, rtol=1e-5)  # no coupling across the batch
    prior.check_size(64, 96)
    with pytest.raises(ValueError, match="multiples of 2"):
        prior.check_size(33, 32)
    assert "trained at 32x32" in prior.size_rule()


@pytest.mark.parametrize("variant", [{}, {"use_new_attention_order": True},
                                     {"resblock_updown": False, "use_scale_shift_norm": False}],
                         ids=["legacy-updown-scaleshift", "new-order", "conv-resample-add"])
def test_guided_unet_matches_diffusers_unet2dmodel(tmp_path, variant):
    """Second, independent forward path: diffusers' UNet2DModel with the same weights."""
    diffusers = pytest.importorskip("diffusers")
    cfg, state = _tiny_state(seed=3, **variant)
    path = tmp_path / "v.pt"
    torch.save(state, path)
    prior = load_prior("guided-diffusion", checkpoint=path, **{**TINY_ADM_ARGS, **variant})
    kwargs, theirs = adm_to_diffusers(state, cfg)
    ref = diffusers.UNet2DModel(**kwargs)
    ref.load_state_dict(theirs, strict=True)  # every diffusers tensor comes from the ADM file
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([7, 640])
    with torch.no_grad():
        eps, v = prior.eps_and_variance(x, t)
        out = ref.eval()(x, t).sample
    torch.testing.assert_close(eps, out[:, :3], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(v, out[:, 3:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_head_layout_by_hand(new_order):
    """The qkv channel layout of guided-diffusion's two attention orders, computed by hand."""
    torch.manual_seed(0)
    C, H, T = 64, 4, 9
    block = AttentionBlock(C, num_heads=H, use_new_attention_order=new_order)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, C, 3, 3)
    qkv = block.qkv(block.norm(x.reshape(2, C, T)))  # (B, 3C, T)
    d = C // H
    heads = []
    for h in range(H):
        if new_order:  # [q (all heads) | k | v]
            q, k, v = (qkv[:, i * C + h * d: i * C + (h + 1) * d] for i in range(3))
        else:  # per head: [q_h | k_h | v_h]
            q, k, v = (qkv[:, h * 3 * d + i * d: h * 3 * d + (i + 1) * d] for i in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", w, v))
    expected = x + block.proj_out(torch.cat(heads, dim=1)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_presets_and_explicit_arguments(tiny_gd, tmp_path):
    path, _, _ = tiny_gd
    with pytest.raises(CheckpointMismatchError) as err:  # a tiny file is not ffhq_10m.pt
        load_prior("guided-diffusion", checkpoint=path, preset="ffhq256")
    assert str(path) in str(err.value) and "missing keys" in str(err.value)
    with pytest.raises(ValueError, match="unknown guided-diffusion preset"):
        load_prior("guided-diffusion", checkpoint=path, preset="ffhq1024")
    # explicit arguments override a preset's values
    prior = load_prior("guided-diffusion", checkpoint=path, preset="ffhq256", image_size=32, num_channels=32,
                       channel_mult="1,2", num_head_channels=16)
    assert prior.unet.config["model_channels"] == 32
    with pytest.raises(CheckpointMismatchError, match="qkv"):  # wrong attention placement
        load_prior("guided-diffusion", checkpoint=path, **{**TINY_ADM_ARGS, "attention_resolutions": "32"})


def test_class_conditional_checkpoint_needs_a_label(tmp_path):
    cfg, state = _tiny_state(seed=5, class_cond=True)
    assert state["label_emb.weight"].shape == (1000, 128)
    path = tmp_path / "cond.pt"
    torch.save(state, path)
    args = {**TINY_ADM_ARGS, "class_cond": True}
    with pytest.raises(ValueError, match="class_label"):
        load_prior("guided-diffusion", checkpoint=path, **args)
    a = load_prior("guided-diffusion", checkpoint=path, class_label=3, **args)
    b = load_prior("guided-diffusion", checkpoint=path, class_label=4, **args)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a.eps(x, 10), b.eps(x, 10))


def test_guided_prior_runs_dps_with_learned_variance(tiny_gd):
    path, _, _ = tiny_gd
    prior = load_prior("guided-diffusion", checkpoint=path, **TINY_ADM_ARGS)
    shape = (3, 32, 32)
    d = math.prod(shape)
    op = MatrixOperator(torch.randn(24, d, generator=torch.Generator().manual_seed(0)) / d**0.5, shape)
    y = op(torch.rand(1, *shape) * 2 - 1)
    seen = []
    result = dps(prior, op, y, shape=shape, steps=3, guidance_scale=0.5, seeds=[0],
                 callback=lambda info: seen.append(info["t"]))
    assert result.x.shape == (1, *shape) and torch.isfinite(result.x).all()
    assert seen == [999, 500, 0]
    again = dps(prior, op, y, shape=shape, steps=3, guidance_scale=0.5, seeds=[0])
    assert torch.equal(result.x, again.x)

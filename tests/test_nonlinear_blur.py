"""The bkse KernelWizard operator: checkpoint layout, strict loading, forward, derivatives;
and the built-in stand-in network: its shapes, shipped weights, blur-likeness and the preset.

No bkse weights are needed: a small random network in the real key layout is saved to a
temporary .pth and loaded through the operator's own loader.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffstategrad.operators import (
    KernelWizard,
    KernelWizardConfig,
    NonlinearBlur,
    load_builtin_kernel_wizard,
    load_kernel_wizard,
    load_task,
    resolve_bkse_weights,
    resolve_blur_network,
)
from diffstategrad.operators.kernels import motion_blur_kernel
from diffstategrad.operators.nonlinear_blur import (
    BKSE_WEIGHTS_ENV,
    KernelWizardMismatchError,
    KernelWizardWeightsError,
    builtin_kernel_wizard_dir,
    kernel_code,
)
from diffstategrad.train_blur import BUILTIN_CONFIG, fit_blur_kernel, linear_light_blur

TINY = KernelWizardConfig(nf=8, front_blocks=2, back_blocks=2, kernel_dim=16, extractor_blocks=1)


def test_real_layout_matches_bkse():
    """The generate_blur/default.yml network: key names and shapes as bkse's own KernelWizard.

    The digest is of "key:shape" for every state_dict entry, in order, computed from bkse's code
    (VinAIResearch/blur-kernel-space-exploring at f2fe73e) built with that options file.
    """
    with torch.device("meta"):
        net = KernelWizard(KernelWizardConfig())
    state = net.state_dict()
    assert len(state) == 159
    assert sum(v.numel() for v in state.values()) == 115_265_475
    layout = ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert hashlib.sha256(layout.encode()).hexdigest() == "94c5e4075175b50b493bbe23942f7c7b95c8fe2b84902180ee15c4f816a19084"
    assert tuple(state["adapter.model.submodule.submodule.submodule.submodule.up.1.weight"].shape) == (1024, 512, 4, 4)
    assert tuple(state["kernel_extractor.model.22.conv_block.5.weight"].shape) == (1024, 1024, 3, 3)


def test_config_from_bkse_options():
    options = {"input_nc": 3, "nf": 64, "front_RBs": 10, "back_RBs": 20, "N_frames": 1, "kernel_dim": 512,
               "use_vae": True, "KernelExtractor": {"norm": "none", "use_sharp": True, "n_blocks": 4,
                                                     "padding_type": "reflect", "use_dropout": False},
               "Adapter": {"norm": "none", "use_dropout": False}}
    assert KernelWizardConfig.from_bkse_options(options) == KernelWizardConfig()
    options["Adapter"]["norm"] = "batch"
    with pytest.raises(NotImplementedError, match="Adapter.norm"):
        KernelWizardConfig.from_bkse_options(options)


def _random_state(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in KernelWizard(config).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        # weak enough that most outputs stay inside the clamp
        state[key] = torch.randn(shape, generator=gen) / fan_in**0.5 * (0.05 if key.endswith("bias") else 0.5)
    return state


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny_kernel_wizard.pth"
    state = _random_state(TINY)
    torch.save(state, path)
    return path, state


def _reference_adapt_kernel(state, x, code, nf, front, back):
    """bkse's adaptKernel written functionally from the state_dict (an independent forward)."""
    def conv(h, prefix, stride=1, padding=1):
        return F.conv2d(h, state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), stride=stride, padding=padding)

    def res_block(h, prefix):
        return h + conv(F.relu(conv(h, f"{prefix}.conv1")), f"{prefix}.conv2")

    lrelu = lambda h: F.leaky_relu(h, 0.1)  # noqa: E731
    h = lrelu(conv(x, "feature_extractor.0"))
    h = lrelu(conv(h, "feature_extractor.2", stride=2))
    h = lrelu(conv(h, "feature_extractor.4", stride=2))
    for i in range(front):
        h = res_block(h, f"feature_extractor.{6 + i}")

    # U-Net: outermost down, 3 middle levels, innermost; skips carry leaky_relu(x, 0.2)
    prefixes = ["adapter.model" + ".submodule" * depth for depth in range(5)]

    def level(h, depth):
        p = prefixes[depth]
        if depth == 0:
            inner = F.conv2d(h, state[f"{p}.down.0.weight"], stride=2, padding=1)
            out = F.conv_transpose2d(F.relu(level(inner, 1)), state[f"{p}.up.1.weight"], state[f"{p}.up.1.bias"],
                                     stride=2, padding=1)
            return torch.tanh(out)
        skip = F.leaky_relu(h, 0.2)
        inner = F.conv2d(skip, state[f"{p}.down.1.weight"], stride=2, padding=1)
        middle = torch.cat((inner, code), 1) if depth == 4 else level(inner, depth + 1)
        up = F.conv_transpose2d(F.relu(middle), state[f"{p}.up.1.weight"], stride=2, padding=1)
        return torch.cat((up, skip), 1)

    h = level(h, 0)
    for i in range(back):
        h = res_block(h, f"recon_trunk.{i}")
    h = lrelu(F.pixel_shuffle(conv(h, f"recon_trunk.{back}"), 2))
    h = lrelu(F.pixel_shuffle(conv(h, f"recon_trunk.{back + 3}"), 2))
    h = lrelu(conv(h, f"recon_trunk.{back + 6}"))
    return conv(h, f"recon_trunk.{back + 8}") + x


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (128, 256)])
def test_operator_matches_independent_forward(tiny_checkpoint, size):
    path, state = tiny_checkpoint
    op = NonlinearBlur(load_kernel_wizard(path, TINY))
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = (size[0] // 128, size[1] // 128)
    code = torch.from_numpy(1.2 * np.random.RandomState(0).randn(1, 64, *grid)).float().expand(2, -1, -1, -1)
    expected = (_reference_adapt_kernel(state, (x + 1) / 2, code, nf=8, front=2, back=2) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        got = op(x)
    assert got.shape == x.shape
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    assert not torch.allclose(got, x, atol=1e-2)  # it does something
    assert float((got.abs() == 1).float().mean()) < 0.1
    # per-sample independence (up to float32 rounding of batched convolutions)
    with torch.no_grad():
        assert torch.allclose(op(x[1:]), got[1:], atol=1e-5)


def test_official_code_at_256_and_global_numpy_state():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    code = kernel_code(512, (2, 2))
    assert np.array_equal(np.random.get_state()[1], before)  # the global RNG is untouched
    np.random.seed(0)
    assert np.array_equal(code.numpy(), np.random.randn(1, 512, 2, 2) * 1.2)


def test_checkpoint_prefix_and_mismatch_errors(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    net = load_kernel_wizard(prefixed, TINY)
    assert torch.equal(net.state_dict()["recon_trunk.10.weight"], state["recon_trunk.10.weight"])
    assert not any(p.requires_grad for p in net.parameters())

    broken = dict(state)
    del broken["feature_extractor.0.weight"]
    broken["feature_extractor.0.weight_extra"] = torch.zeros(1)
    broken["recon_trunk.10.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    with pytest.raises(KernelWizardMismatchError) as info:
        load_kernel_wizard(bad, TINY)
    message = str(info.value)
    assert "missing keys: feature_extractor.0.weight" in message
    assert "unexpected keys: feature_extractor.0.weight_extra" in message
    assert "recon_trunk.10.bias (5,) (network (3,))" in message and str(bad) in message
    # a tiny checkpoint against the real architecture: many keys, only the first few listed
    with pytest.raises(KernelWizardMismatchError, match=r"\(\d+ in all\)"):
        load_kernel_wizard(path)

    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(KernelWizardWeightsError, match="not a dict of tensors"):
        load_kernel_wizard(not_a_state, TINY)


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(BKSE_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_bkse_weights()
    message = str(info.value)
    assert str(tmp_path / ".cache" / "diffstategrad" / "bkse" / "GOPRO_wVAE.pth") in message
    assert "drive.google.com" in message and BKSE_WEIGHTS_ENV in message
    monkeypatch.setenv(BKSE_WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        NonlinearBlur.from_checkpoint()
    with pytest.raises(FileNotFoundError, match="given.pth"):
        NonlinearBlur.from_checkpoint(tmp_path / "given.pth")


def test_weights_lookup_order(tiny_checkpoint, tmp_path, monkeypatch):
    path, _ = tiny_checkpoint
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(BKSE_WEIGHTS_ENV, str(path))
    assert resolve_bkse_weights() == path
    assert resolve_bkse_weights(str(path)) == path
    monkeypatch.delenv(BKSE_WEIGHTS_ENV)
    cached = tmp_path / ".cache" / "diffstategrad" / "bkse" / "GOPRO_wVAE.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    assert resolve_bkse_weights() == cached


def test_image_size_checks(tiny_checkpoint):
    path, _ = tiny_checkpoint
    op = NonlinearBlur(load_kernel_wizard(path, TINY))
    for size in [(64, 64), (200, 200), (128, 192)]:
        with pytest.raises(ValueError, match="multiples of 128"):
            op(torch.zeros(1, 3, *size))
    with pytest.raises(ValueError, match="3-channel"):
        op(torch.zeros(1, 2, 128, 128))


def test_a_gray_image_is_blurred_as_its_gray_rgb_image(tiny_checkpoint):
    path, _ = tiny_checkpoint
    op = NonlinearBlur(load_kernel_wizard(path, TINY))
    gray = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op(gray)
    assert y.shape == (2, 1, 128, 128)
    rgb = op.network.adapt_kernel((gray.repeat(1, 3, 1, 1) + 1) / 2, op.code_for(gray))
    torch.testing.assert_close(y, (rgb.mean(1, keepdim=True) * 2 - 1).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_finite_differences(tiny_checkpoint):
    path, _ = tiny_checkpoint
    op = NonlinearBlur(load_kernel_wizard(path, TINY)).double()
    gen = torch.Generator().manual_seed(4)
    # small inputs keep the output inside (-1, 1), away from the clamp
    x = (torch.rand(1, 3, 128, 128, generator=gen, dtype=torch.float64) - 0.5) * 0.2
    x.requires_grad_(True)
    y = op(x)
    assert y.abs().max() < 0.999
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        fd = ((op(x + eps * d) - op(x - eps * d)) * w).sum() / (2 * eps)
    assert abs(float(fd - (grad * d).sum())) < 1e-6 * max(1.0, abs(float(fd)))


def test_preset_builds_with_weights(tiny_checkpoint, tmp_path, monkeypatch):
    """The preset's weights field reaches the loader; with the real layout required, a tiny
    checkpoint is rejected by name (the preset never falls back to random weights)."""
    from diffstategrad.operators import load_task

    path, _ = tiny_checkpoint
    with pytest.raises(KernelWizardMismatchError, match=str(path.name)):
        load_task("nonlinear_deblur", overrides={"operator.weights": str(path)}).build((3, 256, 256))


# ---------------------------------------------------------------------------------------------
# The built-in stand-in network (weights shipped in diffstategrad/weights/kernel_wizard/)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin():
    return load_builtin_kernel_wizard()


@pytest.fixture(scope="module")
def photo():
    """The bundled grace_hopper example at 64x64 in [-1, 1] (never a training image)."""
    from diffstategrad.images import load_example

    return load_example("grace_hopper", 64)


@pytest.fixture
def no_bkse(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(BKSE_WEIGHTS_ENV, raising=False)
    return tmp_path


def test_default_config_is_bkse_and_size_rule():
    assert KernelWizardConfig().adapter_levels == 5 and KernelWizardConfig().tail_nf == 64
    assert KernelWizardConfig().size_multiple == 128 and KernelWizardConfig().code_channels == 512
    assert BUILTIN_CONFIG.size_multiple == 32 and BUILTIN_CONFIG.code_channels == BUILTIN_CONFIG.kernel_dim
    with pytest.raises(ValueError, match="adapter_levels"):
        KernelWizardConfig(adapter_levels=1)


@pytest.mark.parametrize("size,grid", [((64, 64), (2, 2)), ((128, 128), (4, 4)), ((64, 96), (2, 3))])
def test_builtin_shapes(builtin, size, grid):
    network, _ = builtin
    assert network.code_grid(size) == grid
    op = NonlinearBlur(network)
    x = torch.zeros(2, 3, *size)
    assert op.code_for(x).shape == (2, network.config.code_channels, *grid)
    with torch.no_grad():
        assert op(x).shape == x.shape
    mean, sigma = network(x[:1] + 0.5, x[:1] + 0.5)
    assert mean.shape == sigma.shape == (1, network.config.code_channels, *grid)
    with pytest.raises(ValueError, match="multiples of 32"):
        op(torch.zeros(1, 3, 48, 48))


def test_builtin_weights_load_strictly(builtin):
    from safetensors.torch import load_file

    from diffstategrad.priors.builtin import list_builtin

    network, record = builtin
    folder = builtin_kernel_wizard_dir()
    state = load_file(str(folder / "model.safetensors"))
    assert set(state) == set(network.state_dict()) and all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    assert (folder / "model.safetensors").stat().st_size < 6 * 2**20
    assert KernelWizardConfig.from_dict(record["config"]) == network.config == BUILTIN_CONFIG
    info = record["info"]
    assert info["parameters"] == sum(p.numel() for p in network.parameters())
    assert set(info["data"]["held_out_images"]).isdisjoint(info["data"]["train_images"])
    assert info["training"]["steps"] > 0 and info["training"]["command"].startswith("python -m diffstategrad.train_blur train")
    assert not any(p.requires_grad for p in network.parameters())
    assert "kernel_wizard" not in [m["name"] for m in list_builtin()]  # not mistaken for a diffusion prior


def test_builtin_folder_mismatch(builtin, tmp_path):
    from diffstategrad.operators.nonlinear_blur import read_kernel_wizard_folder, save_kernel_wizard_folder

    network, _ = builtin
    folder = save_kernel_wizard_folder(network, tmp_path / "copy", {"name": "copy"})
    again, record = read_kernel_wizard_folder(folder)
    assert record["info"] == {"name": "copy"} and torch.equal(again.recon_trunk[-1].weight, network.recon_trunk[-1].weight)
    source = resolve_blur_network(str(folder))  # a folder as operator.weights: its own configuration
    assert source.kind == "folder" and not source.builtin and source.config() == network.config
    params = load_task("nonlinear_deblur", {"operator.weights": str(folder)}).operator_params((64, 64))
    assert params["weights"] == str(folder) and params["code_grid"] == (2, 2)
    record = json.loads((folder / "kernel_wizard.json").read_text())
    record["config"]["nf"] = 16
    (folder / "kernel_wizard.json").write_text(json.dumps(record))
    with pytest.raises(KernelWizardMismatchError, match="mis-shaped keys"):
        read_kernel_wizard_folder(folder)


def _psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_builtin_operator_is_a_blur(builtin, photo):
    """The fixed-code operator changes the image, and one blur kernel explains that change far
    better than the identity does: A(x) is close to a linear blur of x."""
    op = NonlinearBlur(builtin[0])
    x01 = (photo + 1) / 2
    with torch.no_grad():
        y01 = (op(photo) + 1) / 2
    change = _psnr(y01, x01)
    kernel, fit = fit_blur_kernel(x01, y01, 17)
    assert change < 25  # it does something (19.2 dB)
    assert _psnr(fit, y01) > change + 5  # a blur of x, not x
    assert float(kernel.sum()) == pytest.approx(1.0, abs=0.15)  # brightness kept, as a blur does
    # high frequencies are damped: the Laplacian energy drops (to ~0.75 here; a real 17x17
    # motion blur takes it to ~0.03: the stand-in is a mild blur, see docs/models.md)
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)
    energy = lambda im: float(F.conv2d(im, lap, groups=3).pow(2).mean())  # noqa: E731
    assert energy(y01) < 0.85 * energy(x01)


def test_builtin_reproduces_a_real_motion_blur(builtin, photo):
    """G(x, F(x, y)) for a real motion blur y of a test image is closer to y than x is."""
    network, _ = builtin
    x01 = (photo + 1) / 2
    kernel = torch.from_numpy(motion_blur_kernel(17, 0.5, np.random.default_rng(7))).float()
    y01 = linear_light_blur(x01, kernel[None])
    with torch.no_grad():
        fake, _, _ = network.reconstruct(x01, y01)
    assert _psnr(fake.clamp(0, 1), y01) > _psnr(x01, y01) + 2.5  # 18.2 dB against 14.5 dB


def test_builtin_batch_independence(builtin, photo):
    op = NonlinearBlur(builtin[0])
    x = torch.cat([photo, photo.flip(-1), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1])
    with torch.no_grad():
        batched = op(x)
        alone = torch.cat([op(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_preset_uses_builtin_without_bkse_weights(no_bkse, photo):
    problem = load_task("nonlinear_deblur").build((3, 64, 64), seeds=[0])
    assert problem.params["weights"] == "builtin" and "no bkse weights" in problem.params["network"]
    assert "built-in KernelWizard stand-in" in repr(problem.operator)
    y = problem.measure(photo)
    assert y.shape == photo.shape and torch.isfinite(y).all()
    assert _psnr((y + 1) / 2, (photo + 1) / 2) < 25  # 19.2 dB: it changes the image
    two = load_task("nonlinear_deblur").build((3, 64, 64), seeds=[0, 1])
    x = torch.cat([photo, photo.flip(-2)])
    assert torch.allclose(two.measure(x)[:1], y, atol=1e-5)  # sample 0 alone or in a batch
    # differentiable in x (what the solvers need)
    x = photo.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.operator(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_weights_choice(no_bkse, tiny_checkpoint, monkeypatch):
    """builtin on request; the official file when present (here a tiny stand-in for it, which the
    real layout rejects by name: proof that it was the file that got loaded)."""
    path, _ = tiny_checkpoint
    assert resolve_blur_network("builtin").builtin
    assert resolve_blur_network().builtin
    cached = no_bkse / ".cache" / "diffstategrad" / "bkse" / "GOPRO_wVAE.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    source = resolve_blur_network()
    assert source.kind == "bkse" and source.path == cached
    with pytest.raises(ValueError, match="multiples of 128.*weights: builtin"):
        load_task("nonlinear_deblur").build((3, 64, 64), seeds=[0])
    with pytest.raises(KernelWizardMismatchError, match="GOPRO_wVAE.pth"):
        load_task("nonlinear_deblur").build((3, 256, 256), seeds=[0])
    assert load_task("nonlinear_deblur", {"operator.weights": "builtin"}).operator_params((64, 64))["weights"] == "builtin"
    monkeypatch.setenv(BKSE_WEIGHTS_ENV, str(no_bkse / "missing.pth"))  # asked for, absent: an error
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_task("nonlinear_deblur").build((3, 256, 256), seeds=[0])

"""Training the built-in KernelWizard: synthetic pairs (train split only, linear-light motion
blur), bkse's objective and its two stages, exact resume, export with its record."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffstategrad.operators.blur import Blur
from diffstategrad.operators.nonlinear_blur import NonlinearBlur, read_kernel_wizard_folder
from diffstategrad.train_blur import (
    TINY_CONFIG,
    BlurPairs,
    BlurTrainer,
    blur_settings,
    export_run,
    fit_blur_kernel,
    kernel_wizard_loss,
    linear_light_blur,
    load_network,
    main,
)


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory):
    """A photo folder with train/ and val/ images of different colours (to tell them apart)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, tint in (("train", (1.0, 0.6, 0.3)), ("val", (0.2, 0.5, 1.0))):
        (root / split).mkdir()
        for i in range(2):
            smooth = np.cumsum(np.cumsum(rng.normal(size=(80, 96, 1)), 0), 1)
            smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * np.array(tint)
            Image.fromarray((255 * smooth).astype(np.uint8)).save(root / split / f"{split}{i}.png")
    return root


def _settings(root, steps, **kw):
    return blur_settings(root, config=TINY_CONFIG, crop=64, batch=2, steps=steps, log_every=1, **kw)


def test_linear_light_blur():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(1, 5, 5)
    delta[0, 2, 2] = 1
    assert torch.allclose(linear_light_blur(x, delta), x, atol=1e-5)
    box = torch.full((2, 5, 5), 1 / 25)
    y = linear_light_blur(x, box)
    assert torch.allclose(y, (Blur(box[:, None])(x**2.2)) ** (1 / 2.2), atol=1e-6)
    assert not torch.allclose(y, Blur(box[:, None])(x), atol=1e-3)  # not a blur of the encoded values
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_pairs_are_deterministic_and_from_the_train_split(tiny_photos):
    pairs = BlurPairs(tiny_photos, "train", crop=64, seed=3)
    assert pairs.crops.names == ["train0", "train1"] and pairs.kernel_size == 17
    sharp, blurred = pairs.batch(5, 3)
    again = BlurPairs(tiny_photos, "train", crop=64, seed=3).batch(6, 2)
    assert torch.equal(sharp[1:], again[0]) and torch.equal(blurred[1:], again[1])
    assert sharp.shape == blurred.shape == (3, 3, 64, 64) and float(sharp.min()) >= 0
    assert float(sharp[:, 0].mean()) > float(sharp[:, 2].mean())  # the train tint, never the val one
    assert not torch.allclose(sharp, blurred, atol=1e-2)
    k = pairs.kernel(5)
    assert k.shape == (17, 17) and abs(k.sum() - 1) < 1e-9 and np.array_equal(k, pairs.kernel(5))


def test_loss_parts_and_stages(tiny_photos, tmp_path):
    trainer = BlurTrainer(_settings(tiny_photos, steps=10), tmp_path / "run", echo=lambda m: None)
    assert trainer.kl_weight_at(0) is None and trainer.kl_weight_at(2) is None  # deterministic stage
    assert trainer.kl_weight_at(3) == 0.0 and trainer.kl_weight_at(4) == pytest.approx(5.0)
    assert trainer.kl_weight_at(5) == trainer.kl_weight_at(9) == 10.0
    sharp, blurred = trainer.pairs.batch(0, 2)
    noise = torch.randn(2, TINY_CONFIG.code_channels, 2, 2)
    loss, parts = kernel_wizard_loss(trainer.model, sharp, blurred, noise, 10.0)
    assert float(loss.detach()) == pytest.approx(parts["pixel"] + parts["kl"], rel=1e-5) and parts["kl"] > 0
    _, deterministic = kernel_wizard_loss(trainer.model, sharp, blurred, None, 0.0)
    assert deterministic["kl"] == 0.0


def test_refuses_untrainable_configs(tiny_photos):
    from diffstategrad.operators import KernelWizardConfig

    with pytest.raises(ValueError, match="extractor_blocks"):
        blur_settings(tiny_photos, config=KernelWizardConfig(nf=8, kernel_dim=32, adapter_levels=3, extractor_blocks=0))
    with pytest.raises(ValueError, match="multiple of 32"):
        blur_settings(tiny_photos, config=TINY_CONFIG, crop=48)
    with pytest.raises(ValueError, match="2x2 code grid"):
        blur_settings(tiny_photos, config=TINY_CONFIG, crop=32)


def test_resume_is_exact_and_export(tiny_photos, tmp_path):
    whole = BlurTrainer(_settings(tiny_photos, steps=6), tmp_path / "whole", echo=lambda m: None)
    whole.train(install_signal_handlers=False)
    first = BlurTrainer(_settings(tiny_photos, steps=6), tmp_path / "split", echo=lambda m: None)
    for _ in range(3):  # an interrupted run: 3 of its 6 steps, then the checkpoint
        first.train_step()
    first.save_checkpoint()
    second = BlurTrainer(_settings(tiny_photos, steps=6), tmp_path / "split", echo=lambda m: None)
    assert second.resumed and second.step == 3
    second.train(install_signal_handlers=False)
    for a, b in zip(whole.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)
    # the cosine schedule follows the step budget; the settings except the budget must match
    with pytest.raises(ValueError, match="other settings.*kl_weight"):
        BlurTrainer(_settings(tiny_photos, steps=6, kl_weight=1.0), tmp_path / "split")
    rows = (tmp_path / "split" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4", "5", "6"]

    ckpt = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["images_seen"] == 12
    folder = export_run(tmp_path / "split", tmp_path / "export", name="tiny", count=2)
    network, record = read_kernel_wizard_folder(folder)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), second.ema.state_dict().values()))
    info = record["info"]
    assert info["training"]["steps"] == 6 and info["data"]["train_images"] == ["train0", "train1"]
    assert info["evaluation"]["split"] == "val" and info["evaluation"]["images"] == ["val0", "val1"]
    assert {"identity_psnr", "reproduction_psnr", "operator_linear_fit_psnr"} <= set(info["evaluation"])
    assert load_network(folder)[0].config == TINY_CONFIG
    with torch.no_grad():
        assert NonlinearBlur(network)(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_cli_train_and_export(tiny_photos, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tiny_photos), "--out", str(run), "--tiny", "--batch", "2",
              "--steps", "2", "--log-every", "1"])
    assert exit_info.value.code == 0
    assert json.loads((run / "run.json").read_text())["command"].startswith("python -m diffstategrad.train_blur train")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tiny_photos), "--out", str(tmp_path / "bad"), "--crop", "48"])
    assert exit_info.value.code == 1 and "multiple of 32" in capsys.readouterr().err


def test_fit_blur_kernel_recovers_a_kernel():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kernel = torch.rand(5, 5, generator=torch.Generator().manual_seed(2))
    kernel /= kernel.sum()
    y = Blur(kernel)(x)
    found, fit = fit_blur_kernel(x, y, 5)
    assert torch.allclose(found, kernel, atol=1e-4) and torch.allclose(fit, y, atol=1e-5)

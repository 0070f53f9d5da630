"""Training: a few steps of each mode (pixel, autoencoder, latent) on a tiny synthetic dataset,
exact resume, clean stop on SIGTERM, the time box, checkpoints read with weights_only, exports
(including the shipped converted folders and their self-containedness), transfer shards."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstategrad.data import RandomCrops
from diffstategrad.priors import load_prior
from diffstategrad.priors.small_autoencoder import TINY_AUTOENCODER_CONFIG
from diffstategrad.priors.unet import TINY_UNET_CONFIG
from diffstategrad.training import (
    Trainer,
    autoencoder_settings,
    export_builtin,
    export_weights,
    join_shards,
    latent_settings,
    load_autoencoder,
    load_checkpoint_model,
    load_exported,
    pixel_settings,
    split_shards,
)
from diffstategrad.training.checkpoints import CHECKPOINT_FORMAT


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (32, 56), (64, 40)]):
        smooth = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)
        smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
        Image.fromarray((255 * smooth).astype(np.uint8)).save(root / "train" / f"img{i}.png")
    return root


def _settings(data, steps, **kw):
    return pixel_settings(data, crop=16, batch=4, steps=steps, warmup=2, model=TINY_UNET_CONFIG, bf16=False,
                          log_every=1, snapshot_every=0, checkpoint_minutes=60, **kw)


def _state(trainer):
    return {**{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}}


def _log(run):
    with open(run / "loss.csv") as fh:
        return [row[:4] for row in csv.reader(fh)]


def test_random_crops_are_deterministic_and_in_range(tiny_data):
    ds = RandomCrops(tiny_data, size=16, seed=3)
    a, b = ds[5], RandomCrops(tiny_data, size=16, seed=3)[5]
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    batch = ds.batch(0, 64)
    assert batch.min() >= -1 and batch.max() <= 1
    assert not torch.equal(ds[5], RandomCrops(tiny_data, size=16, seed=4)[5])
    params = [ds.crop_params(i) for i in range(200)]
    assert any(p["native"] for p in params) and any(p["scale"] < 0.5 for p in params)
    assert any(p["flip"] for p in params) and not all(p["flip"] for p in params)


def test_interrupted_run_resumes_exactly(tiny_data, tmp_path):
    straight = Trainer(_settings(tiny_data, 6), tmp_path / "straight", echo=lambda m: None)
    straight.train(install_signal_handlers=False)
    expected = _state(straight)

    run = tmp_path / "interrupted"
    first = Trainer(_settings(tiny_data, 6), run, echo=lambda m: None)
    first.train(install_signal_handlers=False, on_step=lambda tr: tr.request_stop() if tr.step == 3 else None)
    assert first.step == 3 and (run / "checkpoint.pt").is_file()
    saved = _state(first)
    first.close()  # releases the run folder's lock

    second = Trainer(_settings(tiny_data, 6), run, echo=lambda m: None)
    assert second.resumed_from == 3
    resumed = _state(second)
    for k in saved:  # weights after loading == weights at the checkpoint
        assert torch.equal(saved[k], resumed[k]), k
    second.train(install_signal_handlers=False)
    assert second.step == 6 and second.images_seen == 24
    for k in expected:  # same trajectory as the uninterrupted run
        assert torch.equal(expected[k], _state(second)[k]), k
    assert _log(run) == _log(tmp_path / "straight")
    assert [int(r[0]) for r in _log(run)[1:]] == [1, 2, 3, 4, 5, 6]
    assert (run / "export" / "pixel.safetensors").is_file()


def test_resume_refuses_other_settings_and_a_second_process(tiny_data, tmp_path):
    trainer = Trainer(_settings(tiny_data, 1), tmp_path / "run", echo=lambda m: None)
    with pytest.raises(RuntimeError, match="another training process"):
        Trainer(_settings(tiny_data, 1), tmp_path / "run", echo=lambda m: None)
    trainer.train(install_signal_handlers=False)
    trainer.close()
    with pytest.raises(ValueError, match="lr"):
        Trainer(_settings(tiny_data, 1, lr=1e-3), tmp_path / "run", echo=lambda m: None)


def test_export_writes_loadable_safetensors(tiny_data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_settings(tiny_data, 2), run, echo=lambda m: None)
    trainer.train(install_signal_handlers=False)
    path = export_weights(run, tmp_path / "out" / "tiny.safetensors")
    model, record = load_exported(path)
    assert record["kind"] == "pixel" and record["schedule"] == {"name": "linear", "num_timesteps": 1000}
    assert record["training"]["steps"] == 2 and record["training"]["images_seen"] == 8
    assert record["architecture"] == trainer.model.config
    assert path.with_suffix(".json").is_file()
    ema, _ = load_checkpoint_model(run)
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ema(x, t), rtol=0, atol=0)


def test_sigterm_saves_and_exits_cleanly(tiny_data, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "diffstategrad.training", "pixel", "--data", str(tiny_data), "--out", str(run), "--tiny",
           "--crop", "16", "--batch", "2", "--steps", "100000", "--log-every", "1", "--snapshot-every", "0", "--no-bf16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "checkpoint saved" in out
    _, summary = load_checkpoint_model(run)
    assert summary["step"] >= 3


def test_worker_processes_give_the_same_batches(tiny_data):
    from diffstategrad.training import PixelTask

    settings = _settings(tiny_data, 3)
    inline = PixelTask(settings).batches(2)
    pooled = PixelTask(settings | {"workers": 2}).batches(2)
    for _ in range(3):
        assert torch.equal(next(inline), next(pooled))


# ---------------------------------------------------------------------------------------------
# Autoencoder and latent modes, time box, checkpoints read with weights_only, shipped folders
# ---------------------------------------------------------------------------------------------

def _quiet():
    return lambda m: None


def _ae_settings(data, steps, **kw):
    return autoencoder_settings(data, crop=16, batch=4, steps=steps, warmup=2, model=TINY_AUTOENCODER_CONFIG,
                                bf16=False, log_every=1, checkpoint_minutes=60, **kw)


def _latent_settings(data, ae, steps, **kw):
    return latent_settings(data, ae, crop=32, batch=2, steps=steps, warmup=2, model=TINY_UNET_CONFIG, bf16=False,
                           log_every=1, checkpoint_minutes=60, scale_images=6, **kw)


def _train(settings, run, **kw):
    trainer = Trainer(settings, run, echo=_quiet())
    try:
        trainer.train(install_signal_handlers=False, **kw)
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope="module")
def ae_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "run"
    _train(_ae_settings(tiny_data, 3), run)
    return run


def _check_interrupted_equals_straight(settings, tmp_path, stop_at):
    straight = _train(settings, tmp_path / "straight")
    run = tmp_path / "interrupted"
    first = _train(settings, run, on_step=lambda tr: tr.request_stop() if tr.step == stop_at else None)
    assert first.step == stop_at and (run / "checkpoint.pt").is_file()
    second = Trainer(settings, run, echo=_quiet())
    assert second.resumed_from == stop_at
    for k, v in _state(first).items():
        assert torch.equal(v, _state(second)[k]), k
    second.train(install_signal_handlers=False)
    second.close()
    assert second.step == settings["steps"]
    for k, v in _state(straight).items():
        assert torch.equal(v, _state(second)[k]), k
    with open(run / "loss.csv") as fh:
        resumed_log = list(csv.reader(fh))
    with open(tmp_path / "straight" / "loss.csv") as fh:
        straight_log = list(csv.reader(fh))
    assert [r[:4] + r[7:] for r in resumed_log] == [r[:4] + r[7:] for r in straight_log]
    return straight, second


def test_autoencoder_run_resumes_exactly_and_logs_psnr(tiny_data, tmp_path):
    straight, resumed = _check_interrupted_equals_straight(_ae_settings(tiny_data, 4), tmp_path, stop_at=2)
    with open(tmp_path / "straight" / "loss.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-1] == "psnr" and all(float(r[-1]) > 0 for r in rows[1:])
    export = tmp_path / "interrupted" / "export" / "autoencoder.safetensors"
    ae, summary = load_autoencoder(export)
    assert summary["steps"] == 4 and summary["parameters"] == sum(p.numel() for p in ae.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(torch.zeros(1, 3, 16, 16))),
                                   resumed.ema.decode(resumed.ema.encode(torch.zeros(1, 3, 16, 16))), rtol=0, atol=0)


def test_latent_run_resumes_exactly(tiny_data, ae_run, tmp_path):
    straight, resumed = _check_interrupted_equals_straight(_latent_settings(tiny_data, ae_run, 4), tmp_path, stop_at=2)
    assert straight.task.scale_factor == resumed.task.scale_factor
    ae, _ = load_autoencoder(ae_run)
    for k, v in ae.state_dict().items():  # the frozen autoencoder is the autoencoder run's EMA
        assert torch.equal(v, resumed.task.autoencoder.state_dict()[k]), k
    with torch.no_grad():  # scale factor = 1 / std of the latents of the fixed crops
        crops = straight.task.dataset.batch(2**40, 6)
        assert abs(straight.task.scale_factor * ae.encode(crops).double().std().item() - 1) < 1e-6


def test_checkpoints_load_with_weights_only(tiny_data, ae_run, tmp_path):
    _train(_latent_settings(tiny_data, ae_run, 1), tmp_path / "latent")
    _train(_settings(tiny_data, 1), tmp_path / "pixel")
    for path in (tmp_path / "pixel" / "checkpoint.pt", ae_run / "checkpoint.pt", tmp_path / "latent" / "checkpoint.pt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no extra globals needed
        assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["version"] == 2
    assert set(ckpt["task"]) == {"autoencoder_config", "autoencoder", "scale_factor", "autoencoder_summary"}


def test_version_1_checkpoint_still_resumes(tiny_data, tmp_path):
    """Checkpoints of the first trainer (numpy's RNG state as a tuple, no task state) resume."""
    run = tmp_path / "run"
    trainer = _train(_settings(tiny_data, 2), run)
    old = trainer.state_dict()
    old.update(version=1, numpy_rng=np.random.get_state())
    del old["task"], old["info"]
    torch.save(old, run / "checkpoint.pt")
    with pytest.raises(Exception):
        torch.load(run / "checkpoint.pt", weights_only=True)  # plain weights_only refuses the ndarray
    resumed = Trainer(_settings(tiny_data, 3), run, echo=_quiet())
    assert resumed.resumed_from == 2
    resumed.train(install_signal_handlers=False)
    resumed.close()
    assert resumed.step == 3


@pytest.mark.parametrize("mode", ["pixel", "autoencoder"])
def test_max_minutes_stops_cleanly_and_exports(tiny_data, tmp_path, mode):
    settings = (_settings if mode == "pixel" else _ae_settings)(tiny_data, 100000, max_minutes=1e-4)
    trainer = Trainer(settings, tmp_path / "run", echo=_quiet())
    result = trainer.train(install_signal_handlers=False)
    trainer.close()
    assert result["time_boxed"] and not result["finished"] and 1 <= result["step"] < 100
    assert (tmp_path / "run" / "export" / f"{mode}.safetensors").is_file()
    assert load_checkpoint_model(tmp_path / "run")[1]["step"] == result["step"]


def test_export_builtin_pixel_loads_through_load_prior(tiny_data, tmp_path):
    from safetensors import safe_open

    run = tmp_path / "run"
    trainer = _train(_settings(tiny_data, 2), run)
    folder = export_builtin(run, tmp_path / "export" / "pixel", name="pixel-test")
    prior = load_prior("converted", folder)
    assert prior.kind == "pixel" and prior.format_name == "builtin-pixel"
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(x, t), trainer.ema(x, t), rtol=0, atol=0)
    info = json.loads((folder / "config.json").read_text())["spec"]["info"]
    for key in ("kind", "parameters", "crop", "steps", "images_seen", "wall_time_s", "device", "batch", "lr", "data",
                "schedule", "command"):
        assert key in info, key
    assert info["name"] == "pixel-test" and info["kind"] == "pixel" and info["steps"] == 2 and info["crop"] == 16
    assert info["data"]["train_images"] == ["img0", "img1", "img2"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}
    assert {d for k, d in dtypes.items() if k != "schedule.alphas_cumprod"} == {torch.float32}
    with pytest.raises(FileExistsError):
        export_builtin(run, folder)
    export_builtin(run, folder, overwrite=True)
    ae_trainer = _train(_ae_settings(tiny_data, 1), tmp_path / "ae")
    with pytest.raises(ValueError, match="not a diffusion prior"):
        export_builtin(ae_trainer, tmp_path / "x")


def test_init_starts_a_run_from_a_model_folder_or_an_export(tiny_data, tmp_path):
    """--init (fine-tuning): step 0's network and EMA are the source's EMA weights, from a shipped-style
    folder or an exported .safetensors; the source is recorded; another network is refused."""
    source = _train(_settings(tiny_data, 3), tmp_path / "source")
    folder = export_builtin(tmp_path / "source", tmp_path / "folder" / "pixel")
    exported = export_weights(tmp_path / "source", tmp_path / "source.safetensors")
    want = {k: v.clone() for k, v in source.ema.state_dict().items()}
    for init in (folder, exported):
        trainer = Trainer(_settings(tiny_data, 2, init=init), tmp_path / f"ft-{Path(init).name}", echo=_quiet())
        try:
            for got in (trainer.model.state_dict(), trainer.ema.state_dict()):
                for k, v in want.items():
                    torch.testing.assert_close(got[k], v, rtol=0, atol=0)
            assert trainer.settings["init"]["path"] == str(Path(init).resolve())
            assert len(trainer.settings["init"]["sha256"]) == 64
            trainer.train(install_signal_handlers=False)
            assert trainer.task.export_info()["initialised_from"] == trainer.settings["init"]
        finally:
            trainer.close()
    # a random start differs from the source (the test above could not pass by accident)
    fresh = Trainer(_settings(tiny_data, 2), tmp_path / "fresh", echo=_quiet())
    try:
        assert not torch.equal(fresh.model.state_dict()["conv_in.weight"], want["conv_in.weight"])
    finally:
        fresh.close()
    other = dict(TINY_UNET_CONFIG, channels=[8, 16, 16, 32])
    settings = pixel_settings(tiny_data, crop=16, batch=4, steps=1, model=other, bf16=False, init=folder)
    with pytest.raises(ValueError, match="has another network.*channels"):
        Trainer(settings, tmp_path / "other", echo=_quiet())
    with pytest.raises(ValueError, match="no such model folder"):
        pixel_settings(tiny_data, init=tmp_path / "missing")


def test_latent_export_is_self_contained(tiny_data, ae_run, tmp_path):
    ae_copy = tmp_path / "ae"
    shutil.copytree(ae_run, ae_copy)
    run = tmp_path / "latent"
    _train(_latent_settings(tiny_data, ae_copy, 2), run)
    shutil.rmtree(ae_copy)  # the autoencoder run is gone: the latent run carries its weights
    trainer = _train(_latent_settings(tiny_data, ae_copy, 3), run)  # resumes
    assert trainer.step == 3 and (run / "export" / "latent" / "model.safetensors").is_file()
    folder = export_builtin(run, tmp_path / "export" / "latent")
    prior = load_prior("converted", folder)
    assert prior.kind == "latent" and prior.format_name == "builtin-latent"
    assert prior.state_shape((3, 64, 96)) == (3, 16, 24)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        z = prior.encode(x)
        assert z.shape == (2, 3, 16, 24)
        torch.testing.assert_close(z, trainer.task.autoencoder.encode(x) * trainer.task.scale_factor)
        assert prior.decode(z).shape == x.shape
        eps = prior.eps(z, torch.tensor([10, 500]))
        torch.testing.assert_close(eps, trainer.ema(z, torch.tensor([10, 500])), rtol=0, atol=0)
    info = json.loads((folder / "config.json").read_text())["spec"]["info"]
    assert info["kind"] == "latent" and info["scale_factor"] == trainer.task.scale_factor
    assert info["parameters"] == info["unet_parameters"] + info["autoencoder_parameters"]
    assert info["autoencoder"]["steps"] == 3 and info["autoencoder"]["kl_weight"] == 1e-6
    assert info["size_multiple"] == 32 and info["downsampling"] == 4 and "multiples of 32" in info["size_rule"]


def test_shards_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(300, 256, generator=gen) for i in range(8)}  # 300 KiB each
    tensors["schedule"] = torch.linspace(0, 1, 1000, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "builtin-pixel", "x": "1"})
    parts = split_shards(tmp_path / "model.safetensors", tmp_path / "transfer" / "pixel", max_bytes=2**20)
    assert len(parts) >= 3 and all(p.stat().st_size <= 2**20 for p in parts)
    assert all(p.name.startswith("pixel.part") and p.suffix == ".safetensors" for p in parts)
    out = join_shards(reversed(parts), tmp_path / "joined" / "model.safetensors")
    joined = load_file(str(out))
    assert set(joined) == set(tensors) and all(torch.equal(joined[k], tensors[k]) for k in tensors)
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata() == {"format": "builtin-pixel", "x": "1"}
    with pytest.raises(ValueError, match="shards"):
        join_shards(parts[:-1], tmp_path / "bad.safetensors")
    damaged = load_file(str(parts[0]))
    first = sorted(damaged)[0]
    damaged[first] = damaged[first] + 1
    with safe_open(str(parts[0]), framework="pt") as fh:
        meta = fh.metadata()
    save_file(damaged, str(parts[0]), metadata=meta)
    with pytest.raises(ValueError, match="differ"):
        join_shards(parts, tmp_path / "bad.safetensors")


def test_command_line_chain(tiny_data, tmp_path):
    from diffstategrad.training.cli import main

    def cli(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        assert exc.value.code == 0

    common = ["--data", tiny_data, "--tiny", "--no-bf16", "--log-every", "1", "--steps", "100000", "--max-minutes", "0.0001"]
    cli("autoencoder", "--out", tmp_path / "ae", "--crop", "16", "--batch", "2", *common)
    cli("latent", "--out", tmp_path / "latent", "--autoencoder", tmp_path / "ae" / "export" / "autoencoder.safetensors",
        "--crop", "32", "--batch", "2", "--scale-images", "4", *common)
    cli("export-builtin", tmp_path / "latent", "--out", tmp_path / "latent-folder")
    prior = load_prior("converted", tmp_path / "latent-folder")
    info = prior.info
    assert info["command"].startswith("python -m diffstategrad.training latent --out ")
    assert info["max_minutes"] == 0.0001 and info["autoencoder"]["export"].endswith("autoencoder.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["latent", "--out", str(tmp_path / "x"), "--autoencoder", str(tmp_path / "ae"), "--data", str(tiny_data),
              "--crop", "48"])
    assert exc.value.code == 2  # not a multiple of 32


def test_command_line_init_fine_tunes_and_refuses_another_network(tiny_data, tmp_path, capsys):
    from diffstategrad.training.cli import main

    common = ["--data", str(tiny_data), "--no-bf16", "--crop", "16", "--batch", "2", "--steps", "1", "--log-every", "1"]
    with pytest.raises(SystemExit) as exc:
        main(["pixel", "--out", str(tmp_path / "src"), "--tiny", *common])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["pixel", "--out", str(tmp_path / "ft"), "--tiny", "--init", str(tmp_path / "src" / "export" / "pixel.safetensors"), *common])
    assert exc.value.code == 0
    assert "initialised from" in capsys.readouterr().out
    info = json.loads((tmp_path / "ft" / "export" / "pixel.json").read_text())
    assert info["training"]["initialised_from"]["path"].endswith("pixel.safetensors")
    # the default (full-size) network cannot start from the tiny one: one line, exit 1, nothing trained
    with pytest.raises(SystemExit) as exc:
        main(["pixel", "--out", str(tmp_path / "big"), "--init", str(tmp_path / "src" / "export" / "pixel.safetensors"), *common])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has another network" in err[0]
    assert not (tmp_path / "big" / "checkpoint.pt").exists()

"""Training: a few steps on a tiny synthetic dataset, exact resume, clean stop on SIGTERM, export."""

import csv
import os
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
from diffstategrad.priors.unet import TINY_UNET_CONFIG
from diffstategrad.train import Trainer, export_weights, load_checkpoint_model, load_exported, pixel_settings


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
    cmd = [sys.executable, "-m", "diffstategrad.train", "pixel", "--data", str(tiny_data), "--out", str(run), "--tiny",
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
    from diffstategrad.train import PixelTask

    settings = _settings(tiny_data, 3)
    inline = PixelTask(settings).batches(2)
    pooled = PixelTask(settings | {"workers": 2}).batches(2)
    for _ in range(3):
        assert torch.equal(next(inline), next(pooled))

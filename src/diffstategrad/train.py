"""Training of the built-in models, with checkpoint / exact resume.

    python -m diffstategrad.train pixel --data data/photos --out runs/pixel [--steps N] ...
    python -m diffstategrad.train export runs/pixel [--out FILE.safetensors]

Modes: ``pixel`` (an epsilon-prediction UNet on image crops, DDPM objective). The trainer is
generic over a *task* (what a batch is and what the loss is); the autoencoder and latent modes
plug in the same way.

Pixel objective (Ho et al. 2020, Algorithm 1): x0 a random crop in [-1, 1], t ~ U{0..T-1},
eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t from
``make_schedule("linear", 1000)``, loss = ||eps - eps_theta(x_t, t)||^2 (mean). AdamW, linear
warm-up then constant (or cosine) learning rate, gradient clipping, an EMA of the weights
(decay min(ema_decay, (1 + k) / (10 + k)) at step k), bf16 autocast.

Reproducibility and resume: the crops of step k are items k*B .. k*B + B - 1 of
``RandomCrops`` (pure functions of the seed and the index) and t / eps come from a generator
seeded by (seed, k), so an interrupted run that resumes from RUNDIR/checkpoint.pt follows the
same trajectory as an uninterrupted one. Checkpoints (model, EMA, optimizer, step, RNG state,
smoothed loss) are written atomically (tmp file, then ``os.replace``) every
``--checkpoint-minutes``, on SIGTERM / SIGINT (then the process exits cleanly) and at the end.
RUNDIR/run.json records the settings; resuming with different settings is refused, except
for the step budget, threads, device and logging intervals.

Outputs in RUNDIR: ``checkpoint.pt``, ``run.json``, ``loss.csv`` (one row per log interval),
``snapshots/ema_STEP.safetensors`` (+ ``.json``) every ``--snapshot-every`` steps, and at the
end ``export/pixel.safetensors`` + ``export/pixel.json`` (EMA weights and model card data).
"""

from __future__ import annotations

import copy
import csv
import itertools
import fcntl
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffstategrad.data import RandomCrops
from diffstategrad.priors.unet import PIXEL_UNET_CONFIG, UNet, count_parameters
from diffstategrad.schedules import make_schedule

__all__ = ["PixelTask", "Trainer", "export_weights", "load_exported", "load_checkpoint_model", "step_seed"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "diffstategrad-train-checkpoint"
EXPORT_FORMAT = "diffstategrad-unet"

# Settings that may change between a run and its resumption (they do not change the maths).
_MUTABLE_SETTINGS = {"steps", "threads", "device", "workers", "checkpoint_minutes", "log_every", "snapshot_every", "command"}


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws (t, eps) of training step ``step``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0x7E5]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# Tasks: what a batch is and what the loss is
# ---------------------------------------------------------------------------------------------


class PixelTask:
    """DDPM epsilon objective on multi-scale random crops of the prepared photographs."""

    mode = "pixel"

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.schedule = make_schedule(settings["schedule"], settings["num_timesteps"])
        self.dataset = RandomCrops(
            settings["data"], "train", size=settings["crop"], scale_range=tuple(settings["scale_range"]),
            native_prob=settings["native_prob"], seed=settings["seed"],
        )

    def build_model(self) -> nn.Module:
        return UNet(self.settings["model"])

    def batches(self, start_step: int):
        """Iterator over the training batches of steps start_step, start_step + 1, ...

        Batch k is items k*B .. k*B + B - 1 of the crop dataset, whether they are made here or
        by ``workers`` DataLoader processes (for fast accelerators), so results do not depend on it.
        """
        B, workers = self.settings["batch"], int(self.settings.get("workers", 0))
        if workers <= 0:
            return (self.dataset.batch(k * B, B) for k in itertools.count(start_step))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=B, sampler=itertools.count(start_step * B), num_workers=workers,
            persistent_workers=True, prefetch_factor=4, pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def loss(self, model: nn.Module, step: int, x0: torch.Tensor, device: torch.device, autocast) -> tuple[torch.Tensor, int]:
        B = x0.shape[0]
        gen = torch.Generator().manual_seed(step_seed(self.settings["seed"], step))
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = self.schedule.alpha_bar(t, like=x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        x_t, t, noise = x_t.to(device), t.to(device), noise.to(device)
        with autocast():
            eps = model(x_t, t)
        return torch.mean((eps.float() - noise) ** 2), B

    def export_info(self) -> dict[str, Any]:
        manifest_path = Path(self.settings["data"]) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        return {
            "kind": "pixel",
            "schedule": {"name": self.settings["schedule"], "num_timesteps": self.settings["num_timesteps"]},
            "prediction": "epsilon",
            "data": {
                "root": str(self.settings["data"]),
                "version": manifest.get("version"),
                "train_images": self.dataset.names,
                "held_out_images": manifest.get("val", []),
                "crop": self.settings["crop"],
                "scale_range": self.settings["scale_range"],
                "native_prob": self.settings["native_prob"],
                "flip": True,
            },
        }


TASKS = {"pixel": PixelTask}


# ---------------------------------------------------------------------------------------------
# The generic trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Runs a task's loss with AdamW + EMA, logging, checkpoints and exact resume."""

    def __init__(self, settings: dict[str, Any], out: str | os.PathLike, echo=print):
        self.out = Path(out)
        self.echo = echo
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another training process is using {self.out}") from None
        self.settings = self._reconcile_settings(settings)
        torch.set_num_threads(int(self.settings["threads"]))
        self.device = torch.device(self.settings["device"])
        self.task = TASKS[self.settings["mode"]](self.settings)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.settings["seed"]))  # the initial weights depend on the seed only
            self.model = self.task.build_model().to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.settings["lr"], betas=(0.9, 0.999),
            weight_decay=self.settings["weight_decay"],
        )
        self.step = 0
        self.images_seen = 0
        self.wall_time = 0.0
        self.smoothed_loss = float("nan")
        self.stop_requested = False
        self.resumed_from: int | None = None
        if (self.out / CHECKPOINT_NAME).is_file():
            self._load_checkpoint()

    def close(self) -> None:
        """Release the run folder (another process may then resume it)."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # -- settings -------------------------------------------------------------------------------

    def _reconcile_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        path = self.out / "run.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            diffs = {
                k: (saved.get(k), settings.get(k))
                for k in set(saved) | set(settings)
                if k not in _MUTABLE_SETTINGS and saved.get(k) != settings.get(k)
            }
            if diffs:
                lines = ", ".join(f"{k}: run has {a!r}, command gives {b!r}" for k, (a, b) in sorted(diffs.items()))
                raise ValueError(f"{self.out} holds a run with other settings ({lines}); use another --out or the same settings")
        _atomic_write_text(path, json.dumps(settings, indent=2))
        return settings

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "settings": self.settings,
            "step": self.step,
            "images_seen": self.images_seen,
            "wall_time": self.wall_time,
            "smoothed_loss": self.smoothed_loss,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
        }

    def save_checkpoint(self) -> None:
        _atomic_torch_save(self.state_dict(), self.out / CHECKPOINT_NAME)

    def _load_checkpoint(self) -> None:
        ckpt = torch.load(self.out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.out / CHECKPOINT_NAME} is not a diffstategrad training checkpoint")
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.ema.load_state_dict(ckpt["ema"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        self.step, self.images_seen = int(ckpt["step"]), int(ckpt["images_seen"])
        self.wall_time, self.smoothed_loss = float(ckpt["wall_time"]), float(ckpt["smoothed_loss"])
        self.resumed_from = self.step
        self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        """Drop loss.csv rows logged after the checkpoint (they will be logged again)."""
        path = self.out / "loss.csv"
        if not path.is_file():
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(path.with_name("loss.csv.tmp"), "w", newline="") as fh:
            csv.writer(fh).writerows(kept)
        os.replace(path.with_name("loss.csv.tmp"), path)

    # -- the loop -------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        s = self.settings
        warm = max(int(s["warmup_steps"]), 0)
        if step < warm:
            return s["lr"] * (step + 1) / warm
        if s["lr_schedule"] == "cosine":
            progress = min((step - warm) / max(s["steps"] - warm, 1), 1.0)
            return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        return s["lr"]

    def ema_decay_at(self, step: int) -> float:
        return min(self.settings["ema_decay"], (1 + step) / (10 + step))

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.ema_decay_at(self.step)
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
            p_ema.lerp_(p.detach(), 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def request_stop(self, *_):
        if not self.stop_requested:
            self.echo(f"stop requested: finishing step {self.step + 1} and saving a checkpoint")
        self.stop_requested = True

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.settings["bf16"]))

    def _log_row(self, row: list) -> None:
        path = self.out / "loss.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["step", "images_seen", "loss", "loss_smoothed", "lr", "images_per_s", "wall_time_s"])
            w.writerow(row)

    def train(self, install_signal_handlers: bool = True, on_step=None) -> dict[str, Any]:
        """Train until ``settings['steps']`` or a stop request; returns a summary dict.

        ``on_step(trainer)`` is called after every step (tests use it to interrupt a run).
        """
        s = self.settings
        total = int(s["steps"])
        old_handlers = {}
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        n_params = count_parameters(self.model)
        if self.resumed_from is not None:
            self.echo(f"resumed from {self.out / CHECKPOINT_NAME} at step {self.step} ({self.images_seen} images, {_fmt_duration(self.wall_time)} of training)")
        else:
            self.echo(f"new run in {self.out}: {s['mode']} model, {n_params:,} parameters")
        self.echo(f"target {total} steps, batch {s['batch']}, crop {s['crop']}, lr {s['lr']:g}, bf16 {s['bf16']}, "
                  f"{s['threads']} thread(s), device {self.device}, checkpoint every {s['checkpoint_minutes']:g} min")
        self.model.train()
        last_ckpt = time.monotonic()
        interval_losses: list[float] = []
        interval_images = 0
        interval_start = time.monotonic()
        bad_steps = 0
        batches = self.task.batches(self.step)
        try:
            while self.step < total and not self.stop_requested:
                t0 = time.monotonic()
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, n_images = self.task.loss(self.model, self.step, next(batches), self.device, self._autocast)
                value = float(loss.detach())
                if not math.isfinite(value):
                    bad_steps += 1
                    self.echo(f"warning: non-finite loss at step {self.step}; update skipped")
                    if bad_steps >= 10:
                        raise FloatingPointError("10 non-finite losses in a row; the last checkpoint is kept")
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    bad_steps = 0
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(self.model.parameters(), s["grad_clip"])
                    self.optimizer.step()
                    self._update_ema()
                self.step += 1
                self.images_seen += n_images
                self.wall_time += time.monotonic() - t0
                if math.isfinite(value):
                    self.smoothed_loss = value if not math.isfinite(self.smoothed_loss) else 0.98 * self.smoothed_loss + 0.02 * value
                    interval_losses.append(value)
                interval_images += n_images

                if self.step % s["log_every"] == 0 or self.step == total:
                    elapsed = time.monotonic() - interval_start
                    ips = interval_images / max(elapsed, 1e-9)
                    eta = (total - self.step) * s["batch"] / ips if ips > 0 else float("inf")
                    mean_loss = float(np.mean(interval_losses)) if interval_losses else float("nan")
                    self.echo(f"step {self.step}/{total}  loss {mean_loss:.4f}  smoothed {self.smoothed_loss:.4f}  "
                              f"lr {lr:.2e}  {ips:.1f} img/s  trained {_fmt_duration(self.wall_time)}  ETA {_fmt_duration(eta)}")
                    self._log_row([self.step, self.images_seen, f"{mean_loss:.6f}", f"{self.smoothed_loss:.6f}",
                                   f"{lr:.6g}", f"{ips:.2f}", f"{self.wall_time:.1f}"])
                    interval_losses, interval_images, interval_start = [], 0, time.monotonic()
                if s["snapshot_every"] and self.step % s["snapshot_every"] == 0:
                    snap = self.out / "snapshots" / f"ema_{self.step:07d}.safetensors"
                    export_weights(self, snap)
                if on_step is not None:
                    on_step(self)
                if time.monotonic() - last_ckpt >= 60 * s["checkpoint_minutes"]:
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
                    self.echo(f"checkpoint saved at step {self.step}")
            self.save_checkpoint()
            finished = self.step >= total
            if finished:
                path = export_weights(self, self.out / "export" / f"{s['mode']}.safetensors")
                self.echo(f"finished {self.step} steps; EMA weights exported to {path}")
            else:
                self.echo(f"stopped at step {self.step}; checkpoint saved; run the same command to resume")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return {"step": self.step, "finished": self.step >= total, "images_seen": self.images_seen}


# ---------------------------------------------------------------------------------------------
# Export and loading
# ---------------------------------------------------------------------------------------------


def _export_record(settings: dict, task_info: dict, model: nn.Module, step: int, images_seen: int, wall_time: float) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        **{k: task_info[k] for k in ("kind", "schedule", "prediction")},
        "architecture": dict(model.config),
        "parameters": count_parameters(model),
        "size_multiple": model.size_multiple,
        "data_range": [-1.0, 1.0],
        "weights": "ema",
        "training": {
            "steps": step,
            "images_seen": images_seen,
            "wall_time_s": round(wall_time, 1),
            "batch_size": settings["batch"],
            "lr": settings["lr"],
            "lr_schedule": settings["lr_schedule"],
            "warmup_steps": settings["warmup_steps"],
            "ema_decay": settings["ema_decay"],
            "weight_decay": settings["weight_decay"],
            "grad_clip": settings["grad_clip"],
            "bf16": settings["bf16"],
            "seed": settings["seed"],
            "threads": settings["threads"],
            "device": settings["device"],
            "command": settings.get("command"),
            "data": task_info["data"],
        },
    }


def export_weights(source, out: str | os.PathLike) -> Path:
    """Write the EMA weights of a ``Trainer`` or a run folder as ``out`` (.safetensors) plus
    the model record as JSON beside it (same stem). Returns the safetensors path."""
    from safetensors.torch import save_file

    if isinstance(source, Trainer):
        trainer = source
        settings, model, ema = trainer.settings, trainer.model, trainer.ema
        step, seen, wall = trainer.step, trainer.images_seen, trainer.wall_time
        info = trainer.task.export_info()
    else:
        ckpt = torch.load(Path(source) / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
        settings = ckpt["settings"]
        task = TASKS[settings["mode"]](settings)
        model = task.build_model()
        ema = task.build_model()
        ema.load_state_dict(ckpt["ema"], strict=True)
        step, seen, wall = int(ckpt["step"]), int(ckpt["images_seen"]), float(ckpt["wall_time"])
        info = task.export_info()
    record = _export_record(settings, info, model, step, seen, wall)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ema.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(record)})
    os.replace(tmp, out)
    _atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    return out


def load_exported(path: str | os.PathLike, device="cpu") -> tuple[UNet, dict]:
    """(UNet in eval mode, record) from an exported .safetensors (record read from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no diffstategrad config in its metadata")
    record = json.loads(meta["config"])
    if record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file (format {record.get('format')!r})")
    model = UNet(record["architecture"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), record


def load_checkpoint_model(rundir: str | os.PathLike, which: str = "ema") -> tuple[UNet, dict]:
    """(UNet in eval mode, checkpoint summary) from RUNDIR/checkpoint.pt without disturbing it."""
    ckpt = torch.load(Path(rundir) / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    model = UNet(ckpt["settings"]["model"])
    model.load_state_dict(ckpt[which], strict=True)
    summary = {k: ckpt[k] for k in ("step", "images_seen", "wall_time")} | {"settings": ckpt["settings"]}
    return model.eval(), summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def pixel_settings(data, crop=64, batch=32, steps=20000, lr=2e-4, warmup=500, lr_schedule="constant",
                   ema_decay=0.999, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                   device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                   log_every=50, snapshot_every=2500, command=None) -> dict[str, Any]:
    return {
        "mode": "pixel",
        "data": str(Path(data).resolve()),
        "model": dict(model or PIXEL_UNET_CONFIG),
        "schedule": "linear",
        "num_timesteps": 1000,
        "crop": int(crop),
        "scale_range": [float(scale_min), 1.0],
        "native_prob": float(native_prob),
        "batch": int(batch),
        "steps": int(steps),
        "lr": float(lr),
        "warmup_steps": int(warmup),
        "lr_schedule": lr_schedule,
        "ema_decay": float(ema_decay),
        "weight_decay": float(weight_decay),
        "grad_clip": float(grad_clip),
        "bf16": bool(bf16),
        "seed": int(seed),
        "threads": int(threads),
        "device": device,
        "workers": int(workers),
        "checkpoint_minutes": float(checkpoint_minutes),
        "log_every": int(log_every),
        "snapshot_every": int(snapshot_every),
        "command": command,
    }


def main(argv=None):
    import click

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli():
        """Train the built-in models (checkpoints and resumes; see the module docstring).

        \b
        Examples:
          OMP_NUM_THREADS=1 python -m diffstategrad.train pixel --data data/photos --out runs/pixel
          python -m diffstategrad.train export runs/pixel --out pixel.safetensors
        """

    @cli.command("pixel")
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset (python -m diffstategrad.data build).")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it holds a checkpoint).")
    @click.option("--crop", default=64, show_default=True, help="Crop size (multiple of 8).")
    @click.option("--batch", default=32, show_default=True)
    @click.option("--steps", default=20000, show_default=True, help="Step budget (may be raised when resuming).")
    @click.option("--lr", default=2e-4, show_default=True)
    @click.option("--warmup", default=500, show_default=True, help="Linear warm-up steps.")
    @click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
    @click.option("--ema-decay", default=0.999, show_default=True)
    @click.option("--weight-decay", default=0.0, show_default=True)
    @click.option("--grad-clip", default=1.0, show_default=True)
    @click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast.")
    @click.option("--seed", default=0, show_default=True)
    @click.option("--threads", default=1, show_default=True, help="torch threads (also set OMP_NUM_THREADS).")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda, ... (bf16 autocast on either).")
    @click.option("--workers", default=0, show_default=True, help="DataLoader processes making crops (0: in the training process).")
    @click.option("--tiny", is_flag=True, help="A tiny network (smoke tests only).")
    @click.option("--checkpoint-minutes", default=5.0, show_default=True)
    @click.option("--log-every", default=50, show_default=True)
    @click.option("--snapshot-every", default=2500, show_default=True, help="Export EMA snapshots every N steps (0: never).")
    def pixel(data, out, crop, batch, steps, lr, warmup, lr_schedule, ema_decay, weight_decay, grad_clip, bf16,
              seed, threads, device, workers, tiny, checkpoint_minutes, log_every, snapshot_every):
        """Train the pixel-space epsilon-prediction UNet."""
        from diffstategrad.priors.unet import TINY_UNET_CONFIG

        if crop % 8:
            raise click.BadParameter("must be a multiple of 8", param_hint="--crop")
        settings = pixel_settings(
            data, crop, batch, steps, lr, warmup, lr_schedule, ema_decay, weight_decay, grad_clip, bf16, seed,
            threads, device, workers, TINY_UNET_CONFIG if tiny else None, checkpoint_minutes=checkpoint_minutes,
            log_every=log_every, snapshot_every=snapshot_every, command=" ".join(sys.argv),
        )
        try:
            trainer = Trainer(settings, out, echo=lambda m: click.echo(m))
        except (ValueError, RuntimeError) as err:
            raise click.ClickException(str(err)) from None
        try:
            trainer.train()
        finally:
            trainer.close()

    @cli.command("export")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output .safetensors (default RUNDIR/export/MODE.safetensors).")
    def export(rundir, out):
        """Write the EMA weights of RUNDIR/checkpoint.pt as safetensors + JSON."""
        if out is None:
            mode = json.loads((Path(rundir) / "run.json").read_text())["mode"]
            out = Path(rundir) / "export" / f"{mode}.safetensors"
        path = export_weights(rundir, out)
        click.echo(f"wrote {path} and {path.with_suffix('.json')}")

    cli.main(args=argv, prog_name="python -m diffstategrad.train")


if __name__ == "__main__":
    main()

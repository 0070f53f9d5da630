"""The generic trainer: a task's loss under AdamW + EMA, with logging, checkpoints, a time box and
exact resume.

Optimisation: AdamW, linear warm-up then constant (or cosine) learning rate, gradient clipping,
an EMA of the weights (decay min(ema_decay, (1 + k) / (10 + k)) at step k), bf16 autocast on the
device's own type (TF32 matmuls/convolutions on CUDA).

Reproducibility and resume: the crops of step k are items k*B .. k*B + B - 1 of
``RandomCrops`` (pure functions of the seed and the index) and t / eps / the posterior sample
come from a generator on the training device seeded by (seed, k), so an interrupted run that
resumes from RUNDIR/checkpoint.pt follows the same trajectory as an uninterrupted one (bit for
bit on CPU; on CUDA up to the non-determinism of its kernels). Checkpoints (``checkpoints.py``)
are written atomically every ``checkpoint_minutes``, on SIGTERM / SIGINT (then the process exits
cleanly), at the time box (``max_minutes`` of wall time in this process) and at the end.
RUNDIR/run.json records the settings (``settings.reconcile_settings``).

Outputs in RUNDIR: ``checkpoint.pt``, ``run.json``, ``loss.csv`` (one row per log interval),
EMA snapshots under ``snapshots/`` every ``snapshot_every`` steps and, at the end or the time
box, the export: ``export/pixel.safetensors`` (+ ``.json``), ``export/autoencoder.safetensors``
(+ ``.json``) or ``export/latent/`` (a converted folder, as ``export-builtin`` writes it).
"""

from __future__ import annotations

import copy
import csv
import fcntl
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffstategrad.priors.unet import count_parameters
from diffstategrad.storage import atomic_torch_save
from diffstategrad.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    load_checkpoint_file,
    numpy_rng_from_plain,
    numpy_rng_to_plain,
)
from diffstategrad.training.export import export_builtin, export_weights
from diffstategrad.training.formats import read_init_weights
from diffstategrad.training.settings import reconcile_settings
from diffstategrad.training.summaries import RunView
from diffstategrad.training.tasks import TASKS

__all__ = ["Trainer"]


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _allow_tf32(echo) -> None:
    """TF32 for the fp32 parts of a CUDA run (bf16 autocast covers the rest)."""
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels
    except Exception as err:  # pragma: no cover - depends on the torch build
        echo(f"warning: could not enable TF32 ({err})")


class Trainer:
    """Runs a task's loss with AdamW + EMA, logging, checkpoints, a time box and exact resume."""

    def __init__(self, settings: dict[str, Any], out: str | os.PathLike, echo=print):
        self._t_start = time.monotonic()
        self.out = Path(out)
        self.echo = echo
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(f"another training process is using {self.out}") from None
        try:
            self._setup(settings)
        except BaseException:
            self.close()
            raise

    def _setup(self, settings: dict[str, Any]) -> None:
        self.settings = reconcile_settings(settings, self.out)
        torch.set_num_threads(int(self.settings["threads"]))
        self.device = torch.device(self.settings["device"])
        if self.device.type == "cuda":
            _allow_tf32(self.echo)
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
        task_state = None
        if (self.out / CHECKPOINT_NAME).is_file():
            task_state = self._load_checkpoint()
        elif self.settings.get("init"):
            self._load_init(self.settings["init"])
        self.task.prepare(self.device, task_state, echo=self.echo)

    def close(self) -> None:
        """Release the run folder (another process may then resume it)."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # -- what the exports see ------------------------------------------------------------------

    def run_view(self) -> RunView:
        """This run as its exports see it (``export.run_view``): the EMA weights in a CPU float32 model."""
        ema = self.task.build_model()
        ema.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in self.ema.state_dict().items()}, strict=True)
        return RunView(self.settings, self.task, ema.eval(), self.step, self.images_seen, self.wall_time,
                       self.task.export_info(), str(self.out))

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "settings": self.settings,
            "step": self.step,
            "images_seen": self.images_seen,
            "wall_time": self.wall_time,
            "smoothed_loss": self.smoothed_loss,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task": self.task.state_dict(),
            "info": self.task.export_info(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": numpy_rng_to_plain(np.random.get_state()),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = list(torch.cuda.get_rng_state_all())
        return state

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.state_dict(), self.out / CHECKPOINT_NAME)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        ckpt = load_checkpoint_file(self.out / CHECKPOINT_NAME)
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.ema.load_state_dict(ckpt["ema"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(numpy_rng_from_plain(ckpt["numpy_rng"]))
        cuda_rng = ckpt.get("cuda_rng")
        if cuda_rng and self.device.type == "cuda" and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.step, self.images_seen = int(ckpt["step"]), int(ckpt["images_seen"])
        self.wall_time, self.smoothed_loss = float(ckpt["wall_time"]), float(ckpt["smoothed_loss"])
        self.resumed_from = self.step
        self._truncate_log(self.step)
        return ckpt.get("task")

    def _load_init(self, init: dict[str, str]) -> None:
        """Start the network and its EMA from a model's weights (a fine-tuning run's step 0)."""
        state = read_init_weights(init["path"], self.settings["model"])
        self.model.load_state_dict(state, strict=True)
        self.ema.load_state_dict(state, strict=True)
        self.echo(f"initialised from {init['path']} (sha256 {init['sha256'][:12]})")

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
        ema_params = list(self.ema.parameters())
        # one fused call instead of a kernel launch per tensor (it matters on GPUs)
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def request_stop(self, *_):
        if not self.stop_requested:
            self.echo(f"stop requested: finishing step {self.step + 1} and saving a checkpoint")
        self.stop_requested = True

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.settings["bf16"]))

    def _time_left(self) -> float:
        """Seconds left in the time box (inf without one)."""
        limit = float(self.settings.get("max_minutes") or 0)
        if limit <= 0:
            return float("inf")
        return 60 * limit - (time.monotonic() - self._t_start)

    def _log_row(self, row: list) -> None:
        path = self.out / "loss.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["step", "images_seen", "loss", "loss_smoothed", "lr", "images_per_s", "wall_time_s",
                            *self.task.metric_names])
            w.writerow(row)

    def train(self, install_signal_handlers: bool = True, on_step=None) -> dict[str, Any]:
        """Train until ``settings['steps']``, the time box or a stop request; returns a summary.

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
        box = f", time box {s['max_minutes']:g} min" if s.get("max_minutes") else ""
        self.echo(f"target {total} steps, batch {s['batch']}, crop {s['crop']}, lr {s['lr']:g}, bf16 {s['bf16']}, "
                  f"{s['threads']} thread(s), device {self.device}, workers {s.get('workers', 0)}, "
                  f"checkpoint every {s['checkpoint_minutes']:g} min{box}")
        self.model.train()
        last_ckpt = time.monotonic()
        interval_losses: list[float] = []
        interval_metrics: dict[str, list[float]] = {k: [] for k in self.task.metric_names}
        interval_images = 0
        interval_start = time.monotonic()
        bad_steps = 0
        time_boxed = False
        export_path = None
        batches = self.task.batches(self.step)
        try:
            while self.step < total and not self.stop_requested and not time_boxed:
                t0 = time.monotonic()
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, n_images, metrics = self.task.loss(self.model, self.step, next(batches), self.device, self._autocast)
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
                    for k in interval_metrics:
                        interval_metrics[k].append(float(metrics[k]))
                interval_images += n_images
                time_boxed = self._time_left() <= 0

                if self.step % s["log_every"] == 0 or self.step == total or time_boxed:
                    elapsed = time.monotonic() - interval_start
                    ips = interval_images / max(elapsed, 1e-9)
                    eta = (total - self.step) * s["batch"] / ips if ips > 0 else float("inf")
                    eta = max(min(eta, self._time_left()), 0.0)
                    mean_loss = float(np.mean(interval_losses)) if interval_losses else float("nan")
                    means = {k: (float(np.mean(v)) if v else float("nan")) for k, v in interval_metrics.items()}
                    extra = "".join(f"  {k} {v:.2f}" for k, v in means.items())
                    self.echo(f"step {self.step}/{total}  loss {mean_loss:.4f}  smoothed {self.smoothed_loss:.4f}{extra}  "
                              f"lr {lr:.2e}  {ips:.1f} img/s  trained {_fmt_duration(self.wall_time)}  ETA {_fmt_duration(eta)}")
                    self._log_row([self.step, self.images_seen, f"{mean_loss:.6f}", f"{self.smoothed_loss:.6f}",
                                   f"{lr:.6g}", f"{ips:.2f}", f"{self.wall_time:.1f}", *(f"{v:.4f}" for v in means.values())])
                    interval_losses, interval_images, interval_start = [], 0, time.monotonic()
                    interval_metrics = {k: [] for k in self.task.metric_names}
                if s["snapshot_every"] and self.step % s["snapshot_every"] == 0:
                    _export_snapshot(self)
                if on_step is not None:
                    on_step(self)
                if time.monotonic() - last_ckpt >= 60 * s["checkpoint_minutes"] and not time_boxed:
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
                    self.echo(f"checkpoint saved at step {self.step}")
            self.save_checkpoint()
            finished = self.step >= total
            if finished or time_boxed:
                export_path = _export_final(self)
                why = f"finished {self.step} steps" if finished else \
                    f"time box of {s['max_minutes']:g} min reached at step {self.step}; checkpoint saved"
                self.echo(f"{why}; EMA weights exported to {export_path}")
            else:
                self.echo(f"stopped at step {self.step}; checkpoint saved; run the same command to resume")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return {"step": self.step, "finished": self.step >= total, "time_boxed": time_boxed,
                "images_seen": self.images_seen, "export": str(export_path) if export_path else None}


def _export_final(trainer: Trainer) -> Path:
    mode = trainer.settings["mode"]
    if mode == "latent":
        return export_builtin(trainer, trainer.out / "export" / "latent", name="latent", overwrite=True)
    return export_weights(trainer, trainer.out / "export" / f"{mode}.safetensors")


def _export_snapshot(trainer: Trainer) -> Path:
    stem = trainer.out / "snapshots" / f"ema_{trainer.step:07d}"
    if trainer.settings["mode"] == "latent":
        return export_builtin(trainer, stem, name="latent", overwrite=True)
    return export_weights(trainer, stem.with_suffix(".safetensors"))

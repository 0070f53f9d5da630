"""Training the built-in KernelWizard (the nonlinear-blur stand-in) on synthetic motion blurs.

    python -m diffstategrad.train_blur train --data data/photos --out runs/kernel-wizard [--steps N] ...
    python -m diffstategrad.train_blur export runs/kernel-wizard --data data/photos --out FOLDER
    python -m diffstategrad.train_blur evaluate FOLDER_OR_RUNDIR --data data/photos [--split val]

The method is bkse's kernel encoding (Tran et al., "Explore Image Deblurring via Encoded Blur
Kernel Space", CVPR 2021, Sec. 3.1, and its models/kernel_encoding/image_base_model.py): for a
sharp/blurred pair (x, y), the encoder F gives a code mean mu and deviation sigma, k = mu +
sigma * n with n ~ N(0, I), and the adapter G must reproduce y from x and k:

    L = sum_pixels sqrt((G(x, k) - y)^2 + 1e-6) + lambda * (H W / 256^2) * sum_code (mu^2 + sigma^2 - log(1e-8 + sigma^2) - 1)

(bkse's Charbonnier loss, summed, and its VAE term with lambda = 10, ``kl_weight``; bkse trains on
256x256 crops, so the factor H W / 256^2 keeps its balance between a unit of pixel error and a
nat of code per image area at other crop sizes). The logged loss is L divided by the number of
image values (so it reads as a mean absolute error plus the code cost).

Two stages, as bkse trains its VAE model from its deterministic one (options/kernel_encoding/
GOPRO/wVAE.yml starts from GOPRO_wsharp_woVAE.pth): for the first ``vae_start`` of the steps
(0.3) the code is k = mu and there is no KL term; then k is sampled and the KL weight rises
linearly from 0 to ``kl_weight`` over the next ``kl_ramp`` of the steps (0.2). Started with the
KL term from step 0, the encoder collapses to the prior (KL -> 0, a code that carries nothing)
before the adapter has learnt to use it. The learning rate follows a cosine from ``lr`` to
``lr_min``; Adam with bkse's betas (0.9, 0.99), gradient clipping at 1, EMA weights (exported).
The network is ``BUILTIN_CONFIG`` (3 adapter levels, nf 24, code 96, one extractor block;
crops must be multiples of 32 and at least 64, so that the encoder sees a 2x2 code grid).

Training pairs (``BlurPairs``): x is a random crop of the prepared photographs' *train* split
(``diffstategrad.data.RandomCrops``: multi-scale crops and flips; the held-out ``val`` images
are never read by training), mapped to [0, 1]; y is x blurred by a random motion kernel of the
package's generator (``operators.kernels.motion_blur_kernel``, at the size the motion_deblur
preset scales to for the crop, 17x17 at 64x64, intensity uniform in [0, 1]) *in linear light*:

    y = (K * x^2.2)^(1 / 2.2)     (per channel, reflection padding as the Blur operator)

i.e. the sRGB-like values are linearised with gamma 2.2, blurred and re-encoded, as a camera
integrates light during the exposure; bright details smear more than a blur of the encoded
values would, which is the main nonlinearity of real camera blur (GOPRO's blurred frames are
averages of sharp frames in the same spirit). Nothing saturates: a blur of values in [0, 1]
stays in [0, 1].

Reproducibility and resume: pair i of the stream (training step s uses pairs s B .. s B + B - 1)
is a pure function of (seed, i), the VAE noise of step s is drawn from a generator seeded by
(seed, s) and the initial weights by the seed, so a run resumed from RUNDIR/checkpoint.pt follows
the uninterrupted trajectory bit for bit on a CPU. The checkpoint (model, EMA, Adam state, step,
settings; tensors and plain values, read back with ``torch.load(weights_only=True)``) is written
atomically every ``--checkpoint-minutes``, on SIGTERM / SIGINT, at the time box
(``--max-minutes``) and at the end; re-running the same command resumes, other settings than the
step budget, time box, threads and logging are refused. Both the wall time and the process CPU
time of the training steps are recorded (on a shared machine they differ). ``export`` writes the EMA weights as a
KernelWizard folder (``kernel_wizard.json`` + float32 ``model.safetensors``) with the data, the
settings, steps, wall time, the exact command and the held-out evaluation in its record.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffstategrad.data import RandomCrops, load_split
from diffstategrad.operators.blur import Blur
from diffstategrad.operators.kernels import motion_blur_kernel
from diffstategrad.operators.nonlinear_blur import (
    KernelWizard,
    KernelWizardConfig,
    NonlinearBlur,
    read_kernel_wizard_folder,
    save_kernel_wizard_folder,
)
from diffstategrad.operators.tasks import scale_operator_params

__all__ = [
    "BUILTIN_CONFIG",
    "BlurPairs",
    "BlurTrainer",
    "blur_settings",
    "evaluate_network",
    "export_run",
    "fit_blur_kernel",
    "kernel_wizard_loss",
    "linear_light_blur",
    "load_network",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "diffstategrad-kernel-wizard-checkpoint"
# The shipped stand-in: 3 adapter levels (images in multiples of 32, a 2x2 code at 64x64).
BUILTIN_CONFIG = KernelWizardConfig(nf=24, front_blocks=2, back_blocks=4, kernel_dim=96, extractor_blocks=1,
                                    adapter_levels=3, tail_nf=16)
TINY_CONFIG = KernelWizardConfig(nf=8, front_blocks=1, back_blocks=1, kernel_dim=32, extractor_blocks=1,
                                 adapter_levels=3, tail_nf=8)
GAMMA = 2.2
REFERENCE_AREA = 256 * 256  # bkse's training crops
_KERNEL_STREAM = 0xB1   # pair i's kernel: default_rng([seed, i, _KERNEL_STREAM])
_NOISE_STREAM = 0x7E5   # step s's VAE noise
# Settings that may change between a run and its resumption (they do not change the maths).
_MUTABLE_SETTINGS = {"steps", "max_minutes", "threads", "checkpoint_minutes", "log_every", "command"}


def _seed_for(*entropy: int) -> int:
    state = np.random.SeedSequence([int(e) & 0xFFFFFFFF for e in entropy]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def linear_light_blur(sharp: torch.Tensor, kernels: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """(K * x^gamma)^(1 / gamma) per sample: x (B, C, H, W) in [0, 1], kernels (B, k, k) or (1, k, k)."""
    linear = sharp.clamp(0.0, 1.0) ** gamma
    blurred = Blur(kernels[:, None].to(sharp.dtype))(linear)
    return blurred.clamp(0.0, 1.0) ** (1.0 / gamma)


class BlurPairs:
    """Sharp/blurred pairs in [0, 1]; pair i depends only on (seed, i).

    Args:
        root, split: a prepared photo folder and its split (training reads ``train`` only).
        crop: side of the square crops; the motion kernel side is the motion_deblur preset's
            at that size (17 at 64).
        intensity: (min, max) of the kernel intensity, drawn uniformly per pair.
        gamma: the blur happens on x^gamma (linear light).
    """

    def __init__(self, root, split: str = "train", crop: int = 64, intensity=(0.0, 1.0), gamma: float = GAMMA,
                 seed: int = 0):
        self.crops = RandomCrops(root, split, size=crop, seed=seed)
        self.kernel_size = int(scale_operator_params({"name": "motion_blur", "kernel_size": 61, "intensity": 0.5},
                                                     (crop, crop))["kernel_size"])
        self.intensity = (float(intensity[0]), float(intensity[1]))
        if not 0.0 <= self.intensity[0] <= self.intensity[1] <= 1.0:
            raise ValueError(f"intensity range must lie in [0, 1], got {intensity}")
        self.gamma, self.seed = float(gamma), int(seed)

    def kernel(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(index), _KERNEL_STREAM])
        return motion_blur_kernel(self.kernel_size, rng.uniform(*self.intensity), rng)

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs start .. start + size - 1 as (sharp, blurred), each (size, 3, crop, crop)."""
        indices = range(int(start), int(start) + int(size))
        sharp = (self.crops.batch(int(start), int(size)) + 1.0) / 2.0
        kernels = torch.from_numpy(np.stack([self.kernel(i) for i in indices])).float()
        return sharp, linear_light_blur(sharp, kernels, self.gamma)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def _charbonnier(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((a - b) ** 2 + 1e-6)


def kernel_wizard_loss(network: KernelWizard, sharp: torch.Tensor, blurred: torch.Tensor, noise: torch.Tensor | None,
                       kl_weight: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """bkse's objective (module docstring), divided by the number of image values; also returns
    the Charbonnier and KL parts (same units) and ``gain``, the mean PSNR of G(x, k) against y
    minus that of x itself (dB): how much better than the identity the network reproduces y.
    ``noise`` None: the deterministic code k = mu (bkse's woVAE stage)."""
    fake, mean, sigma = network.reconstruct(sharp, blurred, noise if network.config.use_vae else None)
    values = blurred.numel()
    pixel = _charbonnier(fake, blurred).sum() / values
    area = sharp.shape[-2] * sharp.shape[-1] / REFERENCE_AREA
    kl = (mean**2 + sigma**2 - torch.log(1e-8 + sigma**2) - 1).sum() if network.config.use_vae else mean.new_zeros(())
    kl = kl_weight * area * kl / values
    with torch.no_grad():
        gain = _psnr(fake.clamp(0, 1), blurred) - _psnr(sharp, blurred)
    return pixel + kl, {"pixel": float(pixel.detach()), "kl": float(kl.detach()), "gain": float(gain.mean())}


def blur_settings(data, *, config: KernelWizardConfig = BUILTIN_CONFIG, crop=64, batch=16, steps=3600,
                  lr=1e-3, lr_min=1e-6, betas=(0.9, 0.99), ema_decay=0.999, grad_clip=1.0, kl_weight=10.0,
                  vae_start=0.3, kl_ramp=0.2,
                  intensity=(0.0, 1.0), gamma=GAMMA, seed=0, threads=1, checkpoint_minutes=5.0, log_every=25,
                  max_minutes=None, command=None) -> dict[str, Any]:
    """The settings of a run (recorded in RUNDIR/run.json and in the export)."""
    if crop % config.size_multiple or crop < 2 * config.size_multiple:
        # the encoder's residual blocks reflect-pad the code grid, which needs 2 cells per side
        raise ValueError(f"crop {crop} must be a multiple of {config.size_multiple} (the network's size rule) "
                         f"and at least {2 * config.size_multiple} (a 2x2 code grid for the encoder)")
    if config.extractor_blocks < 1 or config.kernel_dim != config.code_channels:
        # without a residual block the encoder ends in a ReLU: mean and sigma could not be negative
        raise ValueError("training needs extractor_blocks >= 1 and kernel_dim equal to the adapter's code channels "
                         f"({config.code_channels}), got {config.extractor_blocks} and {config.kernel_dim}")
    return {
        "data": str(Path(data).resolve()), "config": config.to_dict(), "crop": int(crop), "batch": int(batch),
        "steps": int(steps), "lr": float(lr), "lr_min": float(lr_min), "lr_schedule": "cosine",
        "betas": [float(b) for b in betas], "ema_decay": float(ema_decay), "grad_clip": float(grad_clip),
        "kl_weight": float(kl_weight), "vae_start": float(vae_start), "kl_ramp": float(kl_ramp), "intensity": [float(v) for v in intensity], "gamma": float(gamma),
        "seed": int(seed), "threads": int(threads), "device": "cpu", "checkpoint_minutes": float(checkpoint_minutes),
        "log_every": int(log_every), "max_minutes": float(max_minutes) if max_minutes else None, "command": command,
    }


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a KernelWizard training checkpoint")
    return ckpt


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class BlurTrainer:
    """Adam (bkse's betas) with a cosine learning rate, gradient clipping, EMA, exact resume."""

    def __init__(self, settings: dict[str, Any], out, echo=print):
        self._start = time.monotonic()
        self.out, self.echo = Path(out), echo
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = self._reconcile(settings)
        s = self.settings
        torch.set_num_threads(int(s["threads"]))
        self.config = KernelWizardConfig.from_dict(s["config"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]))  # the initial weights depend on the seed only
            self.model = KernelWizard(self.config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s["lr"], betas=tuple(s["betas"]))
        self.pairs = BlurPairs(s["data"], "train", crop=s["crop"], intensity=s["intensity"], gamma=s["gamma"],
                               seed=s["seed"])
        self.step, self.wall_time, self.cpu_time, self.stop_requested = 0, 0.0, 0.0, False
        self.resumed = (self.out / CHECKPOINT_NAME).is_file()
        if self.resumed:
            ckpt = _read_checkpoint(self.out / CHECKPOINT_NAME)
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.ema.load_state_dict(ckpt["ema"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step, self.wall_time, self.cpu_time = int(ckpt["step"]), float(ckpt["wall_time"]), float(ckpt["cpu_time"])
            self._truncate_log()

    def _reconcile(self, settings: dict[str, Any]) -> dict[str, Any]:
        path = self.out / "run.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            diffs = sorted(k for k in set(saved) | set(settings) if k not in _MUTABLE_SETTINGS and saved.get(k) != settings.get(k))
            if diffs:
                detail = ", ".join(f"{k}: run has {saved.get(k)!r}, command gives {settings.get(k)!r}" for k in diffs)
                raise ValueError(f"{self.out} holds a run with other settings ({detail}); use another --out or the same settings")
        tmp = path.with_name("run.json.tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, path)
        return settings

    def _truncate_log(self) -> None:
        """Drop loss.csv rows logged after the checkpoint (they are logged again)."""
        path = self.out / "loss.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= self.step]
            with open(path.with_name("loss.csv.tmp"), "w", newline="") as fh:
                csv.writer(fh).writerows(kept)
            os.replace(path.with_name("loss.csv.tmp"), path)

    def save_checkpoint(self) -> None:
        _atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "settings": self.settings, "step": self.step, "wall_time": self.wall_time,
            "cpu_time": self.cpu_time,
            "images_seen": self.step * self.settings["batch"], "model": self.model.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
        }, self.out / CHECKPOINT_NAME)

    def lr_at(self, step: int) -> float:
        s = self.settings
        progress = min(step / max(s["steps"], 1), 1.0)
        return s["lr_min"] + (s["lr"] - s["lr_min"]) * 0.5 * (1 + math.cos(math.pi * progress))

    def kl_weight_at(self, step: int) -> float | None:
        """None during the deterministic stage (the first ``vae_start`` of the steps), then the
        KL weight ramped linearly to ``kl_weight`` over the next ``kl_ramp`` of them."""
        s = self.settings
        progress = step / max(s["steps"], 1)
        if progress < s["vae_start"]:
            return None
        return s["kl_weight"] * min(1.0, (progress - s["vae_start"]) / s["kl_ramp"]) if s["kl_ramp"] > 0 else s["kl_weight"]

    def request_stop(self, *_):
        self.stop_requested = True

    def _time_left(self) -> float:
        limit = self.settings.get("max_minutes") or 0
        return 60 * limit - (time.monotonic() - self._start) if limit > 0 else float("inf")

    def _log(self, row: list) -> None:
        path = self.out / "loss.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "loss", "pixel", "kl", "gain_db", "lr", "images_per_s", "wall_time_s", "cpu_time_s"])
            writer.writerow(row)

    def train_step(self) -> dict[str, float]:
        s, B = self.settings, self.settings["batch"]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        sharp, blurred = self.pairs.batch(self.step * B, B)
        gen = torch.Generator().manual_seed(_seed_for(s["seed"], self.step, _NOISE_STREAM))
        grid = self.model.code_grid(sharp.shape[-2:])
        noise = torch.randn((B, self.config.code_channels, *grid), generator=gen)
        kl_weight = self.kl_weight_at(self.step)
        loss, parts = kernel_wizard_loss(self.model, sharp, blurred, None if kl_weight is None else noise,
                                         kl_weight or 0.0)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {self.step}; the last checkpoint is kept")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s["grad_clip"])
        self.optimizer.step()
        decay = min(s["ema_decay"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        self.step += 1
        return {"loss": float(loss.detach()), **parts}

    def train(self, install_signal_handlers: bool = True) -> dict[str, Any]:
        s = self.settings
        handlers = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if install_signal_handlers else {}
        n_params = sum(p.numel() for p in self.model.parameters())
        self.echo(f"resumed at step {self.step} ({_fmt_duration(self.wall_time)} of training, CPU {_fmt_duration(self.cpu_time)})" if self.resumed
                  else f"new run in {self.out}: KernelWizard, {n_params:,} parameters")
        self.echo(f"target {s['steps']} steps, batch {s['batch']}, crop {s['crop']} (kernels {self.pairs.kernel_size}x"
                  f"{self.pairs.kernel_size}), lr {s['lr']:g} cosine, {s['threads']} thread(s)")
        last_ckpt, window, window_start, time_boxed = time.monotonic(), [], time.monotonic(), False
        try:
            while self.step < s["steps"] and not self.stop_requested and not time_boxed:
                t0, c0 = time.monotonic(), time.process_time()
                window.append(self.train_step())
                self.wall_time += time.monotonic() - t0
                self.cpu_time += time.process_time() - c0
                time_boxed = self._time_left() <= 0
                if self.step % s["log_every"] == 0 or self.step == s["steps"] or time_boxed:
                    means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    ips = len(window) * s["batch"] / max(time.monotonic() - window_start, 1e-9)
                    eta = min((s["steps"] - self.step) * s["batch"] / ips, self._time_left())
                    self.echo(f"step {self.step}/{s['steps']}  loss {means['loss']:.4f} (pixel {means['pixel']:.4f}, "
                              f"kl {means['kl']:.4f})  gain {means['gain']:+.2f} dB  {ips:.1f} img/s  "
                              f"trained {_fmt_duration(self.wall_time)} (CPU {_fmt_duration(self.cpu_time)})  ETA {_fmt_duration(max(eta, 0))}")
                    self._log([self.step, *(f"{means[k]:.6f}" for k in ("loss", "pixel", "kl")), f"{means['gain']:.3f}",
                               f"{self.lr_at(self.step - 1):.6g}", f"{ips:.2f}", f"{self.wall_time:.1f}", f"{self.cpu_time:.1f}"])
                    window, window_start = [], time.monotonic()
                if time.monotonic() - last_ckpt >= 60 * s["checkpoint_minutes"]:
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
            self.save_checkpoint()
            finished = self.step >= s["steps"]
            self.echo(f"finished {self.step} steps" if finished else
                      f"stopped at step {self.step}; checkpoint saved; run the same command to resume")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return {"step": self.step, "finished": self.step >= s["steps"], "time_boxed": time_boxed,
                "wall_time": self.wall_time}


# ---------------------------------------------------------------------------------------------
# Evaluation: how well the network reproduces held-out motion blurs, and how blur-like A is
# ---------------------------------------------------------------------------------------------


def load_network(source) -> tuple[KernelWizard, dict]:
    """(network, record) from a KernelWizard folder or a run folder (its EMA weights)."""
    source = Path(source)
    if (source / CHECKPOINT_NAME).is_file():
        ckpt = _read_checkpoint(source / CHECKPOINT_NAME)
        network = KernelWizard(KernelWizardConfig.from_dict(ckpt["settings"]["config"]))
        network.load_state_dict(ckpt["ema"], strict=True)
        record = {"settings": ckpt["settings"], "step": ckpt["step"], "wall_time": ckpt["wall_time"],
                  "cpu_time": ckpt["cpu_time"]}
        return network.eval().requires_grad_(False), record
    return read_kernel_wizard_folder(source)


def fit_blur_kernel(sharp: torch.Tensor, blurred: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (size, size) kernel K, one for all channels, minimising ||K * sharp - blurred||^2
    (reflection padding as the Blur operator), by least squares; returns (K, K * sharp).
    sharp and blurred: (1, C, H, W)."""
    pad = size // 2
    patches = F.unfold(F.pad(sharp, (pad, pad, pad, pad), mode="reflect"), size)  # (1, C k^2, H W)
    channels = sharp.shape[1]
    design = patches.reshape(channels, size * size, -1).permute(0, 2, 1).reshape(-1, size * size).double()
    target = blurred.reshape(channels, -1).reshape(-1, 1).double()
    kernel = torch.linalg.lstsq(design, target).solution.reshape(size, size)
    fit = (design @ kernel.reshape(-1, 1)).reshape(blurred.shape).to(blurred.dtype)
    return kernel.to(sharp.dtype), fit


@torch.no_grad()
def evaluate_network(network: KernelWizard, data, split: str = "val", count: int = 64, crop: int = 64,
                     seed: int = 1234, batch: int = 16, intensity=(0.0, 1.0), gamma: float = GAMMA) -> dict[str, Any]:
    """Held-out reproduction and the fixed-code operator's blur-likeness, on ``count`` pairs of
    ``split`` crops (seeded by ``seed``, a stream training never uses):

    - ``identity_psnr``: PSNR(x, y), the blur's own strength; ``reproduction_psnr``: PSNR(G(x,
      mu(x, y)), y), the network given the code of the pair (mean, no sampling);
    - ``linear_fit_psnr``: PSNR of y against its best linear blur of x, the floor a linear model
      reaches on these nonlinear blurs;
    - the fixed-code operator A (code seed 0, scale 1.2): ``operator_change_psnr`` PSNR(A(x), x)
      and ``operator_linear_fit_psnr`` PSNR(A(x), K A-fit), how well one blur kernel explains it.
    """
    pairs = BlurPairs(data, split, crop=crop, intensity=intensity, gamma=gamma, seed=seed)
    operator = NonlinearBlur(network)
    rows = {k: [] for k in ("identity_psnr", "reproduction_psnr", "linear_fit_psnr", "operator_change_psnr",
                            "operator_linear_fit_psnr")}
    for start in range(0, count, batch):
        sharp, blurred = pairs.batch(start, min(batch, count - start))
        fake, _, _ = network.reconstruct(sharp, blurred)
        rows["identity_psnr"] += _psnr(sharp, blurred).tolist()
        rows["reproduction_psnr"] += _psnr(fake.clamp(0, 1), blurred).tolist()
        applied = (operator(sharp * 2 - 1) + 1) / 2
        rows["operator_change_psnr"] += _psnr(applied, sharp).tolist()
        for b in range(sharp.shape[0]):
            rows["linear_fit_psnr"].append(float(_psnr(fit_blur_kernel(sharp[b:b + 1], blurred[b:b + 1], pairs.kernel_size)[1], blurred[b:b + 1])))
            fit = fit_blur_kernel(sharp[b:b + 1], applied[b:b + 1], pairs.kernel_size)[1]
            rows["operator_linear_fit_psnr"].append(float(_psnr(fit, applied[b:b + 1])))
    out: dict[str, Any] = {"split": split, "images": sorted(load_split(data, split)), "pairs": count, "crop": crop,
                           "kernel_size": pairs.kernel_size, "seed": seed, "intensity": list(pairs.intensity),
                           "gamma": gamma}
    out.update({k: round(float(np.mean(v)), 3) for k, v in rows.items()})
    out["reproduction_better_than_identity"] = round(float(np.mean(np.array(rows["reproduction_psnr"]) > np.array(rows["identity_psnr"]))), 3)
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _data_record(root) -> dict[str, Any]:
    manifest_path = Path(root) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {"root": str(root), "version": manifest.get("version"), "description": manifest.get("description"),
            "train_images": sorted(load_split(root, "train")), "held_out_images": manifest.get("val", []),
            "build": "python -m diffstategrad.data build --out DIR"}


def export_run(rundir, out, data=None, name: str = "kernel_wizard", count: int = 64) -> Path:
    """Write the EMA weights of ``rundir`` as a KernelWizard folder with its full record, and
    evaluate them on ``count`` pairs of the held-out split of ``data`` (default: the run's data folder)."""
    network, record = load_network(rundir)
    s = record["settings"]
    data = data or s["data"]
    info = {
        "name": name,
        "description": "bkse's KernelWizard architecture in a small configuration, trained with bkse's objective "
                       "on synthetic motion blurs (linear light, gamma 2.2) of the training photographs: a stand-in "
                       "for the GOPRO network, not a replacement",
        "parameters": sum(p.numel() for p in network.parameters()),
        "size_rule": f"height and width multiples of {network.config.size_multiple}; code grid (H/{network.config.size_multiple}, W/{network.config.size_multiple})",
        "data": _data_record(s["data"]),
        "synthesis": {"kernels": "operators.kernels.motion_blur_kernel", "kernel_size": BlurPairs(s["data"], crop=s["crop"]).kernel_size,
                      "intensity": s["intensity"], "gamma": s["gamma"], "blur": "(K * x^gamma)^(1/gamma), reflection padding"},
        "training": {"steps": record["step"], "images_seen": record["step"] * s["batch"],
                     "wall_time_s": round(record["wall_time"], 1), "cpu_time_s": round(record["cpu_time"], 1),
                     "device": s["device"], "threads": s["threads"],
                     "torch": str(torch.__version__), "settings": s, "command": s["command"], "weights": "EMA"},
        "evaluation": evaluate_network(network, data, "val", count=count, crop=s["crop"], intensity=s["intensity"],
                                       gamma=s["gamma"]),
    }
    folder = save_kernel_wizard_folder(network, out, info)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    import click

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli():
        """Train, export and evaluate the built-in KernelWizard (see the module docstring).

        \b
        Examples:
          OMP_NUM_THREADS=1 python -m diffstategrad.train_blur train --data data/photos --out runs/kernel-wizard
          python -m diffstategrad.train_blur export runs/kernel-wizard --out src/diffstategrad/weights/kernel_wizard
          python -m diffstategrad.train_blur evaluate src/diffstategrad/weights/kernel_wizard --data data/photos
        """

    @cli.command("train")
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared photo folder (python -m diffstategrad.data build); its train split only.")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it holds a checkpoint).")
    @click.option("--steps", default=3600, show_default=True, help="Step budget (may change when resuming).")
    @click.option("--batch", default=16, show_default=True)
    @click.option("--crop", default=64, show_default=True)
    @click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (cosine to --lr-min over --steps).")
    @click.option("--lr-min", default=1e-6, show_default=True)
    @click.option("--kl-weight", default=10.0, show_default=True, help="bkse's VAE weight per 256x256 image.")
    @click.option("--vae-start", default=0.3, show_default=True, help="Fraction of the steps trained with the deterministic code (no KL), as bkse's woVAE stage.")
    @click.option("--kl-ramp", default=0.2, show_default=True, help="Fraction of the steps over which the KL weight then rises linearly to --kl-weight.")
    @click.option("--intensity", default="0,1", show_default=True, help="Motion-kernel intensity range MIN,MAX.")
    @click.option("--gamma", default=GAMMA, show_default=True, help="Blur in linear light x^gamma (1: plain linear blur).")
    @click.option("--ema-decay", default=0.999, show_default=True)
    @click.option("--seed", default=0, show_default=True)
    @click.option("--threads", default=1, show_default=True, help="torch threads (also set OMP_NUM_THREADS).")
    @click.option("--max-minutes", default=0.0, show_default=True, help="Stop cleanly after this many minutes (checkpoint); 0: no limit.")
    @click.option("--checkpoint-minutes", default=5.0, show_default=True)
    @click.option("--log-every", default=25, show_default=True)
    @click.option("--tiny", is_flag=True, help="A tiny network (smoke tests only).")
    def train(data, out, steps, batch, crop, lr, lr_min, kl_weight, vae_start, kl_ramp, intensity, gamma, ema_decay, seed, threads,
              max_minutes, checkpoint_minutes, log_every, tiny):
        """Train the KernelWizard on synthetic motion blurs of the training photographs."""
        try:
            lo, hi = (float(v) for v in intensity.split(","))
            settings = blur_settings(data, config=TINY_CONFIG if tiny else BUILTIN_CONFIG, crop=crop, batch=batch,
                                     steps=steps, lr=lr, lr_min=lr_min, kl_weight=kl_weight, vae_start=vae_start,
                                     kl_ramp=kl_ramp, intensity=(lo, hi),
                                     gamma=gamma, ema_decay=ema_decay, seed=seed, threads=threads,
                                     checkpoint_minutes=checkpoint_minutes, log_every=log_every, max_minutes=max_minutes,
                                     command="python -m diffstategrad.train_blur " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv]))
            trainer = BlurTrainer(settings, out, echo=click.echo)
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(str(err).splitlines()[0]) from None
        trainer.train()

    @cli.command("export")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (kernel_wizard.json + model.safetensors).")
    @click.option("--data", default=None, type=click.Path(exists=True, file_okay=False), help="Photo folder for the held-out evaluation (default: the run's).")
    def export(rundir, out, data):
        """Write a run's EMA weights as a KernelWizard folder, with its record and held-out evaluation."""
        path = export_run(rundir, out, data)
        record = json.loads((path / "kernel_wizard.json").read_text())
        size = (path / "model.safetensors").stat().st_size / 2**20
        click.echo(f"wrote {path} ({record['info']['parameters']:,} parameters, {size:.2f} MiB)")
        click.echo(json.dumps(record["info"]["evaluation"], indent=2))

    @cli.command("evaluate")
    @click.argument("source", type=click.Path(exists=True, file_okay=False))
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--split", default="val", show_default=True)
    @click.option("--count", default=64, show_default=True)
    def evaluate(source, data, split, count):
        """Reproduction PSNR of held-out motion blurs and the fixed-code operator's blur fit."""
        network, _ = load_network(source)
        click.echo(json.dumps(evaluate_network(network, data, split, count=count), indent=2))

    cli.main(args=argv, prog_name="python -m diffstategrad.train_blur")


if __name__ == "__main__":
    main()

"""Training of the built-in models, with checkpoint / exact resume.

    python -m diffstategrad.train pixel --data data/photos --out runs/pixel [--steps N] ...
    python -m diffstategrad.train autoencoder --data data/photos --out runs/ae [--crop 128] ...
    python -m diffstategrad.train latent --data data/photos --out runs/latent --autoencoder runs/ae ...
    python -m diffstategrad.train export runs/pixel [--out FILE.safetensors]
    python -m diffstategrad.train export-builtin runs/pixel --out weights/pixel [--name NAME]

Every training mode takes ``--max-minutes M`` (stop cleanly after M minutes of wall time in
this process, then checkpoint and export, to time-box a GPU run; ``--steps`` stays the step
budget), ``--device cuda`` (bf16 autocast on the device's own type, TF32 matmuls/convolutions)
and ``--workers N`` (DataLoader processes making crops, persistent, pinned memory on CUDA).

Modes. The trainer is generic over a *task* (what a batch is, what the loss is, what frozen
state it carries); every task trains on multi-scale random crops of the prepared photographs
(``diffstategrad.data.RandomCrops``).

- ``pixel``: an epsilon-prediction UNet (Ho et al. 2020, Algorithm 1): x0 a crop in [-1, 1],
  t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t from
  ``make_schedule("linear", 1000)``, loss = ||eps - eps_theta(x_t, t)||^2 (mean).
- ``autoencoder``: the KL-regularised f4 autoencoder of the latent prior
  (``priors/small_autoencoder.py``). z = mean + exp(logvar / 2) * n is sampled from the
  posterior, loss = l1_weight * |D(z) - x| + mse_weight * |D(z) - x|^2 (means over pixels) +
  kl_weight * KL / (number of image values), the KL summed over latent elements. Dividing the
  summed KL by the number of image values gives kl_weight the meaning it has in LDM's
  ``LPIPSWithDiscriminator`` (which sums both terms; LDM uses 1e-6). The progress line shows
  the reconstruction PSNR of the training batch.
- ``latent``: an epsilon-prediction UNet on the latents of a frozen autoencoder (its EMA
  weights, from an autoencoder run folder or export). Each crop batch is encoded on the fly
  (posterior mean, fp32, no grad) and multiplied by the scale factor 1 / std(latents),
  measured once at the start of the run on ``scale_images`` fixed training crops (items 2**40
  onwards of the crop stream, never reached by training) -- Stable Diffusion's 0.18215, but
  measured. The DDPM objective as in pixel mode, on the scaled latents. The autoencoder's
  weights, summary and the scale factor are copied into the checkpoint and the export, so a
  latent run and its export are self-contained (the autoencoder folder may be deleted).

Optimisation: AdamW, linear warm-up then constant (or cosine) learning rate, gradient clipping,
an EMA of the weights (decay min(ema_decay, (1 + k) / (10 + k)) at step k), bf16 autocast.

Reproducibility and resume: the crops of step k are items k*B .. k*B + B - 1 of
``RandomCrops`` (pure functions of the seed and the index) and t / eps / the posterior sample
come from a generator on the training device seeded by (seed, k), so an interrupted run that
resumes from RUNDIR/checkpoint.pt follows the same trajectory as an uninterrupted one (bit for
bit on CPU; on CUDA up to the non-determinism of its kernels). Checkpoints (model, EMA,
optimizer, step, RNG states, smoothed loss, the task's frozen state, the export info) hold only
tensors and plain Python values, are read with ``torch.load(..., weights_only=True)`` and are
written atomically (tmp file, then ``os.replace``) every ``--checkpoint-minutes``, on SIGTERM /
SIGINT (then the process exits cleanly), at the time box and at the end. RUNDIR/run.json records
the settings; resuming with different settings is refused, except for the step budget, time box,
threads, device, workers and logging intervals.

Outputs in RUNDIR: ``checkpoint.pt``, ``run.json``, ``loss.csv`` (one row per log interval),
EMA snapshots under ``snapshots/`` every ``--snapshot-every`` steps and, at the end or the time
box, the export: ``export/pixel.safetensors`` (+ ``.json``), ``export/autoencoder.safetensors``
(+ ``.json``) or ``export/latent/`` (a converted folder, as ``export-builtin`` writes it).

Transfer: ``split-shards`` cuts a safetensors file into shards of at most 15 MiB (each itself a
safetensors file), ``join-shards`` (``join_shards``) puts them back together and checks every
tensor against the digest the shards carry.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffstategrad.data import ArrayImages, RandomCrops, load_fashion_mnist
from diffstategrad.priors.small_autoencoder import AUTOENCODER_CONFIG, SmallAutoencoder, kl_divergence
from diffstategrad.priors.unet import LATENT_UNET_CONFIG, PIXEL_UNET_CONFIG, UNet, count_parameters, network_target
from diffstategrad.schedules import alpha_bar_to_sigma, make_schedule
from diffstategrad.storage import atomic_torch_save, atomic_write_text, read_safetensors, read_safetensors_metadata, save_safetensors

__all__ = [
    "PixelTask",
    "AutoencoderTask",
    "LatentTask",
    "Trainer",
    "export_weights",
    "export_builtin",
    "build_builtin_prior",
    "load_exported",
    "load_autoencoder",
    "load_checkpoint_model",
    "load_checkpoint_file",
    "run_view",
    "split_shards",
    "join_shards",
    "step_seed",
    "pixel_settings",
    "autoencoder_settings",
    "latent_settings",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "diffstategrad-train-checkpoint"
CHECKPOINT_VERSION = 2
EXPORT_FORMAT = "diffstategrad-unet"
AUTOENCODER_EXPORT_FORMAT = "diffstategrad-autoencoder"
SHARD_MAX_BYTES = 15 * 2**20

# The fixed crops on which a latent run measures its scale factor: items SCALE_CROP_START ..
# of the training crop stream (training reads items 0 .. steps * batch).
SCALE_CROP_START = 2**40

# Settings that may change between a run and its resumption (they do not change the maths).
# Settings added after runs existed: a run.json without them had these values.
_SETTING_DEFAULTS = {"dataset": "photos", "preconditioning": "none", "sigma_data": 0.5, "t_sampling": "uniform"}
DATASETS = ("photos", "fashion-mnist")
T_SAMPLINGS = ("uniform", "lognormal")

_MUTABLE_SETTINGS = {"steps", "threads", "device", "workers", "checkpoint_minutes", "log_every", "snapshot_every",
                     "command", "max_minutes"}


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws (t, eps) of training step ``step``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0x7E5]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Checkpoint files: tensors and plain values only, read with weights_only=True
# ---------------------------------------------------------------------------------------------


def _legacy_numpy_globals() -> list:
    """What a version-1 checkpoint needs beyond tensors: it stored numpy's RNG state as the tuple
    of ``np.random.get_state()`` (a uint32 ndarray inside). These numpy types rebuild arrays of
    plain dtypes only; nothing callable is allowed."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [np.ndarray, np.dtype, _reconstruct]
    uint32_dtype = getattr(getattr(np, "dtypes", None), "UInt32DType", None)
    if uint32_dtype is not None:
        allowed.append(uint32_dtype)
    return allowed


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint read with ``torch.load(weights_only=True)`` (no arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    with torch.serialization.safe_globals(_legacy_numpy_globals()):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a diffstategrad training checkpoint")
    return ckpt


def _numpy_rng_to_plain(state) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_rng_from_plain(obj) -> tuple:
    if isinstance(obj, dict):
        return (obj["name"], obj["keys"].numpy().astype(np.uint32), int(obj["pos"]), int(obj["has_gauss"]),
                float(obj["cached_gaussian"]))
    return tuple(obj)  # version 1: the tuple itself


# ---------------------------------------------------------------------------------------------
# Tasks: what a batch is, what the loss is, what frozen state the run carries
# ---------------------------------------------------------------------------------------------


def data_summary(settings: dict[str, Any]) -> dict[str, Any]:
    """Training data of a run for its model card: image lists from the prepared folder."""
    root = Path(settings["data"])
    if settings.get("dataset", "photos") == "fashion-mnist":
        return {"root": str(root), "dataset": "fashion-mnist",
                "description": "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), Debian package dataset-fashion-mnist; "
                               "the 60,000 training images, zero-padded from 28x28 to 32x32; the 10,000 test images held out",
                "train_images": 60000, "held_out_images": "the 10,000 test images", "crop": settings["crop"], "flip": True}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    def names(split):
        if split in manifest:
            return sorted(manifest[split])
        return sorted(p.stem for p in (root / split).glob("*.png")) if (root / split).is_dir() else []

    return {
        "root": str(root),
        "version": manifest.get("version"),
        "description": manifest.get("description"),
        "train_images": names("train"),
        "held_out_images": names("val"),
        "crop": settings["crop"],
        "scale_range": settings["scale_range"],
        "native_prob": settings["native_prob"],
        "flip": True,
    }


class _CropTask:
    """Shared by every task: the crop stream and its batching."""

    mode = ""
    metric_names: tuple[str, ...] = ()

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self._dataset: RandomCrops | None = None

    @property
    def dataset(self) -> RandomCrops | ArrayImages:
        """The crop stream (loaded on first use, so exporting a run does not read its data)."""
        if self._dataset is None:
            s = self.settings
            if s.get("dataset", "photos") == "fashion-mnist":
                self._dataset = ArrayImages(load_fashion_mnist("train", root=s["data"]), seed=s["seed"])
                return self._dataset
            self._dataset = RandomCrops(s["data"], "train", size=s["crop"], scale_range=tuple(s["scale_range"]),
                                        native_prob=s["native_prob"], seed=s["seed"])
        return self._dataset

    def build_model(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, device: torch.device, state: dict[str, Any] | None, echo=print) -> None:
        """Set up frozen parts (``state``: what ``state_dict`` returned, from a checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def batches(self, start_step: int):
        """Iterator over the training batches of steps start_step, start_step + 1, ...

        Batch k is items k*B .. k*B + B - 1 of the crop dataset, whether they are made here or
        by ``workers`` DataLoader processes (for fast accelerators), so results do not depend on it.
        """
        B, workers = self.settings["batch"], int(self.settings.get("workers", 0))
        dataset = self.dataset
        if workers <= 0:
            return (dataset.batch(k * B, B) for k in itertools.count(start_step))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=B, sampler=itertools.count(start_step * B), num_workers=workers,
            persistent_workers=True, prefetch_factor=2,  # 2 batches per worker in shared memory
            pin_memory=str(self.settings.get("device", "cpu")).startswith("cuda"),
        )
        return iter(loader)

    def export_info(self) -> dict[str, Any]:
        return {"kind": self.mode, "data": data_summary(self.settings)}


class _EpsilonMixin:
    """The denoising objective on a batch of clean states: DDPM's epsilon regression (Ho et al.
    2020, Algorithm 1) with ``preconditioning: none``, or EDM's preconditioned regression with
    unit weight on the network's target (``edm``, see ``priors/unet.py``). Timesteps are drawn
    uniformly (DDPM) or, with ``t_sampling: lognormal``, as the timesteps nearest to EDM's
    ln(sigma) ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1)."""

    def _timesteps(self, B, gen, device):
        T = self.schedule.num_timesteps
        if self.settings.get("t_sampling", "uniform") == "uniform":
            return torch.randint(0, T, (B,), generator=gen, device=device)
        log_sigma = -1.2 + 1.2 * torch.randn(B, generator=gen, device=device)
        sigmas = alpha_bar_to_sigma(self.schedule.alphas_cumprod).to(device, torch.float32)  # increasing in t
        return torch.searchsorted(sigmas, log_sigma.exp()).clamp(max=T - 1)

    def _epsilon_loss(self, model, step, x0, device, autocast):
        B = x0.shape[0]
        gen = torch.Generator(device=device).manual_seed(step_seed(self.settings["seed"], step))
        t = self._timesteps(B, gen, device)
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
        a = self.schedule.alpha_bar(t, like=x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        scale, target = network_target(x0, noise, a, self.settings.get("preconditioning", "none"), self.settings.get("sigma_data", 0.5))
        with autocast():
            out = model(scale * x_t, t)
        return torch.mean((out.float() - target) ** 2)

    def _diffusion_info(self) -> dict[str, Any]:
        info = {"schedule": {"name": self.settings["schedule"], "num_timesteps": self.settings["num_timesteps"]},
                "prediction": "epsilon", "preconditioning": self.settings.get("preconditioning", "none"),
                "t_sampling": self.settings.get("t_sampling", "uniform")}
        if info["preconditioning"] == "edm":
            info["sigma_data"] = self.settings.get("sigma_data", 0.5)
        return info


class PixelTask(_EpsilonMixin, _CropTask):
    """DDPM epsilon objective on multi-scale random crops of the prepared photographs."""

    mode = "pixel"

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.schedule = make_schedule(settings["schedule"], settings["num_timesteps"])

    def build_model(self) -> nn.Module:
        return UNet(self.settings["model"])

    def loss(self, model, step, x0, device, autocast):
        x0 = x0.to(device, non_blocking=True)
        return self._epsilon_loss(model, step, x0, device, autocast), x0.shape[0], {}

    def export_info(self) -> dict[str, Any]:
        return {**super().export_info(), **self._diffusion_info()}


class AutoencoderTask(_CropTask):
    """The KL-regularised autoencoder: L1 + MSE reconstruction + kl_weight * KL."""

    mode = "autoencoder"
    metric_names = ("psnr",)

    def build_model(self) -> nn.Module:
        return SmallAutoencoder(self.settings["model"])

    def loss(self, model, step, x0, device, autocast):
        s = self.settings
        x = x0.to(device, non_blocking=True)
        gen = torch.Generator(device=device).manual_seed(step_seed(s["seed"], step))
        with autocast():
            mean, logvar = model.posterior(x)
        mean, logvar = mean.float(), logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=device)
        with autocast():
            rec = model.decode(z)
        err = rec.float() - x
        l1, mse = err.abs().mean(), err.square().mean()
        kl = kl_divergence(mean, logvar).sum() / x.numel()
        loss = s["l1_weight"] * l1 + s["mse_weight"] * mse + s["kl_weight"] * kl
        psnr = 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12))
        return loss, x.shape[0], {"psnr": psnr}

    def export_info(self) -> dict[str, Any]:
        return {**super().export_info(), "objective": {
            "l1_weight": self.settings["l1_weight"], "mse_weight": self.settings["mse_weight"],
            "kl_weight": self.settings["kl_weight"], "kl_normalisation": "sum over latent elements / number of image values"}}


class LatentTask(_EpsilonMixin, _CropTask):
    """DDPM epsilon objective on the scaled latents of a frozen autoencoder."""

    mode = "latent"

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.schedule = make_schedule(settings["schedule"], settings["num_timesteps"])
        self.autoencoder: SmallAutoencoder | None = None
        self.autoencoder_summary: dict[str, Any] = {}
        self.scale_factor: float | None = None

    def build_model(self) -> nn.Module:
        return UNet(self.settings["model"])

    def prepare(self, device, state, echo=print) -> None:
        if state:
            ae = SmallAutoencoder(state["autoencoder_config"])
            ae.load_state_dict(state["autoencoder"], strict=True)
            summary, scale = dict(state["autoencoder_summary"]), float(state["scale_factor"])
        else:
            ae, summary = load_autoencoder(self.settings["autoencoder"])
            scale = None
        unet_in = int(self.settings["model"]["in_channels"])
        if unet_in != ae.latent_channels or int(self.settings["model"]["out_channels"]) != ae.latent_channels:
            raise ValueError(f"the latent UNet has {unet_in} channels, the autoencoder's latents {ae.latent_channels}")
        self.autoencoder = ae.float().to(device).eval().requires_grad_(False)
        self.autoencoder_summary = summary
        if scale is None:
            scale = self.measure_scale(device)
            echo(f"latent scale factor {scale:.6f} (1 / std of the latents of {self.settings['scale_images']} fixed training crops)")
        self.scale_factor = scale

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled posterior means, in float32 whatever autocast is active outside."""
        with torch.autocast(x.device.type, enabled=False):
            return self.autoencoder.encode(x.float())

    def measure_scale(self, device) -> float:
        n, B = int(self.settings["scale_images"]), int(self.settings["batch"])
        chunks = []
        for start in range(0, n, B):
            x = self.dataset.batch(SCALE_CROP_START + start, min(B, n - start)).to(device)
            chunks.append(self.encode(x).double().cpu())
        std = float(torch.cat(chunks).std())
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"the autoencoder's latents have standard deviation {std}; is it trained?")
        return 1.0 / std

    def loss(self, model, step, x0, device, autocast):
        z = self.encode(x0.to(device, non_blocking=True)) * self.scale_factor
        return self._epsilon_loss(model, step, z, device, autocast), x0.shape[0], {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "autoencoder_config": dict(self.autoencoder.config),
            "autoencoder": {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.autoencoder.state_dict().items()},
            "scale_factor": float(self.scale_factor),
            "autoencoder_summary": self.autoencoder_summary,
        }

    def export_info(self) -> dict[str, Any]:
        return {**super().export_info(), **self._diffusion_info(), "scale_factor": self.scale_factor,
                "autoencoder": self.autoencoder_summary}


TASKS = {"pixel": PixelTask, "autoencoder": AutoencoderTask, "latent": LatentTask}


# ---------------------------------------------------------------------------------------------
# The generic trainer
# ---------------------------------------------------------------------------------------------


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
        self.settings = self._reconcile_settings(settings)
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
        self.task.prepare(self.device, task_state, echo=self.echo)

    def close(self) -> None:
        """Release the run folder (another process may then resume it)."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # -- settings -------------------------------------------------------------------------------

    def _reconcile_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        path = self.out / "run.json"
        settings = {**_SETTING_DEFAULTS, **settings}
        if path.is_file():
            saved = {**_SETTING_DEFAULTS, **json.loads(path.read_text())}
            diffs = {
                k: (saved.get(k), settings.get(k))
                for k in set(saved) | set(settings)
                if k not in _MUTABLE_SETTINGS and saved.get(k) != settings.get(k)
            }
            if diffs:
                lines = ", ".join(f"{k}: run has {a!r}, command gives {b!r}" for k, (a, b) in sorted(diffs.items()))
                raise ValueError(f"{self.out} holds a run with other settings ({lines}); use another --out or the same settings")
        atomic_write_text(path, json.dumps(settings, indent=2))
        return settings

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
            "numpy_rng": _numpy_rng_to_plain(np.random.get_state()),
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
        np.random.set_state(_numpy_rng_from_plain(ckpt["numpy_rng"]))
        cuda_rng = ckpt.get("cuda_rng")
        if cuda_rng and self.device.type == "cuda" and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.step, self.images_seen = int(ckpt["step"]), int(ckpt["images_seen"])
        self.wall_time, self.smoothed_loss = float(ckpt["wall_time"]), float(ckpt["smoothed_loss"])
        self.resumed_from = self.step
        self._truncate_log(self.step)
        return ckpt.get("task")

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


# ---------------------------------------------------------------------------------------------
# A finished (or running) run, seen from an export
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunView:
    """What an export needs: settings, the prepared task (on CPU), the EMA model (CPU, float32)."""

    settings: dict[str, Any]
    task: Any
    ema: nn.Module
    step: int
    images_seen: int
    wall_time: float
    info: dict[str, Any]
    source: str


def run_view(source) -> RunView:
    """A ``RunView`` of a ``Trainer`` or of a run folder (its checkpoint.pt, read safely)."""
    if isinstance(source, Trainer):
        tr = source
        ema = tr.task.build_model()
        ema.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in tr.ema.state_dict().items()}, strict=True)
        return RunView(tr.settings, tr.task, ema.eval(), tr.step, tr.images_seen, tr.wall_time, tr.task.export_info(),
                       str(tr.out))
    rundir = Path(source)
    ckpt = load_checkpoint_file(rundir / CHECKPOINT_NAME)
    settings = ckpt["settings"]
    task = TASKS[settings["mode"]](settings)
    if settings["mode"] == "latent" and not ckpt.get("task"):
        raise ValueError(f"{rundir / CHECKPOINT_NAME} holds no autoencoder weights; it was not written by this trainer")
    task.prepare(torch.device("cpu"), ckpt.get("task"), echo=lambda m: None)
    ema = task.build_model()
    ema.load_state_dict({k: v.to(torch.float32) for k, v in ckpt["ema"].items()}, strict=True)
    info = ckpt.get("info") or task.export_info()
    return RunView(settings, task, ema.eval(), int(ckpt["step"]), int(ckpt["images_seen"]), float(ckpt["wall_time"]),
                   info, str(rundir))


def training_summary(view: RunView) -> dict[str, Any]:
    """How a model was trained, for its record / model card."""
    s = view.settings
    summary = {
        "steps": view.step,
        "images_seen": view.images_seen,
        "wall_time_s": round(view.wall_time, 1),
        "device": s["device"],
        "batch": s["batch"],
        "crop": s["crop"],
        "lr": s["lr"],
        "lr_schedule": s["lr_schedule"],
        "warmup_steps": s["warmup_steps"],
        "ema_decay": s["ema_decay"],
        "weight_decay": s["weight_decay"],
        "grad_clip": s["grad_clip"],
        "bf16": s["bf16"],
        "seed": s["seed"],
        "threads": s["threads"],
        "workers": s.get("workers", 0),
        "max_minutes": s.get("max_minutes"),
        "command": s.get("command"),
        "data": view.info["data"],
    }
    if s["mode"] == "autoencoder":
        summary.update(kl_weight=s["kl_weight"], l1_weight=s["l1_weight"], mse_weight=s["mse_weight"])
    if s["mode"] == "latent":
        summary["scale_images"] = s["scale_images"]
    return summary


def autoencoder_summary(view: RunView) -> dict[str, Any]:
    """The autoencoder part of a latent model's card."""
    ae = view.ema
    return {"parameters": count_parameters(ae), "architecture": dict(ae.config), "downsampling": ae.downsampling,
            "latent_channels": ae.latent_channels, "run": view.source, **training_summary(view)}


def _export_record(settings: dict, task_info: dict, model: nn.Module, step: int, images_seen: int, wall_time: float) -> dict:
    """The record of a pixel export (``export/pixel.safetensors``)."""
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


def _autoencoder_record(view: RunView) -> dict:
    ae = view.ema
    return {
        "format": AUTOENCODER_EXPORT_FORMAT,
        "format_version": 1,
        "kind": "autoencoder",
        "architecture": dict(ae.config),
        "parameters": count_parameters(ae),
        "downsampling": ae.downsampling,
        "latent_channels": ae.latent_channels,
        "data_range": [-1.0, 1.0],
        "weights": "ema",
        "objective": view.info.get("objective"),
        "summary": autoencoder_summary(view),
    }


def export_weights(source, out: str | os.PathLike) -> Path:
    """Write the EMA weights of a pixel or autoencoder run (a ``Trainer`` or a run folder) as
    ``out`` (.safetensors, the record in its metadata) plus the record as JSON beside it (same
    stem). Returns the safetensors path. Latent runs export as a converted folder
    (``export_builtin``)."""
    view = run_view(source)
    mode = view.settings["mode"]
    if mode == "pixel":
        record = _export_record(view.settings, view.info, view.ema, view.step, view.images_seen, view.wall_time)
    elif mode == "autoencoder":
        record = _autoencoder_record(view)
    else:
        raise ValueError("a latent run exports as a converted folder: use export_builtin / `export-builtin`")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in view.ema.state_dict().items()}
    save_safetensors(tensors, out, metadata={"config": json.dumps(record)})
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    return out


def _read_record(path: Path) -> dict:
    meta = read_safetensors_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no diffstategrad config in its metadata")
    return json.loads(meta["config"])


def load_exported(path: str | os.PathLike, device="cpu") -> tuple[UNet, dict]:
    """(UNet in eval mode, record) from an exported pixel .safetensors (record read from its metadata)."""
    path = Path(path)
    record = _read_record(path)
    if record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file (format {record.get('format')!r})")
    model = UNet(record["architecture"])
    model.load_state_dict(read_safetensors(path), strict=True)
    return model.to(device).eval(), record


def load_autoencoder(path: str | os.PathLike) -> tuple[SmallAutoencoder, dict]:
    """(autoencoder in eval mode with its EMA weights, summary) from an autoencoder run folder
    (its checkpoint), its export folder or an exported ``autoencoder.safetensors``."""
    p = Path(path)
    if p.is_dir() and (p / CHECKPOINT_NAME).is_file():
        view = run_view(p)
        if view.settings["mode"] != "autoencoder":
            raise ValueError(f"{p} is a {view.settings['mode']} run, not an autoencoder run")
        return view.ema.eval(), autoencoder_summary(view)
    if p.is_dir() and (p / "autoencoder.safetensors").is_file():
        p = p / "autoencoder.safetensors"
    elif p.is_dir() and (p / "export" / "autoencoder.safetensors").is_file():
        p = p / "export" / "autoencoder.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no autoencoder at {path}: give an autoencoder run folder or its export/autoencoder.safetensors")
    record = _read_record(p)
    if record.get("format") != AUTOENCODER_EXPORT_FORMAT:
        raise ValueError(f"{p} is not a {AUTOENCODER_EXPORT_FORMAT} file (format {record.get('format')!r})")
    ae = SmallAutoencoder(record["architecture"])
    ae.load_state_dict(read_safetensors(p), strict=True)
    return ae.eval(), {**record["summary"], "export": str(p)}


def load_checkpoint_model(rundir: str | os.PathLike, which: str = "ema") -> tuple[nn.Module, dict]:
    """(network in eval mode, checkpoint summary) from RUNDIR/checkpoint.pt without disturbing
    it: the UNet of a pixel or latent run, the autoencoder of an autoencoder run."""
    ckpt = load_checkpoint_file(Path(rundir) / CHECKPOINT_NAME)
    model = TASKS[ckpt["settings"]["mode"]](ckpt["settings"]).build_model()
    model.load_state_dict(ckpt[which], strict=True)
    summary = {k: ckpt[k] for k in ("step", "images_seen", "wall_time")} | {"settings": ckpt["settings"]}
    return model.eval(), summary


# ---------------------------------------------------------------------------------------------
# The shipped format: converted folders (config.json + model.safetensors)
# ---------------------------------------------------------------------------------------------


def builtin_info(view: RunView, name: str) -> dict[str, Any]:
    """The ``info`` block of a shipped model: what ``diffstategrad models`` and the card show."""
    s = view.settings
    unet = view.ema
    info = {
        "name": name,
        "kind": s["mode"],
        "parameters": count_parameters(unet),
        "architecture": dict(unet.config),
        **view.info,
        **training_summary(view),
        "data_range": [-1.0, 1.0],
        "weights": "ema",
    }
    info["kind"] = s["mode"]
    if s["mode"] == "pixel":
        info["size_multiple"] = unet.size_multiple
    else:
        ae = view.task.autoencoder
        info.update(
            parameters=count_parameters(unet) + count_parameters(ae),
            unet_parameters=count_parameters(unet),
            autoencoder_parameters=count_parameters(ae),
            latent_channels=ae.latent_channels,
            downsampling=ae.downsampling,
            size_multiple=unet.size_multiple * ae.downsampling,
            scale_factor=float(view.task.scale_factor),
            autoencoder=view.task.autoencoder_summary,
        )
    return info


def build_builtin_prior(source, name: str = "builtin"):
    """The ``BuiltinPixelPrior`` / ``BuiltinLatentPrior`` (CPU, float32, EMA weights) of a pixel or
    latent run (a ``Trainer`` or a run folder)."""
    from diffstategrad.priors.builtin import BuiltinLatentPrior, BuiltinPixelPrior

    view = run_view(source)
    s = view.settings
    schedule = make_schedule(s["schedule"], s["num_timesteps"]) if "schedule" in s else None
    info = builtin_info(view, name) if schedule is not None else None
    if s["mode"] == "pixel":
        precond = {"kind": s.get("preconditioning", "none"), "sigma_data": s.get("sigma_data", 0.5)}
        prior = BuiltinPixelPrior(view.ema.config, schedule, info, precond)
    elif s["mode"] == "latent":
        ae = view.task.autoencoder
        prior = BuiltinLatentPrior(view.ema.config, ae.config, schedule, view.task.scale_factor, info)
        prior.autoencoder.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in ae.state_dict().items()}, strict=True)
    else:
        raise ValueError(f"a {s['mode']} run is not a diffusion prior; train a latent run on it "
                         "(python -m diffstategrad.train latent --autoencoder RUNDIR ...) and export that")
    prior.unet.load_state_dict(view.ema.state_dict(), strict=True)
    prior.info["size_rule"] = prior.size_rule()
    return prior.float().eval().requires_grad_(False)


def export_builtin(source, out: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
    """Write a pixel or latent run as a converted folder (config.json + float32 model.safetensors)
    that ``load_prior("converted", out)`` loads and that ships under ``diffstategrad/weights/``.
    The folder is written beside ``out`` and then moved into place."""
    from diffstategrad.priors.converted import save_converted

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    prior = build_builtin_prior(source, name or out.name)
    view_source = str(source.out) if isinstance(source, Trainer) else str(source)
    steps = prior.info.get("steps")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_converted(prior, tmp, source=f"diffstategrad.train {prior.info['kind']} run {view_source} (step {steps}, EMA weights)")
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


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


# ---------------------------------------------------------------------------------------------
# Shards: moving files of > 16 MiB through a channel that refuses them
# ---------------------------------------------------------------------------------------------


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_shards(path: str | os.PathLike, prefix: str | os.PathLike, max_bytes: int = SHARD_MAX_BYTES) -> list[Path]:
    """Cut a safetensors file into ``PREFIX.partI.safetensors`` files of at most ``max_bytes``
    each (whole tensors per shard; each shard is itself a safetensors file). Every shard's
    metadata carries the original metadata, the shard count and a digest of all tensors, which
    ``join_shards`` checks."""
    path, prefix = Path(path), Path(prefix)
    metadata = read_safetensors_metadata(path)
    tensors = read_safetensors(path)
    digest = _tensor_digest(tensors)
    budget = max_bytes - 256 * 1024  # room for the JSON header
    groups: list[list[str]] = [[]]
    used = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if nbytes > budget:
            raise ValueError(f"tensor {k} ({nbytes} bytes) does not fit in a shard of {max_bytes} bytes")
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += nbytes
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for old in prefix.parent.glob(prefix.name + ".part*.safetensors"):
        old.unlink()
    paths = []
    for i, keys in enumerate(groups):
        shard = prefix.with_name(f"{prefix.name}.part{i}.safetensors")
        meta = {"diffstategrad_shard": "1", "shard": str(i), "shards": str(len(groups)), "original_name": path.name,
                "original_sha256": _sha256_file(path), "tensors_sha256": digest, "original_metadata": json.dumps(metadata)}
        save_safetensors({k: tensors[k] for k in keys}, shard, metadata=meta)
        if shard.stat().st_size > max_bytes:
            raise RuntimeError(f"{shard} came out larger than {max_bytes} bytes")
        paths.append(shard)
    return paths


def join_shards(parts, out: str | os.PathLike) -> Path:
    """Reassemble the shards of ``split_shards`` into the safetensors file ``out``.

    Checks that every shard is present once and that every tensor (name, dtype, shape, bytes)
    equals the original's; the metadata is restored. (The file's bytes may differ from the
    original's: safetensors does not fix the order of the metadata keys.)

    From a shell:  python -m diffstategrad.train join-shards OUT.safetensors PREFIX.part*.safetensors
    """
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("no shards given")
    metas = []
    for p in parts:
        meta = read_safetensors_metadata(p)
        if meta.get("diffstategrad_shard") != "1":
            raise ValueError(f"{p} is not a shard written by split_shards")
        metas.append(meta)
    count, digest = int(metas[0]["shards"]), metas[0]["tensors_sha256"]
    indices = sorted(int(m["shard"]) for m in metas)
    if indices != list(range(count)) or any(m["tensors_sha256"] != digest for m in metas):
        raise ValueError(f"expected shards 0..{count - 1} of one file, got indices {indices}")
    tensors: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in read_safetensors(p).items():
            if k in tensors:
                raise ValueError(f"tensor {k} appears in two shards")
            tensors[k] = v
    if _tensor_digest(tensors) != digest:
        raise ValueError("the joined tensors differ from the original file's (a shard is damaged)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, out, metadata=json.loads(metas[0]["original_metadata"]))


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _base_settings(mode, data, model, crop, batch, steps, lr, warmup, lr_schedule, ema_decay, weight_decay,
                   grad_clip, bf16, seed, threads, device, workers, scale_min, native_prob, checkpoint_minutes,
                   log_every, snapshot_every, max_minutes, command) -> dict[str, Any]:
    settings = {
        "mode": mode,
        "data": str(Path(data).resolve()),
        "model": dict(model),
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
        "max_minutes": float(max_minutes) if max_minutes else None,
        "command": command,
    }
    return settings


def pixel_settings(data, crop=64, batch=32, steps=20000, lr=2e-4, warmup=500, lr_schedule="constant",
                   ema_decay=0.999, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                   device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                   log_every=50, snapshot_every=2500, command=None, max_minutes=None, dataset="photos",
                   preconditioning="none", sigma_data=0.5, t_sampling="uniform") -> dict[str, Any]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
    if dataset == "fashion-mnist":
        from diffstategrad.priors.unet import FASHION_UNET_CONFIG

        model = model or FASHION_UNET_CONFIG
        if crop != 32:
            raise ValueError("Fashion-MNIST images are 32x32 after padding: use crop 32")
    s = _base_settings("pixel", data, model or PIXEL_UNET_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "schedule": "linear", "num_timesteps": 1000, "dataset": dataset, "preconditioning": preconditioning,
            "sigma_data": float(sigma_data), "t_sampling": t_sampling}


def autoencoder_settings(data, crop=128, batch=16, steps=20000, lr=2e-4, warmup=200, lr_schedule="constant",
                         ema_decay=0.998, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                         device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                         log_every=50, snapshot_every=0, command=None, max_minutes=None, kl_weight=1e-6,
                         l1_weight=1.0, mse_weight=1.0) -> dict[str, Any]:
    s = _base_settings("autoencoder", data, model or AUTOENCODER_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "kl_weight": float(kl_weight), "l1_weight": float(l1_weight), "mse_weight": float(mse_weight)}


def latent_settings(data, autoencoder, crop=128, batch=32, steps=20000, lr=2e-4, warmup=500, lr_schedule="constant",
                    ema_decay=0.999, weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, threads=1,
                    device="cpu", workers=0, model=None, scale_min=0.25, native_prob=0.25, checkpoint_minutes=5.0,
                    log_every=50, snapshot_every=0, command=None, max_minutes=None, scale_images=256) -> dict[str, Any]:
    s = _base_settings("latent", data, model or LATENT_UNET_CONFIG, crop, batch, steps, lr, warmup, lr_schedule,
                       ema_decay, weight_decay, grad_clip, bf16, seed, threads, device, workers, scale_min,
                       native_prob, checkpoint_minutes, log_every, snapshot_every, max_minutes, command)
    return {**s, "schedule": "linear", "num_timesteps": 1000, "autoencoder": str(Path(autoencoder).resolve()),
            "scale_images": int(scale_images)}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    import click

    def train_options(crop, batch, steps, lr, warmup, ema_decay, snapshot_every):
        options = [
            click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset (python -m diffstategrad.data build)."),
            click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it holds a checkpoint)."),
            click.option("--crop", default=crop, show_default=True, help="Crop size."),
            click.option("--batch", default=batch, show_default=True),
            click.option("--steps", default=steps, show_default=True, help="Step budget (may be raised when resuming)."),
            click.option("--max-minutes", default=0.0, show_default=True, help="Stop cleanly after this many minutes of wall time (checkpoint + export); 0: no limit."),
            click.option("--lr", default=lr, show_default=True),
            click.option("--warmup", default=warmup, show_default=True, help="Linear warm-up steps."),
            click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True),
            click.option("--ema-decay", default=ema_decay, show_default=True),
            click.option("--weight-decay", default=0.0, show_default=True),
            click.option("--grad-clip", default=1.0, show_default=True),
            click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast."),
            click.option("--seed", default=0, show_default=True),
            click.option("--threads", default=1, show_default=True, help="torch threads (also set OMP_NUM_THREADS)."),
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda, ... (bf16 autocast on either)."),
            click.option("--workers", default=0, show_default=True, help="DataLoader processes making crops (0: in the training process)."),
            click.option("--scale-min", default=0.25, show_default=True, help="Smallest crop downscaling factor."),
            click.option("--native-prob", default=0.25, show_default=True, help="Probability of a crop at the original resolution."),
            click.option("--tiny", is_flag=True, help="A tiny network (smoke tests only)."),
            click.option("--checkpoint-minutes", default=5.0, show_default=True),
            click.option("--log-every", default=50, show_default=True),
            click.option("--snapshot-every", default=snapshot_every, show_default=True, help="Export EMA snapshots every N steps (0: never)."),
        ]

        def decorate(f):
            for option in reversed(options):
                f = option(f)
            return f

        return decorate

    def common(kw: dict, model) -> dict:
        return dict(
            crop=kw["crop"], batch=kw["batch"], steps=kw["steps"], lr=kw["lr"], warmup=kw["warmup"],
            lr_schedule=kw["lr_schedule"], ema_decay=kw["ema_decay"], weight_decay=kw["weight_decay"],
            grad_clip=kw["grad_clip"], bf16=kw["bf16"], seed=kw["seed"], threads=kw["threads"], device=kw["device"],
            workers=kw["workers"], model=model, scale_min=kw["scale_min"], native_prob=kw["native_prob"],
            checkpoint_minutes=kw["checkpoint_minutes"], log_every=kw["log_every"], snapshot_every=kw["snapshot_every"],
            max_minutes=kw["max_minutes"] or None,
            command="python -m diffstategrad.train " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv]),
        )

    def run(settings, out):
        try:
            trainer = Trainer(settings, out, echo=lambda m: click.echo(m))
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from None
        try:
            trainer.train()
        finally:
            trainer.close()

    def check_crop(crop, multiple, why):
        if crop % multiple:
            raise click.BadParameter(f"must be a multiple of {multiple} ({why})", param_hint="--crop")

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli():
        """Train the built-in models (checkpoints and resumes; see the module docstring).

        \b
        Examples:
          OMP_NUM_THREADS=1 python -m diffstategrad.train pixel --data data/photos --out runs/pixel
          python -m diffstategrad.train autoencoder --data data/photos --out runs/ae --device cuda --workers 12
          python -m diffstategrad.train latent --data data/photos --out runs/latent --autoencoder runs/ae
          python -m diffstategrad.train export-builtin runs/latent --out weights/latent
        """

    @cli.command("pixel")
    @train_options(crop=64, batch=32, steps=20000, lr=2e-4, warmup=500, ema_decay=0.999, snapshot_every=2500)
    @click.option("--dataset", type=click.Choice(DATASETS), default="photos", show_default=True,
                  help="photos: crops of a prepared photo folder; fashion-mnist: --data is the IDX folder "
                       "(/usr/share/datasets/fashion-mnist), --crop 32, a 1-channel UNet.")
    @click.option("--preconditioning", type=click.Choice(["none", "edm"]), default="none", show_default=True,
                  help="none: the network predicts epsilon (DDPM); edm: EDM's c_skip/c_out/c_in preconditioning and loss weighting.")
    @click.option("--sigma-data", default=0.5, show_default=True, help="EDM's sigma_data (the data's standard deviation).")
    @click.option("--t-sampling", type=click.Choice(T_SAMPLINGS), default="uniform", show_default=True,
                  help="Training timesteps: uniform (DDPM) or nearest to EDM's log-normal sigma.")
    def pixel(dataset, preconditioning, sigma_data, t_sampling, **kw):
        """Train the pixel-space UNet (epsilon or EDM-preconditioned)."""
        from diffstategrad.priors.unet import TINY_UNET_CONFIG

        model = TINY_UNET_CONFIG if kw["tiny"] else None
        if model is not None and dataset == "fashion-mnist":
            model = {**model, "in_channels": 1, "out_channels": 1, "channels": model["channels"][:3]}
        check_crop(kw["crop"], 8 if dataset == "photos" else 4, "the UNet halves the size")
        try:
            settings = pixel_settings(kw["data"], **common(kw, model), dataset=dataset, preconditioning=preconditioning,
                                      sigma_data=sigma_data, t_sampling=t_sampling)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        run(settings, kw["out"])

    @cli.command("autoencoder")
    @train_options(crop=128, batch=16, steps=20000, lr=2e-4, warmup=200, ema_decay=0.998, snapshot_every=0)
    @click.option("--kl-weight", default=1e-6, show_default=True, help="Weight of the KL term (LDM's convention).")
    @click.option("--l1-weight", default=1.0, show_default=True)
    @click.option("--mse-weight", default=1.0, show_default=True)
    def autoencoder(**kw):
        """Train the KL-regularised f4 autoencoder of the latent prior."""
        from diffstategrad.priors.small_autoencoder import TINY_AUTOENCODER_CONFIG

        check_crop(kw["crop"], 4, "the autoencoder downsamples by 4")
        settings = autoencoder_settings(kw["data"], **common(kw, TINY_AUTOENCODER_CONFIG if kw["tiny"] else None),
                                        kl_weight=kw["kl_weight"], l1_weight=kw["l1_weight"], mse_weight=kw["mse_weight"])
        run(settings, kw["out"])

    @cli.command("latent")
    @train_options(crop=128, batch=32, steps=20000, lr=2e-4, warmup=500, ema_decay=0.999, snapshot_every=0)
    @click.option("--autoencoder", "autoencoder_path", required=True, type=click.Path(exists=True),
                  help="Autoencoder run folder or its export/autoencoder.safetensors (EMA weights; copied into the run).")
    @click.option("--scale-images", default=256, show_default=True, help="Fixed training crops on which the latent scale factor is measured.")
    def latent(autoencoder_path, scale_images, **kw):
        """Train the latent epsilon-prediction UNet on a frozen autoencoder's latents."""
        from diffstategrad.priors.unet import TINY_UNET_CONFIG

        model = TINY_UNET_CONFIG if kw["tiny"] else LATENT_UNET_CONFIG
        multiple = 4 * 2 ** (len(model["channels"]) - 1)
        check_crop(kw["crop"], multiple, "autoencoder x4, then the UNet's halvings")
        settings = latent_settings(kw["data"], autoencoder_path, **common(kw, model), scale_images=scale_images)
        run(settings, kw["out"])

    @cli.command("export")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output .safetensors (default RUNDIR/export/MODE.safetensors).")
    def export(rundir, out):
        """Write the EMA weights of a pixel or autoencoder RUNDIR/checkpoint.pt as safetensors + JSON."""
        if out is None:
            mode = json.loads((Path(rundir) / "run.json").read_text())["mode"]
            out = Path(rundir) / "export" / f"{mode}.safetensors"
        try:
            path = export_weights(rundir, out)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {path} and {path.with_suffix('.json')}")

    @cli.command("export-builtin")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (config.json + model.safetensors).")
    @click.option("--name", default=None, help="Model name recorded in its info (default: the folder name).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
    def export_builtin_cmd(rundir, out, name, overwrite):
        """Write a pixel or latent run as a shipped model folder (load_prior("converted", FOLDER))."""
        try:
            path = export_builtin(rundir, out, name=name, overwrite=overwrite)
        except (ValueError, FileExistsError) as err:
            raise click.ClickException(str(err)) from None
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        info = json.loads((path / "config.json").read_text())["spec"]["info"]
        click.echo(f"wrote {path} ({info['kind']}, {info['parameters']:,} parameters, {size:.1f} MiB, step {info['steps']})")

    @cli.command("split-shards")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--prefix", required=True, help="Shards are written as PREFIX.partI.safetensors.")
    @click.option("--max-mib", default=15.0, show_default=True)
    def split_cmd(file, prefix, max_mib):
        """Cut a safetensors file into shards of at most --max-mib MiB."""
        for p in split_shards(file, prefix, int(max_mib * 2**20)):
            click.echo(f"wrote {p} ({p.stat().st_size / 2**20:.2f} MiB)")

    @cli.command("join-shards")
    @click.argument("out", type=click.Path(dir_okay=False))
    @click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
    def join_cmd(out, parts):
        """Reassemble OUT from the shards PARTS (checked tensor by tensor)."""
        try:
            path = join_shards(parts, out)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {path}")

    cli.main(args=argv, prog_name="python -m diffstategrad.train")


if __name__ == "__main__":
    main()

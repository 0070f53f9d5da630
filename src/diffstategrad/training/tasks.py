"""Training tasks: what a batch is, what the loss is, what frozen state a run carries.

The trainer (``trainer.py``) is generic over a task; ``TASKS`` maps a run's mode to its task.
Every task trains on multi-scale random crops of the prepared photographs
(``diffstategrad.data.RandomCrops``); batch k is items k*B .. k*B + B - 1 of the crop stream,
and the random draws of step k come from ``step_seed(seed, k)``.

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
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from diffstategrad.data import ArrayImages, RandomCrops, load_fashion_mnist
from diffstategrad.priors.small_autoencoder import SmallAutoencoder, kl_divergence
from diffstategrad.priors.unet import UNet, network_target
from diffstategrad.schedules import alpha_bar_to_sigma, make_schedule
from diffstategrad.training.checkpoints import step_seed
from diffstategrad.training.formats import load_autoencoder
from diffstategrad.training.summaries import data_summary

__all__ = ["PixelTask", "AutoencoderTask", "LatentTask", "TASKS", "SCALE_CROP_START"]

# The fixed crops on which a latent run measures its scale factor: items SCALE_CROP_START ..
# of the training crop stream (training reads items 0 .. steps * batch).
SCALE_CROP_START = 2**40


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
        info = {**super().export_info(), **self._diffusion_info()}
        if self.settings.get("init"):
            info["initialised_from"] = dict(self.settings["init"])
        return info


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

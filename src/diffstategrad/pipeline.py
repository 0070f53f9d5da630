"""The main job, shared by ``diffstategrad solve`` and ``diffstategrad evaluate``:

    image -> task preset -> (operator, noise) -> y -> solver (with / without DiffStateGrad)
          -> reconstruction -> PSNR / SSIM / LPIPS

Everything that reads or writes files lives in the CLI and in ``evaluate_item``; ``run_case``
is pure computation on tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffstategrad.operators import Inpaint, PhaseRetrieval, Resize, load_task
from diffstategrad.presets import solver_defaults
from diffstategrad.priors import DiffusionPrior, load_prior
from diffstategrad.projection import DiffStateGrad
from diffstategrad.solvers import SOLVERS, SolveResult, solve

__all__ = ["LATENT_SOLVERS", "resolve_model", "resolve_device", "defaults_profile", "CaseResult", "run_case", "measurement_image", "evaluate_items", "reconstruction_path", "solver_kwargs"]

LATENT_SOLVERS = ("psld", "resample", "latent-daps")


class PipelineError(ValueError):
    """A problem with the user's request (unknown name, wrong size, ...): one line, no traceback."""


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_model(spec: str | None, solver: str, device: torch.device) -> tuple[DiffusionPrior, str]:
    """The prior for ``solver``: ``spec`` is None (the default built-in model of the right kind),
    a built-in model's name, or a folder written by ``diffstategrad convert`` / training."""
    from diffstategrad.priors.builtin import list_builtin

    want = "latent" if solver in LATENT_SOLVERS else "pixel"
    builtin = {m["name"]: m for m in list_builtin()}
    if spec is None:
        names = [n for n, m in builtin.items() if m["kind"] == want]
        if not names:
            raise PipelineError(f"no built-in {want} model is shipped with this installation; pass --model FOLDER")
        spec = names[0]
    if spec in builtin:
        prior, label = load_prior("builtin", spec, device=device), f"builtin:{spec}"
    elif Path(spec).expanduser().is_dir():
        prior, label = load_prior("converted", spec, device=device), str(Path(spec).expanduser())
    else:
        known = ", ".join(builtin) or "none"
        raise PipelineError(f"unknown model {spec!r}: not a built-in model ({known}) nor a converted model folder "
                            "(write one with `diffstategrad convert`)")
    if prior.kind != want:
        raise PipelineError(f"solver {solver!r} needs a {want} model, but {label} is a {prior.kind} model")
    return prior.to(device).eval(), label


def defaults_profile(model_label: str) -> str | None:
    """Built-in models run with the table's ``builtin`` defaults; every other model with the
    official ones."""
    return "builtin" if model_label.startswith("builtin:") else None


def solver_kwargs(solver: str, task: str, *, steps=None, guidance_scale=None, guidance_multiplier: float = 1.0, overrides=None, profile: str | None = None) -> dict:
    """The solver's keyword arguments: the table's defaults for the task (and ``profile``), then
    the caller's values. ``guidance_multiplier`` scales the default guidance (the evaluation
    grid)."""
    if solver not in SOLVERS:
        raise PipelineError(f"unknown solver {solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
    kwargs = solver_defaults(solver, task, profile)
    kwargs["guidance_scale"] = float(kwargs.get("guidance_scale", 1.0)) * float(guidance_multiplier)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = float(guidance_scale)
    if steps is not None:
        kwargs["steps"] = int(steps)
    kwargs.update(overrides or {})
    return kwargs


@dataclass
class CaseResult:
    result: SolveResult
    metrics: dict[str, float]
    solver_kwargs: dict[str, Any] = field(default_factory=dict)


def run_case(prior, problem, x, y, solver: str, kwargs: dict, projector: DiffStateGrad | None, seed: int, lpips=None, progress: bool = False) -> CaseResult:
    """Solve one measurement and score it against the ground truth ``x`` (1, C, H, W)."""
    from diffstategrad.metrics import metrics_for

    result = solve(solver, prior, problem.operator, y, shape=tuple(x.shape[1:]), seeds=[seed], projector=projector, progress=progress, **kwargs)
    scores = metrics_for(result.x.detach().float(), x.float(), lpips=lpips)
    metrics = {k: float(v[0]) for k, v in scores.items()}
    metrics.update(seconds=float(result.seconds), failed=bool(result.failed[0]), failed_step=int(result.failed_step[0]), residual=float(result.residual[0]))
    return CaseResult(result, metrics, kwargs)


def measurement_image(operator, y: torch.Tensor, image_shape) -> torch.Tensor:
    """The measurement as a picture a person can read, at the image's size: super-resolution
    inputs upsampled (nearest), inpainting with the missing pixels grey, phase retrieval as a
    log-magnitude (centred spectrum), everything else as is."""
    H, W = image_shape[-2:]
    if isinstance(operator, Resize):
        return F.interpolate(y, size=(H, W), mode="nearest")
    if isinstance(operator, Inpaint):
        return y * operator.mask.to(y.dtype)
    if isinstance(operator, PhaseRetrieval):
        mag = torch.log1p(y.abs())
        lo = mag.amin(dim=(1, 2, 3), keepdim=True)
        hi = mag.amax(dim=(1, 2, 3), keepdim=True)
        return F.interpolate((mag - lo) / (hi - lo).clamp(min=1e-8) * 2 - 1, size=(H, W), mode="area")
    if y.shape[-2:] != (H, W):
        return F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
    return y


# ---------------------------------------------------------------------------------------------
# One evaluation item (run by every evaluate backend: in process, worker processes, Ray)
# ---------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _worker_state(context: dict) -> dict:
    """Per-process cache of the prior, LPIPS and the images for one evaluation context."""
    key = repr(sorted((k, str(v)) for k, v in context.items()))
    if _STATE.get("key") != key:
        from diffstategrad.images import load_image
        from diffstategrad.metrics import get_lpips

        torch.set_num_threads(int(context.get("threads", 1)))
        device = resolve_device(context.get("device"))
        priors, profiles = {}, {}
        for solver in context["solvers"]:
            kind = "latent" if solver in LATENT_SOLVERS else "pixel"
            if kind not in priors:
                priors[kind], label = resolve_model(context.get("models", {}).get(kind), solver, device)
                profiles[kind] = defaults_profile(label)
        size = context["size"]
        images = {name: load_image(path, size).image.to(device) for name, path in context["images"].items()}
        _STATE.clear()
        net = context.get("lpips", "vgg")
        _STATE.update(key=key, device=device, priors=priors, profiles=profiles, images=images, lpips=None if net == "none" else get_lpips(net, device=device))
    return _STATE


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def reconstruction_path(out_dir, record: dict) -> Path:
    """Where an evaluation saves (and its image grid finds) one item's reconstruction."""
    from diffstategrad.evaluate import item_key

    return Path(out_dir) / "images" / f"{safe_name(item_key(record))}.png"


def evaluate_items(items: list[dict], context: dict) -> list[dict]:
    """Run a batch of items that differ only by image (one solver call) and return their
    records. Each sample uses the item's seed for its mask/kernel, noise and solver draws, so
    the records are those the items would give one by one."""
    from diffstategrad.evaluate import batch_key
    from diffstategrad.images import save_image
    from diffstategrad.metrics import metrics_for

    first = items[0]
    if any(batch_key(it) != batch_key(first) for it in items):
        raise ValueError("evaluate_items takes items that differ only by image")
    state = _worker_state(context)
    kind = "latent" if first["solver"] in LATENT_SOLVERS else "pixel"
    prior = state["priors"][kind]
    x = torch.cat([state["images"][it["image"]] for it in items])
    seeds = [first["seed"]] * len(items)
    task = load_task(first["task"], context.get("task_overrides"))
    problem = task.build(tuple(x.shape[1:]), seeds=seeds, device=x.device)
    y = problem.measure(x, seeds=seeds)
    kwargs = solver_kwargs(first["solver"], first["task"], steps=context.get("steps"), guidance_multiplier=first["guidance_scale"], profile=state["profiles"][kind])
    projector = DiffStateGrad(**context.get("projector", {})) if first["diffstategrad"] else None
    result = solve(first["solver"], prior, problem.operator, y, shape=tuple(x.shape[1:]), seeds=seeds, projector=projector, **kwargs)
    scores = metrics_for(result.x.detach().float(), x.float(), lpips=state["lpips"])
    records = []
    for b, it in enumerate(items):
        save_image(result.x[b : b + 1].detach().cpu(), reconstruction_path(context["out"], it))
        record = dict(it)
        values = {k: float(v[b]) for k, v in scores.items()}
        values.update(seconds=float(result.seconds) / len(items), failed=bool(result.failed[b]), failed_step=int(result.failed_step[b]), residual=float(result.residual[b]))
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        record.update(guidance_value=kwargs["guidance_scale"], steps=kwargs.get("steps"), size=int(x.shape[-1]), batch=len(items))
        records.append(record)
    return records

"""The main job, one batched runner shared by ``solve``, ``evaluate`` and ``serve``:

    images -> task preset -> (operator, noise) -> y -> solver (with / without DiffStateGrad,
           N posterior samples per image) -> reconstructions -> PSNR / SSIM / LPIPS

``run_job(prior, job, x, seeds)`` is pure computation on tensors: a ``Job`` names the task,
the solver and its settings, ``x`` is a batch of ground truths and ``seeds`` one seed per image
(its mask / kernel, its noise and its solver draws). With ``job.samples = N`` every image gets N
posterior samples in the same solver call (sample k draws from ``derive_seed(seed, "solver",
k)``; sample 0 is the single-sample default), scored as the first sample and as their mean,
with the per-pixel standard deviation. ``solve_image`` runs one image without and / or with the
projector and ``write_solve_outputs`` writes the ``solve`` command's folder; ``evaluate_items``
is the evaluation's item runner. The CLI parses and prints; it does neither the math nor the
files.

Every item's metrics also say what it cost (``run_job``): ``seconds`` (the solver's wall time)
and ``wall_seconds`` (measurement, solve and scoring), each per image of its batch;
``network_calls`` / ``autoencoder_calls`` (the prior's passes in the solver call, each over the
whole batch: N for N-step DPS whatever the batch); ``peak_memory_mb`` with ``peak_memory_kind``
``cuda_max_allocated`` (``torch.cuda.max_memory_allocated``, reset before the batch: the batch's
own peak) or ``cpu_max_rss`` (``ru_maxrss`` of the process: its high-water mark since it
started, not the batch's own); and the ``device``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffstategrad.operators import Inpaint, PhaseRetrieval, Resize, load_task
from diffstategrad.presets import projector_defaults, solver_defaults
from diffstategrad.priors import DiffusionPrior, load_prior
from diffstategrad.projection import DiffStateGrad
from diffstategrad.records import guidance_multiplier, reconstruction_path
from diffstategrad.rng import SampleGenerators, derive_seed
from diffstategrad.solvers import SolveResult, solve, solver_names, solver_spec

__all__ = ["PipelineError", "Job", "BatchResult", "EvalContext", "resolve_device", "resolve_devices", "resolve_model",
           "check_network_options", "configure_prior", "peak_memory", "reset_peak_memory", "defaults_profile",
           "default_size", "solver_kwargs", "run_job", "solve_image", "write_solve_outputs", "measurement_image",
           "evaluate_items", "failed_any"]


class PipelineError(ValueError):
    """A problem with the user's request (unknown name, wrong size, ...): one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Resolving names: device, model, defaults
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | None, option: str = "--device") -> torch.device:
    """The torch device for ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``;
    a :class:`PipelineError` naming ``option`` for an unknown or absent device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PipelineError(f"{option}: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{option} {device} was asked for but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PipelineError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_devices(devices: str, option: str = "--devices") -> tuple[str, ...]:
    """A comma-separated device list (``cuda:0,cuda:1``; ``cpu,cpu`` for two CPU workers), each
    checked by :func:`resolve_device`, all of one kind (a CPU's and a GPU's float rounding
    differ, and the results of an evaluation must not depend on where an item ran). Returns the
    devices as given, stripped."""
    names = tuple(d.strip() for d in str(devices).split(",") if d.strip())
    if not names:
        raise PipelineError(f"{option} is empty; give devices such as cuda:0,cuda:1")
    kinds = {resolve_device(name, option).type for name in names}
    if len(kinds) > 1:
        raise PipelineError(f"{option} {','.join(names)} mixes {' and '.join(sorted(kinds))} devices; "
                            "use devices of one kind (their float rounding differs)")
    return names


def check_network_options(precision: str, compile: bool | str, device: torch.device) -> None:
    """A :class:`PipelineError` (one line) if ``device`` cannot run the network options, before
    anything is loaded or written (:func:`diffstategrad.precision.check_precision`)."""
    from diffstategrad.precision import PrecisionError, check_precision

    try:
        check_precision(precision, device)
    except PrecisionError as exc:
        raise PipelineError(str(exc)) from None
    if compile and not hasattr(torch, "compile"):
        raise PipelineError(f"--compile needs torch.compile (torch >= 2.0); this is torch {torch.__version__}")
    if isinstance(compile, str) and compile:
        from torch import _dynamo

        backends = _dynamo.list_backends(exclude_tags=())
        if compile not in backends:
            raise PipelineError(f"--compile {compile}: not a torch.compile backend; use inductor (the default), "
                                "or eager / aot_eager to check that a model traces")


def configure_prior(prior: DiffusionPrior | None, precision: str = "fp32", channels_last: bool = False,
                    compile: bool | str = False) -> None:
    """Apply the network options to a resolved prior (``configure_network``); nothing for the
    classical solvers (no prior). A :class:`PipelineError` where the prior or its device
    cannot run them."""
    from diffstategrad.precision import PrecisionError, configure_network

    if prior is None:
        return
    try:
        configure_network(prior, precision, channels_last=channels_last, compile=compile)
    except PrecisionError as exc:
        raise PipelineError(str(exc)) from None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window on ``device`` (nothing on the CPU: the peak RSS of a
    process cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(MiB, kind): ``torch.cuda.max_memory_allocated`` since the last reset on a CUDA device
    (kind ``cuda_max_allocated``); elsewhere the process's peak resident set size since it
    started (``ru_maxrss``, kind ``cpu_max_rss``: a lifetime high-water mark, not one item's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None, "cpu_max_rss"
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1), "cpu_max_rss"


def resolve_model(spec: str | None, solver: str, device: torch.device) -> tuple[DiffusionPrior | None, str]:
    """The prior for ``solver``: ``spec`` is None (the default built-in model of the kind the
    solver needs), a built-in model's name, or a folder written by ``diffstategrad convert`` /
    training. Solvers that need no prior (the classical baselines) get (None, "none")."""
    from diffstategrad.priors.builtin import list_builtin

    try:
        kinds = solver_spec(solver).priors
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if not kinds:
        return None, "none"
    builtin = {m["name"]: m for m in list_builtin()}
    if spec is None:
        names = [n for n, m in builtin.items() if m["kind"] == kinds[0] and m["info"].get("default", True)]
        if not names:
            raise PipelineError(f"no built-in {kinds[0]} model is shipped with this installation; pass --model FOLDER")
        spec = names[0]
    if spec in builtin:
        prior, label = load_prior("builtin", spec, device=device), f"builtin:{spec}"
    elif Path(spec).expanduser().is_dir():
        prior, label = load_prior("converted", spec, device=device), str(Path(spec).expanduser())
    else:
        known = ", ".join(builtin) or "none"
        raise PipelineError(f"unknown model {spec!r}: not a built-in model ({known}) nor a converted model folder "
                            "(write one with `diffstategrad convert`)")
    if prior.kind not in kinds:
        raise PipelineError(f"solver {solver!r} needs a {' or '.join(kinds)} model, but {label} is a {prior.kind} model")
    return prior.to(device).eval(), label


def defaults_profile(model_label: str) -> str | None:
    """Built-in models run with the table's ``builtin`` defaults (the Fashion-MNIST model with
    its own ``builtin.fashion`` values on top, ``"builtin:fashion"``); every other model with
    the official ones."""
    if not model_label.startswith("builtin:"):
        return None
    return "builtin:fashion" if model_label == "builtin:fashion" else "builtin"


def default_size(prior: DiffusionPrior | None) -> int:
    """The image side the CLI uses when none is given: what the built-in models were made for."""
    if prior is None:
        return 64
    info = getattr(prior, "info", {}) or {}
    if info.get("image_size"):
        return int(info["image_size"])
    return 128 if prior.kind == "latent" else 64


def parse_steps(text: str, solvers=None) -> int | dict[str, int]:
    """``--steps``: ``20`` (every solver) or ``20,daps=10`` (per solver; a bare count is the
    others'). One count for all is returned as an int, so settings written before per-solver
    counts existed compare equal. ``solvers``: the names allowed (default: the registry's)."""
    known = solver_names() if solvers is None else list(solvers)
    out: dict[str, int] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.rpartition("=")
        name = name.strip()
        if name and name not in known:
            raise ValueError(f"--steps: unknown solver {name!r} (choose from {', '.join(known)})")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--steps: {item!r} is not a positive step count")
        if (name or "*") in out:
            raise ValueError(f"--steps: {name or 'the default count'} given twice")
        out[name or "*"] = int(value)
    if not out:
        raise ValueError("--steps is empty")
    return out["*"] if list(out) == ["*"] else out


def steps_for(steps, solver: str) -> int | None:
    """The step count ``steps`` (None, an int, or a ``parse_steps`` mapping) gives ``solver``;
    None: the preset's."""
    if steps is None or isinstance(steps, int):
        return steps
    return steps.get(solver, steps.get("*"))


def solver_kwargs(solver: str, task: str, *, steps=None, guidance_scale=None, guidance_multiplier: float = 1.0, overrides=None,
                  profile: str | None = None, diffstategrad: bool = False) -> dict:
    """The solver's keyword arguments: the table's defaults for the task (and ``profile``; with
    ``diffstategrad``, the profile's values tuned with the projector on), then the caller's
    values. ``guidance_scale`` is absolute; ``guidance_multiplier`` scales the default guidance
    (the evaluation grid) when no absolute value is given."""
    try:
        solver_spec(solver)
        kwargs = solver_defaults(solver, task, profile, diffstategrad=diffstategrad)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if "guidance_scale" in kwargs or guidance_scale is not None or guidance_multiplier != 1.0:
        kwargs["guidance_scale"] = float(kwargs.get("guidance_scale", 1.0)) * float(guidance_multiplier)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = float(guidance_scale)
    if steps is not None:
        kwargs["steps"] = int(steps)
    kwargs.update(overrides or {})
    return kwargs


# ---------------------------------------------------------------------------------------------
# One batched job
# ---------------------------------------------------------------------------------------------


DSG_DEFAULTS = ("own", "shared")


@dataclass(frozen=True)
class Job:
    """What to run on a batch of images (everything but the images and their seeds)."""

    task: str
    solver: str
    projector: DiffStateGrad | None = None
    steps: int | None = None
    guidance_scale: float | None = None  # absolute; None: the defaults' value x guidance_multiplier
    guidance_multiplier: float = 1.0
    samples: int = 1
    task_overrides: Mapping[str, Any] | None = None
    solver_overrides: Mapping[str, Any] | None = None
    profile: str | None = None
    # "own": a projected run takes the profile's defaults tuned with DiffStateGrad (each side at
    # its own best); "shared": both take the plain run's, so a step sweep pairs equal steps
    dsg_defaults: str = "own"

    def __post_init__(self):
        if self.dsg_defaults not in DSG_DEFAULTS:
            raise PipelineError(f"dsg_defaults must be one of {', '.join(DSG_DEFAULTS)}, not {self.dsg_defaults!r}")

    def kwargs(self) -> dict:
        return solver_kwargs(self.solver, self.task, steps=self.steps, guidance_scale=self.guidance_scale,
                             guidance_multiplier=self.guidance_multiplier, overrides=self.solver_overrides, profile=self.profile,
                             diffstategrad=self.projector is not None and self.dsg_defaults == "own")

    def projector_tuned(self) -> dict:
        """The projector settings this job takes from the profile's ``with_diffstategrad`` block
        (``dsg_defaults="own"``): each tuned field whose value the caller left at the
        projector's own default (a field set to anything else is the caller's choice and
        stays). {} without a projector, with ``"shared"``, or where the profile tuned none."""
        if self.projector is None or self.dsg_defaults != "own" or self.profile is None:
            return {}
        try:
            tuned = projector_defaults(self.solver, self.task, self.profile)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        own = {f.name: f.default for f in fields(DiffStateGrad)}
        return {k: v for k, v in tuned.items() if getattr(self.projector, k) == own[k] and v != own[k]}

    def run_projector(self, tuned: dict | None = None) -> DiffStateGrad | None:
        """The projector the job runs with: ``projector`` with :meth:`projector_tuned` (or the
        ``tuned`` it already returned) applied."""
        tuned = self.projector_tuned() if tuned is None else tuned
        return DiffStateGrad.from_dict({**self.projector.to_dict(), **tuned}) if tuned else self.projector

    def with_projector(self, projector: DiffStateGrad | None) -> "Job":
        return replace(self, projector=projector)


@dataclass
class BatchResult:
    """The outcome of ``run_job`` for B images with N samples each.

    x: (B, C, H, W) the first sample of every image; mean / std: their posterior mean and
    per-pixel standard deviation over the N samples (None when N = 1); y: the measurements;
    measurement: y as a picture (``measurement_image``); metrics: one dict per image (psnr, ssim,
    lpips of the first sample; mean_psnr, ... of the mean when N > 1; seconds, failed,
    failed_step, residual, failed_samples; what it cost: wall_seconds, network_calls,
    autoencoder_calls, peak_memory_mb, peak_memory_kind, device, see the module docstring);
    result: the solver's result for all B * N samples (image-major); kwargs: the solver's
    keyword arguments; projector_tuned: the projector settings the profile's values tuned with
    DiffStateGrad replaced (``Job.projector_tuned``).
    """

    x: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None
    y: torch.Tensor
    measurement: torch.Tensor
    metrics: list[dict[str, Any]]
    result: SolveResult
    kwargs: dict
    problem: Any = field(repr=False, default=None)
    projector_tuned: dict = field(default_factory=dict)  # Job.projector_tuned: the projector settings taken from the profile


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_job(prior: DiffusionPrior | None, job: Job, x: torch.Tensor, seeds, *, lpips=None, progress: bool = False,
            callback: Callable[[dict], None] | None = None) -> BatchResult:
    """Measure the ground truths ``x`` (B, C, H, W) with the job's task and solve, N samples per
    image in one solver call. ``seeds``: one int per image. A sample's result does not depend on
    the rest of the batch."""
    from diffstategrad.metrics import metrics_for
    from diffstategrad.priors import count_network_calls

    started = time.perf_counter()
    reset_peak_memory(x.device)
    seeds = [int(s) for s in seeds]
    B, N = x.shape[0], int(job.samples)
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} images")
    if N < 1:
        raise ValueError(f"samples must be >= 1, got {N}")
    shape = tuple(x.shape[1:])
    task = load_task(job.task, job.task_overrides)
    problem = task.build(shape, seeds=seeds, device=x.device)
    y = problem.measure(x, seeds=seeds)
    kwargs = job.kwargs()
    if N == 1:
        operator, y_all, gens = problem.operator, y, SampleGenerators([derive_seed(s, "solver") for s in seeds])
    else:
        # every sample of an image sees that image's operator (drawn from its seed) and its y
        operator = task.build(shape, seeds=[s for s in seeds for _ in range(N)], device=x.device).operator
        y_all = y.repeat_interleave(N, dim=0)
        gens = SampleGenerators([derive_seed(s, "solver", k) for s in seeds for k in range(N)])
    tuned = job.projector_tuned()
    with count_network_calls(prior) as calls:
        result = solve(job.solver, prior, operator, y_all, shape=shape, seeds=gens, projector=job.run_projector(tuned), progress=progress,
                       callback=callback, **kwargs)
    samples = result.x.detach().float().reshape(B, N, *shape)
    first = samples[:, 0]
    mean = samples.mean(1) if N > 1 else None
    std = samples.std(1, unbiased=True) if N > 1 else None
    truth = x.float()
    scores = metrics_for(first, truth, lpips=lpips)
    mean_scores = metrics_for(mean, truth, lpips=lpips) if N > 1 else {}
    failed = result.failed.reshape(B, N)
    failed_step = result.failed_step.reshape(B, N)
    residual = result.residual.reshape(B, N)
    per_image = [({k: float(v[b]) for k, v in scores.items()}, {f"mean_{k}": float(v[b]) for k, v in mean_scores.items()})
                 for b in range(B)]  # (the floats synchronise with the device before the clock stops)
    wall = time.perf_counter() - started
    memory_mb, memory_kind = peak_memory(x.device)
    metrics = []
    for b in range(B):
        m = {**per_image[b][0], **per_image[b][1]}
        m.update(seconds=float(result.seconds) / B, failed=bool(failed[b, 0]), failed_step=int(failed_step[b, 0]),
                 residual=float(residual[b, 0]), samples=N, failed_samples=int(failed[b].sum()),
                 wall_seconds=wall / B, network_calls=calls.network, autoencoder_calls=calls.autoencoder,
                 peak_memory_mb=memory_mb, peak_memory_kind=memory_kind, device=str(x.device))
        metrics.append({k: _finite_or_none(v) for k, v in m.items()})
    return BatchResult(first, mean, std, y, measurement_image(problem.operator, y, x.shape), metrics, result, kwargs, problem, tuned)


def failed_any(batch: BatchResult) -> bool:
    return any(m["failed_samples"] for m in batch.metrics)


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
# solve: one image, without and / or with the projector
# ---------------------------------------------------------------------------------------------

VARIANTS = {"baseline": "without DiffStateGrad", "diffstategrad": "with DiffStateGrad", "tv": "TV (classical)",
            "pseudo-inverse": "pseudo-inverse (classical)"}


def solve_image(prior, job: Job, x: torch.Tensor, seed: int, variants: Mapping[str, DiffStateGrad | None], *, lpips=None,
                progress: bool = False, callback: Callable[[str, dict], None] | None = None) -> dict[str, BatchResult]:
    """Run ``job`` on one image once per variant (name -> projector or None); ``callback(name,
    info)`` follows each run's steps."""
    runs = {}
    for name, projector in variants.items():
        cb = None if callback is None else (lambda info, name=name: callback(name, info))
        runs[name] = run_job(prior, job.with_projector(projector), x, [seed], lpips=lpips, progress=progress, callback=cb)
    return runs


def _plain(obj):
    """JSON/YAML-safe copy (tuples to lists, tensors and numpy values to Python numbers)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_solve_outputs(out_dir: Path, x: torch.Tensor, runs: Mapping[str, BatchResult], job: Job, config: dict) -> Path:
    """The ``solve`` command's folder: ground_truth.png, measurement.png, reconstruction.png (the
    run with DiffStateGrad where there is one), reconstruction_NAME.png of the other runs
    (``baseline``, a classical solver's) and comparison.png when more than one ran, posterior_mean*.png / posterior_std*.png with ``samples`` > 1, metrics.json
    and config.yaml."""
    import json

    import yaml

    from diffstategrad.images import comparison_figure, save_image
    from diffstategrad.storage import atomic_write_text

    out_dir = Path(out_dir)
    main_name = "diffstategrad" if "diffstategrad" in runs else "baseline"
    main = runs[main_name]
    save_image(x.cpu(), out_dir / "ground_truth.png")
    save_image(main.measurement.cpu(), out_dir / "measurement.png")
    save_image(main.x.cpu(), out_dir / "reconstruction.png")
    for name, run in runs.items():
        suffix = "" if name == main_name else f"_{name}"
        if name != main_name:
            save_image(run.x.cpu(), out_dir / f"reconstruction{suffix}.png")
        if run.mean is not None:
            save_image(run.mean.cpu(), out_dir / f"posterior_mean{suffix}.png")
            save_image(_std_image(run.std).cpu(), out_dir / f"posterior_std{suffix}.png")
    if len(runs) > 1:
        panels = [("ground truth", x.cpu()), (f"measurement ({job.task})", main.measurement.cpu())]
        for name, run in runs.items():
            panels.append((_label(VARIANTS.get(name, name), run.metrics[0]), run.x.cpu()))
        for name, run in runs.items():
            if run.mean is not None:
                panels.append((_label(f"mean of {job.samples}, {VARIANTS.get(name, name)}", run.metrics[0], "mean_"), run.mean.cpu()))
        comparison_figure(panels, out_dir / "comparison.png", panel_height=max(256, int(x.shape[-2])),
                          columns=len(panels) if len(panels) <= 5 else (len(panels) + 1) // 2)
    metrics = dict(main.metrics[0])
    metrics.update({name: run.metrics[0] for name, run in runs.items()})
    atomic_write_text(out_dir / "metrics.json", json.dumps(_plain(metrics), indent=2) + "\n")
    config = {**config, "solver_kwargs": main.kwargs, "task_parameters_at_size": main.problem.params, "samples": job.samples}
    if "baseline" in runs and runs["baseline"].kwargs != main.kwargs:  # the projected run took its own tuned defaults
        config["solver_kwargs_baseline"] = runs["baseline"].kwargs
    if main.projector_tuned:  # ... and the projector settings tuned with it
        config["diffstategrad_tuned"] = main.projector_tuned
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
    return out_dir


def _label(name: str, m: dict, prefix: str = "") -> str:
    lp = m.get(f"{prefix}lpips")
    return (f"{name}  PSNR {m[f'{prefix}psnr']:.2f} / SSIM {m[f'{prefix}ssim']:.3f}"
            + (f" / LPIPS {lp:.3f}" if lp is not None else "") + ("  FAILED" if not prefix and m.get("failed") else ""))


def _std_image(std: torch.Tensor) -> torch.Tensor:
    """A per-pixel standard deviation as a picture: channels averaged, scaled so that the
    image's largest value is white (0 is black)."""
    s = std.mean(1, keepdim=True)
    return s / s.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8) * 2 - 1


# ---------------------------------------------------------------------------------------------
# evaluate: the item runner (run by every backend: in process, worker processes, Ray)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalContext:
    """What every item of one evaluation shares (sent to each worker, so plain values only)."""

    images: Mapping[str, str]  # name -> file
    solvers: tuple[str, ...]
    size: int
    out: str
    steps: int | Mapping[str, int] | None = None  # parse_steps: one count, or per solver ("*": the others)
    samples: int = 1
    device: str = "auto"
    threads: int = 1
    models: Mapping[str, str | None] = field(default_factory=dict)  # prior kind -> model spec
    projector: Mapping[str, Any] = field(default_factory=dict)  # DiffStateGrad.to_dict()
    lpips: str = "vgg"
    task_overrides: Mapping[str, Any] | None = None
    precision: str = "fp32"  # the prior's network passes (diffstategrad.precision)
    channels_last: bool = False
    compile: bool | str = False  # False, or a torch.compile backend ("inductor")
    devices: tuple[str, ...] = ()  # --devices: one worker per device, each with on_device(d)
    dsg_defaults: str = "own"  # Job.dsg_defaults

    def settings(self) -> dict:
        """What identifies the experiment (a resumed run must have the same). The device list
        of ``--devices`` counts as the device, as ``--device`` does; the network options are
        left out at their defaults, so folders written before they existed resume; so is
        ``dsg_defaults="shared"``, what every run did before the profile had values tuned with
        DiffStateGrad."""
        d = asdict(self)
        for k in ("threads", "out", "images", "devices"):
            d.pop(k)
        if d["dsg_defaults"] == "shared":
            d.pop("dsg_defaults")
        if self.devices:
            d["device"] = ",".join(self.devices)
        for k, default in NETWORK_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        return _plain(d)

    def on_device(self, device: str) -> "EvalContext":
        """The context one worker of a ``--devices`` run gets: its own device."""
        return replace(self, device=str(device), devices=())


NETWORK_DEFAULTS = {"precision": "fp32", "channels_last": False, "compile": False}


_STATE: dict[str, Any] = {}


def _worker_state(context: EvalContext) -> dict:
    """Per-process cache of the priors, LPIPS and the images for one evaluation context."""
    key = repr(sorted((k, repr(v)) for k, v in asdict(context).items()))
    if _STATE.get("key") != key:
        from diffstategrad.images import load_image
        from diffstategrad.metrics import get_lpips

        torch.set_num_threads(int(context.threads))
        device = resolve_device(context.device)
        priors, profiles = {}, {}
        for solver in context.solvers:
            kind = solver_spec(solver).default_prior
            if kind not in priors:
                priors[kind], label = resolve_model(context.models.get(kind) if kind else None, solver, device)
                configure_prior(priors[kind], context.precision, context.channels_last, context.compile)
                profiles[kind] = defaults_profile(label) if kind else None
        channels = next((p.image_channels if p.kind == "latent" else p.channels for p in priors.values() if p is not None), 3)
        images = {name: load_image(path, context.size, channels=channels).image.to(device) for name, path in context.images.items()}
        _STATE.clear()
        _STATE.update(key=key, device=device, priors=priors, profiles=profiles, images=images,
                      lpips=None if context.lpips == "none" else get_lpips(context.lpips, device=device))
    return _STATE


def evaluate_items(items: list[dict], context: EvalContext) -> list[dict]:
    """Run a batch of items that differ only by image (one solver call) and return their
    records. Each image uses the item's seed for its mask/kernel, noise and solver draws, so
    the records are those the items would give one by one."""
    from diffstategrad.images import save_image
    from diffstategrad.records import batch_key

    first = items[0]
    if any(batch_key(it) != batch_key(first) for it in items):
        raise ValueError("evaluate_items takes items that differ only by image")
    state = _worker_state(context)
    kind = solver_spec(first["solver"]).default_prior
    x = torch.cat([state["images"][it["image"]] for it in items])
    job = Job(first["task"], first["solver"], DiffStateGrad.from_dict(dict(context.projector)) if first["diffstategrad"] else None,
              steps=steps_for(context.steps, first["solver"]), guidance_multiplier=guidance_multiplier(first), samples=context.samples,
              task_overrides=context.task_overrides, profile=state["profiles"][kind], dsg_defaults=context.dsg_defaults)
    batch = run_job(state["priors"][kind], job, x, [first["seed"]] * len(items), lpips=state["lpips"])
    records = []
    for b, it in enumerate(items):
        save_image(batch.x[b:b + 1].cpu(), reconstruction_path(context.out, it))
        if batch.mean is not None:
            save_image(batch.mean[b:b + 1].cpu(), reconstruction_path(context.out, it, "_mean"))
            save_image(_std_image(batch.std[b:b + 1]).cpu(), reconstruction_path(context.out, it, "_std"))
        record = {**it, **batch.metrics[b]}
        record.update(guidance_scale=batch.kwargs.get("guidance_scale"), steps=batch.kwargs.get("steps"), size=int(x.shape[-1]),
                      batch=len(items))
        if batch.projector_tuned:
            record["projector_tuned"] = dict(batch.projector_tuned)
        records.append(record)
    return records

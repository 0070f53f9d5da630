"""``diffstategrad serve``: a local web page for the main job (docs/serve.md).

A user picks a bundled photograph or uploads one, a task preset with its noise level and key
parameter, a solver, its steps and guidance step size, the image size, a seed and the
projector's settings (tau, F, rank rule); the page runs the solver **without and with
DiffStateGrad** one after the other, shows the current x0 estimate of each every few steps and a
progress bar, then the measurement, both reconstructions, their PSNR / SSIM / LPIPS and
downloads (PNGs and a metrics JSON).

The module has three layers, so that the job can be swapped without touching the page:

1. **Requests** (:class:`JobRequest`, :func:`validate_request`): the form's values checked and
   typed, one-line :class:`RequestError` messages; no torch, no Gradio.
2. **The adapter** (:class:`Engine`): the only code that calls the rest of the package
   (``pipeline.resolve_model`` / ``solver_kwargs`` / ``run_case`` / ``measurement_image``, the
   task presets, images and metrics). :meth:`Engine.run_pair` runs one request and reports
   :class:`ProgressEvent` s through a callback; it returns a :class:`PairResult` of PIL images
   and plain dicts. Solvers call back after each step with a dict whose keys differ (``x`` is
   the state, most also give ``x0``, latent solvers give latents); the adapter turns that into
   images.
3. **The page** (:func:`build_app`, :func:`serve`): Gradio Blocks that talk to an ``Engine``
   only through the three types above. Gradio is imported here only (an optional extra,
   ``pip install 'diffstategrad[web]'``).

Jobs go through Gradio's queue with a small concurrency limit; a job's results live in its own
folder and reach only the browser tab that asked (nothing per-user is kept at module level: the
engine caches only the models, which solvers do not modify). Cancel stops the solver at its next
step. The server binds to 127.0.0.1 unless told otherwise, sends no analytics and makes no share
link.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

__all__ = [
    "RequestError", "JobError", "JobCancelled", "ServeError", "Limits", "JobRequest", "ProgressEvent", "PairResult",
    "TaskParameter", "TASK_PARAMETERS", "RANK_RULES", "validate_request", "Engine", "build_app", "serve",
]

log = logging.getLogger(__name__)

RANK_RULES = ("reference", "per_channel")
RUNS = ("baseline", "diffstategrad")  # without, with DiffStateGrad (the names metrics.json uses)
RUN_TITLES = {"baseline": "without DiffStateGrad", "diffstategrad": "with DiffStateGrad"}
FILE_NAMES = {"ground_truth": "ground_truth.png", "measurement": "measurement.png", "baseline": "without_diffstategrad.png",
              "diffstategrad": "with_diffstategrad.png"}
UPLOAD = "upload"  # the image choice that means "the uploaded file"
PREVIEWS_PER_RUN = 10  # how many x0 estimates each run shows while it runs


class RequestError(ValueError):
    """A form value the user can fix; the message is one line."""


class JobError(RuntimeError):
    """A job that could not run (a task that does not fit the size, a model that cannot take
    it, ...); the message is one line."""


class JobCancelled(Exception):
    """Raised inside the solver's callback when the user pressed Cancel."""


class ServeError(RuntimeError):
    """The server cannot start (Gradio missing, port taken); one line."""


# ---------------------------------------------------------------------------------------------
# 1. Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the server accepts: upload size in bytes and pixels, image side, steps."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_size: int = 256
    max_steps: int = 1000


@dataclass(frozen=True)
class TaskParameter:
    """The one operator field of a task the page offers (value at the preset's 256x256
    reference size; the preset scales it to the image size, docs/tasks.md)."""

    key: str  # the load_task override key
    label: str
    integer: bool
    minimum: float
    maximum: float


TASK_PARAMETERS: dict[str, TaskParameter] = {
    "super_resolution": TaskParameter("operator.factor", "downsampling factor", True, 2, 16),
    "gaussian_deblur": TaskParameter("operator.sigma", "blur sigma (pixels at 256x256)", False, 0.1, 20),
    "motion_deblur": TaskParameter("operator.intensity", "motion intensity", False, 0.0, 1.0),
    "box_inpainting": TaskParameter("operator.box_size", "box side (pixels at 256x256)", True, 8, 192),
    "rand_inpainting": TaskParameter("operator.missing_fraction", "missing fraction", False, 0.0, 0.99),
    "phase_retrieval": TaskParameter("operator.oversample", "oversampling", False, 0.0, 4.0),
    "hdr": TaskParameter("operator.scale", "exposure scale", False, 1.0, 10.0),
}


@dataclass(frozen=True)
class JobRequest:
    """One job: what the form asks for, checked. ``upload`` (a file path) replaces ``example``
    when given. ``task_value`` is the task's key parameter (:data:`TASK_PARAMETERS`), None to
    keep the preset's."""

    task: str
    solver: str
    example: str
    upload: str | None
    size: int
    steps: int
    guidance_scale: float
    seed: int
    noise_sigma: float
    task_value: float | None
    var_cutoff: float
    period: int
    rank_rule: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _number(value, name: str, *, integer: bool = False, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if integer and number != int(number):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise RequestError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {number:g}")
    if high is not None and number > high:
        raise RequestError(f"{name} must be <= {high:g}, got {number:g}")
    return int(number) if integer else number


def validate_request(form: dict, *, tasks, solvers, examples, limits: Limits = Limits()) -> JobRequest:
    """A :class:`JobRequest` from the form's raw values, or a one-line :class:`RequestError`.

    ``form`` keys: task, solver, image (an example name or ``"upload"``), upload (a path or
    None), size, steps, guidance_scale, seed, noise_sigma, task_value, var_cutoff, period,
    rank_rule. ``tasks``, ``solvers``, ``examples``: the valid names."""
    task, solver, image = form.get("task"), form.get("solver"), form.get("image")
    if task not in tasks:
        raise RequestError(f"unknown task {task!r}; choose one of {', '.join(tasks)}")
    if solver not in solvers:
        raise RequestError(f"unknown solver {solver!r}; choose one of {', '.join(solvers)}")
    upload = form.get("upload") or None
    if image == UPLOAD:
        if upload is None:
            raise RequestError("no image uploaded: upload one, or pick a bundled photograph")
    elif image in examples:
        upload = None
    else:
        raise RequestError(f"unknown image {image!r}; choose one of {', '.join(examples)} or upload one")
    size = _number(form.get("size"), "image size", integer=True, low=8, high=limits.max_size)
    parameter = TASK_PARAMETERS.get(task)
    task_value = form.get("task_value")
    if parameter is None or task_value in (None, ""):
        task_value = None
    else:
        task_value = _number(task_value, parameter.label, integer=parameter.integer, low=parameter.minimum, high=parameter.maximum)
    return JobRequest(
        task=task, solver=solver, example=image if upload is None else examples[0], upload=upload, size=size,
        steps=_number(form.get("steps"), "steps", integer=True, low=1, high=limits.max_steps),
        guidance_scale=_number(form.get("guidance_scale"), "guidance step size", low=0, low_open=True),
        seed=_number(form.get("seed"), "seed", integer=True, low=0, high=2**31 - 1),
        noise_sigma=_number(form.get("noise_sigma"), "noise sigma", low=0, high=2),
        task_value=task_value,
        var_cutoff=_number(form.get("var_cutoff"), "variance cutoff tau", low=0, low_open=True, high=1),
        period=_number(form.get("period"), "period F", integer=True, low=0, high=10000),
        rank_rule=_rank_rule(form.get("rank_rule")),
    )


def _rank_rule(value) -> str:
    if value not in RANK_RULES:
        raise RequestError(f"unknown rank rule {value!r}; choose one of {', '.join(RANK_RULES)}")
    return value


# ---------------------------------------------------------------------------------------------
# 2. The adapter: every call into the rest of the package
# ---------------------------------------------------------------------------------------------


@dataclass
class ProgressEvent:
    """What a running job reports. ``stage``: ``"measured"`` (``images`` holds the ground truth
    and the measurement), then ``"baseline"`` and ``"diffstategrad"`` after each solver step
    (``images`` holds that run's current x0 estimate every few steps, else nothing)."""

    stage: str
    step: int = 0
    total: int = 0
    images: dict[str, Image.Image] = field(default_factory=dict)


@dataclass
class PairResult:
    """A finished job: PIL images (``ground_truth``, ``measurement``, ``baseline``,
    ``diffstategrad``), the metrics of both runs (psnr, ssim, lpips, seconds, failed,
    failed_step, residual), the resolved configuration and the image-conversion notes."""

    images: dict[str, Image.Image]
    metrics: dict[str, dict[str, Any]]
    config: dict[str, Any]
    notes: list[str]
    tensors: dict[str, Any] = field(default_factory=dict, repr=False)


class Engine:
    """Runs jobs on one device; caches the models (read-only, shared by all sessions).
    ``threads``: torch CPU threads for each job (None: torch's default)."""

    def __init__(self, device: str = "auto", limits: Limits = Limits(), threads: int | None = None):
        from diffstategrad.pipeline import PipelineError, resolve_device

        try:
            self.device = resolve_device(device)
        except PipelineError as exc:
            raise ServeError(str(exc)) from None
        self.limits, self.threads = limits, threads
        self._models: dict[str, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    # -- what the form offers ----------------------------------------------------------------

    @staticmethod
    def tasks() -> list[str]:
        from diffstategrad.operators import list_tasks

        return list_tasks()

    @staticmethod
    def solvers() -> list[str]:
        """The diffusion solvers (the classical baselines have no guidance gradient to compare
        with and without the projector)."""
        from diffstategrad.solvers import solver_names, solver_spec

        return [name for name in solver_names() if solver_spec(name).needs_prior]

    @staticmethod
    def examples() -> list[str]:
        from diffstategrad.images import list_examples

        return list_examples()

    @staticmethod
    def task_defaults(task: str) -> dict:
        """``{"noise_sigma", "task_value"}``: the preset's noise level and key parameter (at the
        reference size; None where the page offers none)."""
        from diffstategrad.operators import load_task

        preset = load_task(task)
        parameter = TASK_PARAMETERS.get(task)
        value = None
        if parameter is not None:
            value = preset.operator[parameter.key.split(".", 1)[1]]
            value = value[0] if isinstance(value, (list, tuple)) else value
        return {"noise_sigma": float(preset.noise.get("sigma", 0.0)), "task_value": value}

    @staticmethod
    def solver_defaults(solver: str, task: str) -> dict:
        """``{"steps", "guidance_scale"}`` the built-in models run with for this task."""
        from diffstategrad.pipeline import solver_kwargs

        kwargs = solver_kwargs(solver, task, profile="builtin")
        return {"steps": int(kwargs["steps"]), "guidance_scale": float(kwargs["guidance_scale"])}

    # -- inputs ------------------------------------------------------------------------------

    def check_upload(self, path: str) -> None:
        """Refuse an uploaded file that is too large (bytes or pixels) or not an image, with a
        one-line :class:`RequestError`, before anything decodes it in full."""
        file = Path(path)
        name = file.name
        try:
            size = file.stat().st_size
        except OSError:
            raise RequestError(f"the uploaded file {name} cannot be read; upload it again") from None
        if size > self.limits.max_upload_bytes:
            raise RequestError(f"{name} is {size / 2**20:.3g} MB; uploads are limited to {self.limits.max_upload_bytes / 2**20:.3g} MB")
        try:
            with Image.open(file) as im:  # reads the header only
                width, height = im.size
        except Image.DecompressionBombError:
            raise RequestError(f"{name} has too many pixels; uploads are limited to {self.limits.max_pixels / 1e6:.3g} megapixels") from None
        except (OSError, SyntaxError, ValueError):
            raise RequestError(f"{name} is not an image this page can read (PNG, JPEG, WebP, BMP, TIFF, GIF, ...)") from None
        if width * height > self.limits.max_pixels:
            raise RequestError(f"{name} is {width}x{height} ({width * height / 1e6:.3g} megapixels); uploads are limited to "
                               f"{self.limits.max_pixels / 1e6:.3g} megapixels")

    def load_input(self, request: JobRequest):
        """(image (1, 3, size, size) on the device, label, notes)."""
        from diffstategrad.images import ImageError, example_path, load_image

        if request.upload is not None:
            self.check_upload(request.upload)
            path, label = Path(request.upload), f"upload:{Path(request.upload).name}"
        else:
            path, label = example_path(request.example), f"example:{request.example}"
        try:
            loaded = load_image(path, request.size, channels=3)
        except (FileNotFoundError, ImageError) as exc:
            raise RequestError(str(exc).splitlines()[0].replace(str(path.parent) + os.sep, "")) from None
        return loaded.image.to(self.device), label, list(loaded.notes)

    def preview(self, image: str, upload: str | None, size: int) -> tuple[Image.Image, list[str]]:
        """The chosen input as the job will see it (centre crop, resized), and the notes."""
        from diffstategrad.images import to_pil

        request = JobRequest(task="", solver="", example=image, upload=upload if image == UPLOAD else None, size=size, steps=1,
                             guidance_scale=1.0, seed=0, noise_sigma=0.0, task_value=None, var_cutoff=1.0, period=1, rank_rule="reference")
        x, _, notes = self.load_input(request)
        return to_pil(x.cpu()), notes

    def _model(self, solver: str):
        from diffstategrad.pipeline import resolve_model
        from diffstategrad.solvers import solver_spec

        kind = solver_spec(solver).default_prior
        with self._lock:
            if kind not in self._models:
                self._models[kind] = resolve_model(None, solver, self.device)
            return self._models[kind]

    # -- the job -----------------------------------------------------------------------------

    def run_pair(self, request: JobRequest, on_progress: Callable[[ProgressEvent], None] | None = None,
                 cancel: threading.Event | None = None) -> PairResult:
        """Solve ``request`` without and with DiffStateGrad (same measurement, same seed) and
        score both. ``on_progress`` gets :class:`ProgressEvent` s; setting ``cancel`` stops the
        job at the solver's next step with :class:`JobCancelled`. Raises :class:`RequestError`
        or :class:`JobError` (one line) for what cannot run."""
        import torch

        from diffstategrad import DiffStateGrad
        from diffstategrad.images import to_pil
        from diffstategrad.metrics import get_lpips
        from diffstategrad.operators import load_task
        from diffstategrad.pipeline import Job, PipelineError, defaults_profile, measurement_image, run_job

        if self.threads is not None:
            torch.set_num_threads(self.threads)  # per OS thread: jobs run on worker threads
        report = on_progress or (lambda event: None)
        x, image_label, notes = self.load_input(request)
        overrides = {"noise.sigma": request.noise_sigma}
        parameter = TASK_PARAMETERS.get(request.task)
        if parameter is not None and request.task_value is not None and request.task_value != self.task_defaults(request.task)["task_value"]:
            overrides[parameter.key] = request.task_value
        try:
            preset = load_task(request.task, overrides)
            prior, model_label = self._model(request.solver)
            if prior is not None:
                try:
                    prior.check_size(*prior.state_shape((3, request.size, request.size))[1:])
                except ValueError as exc:
                    raise JobError(f"image size {request.size}: {exc}; the model accepts {prior.size_rule()}") from None
            profile = defaults_profile(model_label)
            guidance = request.guidance_scale
            plain = Job(request.task, request.solver, profile=profile).kwargs().get("guidance_scale")
            if guidance is not None and plain is not None and math.isclose(float(guidance), float(plain), rel_tol=1e-6):
                guidance = None  # the field still shows the default: each run takes its own (tuned with / without the projector)
            job = Job(request.task, request.solver, steps=request.steps, guidance_scale=guidance, task_overrides=overrides,
                      profile=profile)
            kwargs = job.kwargs()
            problem = preset.build(tuple(x.shape[1:]), seeds=[request.seed], device=self.device)
        except (PipelineError, ValueError, FileNotFoundError) as exc:
            raise JobError(str(exc).splitlines()[0]) from None
        lpips = get_lpips("vgg", device=self.device)
        projector = DiffStateGrad(var_cutoff=request.var_cutoff, period=request.period, rank_rule=request.rank_rule)
        total = int(kwargs["steps"])
        every = max(1, math.ceil(total / PREVIEWS_PER_RUN))
        y = problem.measure(x, seeds=[request.seed])  # what run_job measures too (same seed, same noise)
        tensors = {"ground_truth": x.cpu(), "measurement": measurement_image(problem.operator, y, x.shape).cpu()}
        report(ProgressEvent("measured", images={k: to_pil(v) for k, v in tensors.items()}))
        metrics, run_kwargs, tuned = {}, {}, {}
        for run in RUNS:
            def callback(info: dict, run=run) -> None:
                if cancel is not None and cancel.is_set():
                    raise JobCancelled
                step = int(info["step"]) + 1
                images = {}
                if step % every == 0 or step >= total:
                    with torch.no_grad():  # the step's clean estimate, decoded for latent solvers
                        estimate = info["x0"].detach() if prior is None else prior.to_image(info["x0"].detach())
                    images[run] = to_pil(estimate[:1].cpu())
                report(ProgressEvent(run, min(step, total), total, images))

            result = run_job(prior, job.with_projector(projector if run == "diffstategrad" else None), x, [request.seed], lpips=lpips,
                             callback=callback)
            tensors[run] = result.x.cpu()
            metrics[run] = result.metrics[0]
            run_kwargs[run] = result.kwargs
            if run == "diffstategrad":
                tuned = result.projector_tuned
        config = {
            "request": {k: v for k, v in request.to_dict().items() if k != "upload"}, "image": image_label, "image_notes": notes,
            "task": preset.to_dict(), "task_parameters_at_size": problem.params,
            "solver_kwargs": kwargs, "diffstategrad": projector.to_dict(), "model": model_label, "device": str(self.device),
        }
        if run_kwargs["diffstategrad"] != kwargs:  # the profile's values tuned with DiffStateGrad
            config["solver_kwargs_diffstategrad"] = run_kwargs["diffstategrad"]
        if tuned:  # ... and the projector settings tuned with it (the tau field left at its default)
            config["diffstategrad_tuned"] = tuned
        return PairResult({k: to_pil(v) for k, v in tensors.items()}, metrics, _jsonable(config), notes, tensors)

    @staticmethod
    def write_outputs(result: PairResult, folder: Path) -> list[Path]:
        """The downloads: ground_truth.png, measurement.png, without_diffstategrad.png,
        with_diffstategrad.png, comparison.png (the four, labelled) and metrics.json (the metrics
        under ``baseline`` and ``diffstategrad``, as ``solve --compare`` writes them, and the
        resolved configuration under ``config``)."""
        from diffstategrad.images import comparison_figure

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, file_name in FILE_NAMES.items():
            result.images[name].save(folder / file_name)
            paths.append(folder / file_name)
        t = result.tensors
        comparison_figure(
            [("ground truth", t["ground_truth"]), ("measurement", t["measurement"]),
             *((f"{RUN_TITLES[r]}  {metric_line(result.metrics[r])}", t[r]) for r in RUNS)],
            folder / "comparison.png", panel_height=max(256, int(t["ground_truth"].shape[-2])),
        )
        (folder / "metrics.json").write_text(json.dumps(_jsonable({**result.metrics, "config": result.config}), indent=2) + "\n")
        return [*paths, folder / "comparison.png", folder / "metrics.json"]


def metric_line(m: dict) -> str:
    return f"PSNR {m['psnr']:.2f} / SSIM {m['ssim']:.3f} / LPIPS {m['lpips']:.3f}"


def _jsonable(obj):
    """A JSON-safe copy: tuples to lists, tensors and numpy numbers to Python values, non-finite
    floats to None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------
# 3. The page
# ---------------------------------------------------------------------------------------------

SHOWN = (("ground_truth", "ground truth"), ("measurement", "measurement"), *RUN_TITLES.items())
DISPLAY_SIDE = 256  # images are shown at least this large (nearest-neighbour), downloads keep their size

_CSS = """
#outputs img, #inputs img { image-rendering: pixelated; }
#status.error, .upload-error { color: #b91c1c; font-weight: 600; }
"""


def _display(image: Image.Image | None) -> Image.Image | None:
    if image is None or image.height >= DISPLAY_SIDE:
        return image
    k = math.ceil(DISPLAY_SIDE / image.height)
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def metrics_markdown(metrics: dict[str, dict]) -> str:
    """The metrics table the page shows (one row per finished run)."""
    rows = ["| | PSNR (dB) | SSIM | LPIPS | residual | time |", "|---|---|---|---|---|---|"]
    for run in RUNS:
        if run in metrics:
            m = metrics[run]
            title = RUN_TITLES[run] + (f" (failed at step {m['failed_step']})" if m["failed"] else "")
            rows.append(f"| {title} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['lpips']:.3f} | {m['residual']:.3g} | {m['seconds']:.1f} s |")
    return "\n".join(rows)


def _prune(root: Path, max_age_s: float = 3600.0) -> None:
    """Delete job folders older than ``max_age_s``."""
    now = time.time()
    for job in root.glob("job-*"):
        if now - job.stat().st_mtime > max_age_s:
            shutil.rmtree(job, ignore_errors=True)


def _gradio():
    """Gradio, imported with analytics and hub calls switched off, or a one-line ServeError."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ServeError("the web page needs Gradio: pip install 'diffstategrad[web]' (scripts/setup.sh installs it)")
    for name, value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        os.environ[name] = value
    import gradio

    return gradio


def build_app(engine: Engine, *, concurrency: int = 1, queue_size: int = 16, work_dir: str | os.PathLike | None = None):
    """The Gradio Blocks of the page, its queue set up (``concurrency`` jobs at once, up to
    ``queue_size`` waiting). Job folders go under ``work_dir`` (default: a new temporary
    folder)."""
    gr = _gradio()
    root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="diffstategrad-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    tasks, solvers, examples, limits = engine.tasks(), engine.solvers(), engine.examples(), engine.limits
    first_task, first_solver = "box_inpainting" if "box_inpainting" in tasks else tasks[0], solvers[0]
    task_d, solver_d = engine.task_defaults(first_task), engine.solver_defaults(first_solver, first_task)

    def parameter_update(task: str):
        parameter, value = TASK_PARAMETERS.get(task), engine.task_defaults(task)
        if parameter is None:
            return gr.update(visible=False, value=None), gr.update(value=value["noise_sigma"])
        return (gr.update(visible=True, value=value["task_value"], label=parameter.label, minimum=parameter.minimum,
                          maximum=parameter.maximum, precision=0 if parameter.integer else None),
                gr.update(value=value["noise_sigma"]))

    def solver_update(solver: str, task: str):
        d = engine.solver_defaults(solver, task)
        return gr.update(value=d["steps"]), gr.update(value=d["guidance_scale"])

    def input_preview(image, upload, size):
        try:
            picture, _ = engine.preview(image, upload, int(size))
        except (RequestError, ValueError):
            return None
        return _display(picture)

    def upload_changed(upload, size):
        if not upload:
            return gr.update(value=examples[0]), "", input_preview(examples[0], None, size)
        try:
            engine.check_upload(upload)
            picture, notes = engine.preview(UPLOAD, upload, int(size))
        except RequestError as exc:
            return (gr.update(value=examples[0]), f"<span class='upload-error'>upload rejected: {exc}</span>",
                    input_preview(examples[0], None, size))
        return gr.update(value=UPLOAD), "uploaded" + (": " + "; ".join(notes) if notes else ""), _display(picture)

    with gr.Blocks(title="DiffStateGrad", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown("# DiffStateGrad: a solver without and with the projector\n"
                    "Pick an image, a task and a solver; **Run** solves the same measurement twice, without and with "
                    "DiffStateGrad (Zirvi, Tolooshams & Anandkumar, ICLR 2025), and scores both against the image.")
        with gr.Row():
            with gr.Column(scale=1, elem_id="inputs"):
                image = gr.Radio([*examples, UPLOAD], value=examples[0], label="image", elem_id="image-choice")
                upload = gr.File(label=f"upload an image (at most {limits.max_upload_bytes / 2**20:.3g} MB, "
                                       f"{limits.max_pixels / 1e6:.3g} megapixels)", type="filepath", height=150, elem_id="upload")
                upload_status = gr.Markdown(elem_id="upload-status")
                picture = gr.Image(label="input (centre crop at the image size)", type="pil", format="png", interactive=False,
                                   height=160, elem_id="input-preview")
            with gr.Column(scale=1):
                task = gr.Dropdown(tasks, value=first_task, label="task", elem_id="task")
                first_parameter = TASK_PARAMETERS[first_task]
                task_value = gr.Number(task_d["task_value"], label=first_parameter.label, minimum=first_parameter.minimum,
                                       maximum=first_parameter.maximum, precision=0 if first_parameter.integer else None,
                                       elem_id="task-value", info="at the presets' 256x256 reference size; scaled to the image size")
                noise_sigma = gr.Number(task_d["noise_sigma"], minimum=0, label="noise sigma ([-1, 1] units)", elem_id="noise-sigma")
                size = gr.Slider(32, limits.max_size, value=64, step=32, label="image size (pixels)", elem_id="size")
                seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
            with gr.Column(scale=1):
                solver = gr.Dropdown(solvers, value=first_solver, label="solver", elem_id="solver")
                with gr.Row():
                    steps = gr.Number(solver_d["steps"], precision=0, minimum=1, maximum=limits.max_steps, label="steps", elem_id="steps")
                    guidance = gr.Number(solver_d["guidance_scale"], minimum=0, label="guidance step size", elem_id="guidance")
                var_cutoff = gr.Slider(0.5, 1.0, value=0.99, step=0.001, label="DiffStateGrad variance cutoff tau", elem_id="var-cutoff")
                with gr.Row():
                    period = gr.Number(1, precision=0, minimum=0, label="period F (0: off)", elem_id="period")
                    rank_rule = gr.Radio(list(RANK_RULES), value="reference", label="rank rule", elem_id="rank-rule")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        status = gr.Markdown(elem_id="status")
        with gr.Row(elem_id="outputs"):
            shown = [gr.Image(label=label, type="pil", format="png", interactive=False, height=DISPLAY_SIDE,
                              elem_id=f"out-{name.replace('_', '-')}") for name, label in SHOWN]
        with gr.Row():
            metrics = gr.Markdown(elem_id="metrics")
            downloads = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="downloads")

        form = [image, upload, task, task_value, noise_sigma, solver, steps, guidance, size, seed, var_cutoff, period, rank_rule]
        outputs = [status, *shown, metrics, downloads]

        token = gr.State(None)  # this tab's current job, for Cancel
        stops: dict[str, tuple[str, threading.Event]] = {}  # job token -> (session, stop flag)

        def register(request: gr.Request):
            job_token = uuid.uuid4().hex
            stops[job_token] = (request.session_hash, threading.Event())
            return job_token

        def stop_session(request: gr.Request):
            for session, flag in list(stops.values()):
                if session == request.session_hash:
                    flag.set()
            return "cancelling"

        for handler in (register, stop_session):  # Gradio finds gr.Request by annotation; this module's are strings it cannot resolve
            handler.__annotations__["request"] = gr.Request

        async def run_job(job_token, *values, progress=gr.Progress()):
            names = ("image", "upload", "task", "task_value", "noise_sigma", "solver", "steps", "guidance_scale", "size", "seed",
                     "var_cutoff", "period", "rank_rule")
            stop = stops[job_token][1] if job_token in stops else threading.Event()
            try:
                request = validate_request(dict(zip(names, values)), tasks=tasks, solvers=solvers, examples=examples, limits=limits)
            except RequestError as exc:
                stops.pop(job_token, None)
                yield _frame(f"**error:** {exc}", {}, "", None)
                return
            _prune(root)
            job = _Job(engine, request, root / f"job-{uuid.uuid4().hex}", stop)
            images: dict = {}
            yield _frame("starting", images, "", None)
            try:
                while not job.finished:
                    await asyncio.sleep(0.1)
                    latest = job.drain(images, _display)
                    if latest is None:
                        continue
                    if latest.total:
                        done = (RUNS.index(latest.stage) * latest.total + latest.step) / (2 * latest.total)
                        progress(done, desc=f"{RUN_TITLES[latest.stage]}: step {latest.step}/{latest.total}")
                    line = f"{RUN_TITLES[latest.stage]}: step {latest.step} of {latest.total}" if latest.total else "measured; solving"
                    yield _frame(line, images, gr.skip(), gr.skip())
            finally:
                stop.set()  # a closed page stops the solver at its next step
                stops.pop(job_token, None)
            if job.error is not None:
                yield _frame(job.error, images, gr.skip(), None)
                return
            result = job.result
            line = f"done: {request.solver} on {request.task} at {request.size}x{request.size}, {request.steps} steps"
            failed = [RUN_TITLES[r] for r in RUNS if result.metrics[r]["failed"]]
            if failed:
                line += f" (failed: {', '.join(failed)}; the image is its last finite state)"
            if result.notes:
                line += "\n\nimage: " + "; ".join(result.notes)
            yield _frame(line, {k: _display(v) for k, v in result.images.items()}, metrics_markdown(result.metrics), job.files)

        task.change(parameter_update, task, [task_value, noise_sigma], queue=False)
        task.change(solver_update, [solver, task], [steps, guidance], queue=False)
        solver.change(solver_update, [solver, task], [steps, guidance], queue=False)
        upload.change(upload_changed, [upload, size], [image, upload_status, picture], queue=False)
        for trigger in (image.change, size.release):
            trigger(input_preview, [image, upload, size], picture, queue=False)
        app.load(input_preview, [image, upload, size], picture, queue=False)
        run.click(register, None, token, queue=False, api_visibility="private").then(
            run_job, [token, *form], outputs, concurrency_limit=concurrency, api_name="run")
        cancel.click(stop_session, None, status, queue=False, api_visibility="private")
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return app


class _Job:
    """One job on a worker thread: the engine's progress events, the stop flag, the outcome
    (``result`` and ``files``, or a one-line ``error``)."""

    def __init__(self, engine: Engine, request: JobRequest, folder: Path, stop: threading.Event):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.result: PairResult | None = None
        self.files: list[str] = []
        self.error: str | None = None
        self.finished = False
        self._engine, self._request, self._folder, self._stop = engine, request, folder, stop
        threading.Thread(target=self._work, name="diffstategrad-job", daemon=True).start()

    def _work(self) -> None:
        try:
            if self._stop.is_set():  # cancelled while it waited in the queue
                raise JobCancelled
            self.result = self._engine.run_pair(self._request, self.events.put, self._stop)
            self.files = [str(p) for p in self._engine.write_outputs(self.result, self._folder)]
        except JobCancelled:
            self.error = "cancelled"
        except (RequestError, JobError) as exc:
            self.error = f"**error:** {exc}"
        except Exception as exc:  # noqa: BLE001  the page shows one line; the log keeps the traceback
            log.exception("job failed")
            self.error = f"**error:** {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            self.events.put(None)

    def drain(self, images: dict, display: Callable) -> ProgressEvent | None:
        """Take the pending events, put their images (through ``display``) into ``images`` and
        return the latest event (None if there was none)."""
        latest = None
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return latest
            if event is None:
                self.finished = True
                return latest
            latest = event
            for name, picture in event.images.items():
                images[name] = display(picture)


def _frame(status: str, images: dict, metrics, files) -> tuple:
    """One update of the outputs, in the order build_app lists them (``images`` in the order of
    :data:`SHOWN`)."""
    return (status, *(images.get(name) for name, _ in SHOWN), metrics, files)


def serve(host: str = "127.0.0.1", port: int = 7860, device: str = "auto", concurrency: int = 1, threads: int | None = None,
          max_upload_mb: float = 20.0, max_megapixels: float = 40.0, max_size: int = 256, block: bool = True):
    """Start the page at http://HOST:PORT. Raises :class:`ServeError` (one line) where it
    cannot. With ``block=False`` returns the running Blocks (``.close()`` stops it)."""
    _gradio()
    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_megapixels * 1e6), max_size=max_size)
    engine = Engine(device, limits, threads)
    app = build_app(engine, concurrency=concurrency)
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True, ssr_mode=False,
                   mcp_server=False, run_history=False, max_file_size=limits.max_upload_bytes, quiet=True, css=_CSS,
                   show_error=False)
    except OSError as exc:
        raise ServeError(f"cannot serve on {host}:{port} ({str(exc).splitlines()[0]}); pass another --port") from None
    print(f"diffstategrad serve: http://{host}:{app.server_port} (device {engine.device}; Ctrl-C stops it)", flush=True)
    if not block:
        return app
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        app.close()
    return None

"""The ``diffstategrad`` command line.

The CLI parses options and prints; the work is done by ``pipeline`` (the solve job, shared with
``evaluate`` and ``serve``) and ``evaluate`` (the grid and its records). Errors a user can cause
end in one line on stderr and a non-zero exit, never a traceback.

Exit codes: 0 everything succeeded; 1 an error (bad input, nothing was run or written);
3 the command ran but some solves failed (diverged: see ``solvers/base.py``), their results
are written and marked failed; 130 interrupted (an evaluation keeps its records and resumes).
"""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
from dataclasses import fields

import click

from diffstategrad import __version__
from diffstategrad.cli_support import POSITIVE, FiniteFloat, NumberList, UserError, check_out, make_out, names, network_options, one_line, \
    user_error

EXIT_SOME_FAILED = 3


# ---------------------------------------------------------------------------------------------
# The projector's options, built from the DiffStateGrad dataclass itself
# ---------------------------------------------------------------------------------------------


def _docstring_args(doc: str) -> dict[str, str]:
    """name -> first sentence of its entry in a Google-style ``Args:`` section."""
    out, current = {}, None
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    for line in section.splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.startswith(" " * 12):
            out[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    return {k: re.split(r"(?<=[.)])\s", v.replace("``", ""), maxsplit=1)[0].rstrip(".") for k, v in out.items()}


def projector_options(command):
    """Add one CLI option per field of :class:`~diffstategrad.projection.DiffStateGrad` (name,
    default and help from the class itself) and hand the command a ready ``projector``."""
    from diffstategrad import projection

    cls = projection.DiffStateGrad
    helps = _docstring_args(cls.__doc__ or "")
    choices = {"rank_rule": projection.RANK_RULES, "svd": projection.SVD_BACKENDS, "svd_device": projection.SVD_DEVICES}
    specs = [f for f in fields(cls) if f.init and f.repr]

    @functools.wraps(command)
    def wrapper(**kwargs):
        config = {f.name: kwargs.pop(f"projector_{f.name}") for f in specs}
        try:
            projector = cls(**config)
        except (TypeError, ValueError) as exc:
            raise UserError(f"DiffStateGrad: {one_line(exc)}") from None
        return command(projector=projector, **kwargs)

    for f in reversed(specs):
        default = f.default
        if f.name in choices:
            kind = click.Choice(list(choices[f.name]))
        elif isinstance(default, bool):
            kind = bool
        elif isinstance(default, str):
            kind = str
        elif isinstance(default, int) or f.name == "rank":
            kind = click.IntRange(0)
        else:
            kind = FiniteFloat(positive=True)
        help_text = "DiffStateGrad: " + helps.get(f.name, f.name.replace("_", " ")) + "."
        wrapper = click.option(f"--{f.name.replace('_', '-')}", f"projector_{f.name}", type=kind, default=default,
                               show_default=default is not None, help=help_text)(wrapper)
    return wrapper


# ---------------------------------------------------------------------------------------------
# The command group, demo, tasks
# ---------------------------------------------------------------------------------------------


class _Group(click.Group):
    """A command group whose every error, bad options included, is one line and exit code 1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            raise SystemExit(1) from None
        except click.ClickException as exc:
            exc.show()
            raise SystemExit(1) from None
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            raise SystemExit(1) from None
        except click.exceptions.Exit as exc:
            raise SystemExit(exc.exit_code) from None
        raise SystemExit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffstategrad")
def main():
    """DiffStateGrad: diffusion-prior solvers for imaging inverse problems, with the
    state-guided low-rank gradient projection of Zirvi, Tolooshams & Anandkumar (ICLR 2025).

    \b
    Examples:
      diffstategrad solve --task box_inpainting --compare --out runs/box
      diffstategrad evaluate --tasks box_inpainting,super_resolution --solvers tv,dps,daps \\
          --guidance-multipliers 0.5,1,2,4 --seeds 0,1 --out runs/eval
      diffstategrad models                # the built-in models
      diffstategrad demo                  # DPS with and without DiffStateGrad on a known prior
      diffstategrad tasks                 # the eight task presets and their parameters

    \b
    Exit codes: 0 success, 1 error, 3 some solves failed (results written, marked failed),
    130 interrupted.
    """


@main.command("demo")
@click.option("--guidance-scales", default="0.3,1,3,10", show_default=True, type=NumberList(float, positive=True),
              help="Comma-separated DPS step sizes zeta.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1, 1000), help="DPS steps.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(1, 256), help="Images per configuration.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the images, the noise and the solver.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def demo_command(guidance_scales: list, steps: int, samples: int, seed: int, as_json: bool):
    """DPS with and without DiffStateGrad on a low-rank Gaussian prior with an exact denoiser.

    Half of the pixels of 3x16x16 images from a known low-rank "manifold" are observed with
    noise 0.05; the table shows, per step size, the reconstruction error and the distance of
    the result from the manifold. DiffStateGrad keeps large steps on the manifold.
    """
    from diffstategrad.demo import low_rank_demo

    records = low_rank_demo(guidance_scales, steps=steps, samples=samples, seed=seed)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(f"{'zeta':>6}  {'DiffStateGrad':<13} {'error':>8} {'off-manifold':>13} {'residual':>9}")
    for r in records:
        click.echo(f"{r['guidance_scale']:>6g}  {r['diffstategrad']:<13} {r['error']:>8.3f} {r['off_manifold']:>13.3f} {r['residual']:>9.3f}")


@main.command("tasks")
@click.option("--json", "as_json", is_flag=True, help="Print the presets as a JSON list.")
def tasks_command(as_json: bool):
    """List the task presets (configs/tasks/*.yaml) with their parameters at 256x256."""
    from diffstategrad.operators import list_tasks, load_task

    presets = [load_task(name).to_dict() for name in list_tasks()]
    if as_json:
        click.echo(json.dumps(presets, indent=2))
        return
    for p in presets:
        click.secho(p["name"], bold=True)
        if p.get("description"):
            click.echo(f"  {p['description']}")
        click.echo(f"  operator: {_inline(p['operator'])}")
        click.echo(f"  noise:    {_inline(p['noise'])}")
        if p.get("source"):
            click.echo(f"  source:   {p['source']}")


def _inline(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


# ---------------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------------


def _load_input_image(image: str | None, size: int, channels: int):
    """(tensor, label, notes) for a file path or a bundled example name (None = the default)."""
    from pathlib import Path

    from diffstategrad.images import ImageError, example_path, list_examples, load_image

    if image is None or image in list_examples():
        path, label = example_path(image), f"example:{image or list_examples()[0]}"
    else:
        path, label = Path(image).expanduser(), str(Path(image).expanduser())
    try:
        loaded = load_image(path, size, channels=channels)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ImageError) as exc:
        raise UserError(one_line(exc)) from None
    return loaded.image, label, list(loaded.notes)


def _parse_options(options) -> dict:
    out = {}
    for opt in options:
        if "=" not in opt:
            raise UserError(f"--task-option takes KEY=VALUE, got {opt!r}")
        key, value = opt.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _solver_help() -> str:
    from diffstategrad.solvers import solver_names

    return ", ".join(solver_names())


def _versions() -> dict:
    import platform

    import torch

    return {"diffstategrad": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


DSG_DEFAULTS_OPTION = click.option(
    "--dsg-defaults", type=click.Choice(["own", "shared"]), default="own", show_default=True,
    help="With DiffStateGrad, own: the built-in profile's values tuned with it (each side at its own best; its tuned "
         "projector settings too, for those left at their defaults); shared: the plain run's values (a sweep then pairs equal steps).")


@main.command("solve")
@click.option("--task", required=True, help="Task preset (see `diffstategrad tasks`).")
@click.option("--solver", default="dps", show_default=True, help="The solver (see docs/solvers): " + _solver_help() + ".")
@click.option("--image", default=None, help="An image file or a bundled example name (default: the first example).")
@click.option("--model", default=None, help="A built-in model name or a converted model folder (default: the built-in model the solver needs).")
@click.option("--no-diffstategrad", "no_dsg", is_flag=True, help="Run the solver without the projector.")
@click.option("--compare", is_flag=True, help="Run with and without DiffStateGrad and write a comparison figure.")
@click.option("--classical", default="tv", show_default=True,
              help="With --compare: the classical solver shown beside them (tv, pseudo-inverse; none: no classical panel). "
                   "It runs at its own preset settings (--steps and --guidance-scale do not apply to it).")
@click.option("--steps", type=click.IntRange(1, 100000), default=None, help="Solver steps (default: the preset's).")
@click.option("--guidance-scale", type=POSITIVE, default=None, help="The solver's guidance step, absolute (default: the preset's; see docs/solvers).")
@click.option("--samples", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Posterior samples drawn (in one batch); with more than one, their mean and per-pixel std are written and scored too.")
@projector_options
@DSG_DEFAULTS_OPTION
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mask / kernel, the measurement noise and the solver's draws.")
@click.option("--size", type=click.IntRange(8, 4096), default=None, help="Image side in pixels (default: 64 for built-in pixel models, 128 for latent).")
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE", help="Override a preset field, e.g. noise.sigma=0.05 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@network_options
@click.option("--out", default=None, help="Output folder (default: runs/solve-TASK-SOLVER).")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def solve_command(task, solver, image, model, no_dsg, compare, classical, steps, guidance_scale, samples, projector, dsg_defaults, seed, size, task_options,
                  device, network, out, overwrite, quiet):
    """Solve one inverse problem and write images, metrics and the resolved configuration.

    \b
    Outputs in --out: ground_truth.png, measurement.png, reconstruction.png, metrics.json
    (the scores, and the time, network calls and peak memory), config.yaml; with --compare also
    reconstruction_baseline.png, reconstruction_tv.png (the --classical solver's) and
    comparison.png; with --samples N > 1 also
    posterior_mean*.png and posterior_std*.png.
    Exit code 3 when a solve failed (diverged); its outputs are still written.
    """
    from diffstategrad.metrics import get_lpips
    from diffstategrad.operators import load_task
    from diffstategrad.pipeline import Job, PipelineError, check_network_options, configure_prior, default_size, defaults_profile, \
        failed_any, resolve_device, resolve_model, run_job, solve_image, write_solve_outputs
    from diffstategrad.solvers import solver_spec

    if no_dsg and compare:
        raise UserError("--no-diffstategrad and --compare exclude each other")
    overrides = _parse_options(task_options)
    out_dir = check_out(out or f"runs/solve-{task}-{solver}", overwrite=overwrite)
    try:
        dev = resolve_device(device)
        check_network_options(network["precision"], network["compile"], dev)
        preset = load_task(task, overrides or None)
        spec = solver_spec(solver)
        prior, model_label = resolve_model(model, solver, dev)
        configure_prior(prior, **network)
        job = Job(task, solver, steps=steps, guidance_scale=guidance_scale, samples=samples, task_overrides=overrides or None,
                  profile=defaults_profile(model_label), dsg_defaults=dsg_defaults)
        job.kwargs()
    except (PipelineError, ValueError, FileNotFoundError) as exc:
        raise UserError(one_line(exc)) from None
    classical = None if classical == "none" else classical
    if classical is not None:
        try:
            if solver_spec(classical).needs_prior:
                raise UserError(f"--classical {classical}: not a classical solver (use tv, pseudo-inverse or none)")
        except ValueError as exc:
            raise UserError(f"--classical {classical}: {one_line(exc)}") from None
    if not spec.needs_prior:
        no_dsg, compare = True, False  # a classical solver has no guidance gradient to project
        if network != {"precision": "fp32", "channels_last": False, "compile": False}:
            click.echo(f"note: solver {solver} runs no network; --precision / --channels-last / --compile do nothing", err=True)
    size = size or default_size(prior)
    channels = 3 if prior is None else (prior.image_channels if prior.kind == "latent" else prior.channels)
    if prior is not None:
        try:
            prior.check_size(*prior.state_shape((channels, size, size))[1:])
        except ValueError as exc:
            raise UserError(f"--size {size}: {exc}; the model accepts {prior.size_rule()}") from None
    x, image_label, notes = _load_input_image(image, size, channels=channels)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    x = x.to(dev)
    try:
        preset.build(tuple(x.shape[1:]), seeds=[seed], device=dev)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(one_line(exc)) from None
    lpips = get_lpips("vgg", device=dev)
    runs = {}
    if compare and classical is not None:
        # first: it is fast, and an operator it cannot invert (pseudo-inverse on a nonlinear task) fails before the long solves
        classical_job = Job(task, classical, task_overrides=overrides or None, profile=defaults_profile(model_label))
        try:
            runs[classical] = run_job(None, classical_job, x, [seed], lpips=lpips)
        except (PipelineError, ValueError) as exc:
            raise UserError(f"--classical {classical}: {one_line(exc)}") from None
    variants = {}
    if compare or no_dsg:
        variants["baseline"] = None
    if not no_dsg:
        variants["diffstategrad"] = projector
    runs.update(solve_image(prior, job, x, seed, variants, lpips=lpips, progress=not quiet))
    config = {"task": preset.to_dict(), "solver": solver, "diffstategrad": None if no_dsg else projector.to_dict(), "compare": compare,
              "classical": classical if compare else None,
              "classical_kwargs": runs[classical].kwargs if compare and classical is not None else None,
              "model": model_label, "model_info": getattr(prior, "info", {}), "image": image_label, "image_notes": notes, "size": size,
              "seed": seed, "device": str(dev), "network": network, "versions": _versions()}
    write_solve_outputs(make_out(out_dir), x, runs, job, config)
    for name, run in runs.items():
        m = run.metrics[0]
        lp = f"  LPIPS {m['lpips']:.3f}" if m.get("lpips") is not None else ""
        line = f"{name:>14}: PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.3f}{lp}  {m['seconds']:.1f} s"
        if samples > 1:
            line += f"  | mean of {samples}: PSNR {m['mean_psnr']:.2f}  SSIM {m['mean_ssim']:.3f}  LPIPS {m['mean_lpips']:.3f}"
        click.echo(line + ("  FAILED (diverged)" if m["failed_samples"] else ""))
    click.echo(f"wrote {out_dir}")
    if any(failed_any(run) for run in runs.values()):
        raise SystemExit(EXIT_SOME_FAILED)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _image_set(images: str | None) -> dict[str, str]:
    """name -> file for a folder of images, a single file, or a built-in set: ``examples`` (the
    bundled photographs), ``heldout`` / ``tune`` (the held-out / tuning photographs of the
    prepared data folder), ``fashion-test[:N]`` (the first N, default 200, of the held-out
    Fashion-MNIST test images, written once as PNG files to the cache) or ``fashion-examples``
    (the eight test images shipped in the package)."""
    from pathlib import Path

    from diffstategrad.images import example_path, list_examples

    if images in (None, "examples"):
        return {name: str(example_path(name)) for name in list_examples()}
    if images == "fashion-examples":
        from diffstategrad.images import fashion_examples

        return {p.stem: str(p) for p in fashion_examples()}
    if images.startswith("fashion-test"):
        from diffstategrad.data import fashion_image_files

        count = images.partition(":")[2] or "200"
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--images {images}: write fashion-test or fashion-test:N with N a positive integer")
        try:
            return {p.stem: str(p) for p in fashion_image_files(int(count), "test")}
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--images {images}: {one_line(exc)}") from None
    if images in ("heldout", "tune"):
        from diffstategrad.data import default_data_dir

        folder = default_data_dir() / ("val" if images == "heldout" else "tune")
        if not folder.is_dir():
            raise UserError(f"--images {images} needs the prepared data ({folder} is missing): run `python -m diffstategrad.data build`")
        images = str(folder)
    path = Path(images).expanduser()
    if path.is_file():
        return {path.stem: str(path)}
    if not path.is_dir():
        raise UserError(f"--images {images}: no such folder or file (or use 'examples', 'heldout', 'tune', 'fashion-test[:N]' "
                        "or 'fashion-examples')")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"))
    if not files:
        raise UserError(f"--images {images}: the folder holds no images")
    return {p.stem: str(p) for p in files}


def _terminate_as_interrupt(signum, frame):
    """SIGTERM (kill, a batch scheduler's time limit) stops an evaluation like Ctrl-C does."""
    raise KeyboardInterrupt


@main.command("evaluate")
@click.option("--images", default="examples", show_default=True, help="A folder of images, one image, or 'examples', 'heldout', 'tune', 'fashion-test[:N]' (the first N held-out Fashion-MNIST test images, default 200), 'fashion-examples'.")
@click.option("--tasks", required=True, help="Comma-separated task presets.")
@click.option("--solvers", default="dps", show_default=True, help="Comma-separated solvers: " + _solver_help() + ".")
@click.option("--guidance-multipliers", "--guidance-scales", "guidance_multipliers", default="1", show_default=True,
              type=NumberList(float, positive=True),
              help="Comma-separated multiples of each solver's default guidance (1 = the default; --guidance-scales is the old name).")
@click.option("--seeds", default="0", show_default=True, type=NumberList(int), help="Comma-separated seeds (mask / kernel, noise and solver draws).")
@click.option("--samples", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Posterior samples per item; with more than one, the records score their mean too.")
@click.option("--size", type=click.IntRange(8, 4096), default=None, help="Image side in pixels (default: the built-in --model's own size, 32 for fashion; else 64).")
@click.option("--steps", default=None, metavar="N[,SOLVER=N,...]",
              help="Solver steps (default: each preset's); per solver as 20,daps=10 (the bare count is the other solvers').")
@click.option("--model", default=None, help="Pixel model for pixel solvers (built-in name or converted folder).")
@click.option("--latent-model", default=None, help="Latent model for latent solvers (built-in name or converted folder).")
@projector_options
@click.option("--diffstategrad", "dsg_mode", type=click.Choice(["both", "with", "without"]), default="both", show_default=True,
              help="Run each item with and/or without the projector.")
@DSG_DEFAULTS_OPTION
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE", help="Override a preset field for every task, e.g. noise.sigma=0.05.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True, help="Images solved together in one solver call (results do not depend on it).")
@click.option("--lpips", "lpips_net", type=click.Choice(["vgg", "alex", "none"]), default="vgg", show_default=True, help="LPIPS backbone (none: PSNR and SSIM only).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Local worker processes.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Torch threads per worker.")
@click.option("--ray", "ray_address", default=None, help="Send the items to a Ray cluster at this address ('local' starts one here).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--devices", default=None, metavar="DEV,DEV,...",
              help="One worker per device, e.g. cuda:0,cuda:1 (cpu,cpu: two CPU workers); the records are those one device gives. "
                   "With --ray: that many tasks at a time, one GPU each for CUDA devices.")
@network_options
@click.option("--out", required=True, help="Output folder (re-running the same command resumes it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(images, tasks, solvers, guidance_multipliers, seeds, samples, size, steps, model, latent_model, projector, dsg_mode, dsg_defaults,
                     task_options, batch, lpips_net, workers, threads, ray_address, device, devices, network, out, quiet):
    """Run tasks x solvers x {without, with DiffStateGrad} x guidance multipliers x seeds over a
    set of images; write records.jsonl (one line per item with its scores, time, network calls
    and peak memory; resumable), summary.csv, summary.md and the robustness figures. Classical
    solvers (tv, pseudo-inverse) run once per image and seed. Exit code 3 when some items failed
    (they are recorded, marked failed)."""
    from diffstategrad.evaluate import EvaluationSettingsError, make_grid, open_evaluation, robustness_figure, run_items, summarize, \
        unsupported_cells, write_summary
    from diffstategrad.operators import list_tasks
    from diffstategrad.pipeline import EvalContext, PipelineError, check_network_options, evaluate_items, parse_steps, resolve_device, \
        resolve_devices
    from diffstategrad.records import FolderInUseError, item_key
    from diffstategrad.solvers import solver_names
    from diffstategrad.stats import paired_differences, paired_figure, write_paired

    task_list, solver_list = names(tasks, "--tasks"), names(solvers, "--solvers")
    size = size or _model_size(model)
    try:
        steps = None if steps is None else parse_steps(steps)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for t in task_list:
        if t not in list_tasks():
            raise UserError(f"unknown task {t!r}; choose from {', '.join(list_tasks())}")
    for s_ in solver_list:
        if s_ not in solver_names():
            raise UserError(f"unknown solver {s_!r}; choose from {', '.join(solver_names())}")
    if devices is not None and device != "auto":
        raise UserError("--device and --devices exclude each other")
    if devices is not None and workers > 1:
        raise UserError("--workers and --devices exclude each other (--devices runs one worker per device)")
    try:
        device_list = resolve_devices(devices) if devices is not None else ()
        for d in device_list or (device,):
            check_network_options(network["precision"], network["compile"], resolve_device(d, "--devices" if device_list else "--device"))
    except PipelineError as exc:
        raise user_error(exc) from None
    if len(device_list) == 1:
        device, device_list = device_list[0], ()
    image_files = _image_set(images)
    try:
        skip = unsupported_cells(task_list, solver_list, size)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(one_line(exc)) from None
    for task, solver in skip:
        click.echo(f"note: {solver} skipped on {task} (it needs a linear operator)", err=True)
    out_dir = check_out(out, resume=True)
    context = EvalContext(images=image_files, solvers=tuple(solver_list), size=size, out=str(out_dir), steps=steps, samples=samples,
                          device=device, threads=threads, models={"pixel": model, "latent": latent_model},
                          projector=projector.to_dict(), lpips=lpips_net, task_overrides=_parse_options(task_options) or None,
                          devices=device_list, dsg_defaults=dsg_defaults, **network)
    try:
        store, lock = open_evaluation(make_out(out_dir), context.settings())
    except (FolderInUseError, EvaluationSettingsError) as exc:
        raise UserError(one_line(exc)) from None
    projector_modes = {"both": (False, True), "with": (True,), "without": (False,)}[dsg_mode]
    grid = make_grid(list(image_files), task_list, solver_list, guidance_multipliers, seeds, projector_modes, skip)
    done_before = sum(it.key in store for it in grid)
    if done_before:
        click.echo(f"resuming: {done_before} of {len(grid)} items already done", err=True)
    previous_term = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        run_items(grid, evaluate_items, context, store, workers=workers, ray_address=ray_address, progress=not quiet, batch=batch,
                  devices=context.devices)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {len(store)} records kept in {store.path}; re-run the command to resume", err=True)
        raise SystemExit(130) from None
    except (PipelineError, FileNotFoundError) as exc:
        raise UserError(one_line(exc)) from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        lock.release()
    keys = {it.key for it in grid}
    records = [r for r in store.values() if item_key(r) in keys]
    rows = summarize(records)
    write_summary(rows, out_dir)
    for metric in ("psnr", "ssim", "lpips"):
        robustness_figure(rows, out_dir / f"robustness_{metric}.png", metric)
    paired = paired_differences(records, "psnr")
    if paired:
        write_paired(paired, out_dir, "psnr")
        paired_figure(paired, out_dir / "paired_psnr.png", "psnr")
    _image_grid(records, out_dir)
    click.echo((out_dir / "summary.md").read_text())
    click.echo(f"wrote {out_dir}")
    failed = sum(bool(r.get("failed")) or bool(r.get("failed_samples")) for r in records)
    if failed:
        click.echo(f"{failed} of {len(records)} items failed (diverged); see the failure_rate column", err=True)
        raise SystemExit(EXIT_SOME_FAILED)


def _model_size(model: str | None) -> int:
    """The image side an evaluation uses by default: a built-in model's own (its info's
    image_size: 32 for fashion), else 64."""
    from diffstategrad.priors.builtin import list_builtin

    info = next((m["info"] for m in list_builtin() if m["name"] == model), {}) if model else {}
    return int(info.get("image_size", 64))


def _image_grid(records, out_dir) -> None:
    """A grid figure: for the first image and seed, each (task, solver) at multiplier 1 (or the
    nearest), without and with DiffStateGrad."""
    from diffstategrad.images import comparison_figure, load_image
    from diffstategrad.records import guidance_multiplier, reconstruction_path

    if not records:
        return
    first = sorted(records, key=lambda r: (r["image"], r["seed"]))[0]
    scale = min({guidance_multiplier(r) for r in records}, key=lambda s: abs(s - 1.0))
    panels = []
    for r in sorted(records, key=lambda r: (r["task"], r["solver"], r["diffstategrad"])):
        if r["image"] != first["image"] or r["seed"] != first["seed"] or guidance_multiplier(r) not in (scale, 1.0):
            continue
        path = reconstruction_path(out_dir, r)
        if path.exists():
            title = f"{r['task']} / {r['solver']} {'+ DSG' if r['diffstategrad'] else ''}  PSNR {r['psnr']:.2f}"
            panels.append((title, load_image(path).image))
    if panels:
        comparison_figure(panels, out_dir / "image_grid.png", columns=min(4, len(panels)), panel_height=192)


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


def _finite(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but 127.0.0.1 exposes the page, without authentication, to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to listen on.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--concurrency", type=click.IntRange(1, 16), default=1, show_default=True, help="Jobs run at once; the others wait in the queue.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Torch CPU threads per job (default: torch's, one per core).")
@click.option("--max-upload-mb", type=click.FloatRange(0, 1024, min_open=True), default=20.0, show_default=True, callback=_finite, help="Largest upload in MB.")
@click.option("--max-megapixels", type=click.FloatRange(0, 1000, min_open=True), default=40.0, show_default=True, callback=_finite, help="Largest upload in megapixels.")
@click.option("--max-size", type=click.IntRange(32, 4096), default=256, show_default=True, help="Largest image side a job may ask for.")
def serve_command(host, port, device, concurrency, threads, max_upload_mb, max_megapixels, max_size):
    """A local web page (Gradio) that runs a solver without and with DiffStateGrad side by side,
    with live progress, metrics and downloads (docs/serve.md). Needs the `web` extra."""
    from diffstategrad.web import ServeError, serve

    try:
        serve(host=host, port=port, device=device, concurrency=concurrency, threads=threads, max_upload_mb=max_upload_mb,
              max_megapixels=max_megapixels, max_size=max_size)
    except ServeError as exc:
        raise UserError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# models, convert
# ---------------------------------------------------------------------------------------------


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (name, kind, parameters, ...); the defaults are the first pixel and the first latent entries whose info does not say default: false.")
def models_command(as_json: bool):
    """List the built-in models with their size, resolution rule and training summary; each
    loads by its name (load_prior("NAME"), --model NAME)."""
    from diffstategrad.priors.builtin import list_builtin

    rows = list_builtin()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no built-in models are installed")
    defaults = {}
    for r in rows:
        info = r["info"]
        if info.get("default", True):
            defaults.setdefault(r["kind"], r["name"])
        tag = " (default)" if defaults.get(r["kind"]) == r["name"] else ""
        click.secho(f"{r['name']}{tag}", bold=True)
        click.echo(f"  kind: {r['kind']}, {r['parameters']:,} parameters, {r['size_mb']} MB")
        if info.get("description"):
            click.echo(f"  {info['description']}")
        if info.get("size_rule"):
            click.echo(f"  sizes: {info['size_rule']}")
        summary = ", ".join(f"{k.replace('_', ' ')} {info[k]}" for k in ("steps", "images_seen", "wall_time_s", "device", "crop") if k in info)
        if summary:
            click.echo(f"  training: {summary}")


def _convertible() -> list[str]:
    from diffstategrad.convert import convertible_formats

    return convertible_formats()


@main.command("convert")
@click.argument("format", type=click.Choice(_convertible()))
@click.argument("checkpoint")
@click.argument("out_dir")
@click.option("--preset", default=None, help="guided-diffusion: ffhq256 or imagenet256.")
@click.option("--config", "config_path", default=None, help="compvis-ldm: the model's YAML config (from the CompVis latent-diffusion repository).")
@click.option("--weights", type=click.Choice(["raw", "ema"]), default=None, help="compvis-ldm: raw (default) or EMA weights.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing folder.")
def convert_command(format, checkpoint, out_dir, preset, config_path, weights, overwrite):
    """Convert a checkpoint to a pickle-free folder (model.safetensors + config.json) that
    `--model FOLDER` and load_prior("converted", FOLDER) then load.

    \b
    Examples:
      diffstategrad convert guided-diffusion ffhq_10m.pt models/ffhq256 --preset ffhq256
      diffstategrad convert compvis-ldm model.ckpt models/ldm-ffhq --config ffhq-ldm-vq-4.yaml
      diffstategrad convert diffusers google/ddpm-ema-celebahq-256 models/celebahq
    """
    from diffstategrad.convert import convert

    kwargs = {k: v for k, v in dict(preset=preset, config=config_path, weights=weights).items() if v is not None}
    try:
        out = convert(format, checkpoint, out_dir, overwrite=overwrite, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as exc:
        raise UserError(one_line(exc)) from None
    click.echo(f"wrote {out}")


def _register_benchmarks() -> None:
    from diffstategrad.posterior_benchmark.command import benchmark_group

    main.add_command(benchmark_group)


_register_benchmarks()

if __name__ == "__main__":  # python -m diffstategrad.cli
    main()

"""The ``diffstategrad`` command line.

The CLI reads files, parses options and prints; it never does the math itself (DESIGN.md).
Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import signal
import threading

import click

from diffstategrad import __version__


class UserError(click.ClickException):
    """An error the user can fix; printed as one line."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True, file=file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffstategrad")
def main():
    """DiffStateGrad: diffusion-prior solvers for imaging inverse problems, with the
    state-guided low-rank gradient projection of Zirvi, Tolooshams & Anandkumar (ICLR 2025).

    \b
    Examples:
      diffstategrad solve --task box_inpainting --compare --out runs/box
      diffstategrad evaluate --tasks box_inpainting,super_resolution --solvers dps,daps \\
          --guidance-scales 0.5,1,2,4 --seeds 0,1 --out runs/eval
      diffstategrad models                # the built-in models
      diffstategrad demo                  # DPS with and without DiffStateGrad on a known prior
      diffstategrad tasks                 # the eight task presets and their parameters
      diffstategrad tasks --json          # the same, machine-readable
    """


@main.command("demo")
@click.option("--guidance-scales", default="0.3,1,3,10", show_default=True, help="Comma-separated DPS step sizes zeta.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1, 1000), help="DPS steps.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(1, 256), help="Images per configuration.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def demo_command(guidance_scales: str, steps: int, samples: int, seed: int, as_json: bool):
    """DPS with and without DiffStateGrad on a low-rank Gaussian prior with an exact denoiser.

    Half of the pixels of 3x16x16 images from a known low-rank "manifold" are observed with
    noise 0.05; the table shows, per step size, the reconstruction error and the distance of
    the result from the manifold. DiffStateGrad keeps large steps on the manifold.
    """
    from diffstategrad.demo import low_rank_demo

    scales = _float_list(guidance_scales, "--guidance-scales")
    records = low_rank_demo(scales, steps=steps, samples=samples, seed=seed)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(f"{'zeta':>6}  {'DiffStateGrad':<13} {'error':>8} {'off-manifold':>13} {'residual':>9}")
    for r in records:
        click.echo(f"{r['guidance_scale']:>6g}  {r['diffstategrad']:<13} {r['error']:>8.3f} {r['off_manifold']:>13.3f} {r['residual']:>9.3f}")


def _float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


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


def _prepare_out(out: str, overwrite: bool):
    from pathlib import Path

    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UserError(f"output folder {path} exists and is not empty; pass --overwrite to replace its files")
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    except (FileNotFoundError, ImageError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    return loaded.image, label, list(loaded.notes)


@main.command("solve")
@click.option("--task", required=True, help="Task preset (see `diffstategrad tasks`).")
@click.option("--solver", default="dps", show_default=True, help="dps, psld, resample, daps or latent-daps.")
@click.option("--image", default=None, help="An image file or a bundled example name (default: the first example).")
@click.option("--model", default=None, help="A built-in model name or a converted model folder (default: the built-in model the solver needs).")
@click.option("--no-diffstategrad", "no_dsg", is_flag=True, help="Run the solver without the projector.")
@click.option("--compare", is_flag=True, help="Run with and without DiffStateGrad and write a comparison figure.")
@click.option("--steps", type=click.IntRange(1, 100000), default=None, help="Solver steps (default: the preset's).")
@click.option("--guidance-scale", type=float, default=None, help="The solver's guidance step (default: the preset's; see docs/solvers).")
@click.option("--var-cutoff", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True, help="DiffStateGrad variance cutoff tau.")
@click.option("--period", type=click.IntRange(0), default=1, show_default=True, help="DiffStateGrad period F (0 disables).")
@click.option("--rank-rule", type=click.Choice(["reference", "per_channel"]), default="reference", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(8, 4096), default=None, help="Image side in pixels (default: 64 for built-in pixel models, 128 for latent).")
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE", help="Override a preset field, e.g. noise.sigma=0.05 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", default=None, help="Output folder (default: runs/solve-TASK-SOLVER).")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def solve_command(task, solver, image, model, no_dsg, compare, steps, guidance_scale, var_cutoff, period, rank_rule, seed, size, task_options, device, out, overwrite, quiet):
    """Solve one inverse problem and write images, metrics and the resolved configuration.

    \b
    Outputs in --out: ground_truth.png, measurement.png, reconstruction.png, metrics.json,
    config.yaml; with --compare also reconstruction_baseline.png and comparison.png.
    """
    import yaml

    from diffstategrad import DiffStateGrad
    from diffstategrad.images import comparison_figure, save_image
    from diffstategrad.metrics import get_lpips
    from diffstategrad.operators import load_task
    from diffstategrad.pipeline import LATENT_SOLVERS, PipelineError, defaults_profile, measurement_image, resolve_device, resolve_model, run_case, solver_kwargs

    if no_dsg and compare:
        raise UserError("--no-diffstategrad and --compare exclude each other")
    overrides = _parse_options(task_options)
    try:
        dev = resolve_device(device)
        preset = load_task(task, overrides or None)
        prior, model_label = resolve_model(model, solver, dev)
        kwargs = solver_kwargs(solver, task, steps=steps, guidance_scale=guidance_scale, profile=defaults_profile(model_label))
    except (PipelineError, ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    size = size or (128 if solver in LATENT_SOLVERS else 64)
    try:
        prior.check_size(*prior.state_shape((3, size, size))[1:])
    except ValueError as exc:
        raise UserError(f"--size {size}: {exc}; the model accepts {prior.size_rule()}") from None
    out_dir = _prepare_out(out or f"runs/solve-{task}-{solver}", overwrite)
    x, image_label, notes = _load_input_image(image, size, channels=3)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    x = x.to(dev)
    try:
        problem = preset.build(tuple(x.shape[1:]), seeds=[seed], device=dev)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    y = problem.measure(x, seeds=[seed])
    lpips = get_lpips("vgg", device=dev)
    projector = DiffStateGrad(var_cutoff=var_cutoff, period=period, rank_rule=rank_rule)
    runs = {}
    if compare or no_dsg:
        runs["baseline"] = run_case(prior, problem, x, y, solver, kwargs, None, seed, lpips, progress=not quiet)
    if not no_dsg:
        runs["diffstategrad"] = run_case(prior, problem, x, y, solver, kwargs, projector, seed, lpips, progress=not quiet)
    main_run = runs.get("diffstategrad") or runs["baseline"]

    shown = measurement_image(problem.operator, y, x.shape)
    save_image(x.cpu(), out_dir / "ground_truth.png")
    save_image(shown.cpu(), out_dir / "measurement.png")
    save_image(main_run.result.x.cpu(), out_dir / "reconstruction.png")
    if compare:
        save_image(runs["baseline"].result.x.cpu(), out_dir / "reconstruction_baseline.png")
        label = lambda name, m: f"{name}  PSNR {m['psnr']:.2f} / SSIM {m['ssim']:.3f} / LPIPS {m['lpips']:.3f}"  # noqa: E731
        comparison_figure(
            [("ground truth", x.cpu()), (f"measurement ({task})", shown.cpu()),
             (label("without DiffStateGrad", runs["baseline"].metrics), runs["baseline"].result.x.cpu()),
             (label("with DiffStateGrad", runs["diffstategrad"].metrics), runs["diffstategrad"].result.x.cpu())],
            out_dir / "comparison.png",
            panel_height=max(256, int(x.shape[-2])),
        )
    metrics = dict(main_run.metrics)
    metrics.update({name: run.metrics for name, run in runs.items()})
    _write_json(out_dir / "metrics.json", metrics)
    config = {
        "task": preset.to_dict(), "task_parameters_at_size": _plain(problem.params), "solver": solver, "solver_kwargs": _plain(kwargs),
        "diffstategrad": None if no_dsg else projector.to_dict(), "compare": compare, "model": model_label,
        "model_info": getattr(prior, "info", {}), "image": image_label, "image_notes": notes, "size": size, "seed": seed,
        "device": str(dev), "versions": _versions(),
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, run in runs.items():
        m = run.metrics
        click.echo(f"{name:>14}: PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.3f}  LPIPS {m['lpips']:.3f}  {m['seconds']:.1f} s" + ("  FAILED" if m["failed"] else ""))
    click.echo(f"wrote {out_dir}")


def _parse_options(options) -> dict:
    out = {}
    for opt in options:
        if "=" not in opt:
            raise UserError(f"--task-option takes KEY=VALUE, got {opt!r}")
        key, value = opt.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _plain(obj):
    """JSON/YAML-safe copy (tuples to lists, tensors and numpy values to Python numbers)."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path, data) -> None:
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    from diffstategrad.records import atomic_write_text

    atomic_write_text(path, json.dumps(clean(_plain(data)), indent=2) + "\n")


def _versions() -> dict:
    import platform

    import torch

    return {"diffstategrad": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _csv(text: str, option: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes a comma-separated list, got {text!r}") from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


def _image_set(images: str | None, size: int) -> dict[str, str]:
    """name -> file for a folder of images, a single file, or a built-in set:
    ``examples`` (the bundled photographs) or ``heldout`` (the held-out photographs of the
    built-in models' training data, from the prepared data folder)."""
    from pathlib import Path

    from diffstategrad.images import example_path, list_examples

    if images in (None, "examples"):
        return {name: str(example_path(name)) for name in list_examples()}
    if images == "heldout":
        from diffstategrad.data import default_data_dir

        folder = default_data_dir() / "val"
        if not folder.is_dir():
            raise UserError(f"the held-out set needs the prepared data ({folder} is missing): run `python -m diffstategrad.data build`")
        images = str(folder)
    path = Path(images).expanduser()
    if path.is_file():
        return {path.stem: str(path)}
    if not path.is_dir():
        raise UserError(f"--images {images}: no such folder or file (or use 'examples' / 'heldout')")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"))
    if not files:
        raise UserError(f"--images {images}: the folder holds no images")
    return {p.stem: str(p) for p in files}


def _terminate_as_interrupt(signum, frame):
    """SIGTERM (kill, a batch scheduler's time limit) stops an evaluation like Ctrl-C does."""
    raise KeyboardInterrupt


@main.command("evaluate")
@click.option("--images", default="examples", show_default=True, help="A folder of images, one image, 'examples' or 'heldout'.")
@click.option("--tasks", required=True, help="Comma-separated task presets.")
@click.option("--solvers", default="dps", show_default=True, help="Comma-separated solvers.")
@click.option("--guidance-scales", default="1", show_default=True, help="Comma-separated multiples of each solver's preset guidance (1 = the default).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--size", type=click.IntRange(8, 4096), default=64, show_default=True, help="Image side in pixels.")
@click.option("--steps", type=click.IntRange(1, 100000), default=None, help="Solver steps (default: each preset's).")
@click.option("--model", default=None, help="Pixel model for pixel solvers (built-in name or converted folder).")
@click.option("--latent-model", default=None, help="Latent model for latent solvers.")
@click.option("--var-cutoff", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True)
@click.option("--period", type=click.IntRange(0), default=1, show_default=True)
@click.option("--rank-rule", type=click.Choice(["reference", "per_channel"]), default="reference", show_default=True)
@click.option("--diffstategrad", "dsg_mode", type=click.Choice(["both", "with", "without"]), default="both", show_default=True, help="Run each item with and/or without the projector.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True, help="Images solved together in one solver call (results do not depend on it).")
@click.option("--lpips", "lpips_net", type=click.Choice(["vgg", "alex", "none"]), default="vgg", show_default=True, help="LPIPS backbone (none: PSNR and SSIM only).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Local worker processes.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Torch threads per worker.")
@click.option("--ray", "ray_address", default=None, help="Send the items to a Ray cluster at this address ('local' starts one here).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, help="Output folder (re-running the same command resumes it).")
@click.option("--quiet", is_flag=True)
def evaluate_command(images, tasks, solvers, guidance_scales, seeds, size, steps, model, latent_model, var_cutoff, period, rank_rule, dsg_mode, batch, lpips_net, workers, threads, ray_address, device, out, quiet):
    """Run tasks x solvers x {without, with DiffStateGrad} x guidance scales x seeds over a set of
    images; write records.jsonl (one line per item, resumable), summary.csv, summary.md and the
    robustness figures."""
    from pathlib import Path

    from diffstategrad.evaluate import item_key, make_grid, robustness_figure, run_items, summarize, write_summary
    from diffstategrad.operators import list_tasks
    from diffstategrad.pipeline import evaluate_items
    from diffstategrad.records import RecordStore, atomic_write_text
    from diffstategrad.solvers import SOLVERS

    task_list, solver_list = _csv(tasks, "--tasks"), _csv(solvers, "--solvers")
    for t in task_list:
        if t not in list_tasks():
            raise UserError(f"unknown task {t!r}; choose from {', '.join(list_tasks())}")
    for s_ in solver_list:
        if s_ not in SOLVERS:
            raise UserError(f"unknown solver {s_!r}; choose from {', '.join(sorted(SOLVERS))}")
    scales = _csv(guidance_scales, "--guidance-scales", float)
    seed_list = _csv(seeds, "--seeds", int)
    image_files = _image_set(images, size)
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    context = {
        "images": image_files, "solvers": solver_list, "size": size, "steps": steps, "device": device, "threads": threads,
        "models": {"pixel": model, "latent": latent_model}, "out": str(out_dir),
        "projector": {"var_cutoff": var_cutoff, "period": period, "rank_rule": rank_rule}, "lpips": lpips_net,
    }
    # a resumed run must be the same experiment: refuse silently mixing settings
    settings_path = out_dir / "evaluate.json"
    settings = {k: v for k, v in context.items() if k not in ("threads", "out")}
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        changed = sorted(k for k in settings if k != "images" and previous.get(k) != _plain(settings[k]))
        if changed:
            raise UserError(f"{out_dir} holds an evaluation with other settings ({', '.join(changed)}); use another --out")
    atomic_write_text(settings_path, json.dumps(_plain(settings), indent=2))
    projector_modes = {"both": (False, True), "with": (True,), "without": (False,)}[dsg_mode]
    grid = make_grid(list(image_files), task_list, solver_list, scales, seed_list, projector_modes)
    store = RecordStore(out_dir / "records.jsonl", item_key)
    done_before = sum(it.key in store for it in grid)
    if done_before:
        click.echo(f"resuming: {done_before} of {len(grid)} items already done", err=True)
    previous_term = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        run_items(grid, evaluate_items, context, store, workers=workers, ray_address=ray_address, progress=not quiet, batch=batch)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {len(store)} records kept in {out_dir / 'records.jsonl'}; re-run the command to resume", err=True)
        raise SystemExit(130) from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    records = [r for r in store.values() if item_key(r) in {it.key for it in grid}]
    rows = summarize(records)
    write_summary(rows, out_dir)
    for metric in ("psnr", "ssim", "lpips"):
        robustness_figure(rows, out_dir / f"robustness_{metric}.png", metric)
    _image_grid(records, out_dir)
    click.echo((out_dir / "summary.md").read_text())
    click.echo(f"wrote {out_dir}")


def _image_grid(records, out_dir) -> None:
    """A grid figure: for the first image and seed, each (task, solver) at guidance scale 1,
    without and with DiffStateGrad."""
    from diffstategrad.images import comparison_figure, load_image
    from diffstategrad.pipeline import reconstruction_path

    if not records:
        return
    first = sorted(records, key=lambda r: (r["image"], r["seed"]))[0]
    scale = min({r["guidance_scale"] for r in records}, key=lambda s: abs(s - 1.0))
    panels = []
    for r in sorted(records, key=lambda r: (r["task"], r["solver"], r["diffstategrad"])):
        if r["image"] != first["image"] or r["seed"] != first["seed"] or r["guidance_scale"] != scale:
            continue
        path = reconstruction_path(out_dir, r)
        if path.exists():
            title = f"{r['task']} / {r['solver']} {'+ DSG' if r['diffstategrad'] else ''}  PSNR {r['psnr']:.2f}"
            panels.append((title, load_image(path).image))
    if panels:
        comparison_figure(panels, out_dir / "image_grid.png", columns=min(4, len(panels)), panel_height=192)


# ---------------------------------------------------------------------------------------------
# models, convert
# ---------------------------------------------------------------------------------------------


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (name, kind, parameters, ...); the first pixel and first latent entries are the defaults.")
def models_command(as_json: bool):
    """List the built-in models with their size, resolution rule and training summary."""
    from diffstategrad.priors.builtin import list_builtin

    rows = list_builtin()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no built-in models are installed")
    defaults = {}
    for r in rows:
        defaults.setdefault(r["kind"], r["name"])
        info = r["info"]
        tag = " (default)" if defaults[r["kind"]] == r["name"] else ""
        click.secho(f"{r['name']}{tag}", bold=True)
        click.echo(f"  kind: {r['kind']}, {r['parameters']:,} parameters, {r['size_mb']} MB")
        if info.get("size_rule"):
            click.echo(f"  sizes: {info['size_rule']}")
        summary = ", ".join(f"{k.replace('_', ' ')} {info[k]}" for k in ("steps", "images_seen", "wall_time_s", "device", "crop") if k in info)
        if summary:
            click.echo(f"  training: {summary}")


@main.command("convert")
@click.argument("format", type=click.Choice(["guided-diffusion", "compvis-ldm", "diffusers"]))
@click.argument("checkpoint")
@click.argument("out_dir")
@click.option("--preset", default=None, help="guided-diffusion: ffhq256 or imagenet256.")
@click.option("--config", "config_path", default=None, help="compvis-ldm: the model's YAML config.")
@click.option("--weights", type=click.Choice(["raw", "ema"]), default=None, help="compvis-ldm: raw (default) or EMA weights.")
@click.option("--overwrite", is_flag=True)
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
        raise UserError(str(exc).splitlines()[0]) from None
    click.echo(f"wrote {out}")


from diffstategrad.posterior_benchmark.command import benchmark_group

main.add_command(benchmark_group)

if __name__ == "__main__":  # python -m diffstategrad.cli
    main()

"""``diffstategrad benchmark posterior``: the click command (parsing and printing only)."""

from __future__ import annotations

import click

__all__ = ["benchmark_group"]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def _names(text: str, option: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def _shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item in _names(text, "--shapes"):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3:
            raise ValueError(f"--shapes takes CxHxW shapes, e.g. 3x16x16; got {item!r}")
        out.append(shape)
    return tuple(out)


def _base_scales(items) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--base-scale takes SOLVER=VALUE, got {item!r}")
    return out


@click.command("posterior")
@click.option("--solvers", default="dps,daps", show_default=True, help="Comma-separated pixel solvers (any name in diffstategrad.solvers.SOLVERS).")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: box_inpainting, rand_inpainting, super_resolution, gaussian_deblur).")
@click.option("--shapes", default=None, help="Comma-separated image shapes CxSxS (default 1x16x16,3x16x16; --quick: 1x8x8,3x8x8).")
@click.option("--noise-levels", default="0.01,0.1", show_default=True, help="Comma-separated measurement noise sigmas ([-1, 1] units).")
@click.option("--multipliers", default=None, help="Comma-separated multiples of each solver's base guidance value (default 0.1,0.3,1,3,10,30; --quick: 1,10).")
@click.option("--base-scale", "base_scales", multiple=True, metavar="SOLVER=VALUE", help="Override a solver's base guidance value (repeatable).")
@click.option("--measurements", type=click.IntRange(1, 1000), default=None, help="Ground truths per cell (default 8; --quick: 2).")
@click.option("--samples", type=click.IntRange(2, 100000), default=None, help="Samples per measurement (default 32; --quick: 8).")
@click.option("--var-cutoff", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True, help="DiffStateGrad variance cutoff tau.")
@click.option("--rank-rule", type=click.Choice(["reference", "per_channel"]), default="reference", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw (prior fit, ground truths, operators, noise, solvers, exact samples).")
@click.option("--quick", is_flag=True, help="Tiny sizes (8x8 images, 3 components, 2 x 8 samples, few steps): a smoke run of about 20 s.")
@click.option("--out", default="runs/benchmark-posterior", show_default=True, help="Output folder: results.json, table.txt / table.md, summary.md, sw_ratio.md, paired.md, one figure per task.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (config, solver settings, records) as JSON instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def posterior_command(solvers, tasks, shapes, noise_levels, multipliers, base_scales, measurements, samples, var_cutoff, rank_rule, seed,
                      quick, out, overwrite, as_json, quiet):
    """Every pixel solver, with and without DiffStateGrad, against the exact posterior of a
    Gaussian-mixture prior fitted to image patches (linear tasks, Gaussian noise).

    Per (shape, task, noise, solver, with/without, guidance multiplier): the sliced Wasserstein
    and energy distances of the samples to exact posterior samples (with the estimator's noise
    floor), the error of the sample mean, the mass in the correct mixture component, the
    distance to the prior's manifold and the failure rate. See docs/posterior-benchmark.md.

    \b
    Examples:
      diffstategrad benchmark posterior --quick
      diffstategrad benchmark posterior --out runs/posterior          # the full run of the docs
      diffstategrad benchmark posterior --solvers dps --tasks box_inpainting --json
    """
    from diffstategrad.cli_support import UserError, check_out, make_out
    from diffstategrad.posterior_benchmark.report import (
        format_paired,
        format_pivot,
        format_summary,
        format_table,
        task_figures,
        to_json,
    )
    from diffstategrad.posterior_benchmark.run import run_benchmark

    try:
        cfg = _config(solvers, tasks, shapes, noise_levels, multipliers, base_scales, measurements, samples, var_cutoff, rank_rule, seed, quick)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    out_dir = make_out(check_out(out, overwrite=overwrite))
    results = run_benchmark(cfg, progress=not quiet)
    records = results["records"]
    (out_dir / "results.json").write_text(to_json(results) + "\n")
    (out_dir / "table.txt").write_text(format_table(records) + "\n")
    (out_dir / "table.md").write_text(format_table(records, markdown=True) + "\n")
    (out_dir / "summary.md").write_text(format_summary(records, markdown=True) + "\n")
    (out_dir / "sw_ratio.md").write_text(format_pivot(records, markdown=True) + "\n")
    (out_dir / "paired.md").write_text(format_paired(records, markdown=True) + "\n")
    figures = task_figures(records, out_dir)
    if as_json:
        click.echo(to_json(results))
        return
    click.echo(format_table(records))
    click.echo()
    click.echo(format_summary(records))
    click.echo()
    click.echo(format_paired(records))
    click.echo(f"\n{len(records)} configurations in {results['seconds']:.0f} s; wrote {out_dir}/results.json, table.txt, "
               f"table.md, summary.md, sw_ratio.md, paired.md and {len(figures)} figures")


def _config(solvers, tasks, shapes, noise_levels, multipliers, base_scales, measurements, samples, var_cutoff, rank_rule, seed, quick):
    """The BenchmarkConfig of the command's options (ValueError for bad ones)."""
    from diffstategrad.posterior_benchmark.run import BenchmarkConfig
    from diffstategrad.posterior_benchmark.solvers import solver_setup

    fields = {
        "solvers": _names(solvers, "--solvers"),
        "noise_levels": _floats(noise_levels, "--noise-levels"),
        "var_cutoff": var_cutoff,
        "rank_rule": rank_rule,
        "seed": seed,
        "base_scales": _base_scales(base_scales),
    }
    optional = {"tasks": tasks and _names(tasks, "--tasks"), "shapes": shapes and _shapes(shapes),
                "multipliers": multipliers and _floats(multipliers, "--multipliers"), "measurements": measurements, "samples": samples}
    fields.update({k: v for k, v in optional.items() if v is not None})
    cfg = BenchmarkConfig.quick_config(**fields) if quick else BenchmarkConfig(**fields)
    unknown = set(cfg.base_scales) - set(cfg.solvers)
    if unknown:
        raise ValueError(f"--base-scale names solvers that are not run: {', '.join(sorted(unknown))}")
    cfg.validate()
    for name in cfg.solvers:
        solver_setup(name, cfg.quick)
    return cfg


@click.group("benchmark")
def benchmark_group():
    """Benchmarks that measure the solvers where the truth is known."""


benchmark_group.add_command(posterior_command)

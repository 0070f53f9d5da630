"""The ``diffstategrad`` command line.

The CLI reads files, parses options and prints; it never does the math itself (DESIGN.md).
Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json

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

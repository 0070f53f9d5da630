"""What every command of the ``diffstategrad`` CLI shares: the one-line user error, option types
that refuse non-finite and non-positive numbers, and the checks of an output folder. Commands
defined outside ``cli.py`` (``benchmark posterior``) use them too, without importing the CLI.
"""

from __future__ import annotations

import math

import click

__all__ = ["UserError", "one_line", "user_error", "FiniteFloat", "NumberList", "POSITIVE", "PRECISION", "network_options", "names",
           "check_out", "make_out"]


class UserError(click.ClickException):
    """An error the user can fix; printed as one line."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def user_error(exc: BaseException) -> UserError:
    """``exc`` (a PipelineError, PrecisionError, ...) as the CLI's one-line error: ``raise
    user_error(exc) from None``."""
    return UserError(one_line(exc))


# ---------------------------------------------------------------------------------------------
# Option types: numbers must be finite (and positive where a step size is asked for)
# ---------------------------------------------------------------------------------------------


class FiniteFloat(click.ParamType):
    """A finite float, optionally > 0."""

    def __init__(self, positive: bool = False):
        self.positive = positive
        self.name = "positive number" if positive else "number"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value) and (value > 0 or not self.positive):
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and v <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return v


class NumberList(click.ParamType):
    """Comma-separated numbers (finite; positive for step sizes; integers for seeds)."""

    def __init__(self, cast=float, positive: bool = False):
        self.cast, self.positive = cast, positive
        self.name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("is empty", param, ctx)
        out = []
        for item in items:
            try:
                v = self.cast(item)
            except ValueError:
                self.fail(f"takes comma-separated {'integers' if self.cast is int else 'numbers'}, got {item!r}", param, ctx)
            if self.cast is float and not math.isfinite(v):
                self.fail(f"{item!r} is not a finite number", param, ctx)
            if self.positive and v <= 0:
                self.fail(f"{item!r} must be positive", param, ctx)
            out.append(v)
        return out


POSITIVE = FiniteFloat(positive=True)

PRECISION = click.Choice(["fp32", "tf32", "bf16", "fp16"])  # diffstategrad.precision.PRECISIONS (tested equal)


def network_options(command):
    """``--precision``, ``--channels-last`` and ``--compile [BACKEND]``: how the prior's network
    passes run (docs/performance.md); the command gets them as ``network``, a dict of
    ``configure_network``'s keywords (precision, channels_last, compile)."""
    import functools

    @functools.wraps(command)
    def wrapper(**kwargs):
        network = {"precision": kwargs.pop("precision"), "channels_last": kwargs.pop("channels_last"),
                   "compile": kwargs.pop("compile_backend") or False}
        return command(network=network, **kwargs)

    wrapper = click.option("--compile", "compile_backend", is_flag=False, flag_value="inductor", default=None, metavar="[BACKEND]",
                           help="Compile the network pass with torch.compile (inductor; a backend name picks another, e.g. eager).")(wrapper)
    wrapper = click.option("--channels-last", is_flag=True, help="The network's weights and inputs in the channels-last layout.")(wrapper)
    wrapper = click.option("--precision", type=PRECISION, default="fp32", show_default=True,
                           help="The network passes' precision: tf32 and fp16 on CUDA only, bf16 on CUDA and the CPU "
                                "(slow on most CPUs); the solver state, projector and data term stay fp32.")(wrapper)
    return wrapper


def names(text: str, option: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise UserError(f"{option} is empty")
    return values


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------


def check_out(out: str, *, overwrite: bool = False, resume: bool = False):
    """The output folder as a Path, after checking (without creating anything) that it can be
    used: not a file, writable, and (for ``solve``) empty unless ``overwrite``."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise UserError(f"output folder {path} exists and is not empty; pass --overwrite to replace its files")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {path}: {existing} is a file")
    try:  # the real test (os.access says yes to root, and knows nothing of read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".diffstategrad-probe-", dir=existing))
    except OSError as exc:
        raise UserError(f"cannot write to {path}: {exc.strerror or exc} ({existing})") from None
    return path


def make_out(path):
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror or exc}") from None
    return path

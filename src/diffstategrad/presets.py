"""The solver-defaults table (configs/solvers.yaml): per solver, per task preset.

``solver_defaults("dps", "box_inpainting")`` returns the keyword arguments the solver runs with
by default for that task (shared ``all`` settings merged with the task's own), so the CLI and
the evaluation grid take every default from one place.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from diffstategrad.resources import config_path

__all__ = ["solver_defaults", "projector_defaults", "solver_table", "solver_source"]


@functools.lru_cache(maxsize=1)
def solver_table() -> dict:
    path: Path = config_path("solvers.yaml")
    table = yaml.safe_load(path.read_text())
    if not isinstance(table, dict):
        raise ValueError(f"{path} is not a mapping of solvers")
    return table


def _entry(solver: str) -> dict:
    table = solver_table()
    if solver not in table:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(table)}")
    return table[solver]


def solver_defaults(solver: str, task: str | None = None, profile: str | None = None, diffstategrad: bool = False) -> dict:
    """Default keyword arguments of ``solver`` for ``task`` (a preset name, or None for the
    settings shared by all tasks).

    ``profile="builtin"`` applies the solver's ``builtin`` block on top: fewer steps and guidance
    scales tuned on the small built-in models (benchmarks/tune_builtin.py), so that they run in
    seconds on a CPU. The official values stay the defaults for every other model.
    ``"builtin:fashion"`` applies the ``builtin`` block's ``fashion`` block on top of it (the
    Fashion-MNIST model's values). ``diffstategrad=True`` then applies the last block's
    ``with_diffstategrad`` block, the values tuned with the projector on (each side at its own
    best); without one the projected run keeps the same values as the plain one. A ``projector``
    entry there is the projector's own tuned settings (:func:`projector_defaults`), not a solver
    argument, and is left out here.
    """
    out = _merged(solver, task, profile, diffstategrad)
    out.pop("projector", None)
    return out


def projector_defaults(solver: str, task: str | None = None, profile: str | None = None) -> dict:
    """The DiffStateGrad settings (``DiffStateGrad`` field -> value, e.g. ``var_cutoff``) the
    profile's ``with_diffstategrad`` block tuned for ``solver`` on ``task``; {} where it tuned
    none (the projector's own defaults apply)."""
    return dict(_merged(solver, task, profile, True).get("projector") or {}) if profile is not None else {}


def _merged(solver: str, task: str | None, profile: str | None, diffstategrad: bool) -> dict:
    entry = _entry(solver)
    out = dict(entry.get("all") or {})
    if task is not None:
        out.update((entry.get("tasks") or {}).get(task, {}))
    out.pop("projector", None)  # only a with_diffstategrad block tunes the projector
    if profile is not None:
        name, _, model = profile.partition(":")
        block = entry.get(name)
        if block is None:
            raise ValueError(f"solver {solver!r} has no {name!r} defaults")
        layers = [block]
        if model:  # "builtin:fashion": the model's own block on top; its values tuned with the projector are its own too
            layers.append(block.get(model) or {})
        if diffstategrad:
            layers.append(layers[-1].get("with_diffstategrad") or {})
        for i, layer in enumerate(layers):
            values = dict(layer.get("all") or {})
            if task is not None:
                values.update((layer.get("tasks") or {}).get(task, {}))
            if not (diffstategrad and i == len(layers) - 1):
                values.pop("projector", None)
            out.update(values)
    return out


def solver_source(solver: str) -> str:
    """Which official configuration the solver's defaults follow."""
    return _entry(solver).get("source", "")

"""The operator catalogue: every operator family registers its spec in its own module.

    register_operator(OperatorSpec("motion_blur", {"kernel_size": 61, "intensity": 0.5},
                                   build=..., scale=...))      # at the bottom of operators/blur.py

A spec names the operator (the ``operator.name`` of a task YAML), its fields with their values at
the reference size (the official ones), ``scale(params, size)`` -- the size rule, given the
fields and a :class:`Size` -- and ``build(params, image_shape, seeds)`` -- the operator for
concrete parameters, drawing its random parts per seed from :func:`operator_rng`. Task presets
read the catalogue, which imports every module of the ``operators`` package on first use, so a
new operator is one module (with its ``register_operator`` call) plus one YAML preset.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffstategrad.rng import derive_seed

__all__ = ["OperatorSpec", "Size", "register_operator", "operator_spec", "operator_names", "operator_rng", "round_half_up",
           "ceil_tolerant", "as_pair"]


@dataclass(frozen=True)
class Size:
    """The target image size and its ratios to the preset's reference size: s_h = H / ref,
    s_w = W / ref, s = min(s_h, s_w) (all 1 when the preset does not scale with size)."""

    height: int
    width: int
    reference: int
    scale_with_size: bool

    @property
    def s_h(self) -> float:
        return self.height / self.reference if self.scale_with_size else 1.0

    @property
    def s_w(self) -> float:
        return self.width / self.reference if self.scale_with_size else 1.0

    @property
    def s(self) -> float:
        return min(self.s_h, self.s_w)


def _unchanged(params: dict, size: Size) -> dict:
    return params


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    fields: Mapping[str, Any]
    build: Callable[[dict, tuple, list], Any]
    scale: Callable[[dict, Size], dict] = _unchanged
    description: str = ""


_SPECS: dict[str, OperatorSpec] = {}
_DISCOVERED = False


def register_operator(spec: OperatorSpec) -> OperatorSpec:
    _SPECS[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every module of the operators package once (each registers its operators)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import diffstategrad.operators as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def operator_spec(name: str) -> OperatorSpec:
    _discover()
    if name not in _SPECS:
        raise ValueError(f"unknown operator {name!r}; choose one of {operator_names()}")
    return _SPECS[name]


def operator_names() -> list[str]:
    _discover()
    return sorted(_SPECS)


def operator_rng(seed: int) -> np.random.Generator:
    """The generator an operator draws its random parameters (kernel, mask) from for one seed."""
    return np.random.default_rng(derive_seed(int(seed), "operator"))


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def ceil_tolerant(value: float) -> int:
    return int(math.ceil(value - 1e-9))  # 30 * 0.3 = 9.000000000000002 must stay 9


def as_pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))

"""Task presets: a named operator + noise model, reproducible from (preset, seed).

A preset (configs/tasks/<name>.yaml) holds the official DiffStateGrad parameters at its
``reference_size`` (256). :meth:`TaskPreset.build` turns it into an :class:`InverseProblem` for
images of a given shape, scaling size-dependent parameters with :func:`scale_operator_params`
(the one place the scaling rule lives; docs/tasks.md states it). Random operator parameters
(motion kernels, masks) are drawn per sample seed s from ``derive_seed(s, "operator")`` and the
measurement noise from ``derive_seed(s, "noise")``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from diffstategrad.resources import configs_dir

from diffstategrad.operators.base import Operator, check_image_batch
from diffstategrad.operators.noise import Noise, make_noise
from diffstategrad.operators.registry import Size, operator_names, operator_spec
from diffstategrad.rng import SampleGenerators, derive_seed

__all__ = [
    "InverseProblem",
    "NOISE_FIELDS",
    "OPERATOR_FIELDS",
    "TaskPreset",
    "list_tasks",
    "load_task",
    "make_operator",
    "scale_operator_params",
    "tasks_dir",
]

class _OperatorFields(Mapping):
    """Every operator's fields with their defaults at the reference size (= the official values),
    read from the operator catalogue (``operators/registry.py``)."""

    def __getitem__(self, name):
        try:
            return operator_spec(name).fields
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(operator_names())

    def __len__(self):
        return len(operator_names())


OPERATOR_FIELDS: Mapping[str, Mapping] = _OperatorFields()
NOISE_FIELDS: dict[str, dict] = {"gaussian": {"sigma": 0.01}, "poisson": {"rate": 1.0}, "none": {}}
_NOISE_ALIASES = {"clean": "none"}
_TOP_FIELDS = ("name", "description", "source", "reference_size", "scale_with_size", "operator", "noise")
_OVERRIDABLE_TOP = ("description", "reference_size", "scale_with_size")
_PAIR_FIELDS = ("box_size", "margin")  # an int or (h, w)


# ----------------------------------------------------------------------------------------------
# Locating and reading presets


def tasks_dir() -> Path:
    """The folder of the bundled presets (see :mod:`diffstategrad.resources`)."""
    return configs_dir() / "tasks"


def list_tasks() -> list[str]:
    """The names of the bundled task presets."""
    return sorted(entry.name[: -len(".yaml")] for entry in tasks_dir().iterdir() if entry.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{origin}: a task preset must be a YAML mapping")
    return data


def load_task(name_or_yaml_path, overrides: Mapping | None = None) -> "TaskPreset":
    """Load a bundled preset by name, or a preset YAML file, and apply field-by-field overrides.

    Args:
        name_or_yaml_path: a name from :func:`list_tasks` or a path to a ``.yaml``/``.yml`` file.
        overrides: dotted keys, e.g. {"noise.sigma": 0.05, "operator.box_size": 64,
            "noise.name": "poisson", "scale_with_size": False} (nested dicts are accepted too).
            Values are at the reference size. Changing ``operator.name`` or ``noise.name``
            resets that section to the new model's defaults before the other keys apply.
            Unknown keys raise a ValueError that lists the valid ones.
    """
    source = str(name_or_yaml_path)
    looks_like_path = isinstance(name_or_yaml_path, Path) or source.endswith((".yaml", ".yml")) or "/" in source
    if looks_like_path:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task preset file {path} does not exist")
        data = _read_yaml(path.read_text(), str(path))
        data.setdefault("name", path.stem)
    else:
        names = list_tasks()
        if source not in names:
            raise ValueError(f"unknown task {source!r}; choose one of {names} or pass a YAML file")
        data = _read_yaml(tasks_dir().joinpath(f"{source}.yaml").read_text(), f"task {source!r}")
        data.setdefault("name", source)
    preset = TaskPreset.from_dict(data)
    return preset.with_overrides(overrides) if overrides else preset


# ----------------------------------------------------------------------------------------------
# Validation


def _coerce(key: str, value, default):
    """Check (and gently convert) an operator/noise field value against its default's type."""
    if isinstance(value, str) and default is not None and not isinstance(default, str):
        value = yaml.safe_load(value)  # "0.05", "[0.5, 0.6]", "true" from a command line
    if default is None:  # a path
        if value is not None and not isinstance(value, (str, Path)):
            raise ValueError(f"{key} must be a path or null, got {value!r}")
        return None if value is None else str(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{key} must be a number or a pair [lo, hi], got {value!r}")
        return [float(v) for v in value]
    if isinstance(default, int):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in _PAIR_FIELDS and isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"{key} must be an int or a pair [h, w], got {value!r}")
            return [_as_int(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return _as_int(key, value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    return value


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _check_section(section: str, data, catalogue: Mapping, origin: str) -> dict:
    if not isinstance(data, Mapping) or "name" not in data:
        raise ValueError(f"{origin}: '{section}' must be a mapping with a 'name'")
    name = _NOISE_ALIASES.get(data["name"], data["name"]) if section == "noise" else data["name"]
    if name not in catalogue:
        raise ValueError(f"{origin}: unknown {section} {data['name']!r}; choose one of {sorted(catalogue)}")
    defaults = catalogue[name]
    unknown = sorted(set(data) - set(defaults) - {"name"})
    if unknown:
        raise ValueError(f"{origin}: unknown {section} field(s) {unknown} for {name!r}; "
                         f"valid: {sorted(defaults)}")
    out = {"name": name}
    for key, default in defaults.items():
        out[key] = _coerce(f"{section}.{key}", data.get(key, copy.deepcopy(default)), default)
    if out.get("kernel_size") is not None and (out["kernel_size"] < 1 or out["kernel_size"] % 2 == 0):
        raise ValueError(f"{origin}: operator.kernel_size must be a positive odd integer, got {out['kernel_size']}")
    return out


def _flatten(overrides: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in overrides.items():
        key = f"{prefix}{key}"
        if isinstance(value, Mapping) and key in ("operator", "noise"):
            flat.update(_flatten(value, prefix=f"{key}."))
        else:
            flat[key] = value
    return flat


# ----------------------------------------------------------------------------------------------
# The scaling rule


def scale_operator_params(operator: Mapping, size, reference_size: int = 256, scale_with_size: bool = True) -> dict:
    """The concrete operator parameters for images of ``size`` = (H, W): the operator's own size
    rule (its spec's ``scale``, given s_h = H / ref, s_w = W / ref, s = min(s_h, s_w), or all 1
    without ``scale_with_size``). The rules of the bundled operators: blur kernel size
    2 ceil((k // 2) s) + 1 (61 -> 31 at 128, 17 at 64, 121 at 512), Gaussian sigma times s, motion
    kernels drawn at the scaled size; box sides round(b s_h) x round(b s_w) and margins
    round(m s_h) / round(m s_w) (half up); phase-retrieval padding int(oversample / 8 * n) for
    each axis length n; the SR factor, random-mask fraction and HDR scale unchanged; for the
    nonlinear blur the network is resolved (``weights``: "builtin" or the file or folder used,
    ``network``: which network and why, ``code_grid``: its code grid at this size; docs/tasks.md).
    Raises ValueError where the result does not fit the image.
    """
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    spec = operator_spec(operator["name"])
    params = {k: copy.deepcopy(v) for k, v in operator.items() if k != "name"}
    try:
        return spec.scale(params, Size(height, width, int(reference_size), bool(scale_with_size)))
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(spec.name) else f"{spec.name}: {message}") from None


def make_operator(name: str, params: Mapping, image_shape, seeds: Sequence[int]) -> Operator:
    """The operator ``name`` with concrete ``params`` (from :func:`scale_operator_params`).

    Random parameters are drawn once per seed (a batch dimension of len(seeds)); the operator is
    float64 until moved with ``.to(dtype)``.
    """
    return operator_spec(name).build(dict(params), tuple(int(n) for n in image_shape), [int(s) for s in seeds])


# ----------------------------------------------------------------------------------------------
# Presets and problems


@dataclass
class TaskPreset:
    """A task: operator and noise parameters at ``reference_size`` plus where they come from."""

    name: str
    operator: dict
    noise: dict
    description: str = ""
    source: str = ""
    reference_size: int = 256
    scale_with_size: bool = True

    @classmethod
    def from_dict(cls, data: Mapping, origin: str | None = None) -> "TaskPreset":
        origin = origin or f"task {data.get('name', '?')!r}"
        unknown = sorted(set(data) - set(_TOP_FIELDS))
        if unknown:
            raise ValueError(f"{origin}: unknown field(s) {unknown}; valid: {list(_TOP_FIELDS)}")
        for required in ("operator", "noise"):
            if required not in data:
                raise ValueError(f"{origin}: the field '{required}' is required")
        reference_size = _as_int("reference_size", data.get("reference_size", 256))
        if reference_size < 1:
            raise ValueError(f"{origin}: reference_size must be positive")
        scale_with_size = data.get("scale_with_size", True)
        if not isinstance(scale_with_size, bool):
            raise ValueError(f"{origin}: scale_with_size must be true or false")
        return cls(
            name=str(data.get("name", "custom")),
            operator=_check_section("operator", data["operator"], OPERATOR_FIELDS, origin),
            noise=_check_section("noise", data["noise"], NOISE_FIELDS, origin),
            description=str(data.get("description", "")),
            source=str(data.get("source", "")),
            reference_size=reference_size,
            scale_with_size=scale_with_size,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "reference_size": self.reference_size,
            "scale_with_size": self.scale_with_size,
            "operator": copy.deepcopy(self.operator),
            "noise": copy.deepcopy(self.noise),
        }

    def with_overrides(self, overrides: Mapping) -> "TaskPreset":
        """A copy with dotted-key overrides applied (see :func:`load_task`)."""
        flat = _flatten(overrides)
        data = self.to_dict()
        valid = list(_OVERRIDABLE_TOP)
        for section, catalogue in (("operator", OPERATOR_FIELDS), ("noise", NOISE_FIELDS)):
            valid += [f"{section}.name"] + [f"{section}.{k}" for k in catalogue[data[section]["name"]]]
            new_name = flat.get(f"{section}.name")
            if new_name is not None:
                new_name = _NOISE_ALIASES.get(new_name, new_name) if section == "noise" else new_name
                if new_name not in catalogue:
                    raise ValueError(f"unknown {section} {new_name!r}; choose one of {sorted(catalogue)}")
                if new_name != data[section]["name"]:
                    data[section] = {"name": new_name, **copy.deepcopy(catalogue[new_name])}
                    valid += [f"{section}.{k}" for k in catalogue[new_name]]
        for key, value in flat.items():
            parts = key.split(".")
            if len(parts) == 1 and key in _OVERRIDABLE_TOP:
                if isinstance(value, str) and key != "description":
                    value = yaml.safe_load(value)  # "false", "128" from a command line
                data[key] = value
                continue
            if len(parts) == 2 and parts[0] in ("operator", "noise"):
                section, leaf = parts
                if leaf == "name":
                    continue
                catalogue = OPERATOR_FIELDS if section == "operator" else NOISE_FIELDS
                if leaf in catalogue[data[section]["name"]]:
                    data[section][leaf] = value
                    continue
            raise ValueError(f"unknown override {key!r} for task {self.name!r}; valid keys: {sorted(set(valid))}")
        return TaskPreset.from_dict(data, origin=f"task {self.name!r} with overrides")

    def operator_params(self, image_size) -> dict:
        """The concrete operator parameters for images of (H, W): the scaling rule applied."""
        return scale_operator_params(self.operator, image_size, self.reference_size, self.scale_with_size)

    def build(self, image_shape, seeds: Sequence[int] | int = (0,), device=None,
              dtype: torch.dtype = torch.float32) -> "InverseProblem":
        """The operator and noise model for images of ``image_shape`` = (C, H, W).

        Args:
            seeds: one seed per sample (kernels/masks drawn per sample from
                derive_seed(seed, "operator")), or a single seed / one-element list shared by the
                whole batch.
        """
        if len(image_shape) != 3 or min(int(n) for n in image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        image_shape = tuple(int(n) for n in image_shape)
        seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if not seeds:
            raise ValueError("at least one seed is needed")
        params = self.operator_params(image_shape[1:])
        operator = make_operator(self.operator["name"], params, image_shape, seeds)
        operator = operator.to(device=device, dtype=dtype)
        return InverseProblem(operator=operator, noise=make_noise(self.noise), task=self,
                              image_shape=image_shape, seeds=seeds, params=params)


@dataclass
class InverseProblem:
    """An operator and a noise model built from a preset for one image shape and seed list."""

    operator: Operator
    noise: Noise
    task: TaskPreset
    image_shape: tuple
    seeds: list = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def measure(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """y = noise(A(x)), the noise of sample b drawn from derive_seed(seeds[b], "noise").

        ``seeds`` defaults to the seeds the problem was built with when there is one per sample.
        """
        check_image_batch(x)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"the problem was built for images {self.image_shape}, got {tuple(x.shape[1:])}")
        if seeds is None:
            if len(self.seeds) != x.shape[0]:
                raise ValueError(f"pass one noise seed per sample: the problem holds {len(self.seeds)} seed(s) "
                                 f"for a batch of {x.shape[0]}")
            seeds = self.seeds
        seeds = [int(s) for s in seeds]
        if len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        generators = SampleGenerators([derive_seed(s, "noise") for s in seeds])
        return self.noise(self.operator(x), generators)

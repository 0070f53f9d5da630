"""Where the package's bundled configuration files live.

The repository keeps them in ``configs/``; the wheel carries the same folder as
``diffstategrad/_configs`` (hatch force-include). Editable installs read the checkout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["configs_dir", "config_path"]


def configs_dir() -> Path:
    bundled = Path(str(importlib.resources.files("diffstategrad").joinpath("_configs")))
    if bundled.is_dir():
        return bundled
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("the bundled configs were not found: neither diffstategrad/_configs (installed wheel) nor configs/ of a source checkout exists; reinstall the package")


def config_path(*parts: str) -> Path:
    path = configs_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled config {'/'.join(parts)} is missing from {configs_dir()}")
    return path

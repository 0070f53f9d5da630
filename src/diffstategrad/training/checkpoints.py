"""Training checkpoint files (RUNDIR/checkpoint.pt) and the random draws of a training step.

A checkpoint holds the model, its EMA, the optimizer, the step, the RNG states, the smoothed
loss, the task's frozen state and the export info: tensors and plain Python values only. It is
read with ``torch.load(..., weights_only=True)`` (``load_checkpoint_file``) and written
atomically by the trainer (tmp file, then ``os.replace``). Version 1 stored numpy's RNG state as
the tuple of ``np.random.get_state()``; version 2 stores it as plain values
(``numpy_rng_to_plain``), and both are read.

The random draws of training step k (t, eps, the posterior sample) come from a generator seeded
by ``step_seed(seed, k)``, so a resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "step_seed", "load_checkpoint_file",
           "numpy_rng_to_plain", "numpy_rng_from_plain"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "diffstategrad-train-checkpoint"
CHECKPOINT_VERSION = 2


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws (t, eps) of training step ``step``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0x7E5]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def _legacy_numpy_globals() -> list:
    """What a version-1 checkpoint needs beyond tensors: it stored numpy's RNG state as the tuple
    of ``np.random.get_state()`` (a uint32 ndarray inside). These numpy types rebuild arrays of
    plain dtypes only; nothing callable is allowed."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [np.ndarray, np.dtype, _reconstruct]
    uint32_dtype = getattr(getattr(np, "dtypes", None), "UInt32DType", None)
    if uint32_dtype is not None:
        allowed.append(uint32_dtype)
    return allowed


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint read with ``torch.load(weights_only=True)`` (no arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    with torch.serialization.safe_globals(_legacy_numpy_globals()):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a diffstategrad training checkpoint")
    return ckpt


def numpy_rng_to_plain(state) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_rng_from_plain(obj) -> tuple:
    if isinstance(obj, dict):
        return (obj["name"], obj["keys"].numpy().astype(np.uint32), int(obj["pos"]), int(obj["has_gauss"]),
                float(obj["cached_gaussian"]))
    return tuple(obj)  # version 1: the tuple itself

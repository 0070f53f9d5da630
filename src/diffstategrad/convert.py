"""Convert any supported checkpoint to a pickle-free folder (``model.safetensors`` + ``config.json``).

    from diffstategrad.convert import convert
    convert("guided-diffusion", "ffhq_10m.pt", "models/ffhq256", preset="ffhq256")
    convert("compvis-ldm", "ldm/model.ckpt", "models/ldm-ffhq", config="ffhq-ldm-vq-4.yaml")
    convert("diffusers", "google/ddpm-ema-celebahq-256", "models/celebahq")

    prior = load_prior("converted", "models/ffhq256")

The source is loaded with the same strict, safe loader as ``load_prior`` (so a conversion
checks the checkpoint completely); the folder then loads with JSON and safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffstategrad.priors.converted import load_converted, save_converted
from diffstategrad.priors.registry import list_formats, load_prior

__all__ = ["convert", "convertible_formats"]


def convertible_formats() -> list[str]:
    """The formats whose original checkpoints ``convert`` reads (from the format catalogue)."""
    return [f.name for f in list_formats(convertible=True)]


def convert(format: str, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
            verify: bool = True, **kwargs) -> Path:
    """Load ``checkpoint`` as ``format`` and write it to ``out_dir``; returns ``out_dir``.

    Args:
        format: ``"guided-diffusion"``, ``"compvis-ldm"`` or ``"diffusers"``.
        checkpoint: the file (or diffusers folder / Hub ID) to convert.
        out_dir: the folder to write; must be empty or absent unless ``overwrite``.
        overwrite: replace the files of an existing folder.
        verify: reload the written folder and check every tensor is bit-identical.
        **kwargs: the loader's other arguments (``preset=`` / model arguments for
            guided-diffusion; ``config=``, ``weights=``, ``first_stage_checkpoint=``,
            ``scale_factor=`` for compvis-ldm; ``revision=``, ``scaling_factor=``,
            ``prediction_type=`` for diffusers).
    """
    if format not in convertible_formats():
        raise ValueError(f"cannot convert format {format!r}; choose one of {', '.join(convertible_formats())}")
    prior = load_prior(format, checkpoint, **kwargs)
    out = save_converted(prior, out_dir, source=str(checkpoint), overwrite=overwrite)
    if verify:
        again = load_converted(out)
        ours, theirs = prior.state_dict(), again.state_dict()
        if ours.keys() != theirs.keys() or any(not ours[k].equal(theirs[k]) for k in ours):
            raise RuntimeError(f"the converted folder {out} does not reproduce {checkpoint}")  # pragma: no cover
        if not again.schedule.alphas_cumprod.equal(prior.schedule.alphas_cumprod):
            raise RuntimeError(f"the converted folder {out} does not reproduce the schedule")  # pragma: no cover
    return out

"""Training of the built-in models, with checkpoint / exact resume: ``python -m diffstategrad.training``.

Each module imports only those listed above it:
  checkpoints.py  the checkpoint file (read with weights_only=True), step seeds, RNG states
  settings.py     the settings of a run per mode (run.json) and the rules of resuming
  summaries.py    ``RunView`` and what a run says on its model card
  formats.py      the exported weight files (records, ``load_exported``, ``load_autoencoder``)
  tasks.py        the pixel / autoencoder / latent objectives on their crop streams (``TASKS``)
  export.py       run views of run folders, weight exports, the shipped converted folders
  trainer.py      the generic ``Trainer`` (AdamW, EMA, logging, time box, signals, resume)
  shards.py       splitting and joining safetensors files for transfer
  cli.py          the command line (``__main__.py`` runs it)
"""

from diffstategrad.training.checkpoints import load_checkpoint_file, step_seed
from diffstategrad.training.export import build_builtin_prior, export_builtin, export_weights, load_checkpoint_model, run_view
from diffstategrad.training.formats import load_autoencoder, load_exported
from diffstategrad.training.settings import autoencoder_settings, latent_settings, pixel_settings
from diffstategrad.training.shards import join_shards, split_shards
from diffstategrad.training.tasks import AutoencoderTask, LatentTask, PixelTask
from diffstategrad.training.trainer import Trainer

__all__ = ["PixelTask", "AutoencoderTask", "LatentTask", "Trainer", "export_weights", "export_builtin",
           "build_builtin_prior", "load_exported", "load_autoencoder", "load_checkpoint_model", "load_checkpoint_file",
           "run_view", "split_shards", "join_shards", "step_seed", "pixel_settings", "autoencoder_settings",
           "latent_settings"]

"""The trainer's command line (click):

    python -m diffstategrad.training pixel --data data/photos --out runs/pixel [--steps N] ...
    python -m diffstategrad.training autoencoder --data data/photos --out runs/ae [--crop 128] ...
    python -m diffstategrad.training latent --data data/photos --out runs/latent --autoencoder runs/ae ...
    python -m diffstategrad.training export runs/pixel [--out FILE.safetensors]
    python -m diffstategrad.training export-builtin runs/pixel --out weights/pixel [--name NAME]
    python -m diffstategrad.training split-shards FILE.safetensors --prefix PREFIX [--max-mib 15]
    python -m diffstategrad.training join-shards OUT.safetensors PREFIX.part*.safetensors

Every training mode takes ``--max-minutes M`` (stop cleanly after M minutes of wall time in
this process, then checkpoint and export, to time-box a GPU run; ``--steps`` stays the step
budget), ``--device cuda`` (bf16 autocast on the device's own type, TF32 matmuls/convolutions)
and ``--workers N`` (DataLoader processes making crops, persistent, pinned memory on CUDA).
A run folder that holds a checkpoint resumes: the same command continues the run.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from diffstategrad.priors.small_autoencoder import TINY_AUTOENCODER_CONFIG
from diffstategrad.priors.unet import LATENT_UNET_CONFIG, TINY_UNET_CONFIG
from diffstategrad.training.export import export_builtin, export_weights
from diffstategrad.training.settings import DATASETS, T_SAMPLINGS, autoencoder_settings, latent_settings, pixel_settings
from diffstategrad.training.shards import join_shards, split_shards
from diffstategrad.training.trainer import Trainer

__all__ = ["main"]


def main(argv=None):
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``)."""

    def train_options(crop, batch, steps, lr, warmup, ema_decay, snapshot_every):
        options = [
            click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset (python -m diffstategrad.data build)."),
            click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it holds a checkpoint)."),
            click.option("--crop", default=crop, show_default=True, help="Crop size."),
            click.option("--batch", default=batch, show_default=True),
            click.option("--steps", default=steps, show_default=True, help="Step budget (may be raised when resuming)."),
            click.option("--max-minutes", default=0.0, show_default=True, help="Stop cleanly after this many minutes of wall time (checkpoint + export); 0: no limit."),
            click.option("--lr", default=lr, show_default=True),
            click.option("--warmup", default=warmup, show_default=True, help="Linear warm-up steps."),
            click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True),
            click.option("--ema-decay", default=ema_decay, show_default=True),
            click.option("--weight-decay", default=0.0, show_default=True),
            click.option("--grad-clip", default=1.0, show_default=True),
            click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast."),
            click.option("--seed", default=0, show_default=True),
            click.option("--threads", default=1, show_default=True, help="torch threads (also set OMP_NUM_THREADS)."),
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda, ... (bf16 autocast on either)."),
            click.option("--workers", default=0, show_default=True, help="DataLoader processes making crops (0: in the training process)."),
            click.option("--scale-min", default=0.25, show_default=True, help="Smallest crop downscaling factor."),
            click.option("--native-prob", default=0.25, show_default=True, help="Probability of a crop at the original resolution."),
            click.option("--tiny", is_flag=True, help="A tiny network (smoke tests only)."),
            click.option("--checkpoint-minutes", default=5.0, show_default=True),
            click.option("--log-every", default=50, show_default=True),
            click.option("--snapshot-every", default=snapshot_every, show_default=True, help="Export EMA snapshots every N steps (0: never)."),
        ]

        def decorate(f):
            for option in reversed(options):
                f = option(f)
            return f

        return decorate

    def common(kw: dict, model) -> dict:
        return dict(
            crop=kw["crop"], batch=kw["batch"], steps=kw["steps"], lr=kw["lr"], warmup=kw["warmup"],
            lr_schedule=kw["lr_schedule"], ema_decay=kw["ema_decay"], weight_decay=kw["weight_decay"],
            grad_clip=kw["grad_clip"], bf16=kw["bf16"], seed=kw["seed"], threads=kw["threads"], device=kw["device"],
            workers=kw["workers"], model=model, scale_min=kw["scale_min"], native_prob=kw["native_prob"],
            checkpoint_minutes=kw["checkpoint_minutes"], log_every=kw["log_every"], snapshot_every=kw["snapshot_every"],
            max_minutes=kw["max_minutes"] or None,
            command="python -m diffstategrad.training " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv]),
        )

    def run(settings, out):
        try:
            trainer = Trainer(settings, out, echo=lambda m: click.echo(m))
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from None
        try:
            trainer.train()
        finally:
            trainer.close()

    def check_crop(crop, multiple, why):
        if crop % multiple:
            raise click.BadParameter(f"must be a multiple of {multiple} ({why})", param_hint="--crop")

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli():
        """Train the built-in models (checkpoints and resumes; see the docstrings of diffstategrad.training).

        \b
        Examples:
          OMP_NUM_THREADS=1 python -m diffstategrad.training pixel --data data/photos --out runs/pixel
          python -m diffstategrad.training autoencoder --data data/photos --out runs/ae --device cuda --workers 12
          python -m diffstategrad.training latent --data data/photos --out runs/latent --autoencoder runs/ae
          python -m diffstategrad.training export-builtin runs/latent --out weights/latent
        """

    @cli.command("pixel")
    @train_options(crop=64, batch=32, steps=20000, lr=2e-4, warmup=500, ema_decay=0.999, snapshot_every=2500)
    @click.option("--dataset", type=click.Choice(DATASETS), default="photos", show_default=True,
                  help="photos: crops of a prepared photo folder; fashion-mnist: --data is the IDX folder "
                       "(/usr/share/datasets/fashion-mnist), --crop 32, a 1-channel UNet.")
    @click.option("--preconditioning", type=click.Choice(["none", "edm"]), default="none", show_default=True,
                  help="none: the network predicts epsilon (DDPM); edm: EDM's c_skip/c_out/c_in preconditioning and loss weighting.")
    @click.option("--sigma-data", default=0.5, show_default=True, help="EDM's sigma_data (the data's standard deviation).")
    @click.option("--t-sampling", type=click.Choice(T_SAMPLINGS), default="uniform", show_default=True,
                  help="Training timesteps: uniform (DDPM) or nearest to EDM's log-normal sigma.")
    @click.option("--init", "init", default=None, type=click.Path(exists=True),
                  help="Fine-tune: start from these weights (a pixel model folder such as "
                       "src/diffstategrad/weights/pixel, or a run's export/pixel.safetensors) instead of random ones.")
    def pixel(dataset, preconditioning, sigma_data, t_sampling, init, **kw):
        """Train the pixel-space UNet (epsilon or EDM-preconditioned)."""
        model = TINY_UNET_CONFIG if kw["tiny"] else None
        if model is not None and dataset == "fashion-mnist":
            model = {**model, "in_channels": 1, "out_channels": 1, "channels": model["channels"][:3]}
        check_crop(kw["crop"], 8 if dataset == "photos" else 4, "the UNet halves the size")
        try:
            settings = pixel_settings(kw["data"], **common(kw, model), dataset=dataset, preconditioning=preconditioning,
                                      sigma_data=sigma_data, t_sampling=t_sampling, init=init)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        run(settings, kw["out"])

    @cli.command("autoencoder")
    @train_options(crop=128, batch=16, steps=20000, lr=2e-4, warmup=200, ema_decay=0.998, snapshot_every=0)
    @click.option("--kl-weight", default=1e-6, show_default=True, help="Weight of the KL term (LDM's convention).")
    @click.option("--l1-weight", default=1.0, show_default=True)
    @click.option("--mse-weight", default=1.0, show_default=True)
    def autoencoder(**kw):
        """Train the KL-regularised f4 autoencoder of the latent prior."""
        check_crop(kw["crop"], 4, "the autoencoder downsamples by 4")
        settings = autoencoder_settings(kw["data"], **common(kw, TINY_AUTOENCODER_CONFIG if kw["tiny"] else None),
                                        kl_weight=kw["kl_weight"], l1_weight=kw["l1_weight"], mse_weight=kw["mse_weight"])
        run(settings, kw["out"])

    @cli.command("latent")
    @train_options(crop=128, batch=32, steps=20000, lr=2e-4, warmup=500, ema_decay=0.999, snapshot_every=0)
    @click.option("--autoencoder", "autoencoder_path", required=True, type=click.Path(exists=True),
                  help="Autoencoder run folder or its export/autoencoder.safetensors (EMA weights; copied into the run).")
    @click.option("--scale-images", default=256, show_default=True, help="Fixed training crops on which the latent scale factor is measured.")
    def latent(autoencoder_path, scale_images, **kw):
        """Train the latent epsilon-prediction UNet on a frozen autoencoder's latents."""
        model = TINY_UNET_CONFIG if kw["tiny"] else LATENT_UNET_CONFIG
        multiple = 4 * 2 ** (len(model["channels"]) - 1)
        check_crop(kw["crop"], multiple, "autoencoder x4, then the UNet's halvings")
        settings = latent_settings(kw["data"], autoencoder_path, **common(kw, model), scale_images=scale_images)
        run(settings, kw["out"])

    @cli.command("export")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output .safetensors (default RUNDIR/export/MODE.safetensors).")
    def export(rundir, out):
        """Write the EMA weights of a pixel or autoencoder RUNDIR/checkpoint.pt as safetensors + JSON."""
        if out is None:
            mode = json.loads((Path(rundir) / "run.json").read_text())["mode"]
            out = Path(rundir) / "export" / f"{mode}.safetensors"
        try:
            path = export_weights(rundir, out)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {path} and {path.with_suffix('.json')}")

    @cli.command("export-builtin")
    @click.argument("rundir", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (config.json + model.safetensors).")
    @click.option("--name", default=None, help="Model name recorded in its info (default: the folder name).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
    def export_builtin_cmd(rundir, out, name, overwrite):
        """Write a pixel or latent run as a shipped model folder (load_prior("converted", FOLDER))."""
        try:
            path = export_builtin(rundir, out, name=name, overwrite=overwrite)
        except (ValueError, FileExistsError) as err:
            raise click.ClickException(str(err)) from None
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        info = json.loads((path / "config.json").read_text())["spec"]["info"]
        click.echo(f"wrote {path} ({info['kind']}, {info['parameters']:,} parameters, {size:.1f} MiB, step {info['steps']})")

    @cli.command("split-shards")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--prefix", required=True, help="Shards are written as PREFIX.partI.safetensors.")
    @click.option("--max-mib", default=15.0, show_default=True)
    def split_cmd(file, prefix, max_mib):
        """Cut a safetensors file into shards of at most --max-mib MiB."""
        for p in split_shards(file, prefix, int(max_mib * 2**20)):
            click.echo(f"wrote {p} ({p.stat().st_size / 2**20:.2f} MiB)")

    @cli.command("join-shards")
    @click.argument("out", type=click.Path(dir_okay=False))
    @click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
    def join_cmd(out, parts):
        """Reassemble OUT from the shards PARTS (checked tensor by tensor)."""
        try:
            path = join_shards(parts, out)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {path}")

    cli.main(args=argv, prog_name="python -m diffstategrad.training")

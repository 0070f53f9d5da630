"""Speed of the solvers, the DiffStateGrad projector and the network fast paths, as ratios
measured in one run: the variants of each comparison alternate inside the timing loop (the order
rotates every repeat), each is summarised by its median, and the tables report ratios, so that a
machine whose speed drifts during the run biases no variant.

    python benchmarks/speed.py                                    # every CPU part, 64x64, one thread
    python benchmarks/speed.py --part svd,solvers --repeats 5 --out docs/perf/cpu.md
    python benchmarks/speed.py --tiny                             # seconds-long smoke run of every part
    python benchmarks/speed.py --part deepinv --deepinv-python /tmp/deepinv-venv/bin/python
    python benchmarks/speed.py --gpu --out $OUT/gpu_speed.md      # the GPU benchmark (scripts/gpu_speed.sh)
    python benchmarks/speed.py --gpu --device cpu --tiny          # its dry run on a CPU

Parts (``--part``, comma-separated; the CPU default is all but deepinv):

- ``accuracy``: how far each exact SVD back-end's projection is from a float64 full-SVD
  reference, on random and on image-like (power-law spectrum) states; no timing, so these
  numbers do not depend on the machine's load.
- ``svd``: the projector's basis (SVD + rank) and one projection, per state shape and SVD back-end
  (and, on an accelerator, computed on the device or on the host), in milliseconds and as a ratio
  to the full SVD; the back-end ``svd="auto"`` picks and the fastest exact one.
- ``solvers``: every solver (dps, psld, resample, daps, latent-daps, diffpir) on the built-in models at
  64x64 with the ``builtin`` defaults (``--steps`` shortens them): time per solver step, the ratio
  of a step to one network forward + input VJP, and the DiffStateGrad overhead (time with /
  without) per SVD back-end.
- ``batch``: DPS seconds per image against the batch size, without and with DiffStateGrad.
- ``precision``: each network path (fp32, channels-last, bf16; tf32 and fp16 on CUDA; compiled
  with ``--compile``) on a fixed problem: speed-up over fp32 and PSNR change (built-in pixel
  prior, DPS, Gaussian deblurring of the bundled photograph ``chelsea``).
- ``deepinv``: the project's DPS against deepinv's DPS (``benchmarks/deepinv_dps.py`` in
  deepinv's own environment) on the same guided-diffusion FFHQ-256 weights (random, in the
  original layout), image and steps: seconds per step and per network call.

``--gpu`` runs the 256x256 benchmark instead: the ``svd`` part at 256x256 (device and host), DPS
on the guided-diffusion FFHQ-256 architecture and ReSample on the LDM-VQ-4 architecture (random
weights in the real layouts): absolute milliseconds per step, the network's share, the
DiffStateGrad overhead per back-end / placement, and the precision paths (speed on the
guided-diffusion network; PSNR change on the trained built-in prior at 256x256).

deepinv is never installed by the project's set-up. Its environment, as it installs here (a CPU
torch from the local index; the torchvision wheel the index serves is built for CUDA and its
compiled operators do not load beside a CPU torch, which benchmarks/deepinv_dps.py works around):

    python3.11 -m venv /tmp/deepinv-venv
    /tmp/deepinv-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 deepinv

(pinning torch and torchvision in the same command keeps pip from replacing the CPU torch with a
CUDA build). Timings on a busy machine are not publishable: docs/performance.md says which runs
its tables come from.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import diffstategrad
from diffstategrad import DiffStateGrad
from diffstategrad.images import load_image
from diffstategrad.metrics import psnr
from diffstategrad.operators import Inpaint, load_task
from diffstategrad.pipeline import parse_steps, solver_kwargs, steps_for
from diffstategrad.precision import PrecisionError, check_precision, configure_network
from diffstategrad.priors import load_prior
from diffstategrad.projection import auto_svd_backend
from diffstategrad.solvers import solve

CPU_PARTS = ("accuracy", "svd", "solvers", "batch", "precision")
ALL_PARTS = CPU_PARTS + ("deepinv",)
SOLVER_NAMES = ("dps", "psld", "resample", "daps", "latent-daps", "diffpir")
LATENT = ("psld", "resample", "latent-daps")
TASK = "gaussian_deblur"
PHOTO = Path(diffstategrad.__file__).parent / "examples" / "chelsea.jpg"

# The official LDM-VQ-4 FFHQ config (CompVis latent-diffusion configs/latent-diffusion/ffhq-ldm-vq-4.yaml):
# the parts that define the network; read by the project's own config reader.
LDM_VQ4_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    timesteps: 1000
    image_size: 64
    channels: 3
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 224
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_head_channels: 32
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config: __is_unconditional__
"""


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each variant; one warm-up call each, then ``repeats`` rounds in which every
    variant runs once, in an order that rotates by one each round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Markdown sections printed as they are made and collected for ``--out``; numbers for ``--json``."""

    def __init__(self, header: str, out: Path | None = None, json_path: Path | None = None):
        self.header, self.out, self.json_path = header, out, json_path
        self.sections: list[str] = []
        self.data: dict = {}
        print(header, flush=True)

    def add(self, title: str, text: str, data=None, key: str | None = None) -> None:
        """Print a section and rewrite the output files with everything so far (a run stopped
        at its time limit keeps what it measured)."""
        section = f"### {title}\n\n{text}\n"
        print("\n" + section, flush=True)
        self.sections.append(section)
        if data is not None:
            self.data[key or title] = data
        self.write()

    def write(self, footer: str = "") -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.header + "\n\n" + "\n".join(self.sections) + footer)
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.data, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ---------------------------------------------------------------------------------------------
# Problems and models
# ---------------------------------------------------------------------------------------------


def fixed_problem(size: int, device: torch.device, batch: int = 1, task: str = TASK):
    """The bundled photograph at ``size``, a task's operator and its measurement (seed 0)."""
    x = load_image(PHOTO, size=size).image.to(device).expand(batch, -1, -1, -1).contiguous()
    problem = load_task(task).build(tuple(x.shape[1:]), seeds=[0] * batch if batch > 1 else [0], device=device)
    y = problem.measure(x, seeds=[0] * batch)
    return x, problem.operator, y


def _randomise_zero_init(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """guided-diffusion / LDM networks zero their output layers at initialisation; give them
    small random values so that a random network behaves like a trained one computationally."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not torch.count_nonzero(p):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return module


def guided_diffusion_prior(device, seed: int = 0):
    """The guided-diffusion FFHQ-256 architecture (DPS's / DAPS's ffhq_10m.pt: 93.6M parameters)
    with random weights, as a prior."""
    from diffstategrad.priors.guided_diffusion import GUIDED_DIFFUSION_PRESETS, GuidedDiffusionPrior, UNetModel, guided_diffusion_unet_config

    torch.manual_seed(seed)
    unet = _randomise_zero_init(UNetModel(**guided_diffusion_unet_config(**GUIDED_DIFFUSION_PRESETS["ffhq256"])))
    return GuidedDiffusionPrior(unet).eval().requires_grad_(False).to(device)


def ldm_vq4_prior(device, seed: int = 0):
    """The LDM-VQ-4 FFHQ architecture (UNet on 3x64x64 latents + the VQ-f4 autoencoder) with
    random weights, as a latent prior."""
    from diffstategrad.priors.compvis import CompVisLatentPrior, build_first_stage, ldm_schedule, read_ldm_config
    from diffstategrad.priors.guided_diffusion import UNetModel

    cfg = read_ldm_config(LDM_VQ4_YAML)
    torch.manual_seed(seed)
    unet = _randomise_zero_init(UNetModel(**cfg["unet"]))
    first_stage = _randomise_zero_init(build_first_stage(cfg["first_stage"]), seed + 1)
    prior = CompVisLatentPrior(unet, first_stage, ldm_schedule(cfg["schedule"]), cfg["scale_factor"])
    return prior.eval().requires_grad_(False).to(device)


def network_pass(prior, state_shape, device) -> Callable[[], object]:
    """One forward pass of the prior's epsilon network and the VJP to its input (what a DPS step
    costs at least), at a state of ``state_shape``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(state_shape, generator=gen).to(device)
    v = torch.randn(state_shape, generator=gen).to(device)
    t = prior.num_timesteps // 2

    def run():
        xx = x.clone().requires_grad_(True)
        eps = prior.eps(xx, t)
        return torch.autograd.grad(eps, xx, grad_outputs=v)[0]

    return run


def projectors(device: torch.device, limit: int | None = None) -> dict[str, DiffStateGrad | None]:
    """Without DiffStateGrad, and with it per SVD back-end (and, on an accelerator, placement):
    the first ``limit`` of them (all by default)."""
    if device.type == "cpu":
        out = {"without": None, "auto": DiffStateGrad(), "full": DiffStateGrad(svd="full"), "gram": DiffStateGrad(svd="gram")}
    else:  # auto = the full SVD on the host, overlapped with the network pass where the solver allows
        out = {"without": None, "auto (host)": DiffStateGrad(), "full on device": DiffStateGrad(svd="full", svd_device="state"),
               "gram on device": DiffStateGrad(svd="gram", svd_device="state"), "gram on host": DiffStateGrad(svd="gram", svd_device="cpu")}
    return dict(list(out.items())[:limit])


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def image_like_state(shape, seed: int = 0, decay: float = 1.5) -> torch.Tensor:
    """Random orthogonal bases with the power-law spectrum s_k = k^-decay of natural images."""
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    K = min(H, W)
    s = torch.arange(1, K + 1, dtype=torch.float64) ** -decay
    Qh = torch.linalg.qr(torch.randn(B, C, H, H, generator=gen, dtype=torch.float64)).Q[..., :K]
    Qw = torch.linalg.qr(torch.randn(B, C, W, W, generator=gen, dtype=torch.float64)).Q[..., :K]
    return ((Qh * s) @ Qw.transpose(-1, -2)).float()


def part_accuracy(report: Report, args, device: torch.device) -> None:
    shapes = [(2, 3, 16, 16), (2, 3, 64, 64)] if args.tiny else [(2, 3, 16, 16), (2, 3, 64, 64), (2, 3, 128, 128), (1, 3, 256, 256), (2, 4, 40, 24)]
    rows, data = [], []
    for shape in shapes:
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(shape, generator=gen)
        for kind, z in (("random", torch.randn(shape, generator=gen)), ("image-like", image_like_state(shape, seed=2))):
            U, s, Vh = torch.linalg.svd(z.double(), full_matrices=False)
            for rule in ("reference", "per_channel"):
                errors, ranks = {}, {}
                for svd in ("full", "gram"):
                    proj = DiffStateGrad(rank_rule=rule, svd=svd)
                    basis = proj.basis(z.to(device))
                    out = proj.project(g.to(device), basis).cpu().double()
                    ranks[svd] = basis.ranks.tolist()
                    err = []
                    for b, r in enumerate(ranks[svd]):
                        u, vh = U[b, :, :, :r], Vh[b, :, :r, :]
                        ref = u @ (u.transpose(-1, -2) @ g[b].double() @ vh.transpose(-1, -2)) @ vh
                        err.append(float((out[b] - ref).norm() / ref.norm()))
                    errors[svd] = max(err)
                rows.append(["x".join(map(str, shape)), kind, rule, ranks["full"][0], "yes" if ranks["full"] == ranks["gram"] else "NO",
                             f"{errors['full']:.1e}", f"{errors['gram']:.1e}"])
                data.append({"shape": shape, "state": kind, "rule": rule, "ranks": ranks, "errors": errors})
    report.add("Projector accuracy: exact back-ends against a float64 reference",
               table(["state", "kind", "rank rule", "rank", "same rank (full, gram)", "full (float32 SVD) error", "gram (float64) error"], rows)
               + f"\n\n(largest relative error over the batch of the projected gradient against the core projection with a float64 "
               f"full SVD at the same rank; image-like: spectrum k^-1.5; device {device})", data, "accuracy")


def part_svd(report: Report, args, device: torch.device) -> None:
    if args.tiny:
        shapes = [(1, 3, 16, 16), (1, 3, 64, 64)]
    elif args.gpu:
        shapes = [(1, 3, 64, 64), (4, 3, 64, 64), (1, 3, 256, 256), (4, 3, 256, 256)]
    else:
        shapes = [(1, 3, 16, 16), (8, 3, 16, 16), (1, 3, 32, 32), (1, 3, 64, 64), (8, 3, 64, 64), (1, 3, 128, 128), (1, 3, 256, 256)]
    where = {"state": "host" if device.type == "cpu" else "device", "cpu": "host"}
    placements = ["state"] if device.type == "cpu" else ["state", "cpu"]
    rows, data = [], []
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        state = torch.randn(shape, generator=gen).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        configs = {f"{svd} on {where[w]}": DiffStateGrad(svd=svd, svd_device=w) for w in placements for svd in ("full", "gram")}
        configs["randomized q=16 (inexact)"] = DiffStateGrad(svd="randomized", lowrank_q=16, rank_rule="per_channel")
        bases = {name: proj.basis(state) for name, proj in configs.items()}
        variants = {f"basis {name}": (lambda p=proj: p.basis(state)) for name, proj in configs.items()}
        for name, proj in configs.items():
            variants[f"once {name}"] = lambda p=proj, n=name: p.project(grad, _fresh(bases[n]))
            variants[f"reused {name}"] = lambda p=proj, n=name: p.project(grad, bases[n])
        repeats = max(3, args.repeats * (10 if shape[-1] <= 64 else 3))
        ms = {k: v * 1e3 for k, v in interleaved(variants, repeats, device, warmup=2).items()}
        reference = ms[f"basis {next(iter(configs))}"]
        exact = {name: ms[f"basis {name}"] for name in configs if "inexact" not in name}
        fastest = min(exact, key=exact.get)
        auto = f"{auto_svd_backend(DiffStateGrad().basis_device(state), torch.float32, *shape[-2:])} on host"
        for name in configs:
            note = ", ".join(n for n, hit in (("fastest exact", name == fastest), ("auto", name == auto)) if hit)
            rows.append(["x".join(map(str, shape)), name, ms[f"basis {name}"], ms[f"basis {name}"] / reference,
                         ms[f"once {name}"], ms[f"reused {name}"], int(bases[name].ranks[0]), note])
        data.append({"shape": shape, "ms": ms, "fastest_exact": fastest, "auto": auto})
    report.add("Projector: basis and projection per SVD back-end",
               table(["state", "back-end", "basis ms", "basis / first", "project once ms", "project reused ms", "rank", "note"], rows)
               + f"\n\n(reference rank rule except the randomized row; 'project reused' is the dense-projector form a reused basis takes; "
               f"{args.repeats_note})", data, "svd")


class TimedProjector(DiffStateGrad):
    """DiffStateGrad with timers around its basis (SVD + rank) and projection calls: what the
    projector itself costs inside a solver, independently of the run-to-run noise of a ratio."""

    def __post_init__(self):
        super().__post_init__()
        self.seconds = {"basis": 0.0, "project": 0.0}
        self.calls = {"basis": 0, "project": 0}

    def _timed(self, key, fn, *a):
        start = time.perf_counter()
        out = fn(*a)
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out

    def _decompose(self, state):
        return self._timed("basis", super()._decompose, state)

    def project(self, grad, basis):
        return self._timed("project", super().project, grad, basis)


def _fresh(basis):
    """The same basis, not yet used (so that a projection takes the first-use core form)."""
    return type(basis)(U=basis.U, Vh=basis.Vh, singular_values=basis.singular_values, ranks=basis.ranks, backend=basis.backend)


def _solver_steps(name: str, kwargs: dict, args) -> dict:
    kwargs = dict(kwargs)
    if args.tiny:
        kwargs["steps"] = {"resample": 6, "daps": 2, "latent-daps": 2}.get(name, 3)
        if name == "resample":
            kwargs.update(pixel_iters=3, latent_iters=3, early_stop_window=1, hdc_every=2)
        if name in ("daps", "latent-daps"):
            kwargs["mcmc_steps"] = min(kwargs.get("mcmc_steps", 5), 5)
    elif (steps := steps_for(args.steps, name)) is not None:
        kwargs["steps"] = steps
    return kwargs


def part_solvers(report: Report, args, device: torch.device) -> None:
    size = args.size
    x, op, y = fixed_problem(size, device)
    rows, data = [], {}
    priors = {"pixel": load_prior("builtin").to(device), "latent": load_prior("builtin-latent").to(device)}
    names = [n for n in SOLVER_NAMES if n in args.solvers]
    for name in names:
        prior = priors["latent" if name in LATENT else "pixel"]
        kwargs = _solver_steps(name, solver_kwargs(name, TASK, profile="builtin"), args)
        steps = kwargs["steps"]
        state_shape = (1, *prior.state_shape(tuple(x.shape[1:])))
        variants: dict[str, Callable] = {"network": network_pass(prior, state_shape, device)}
        for label, proj in projectors(device).items():
            variants[label] = lambda p=proj: solve(name, prior, op, y, shape=tuple(x.shape[1:]), seeds=[0], projector=p, **kwargs)
        sec = interleaved(variants, args.repeats, device)
        step = sec["without"] / steps
        overhead = {label: sec[label] / sec["without"] for label in variants if label not in ("network", "without")}
        timed = TimedProjector()  # the default projector (auto), its own calls timed
        solve(name, prior, op, y, shape=tuple(x.shape[1:]), seeds=[0], projector=timed, **kwargs)
        own = {k: v / steps for k, v in timed.seconds.items()}
        rows.append([name, steps, step * 1e3, step / sec["network"], *overhead.values(), own["basis"] * 1e3,
                     f"{own['project'] * 1e3:.3g} ({timed.calls['project'] / steps:.3g})",
                     f"{100 * (own['basis'] + own['project']) / step:.2g} %"])
        data[name] = {"steps": steps, "seconds": sec, "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))},
                      "projector_seconds_per_step": own, "projector_calls": timed.calls}
    labels = [label for label in projectors(device) if label != "without"]
    report.add(f"Solvers at {size}x{size}: step cost and DiffStateGrad overhead",
               table(["solver", "steps", "ms / step", "step / network fwd+VJP"] + [f"with / without ({label})" for label in labels]
                     + ["auto: basis ms / step", "auto: projections ms / step (calls)", "auto: projector share of a step"], rows)
               + f"\n\n(built-in models, `builtin` defaults{'' if not (args.steps or args.tiny) else ' with shortened runs'}, "
               f"{TASK} of chelsea, batch 1; network = one epsilon-network forward + input VJP at the solver's state size; "
               f"the last three columns time the projector's own calls in one more run, against the step without it; {args.repeats_note})",
               data, "solvers")


def part_batch(report: Report, args, device: torch.device) -> None:
    batches = (1, 2) if args.tiny else (1, 2, 4, 8)
    prior = load_prior("builtin").to(device)
    kwargs = _solver_steps("dps", solver_kwargs("dps", TASK, profile="builtin"), args)
    rows, data = [], {}
    for B in batches:
        x, op, y = fixed_problem(args.size, device, batch=B)
        variants = {label: (lambda p=proj: solve("dps", prior, op, y, shape=tuple(x.shape[1:]), seeds=list(range(B)), projector=p, **kwargs))
                    for label, proj in (("without", None), ("with", DiffStateGrad()))}
        sec = interleaved(variants, args.repeats, device)
        rows.append([B, sec["without"] / B, sec["with"] / B, sec["with"] / sec["without"]])
        data[B] = sec
    base = rows[0][1]
    for row in rows:
        row.insert(2, base / row[1])
    report.add(f"DPS per image against the batch size ({args.size}x{args.size}, {kwargs['steps']} steps)",
               table(["batch", "s / image without", "speed-up per image vs batch 1", "s / image with DiffStateGrad", "with / without"], rows)
               + f"\n\n({args.repeats_note})", data, "batch")


def _precision_paths(device: torch.device, compile_: bool, bf16_on_cpu: bool = True) -> dict[str, dict]:
    paths = {"fp32": {}, "fp32 channels-last": {"channels_last": True}}
    candidates = {"tf32": {"precision": "tf32"}, "bf16": {"precision": "bf16"}, "bf16 channels-last": {"precision": "bf16", "channels_last": True},
                  "fp16": {"precision": "fp16"}}
    for label, options in candidates.items():
        if device.type == "cpu" and not bf16_on_cpu:
            break
        try:
            check_precision(options["precision"], device)
        except PrecisionError:
            continue
        paths[label] = options
    if compile_:
        paths["fp32 compiled"] = {"compile": True}
        if "bf16" in paths:
            paths["bf16 compiled"] = {"precision": "bf16", "compile": True}
    return paths


def _precision_table(report: Report, title: str, make_prior, size: int, steps: int, args, device: torch.device, key: str, note: str) -> None:
    x, op, y = fixed_problem(size, device)
    kwargs = dict(solver_kwargs("dps", TASK, profile="builtin"), steps=steps)
    results, variants = {}, {}
    # the GPU benchmark's dry run on a CPU leaves out bf16 (~50x slower there than fp32 on AVX2)
    for label, options in _precision_paths(device, args.compile, bf16_on_cpu=not args.gpu).items():
        prior = configure_network(make_prior(), **options)

        def run(p=prior, label=label):
            results[label] = solve("dps", p, op, y, shape=tuple(x.shape[1:]), seeds=[0], **kwargs).x

        variants[label] = run
    sec = interleaved(variants, args.repeats, device)
    scores = {label: float(psnr(out.clamp(-1, 1), x)[0]) for label, out in results.items()}
    rows = [[label, sec[label] / steps * 1e3, sec["fp32"] / sec[label], scores[label], scores[label] - scores["fp32"]] for label in variants]
    report.add(title, table(["network path", "ms / step", "speed-up vs fp32", "PSNR dB", "PSNR change dB"], rows) + f"\n\n({note}; {args.repeats_note})",
               {"seconds": sec, "psnr": scores}, key)


def part_precision(report: Report, args, device: torch.device) -> None:
    steps, size = (2, 16) if args.tiny else (args.precision_steps, args.size)
    _precision_table(report, f"Network precision paths (DPS, built-in pixel prior, {size}x{size})",
                     lambda: load_prior("builtin").to(device), size, steps, args, device, "precision",
                     f"DPS with the `builtin` defaults at {steps} steps, {TASK} of chelsea; PSNR against the photograph")


def part_deepinv(report: Report, args, device: torch.device) -> None:
    if not args.deepinv_python:
        report.add("DPS against deepinv", "skipped: pass `--deepinv-python PATH` (see the module docstring for the environment)")
        return
    size, steps = (32, 3) if args.tiny else (args.deepinv_size, args.deepinv_steps)
    prior = guided_diffusion_prior(device)
    gen = torch.Generator().manual_seed(0)
    x01 = load_image(PHOTO, size=size).image.add(1).div(2)
    mask = (torch.rand(1, 1, size, size, generator=gen) > 0.5).float()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(prior.unet.state_dict(), Path(tmp) / "weights.pt")
        torch.save({"x": x01, "mask": mask}, Path(tmp) / "problem.pt")
        worker = subprocess.Popen([args.deepinv_python, str(Path(__file__).with_name("deepinv_dps.py")), "--data", tmp, "--steps", str(steps),
                                   "--threads", str(torch.get_num_threads()), "--device", str(device)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(worker.stdout.readline())
        theirs: dict = {}

        def deepinv_run():
            worker.stdin.write("run\n")
            worker.stdin.flush()
            theirs.update(json.loads(worker.stdout.readline()))

        op = Inpaint(mask.to(device))
        y = op(x01.mul(2).sub(1).to(device))
        calls = {"n": 0}
        forward = prior.unet.forward

        def counted(*a, **k):
            calls["n"] += 1
            return forward(*a, **k)

        prior.unet.forward = counted
        ours_kwargs = dict(shape=(3, size, size), steps=steps, guidance_scale=1.0, sampler="ddpm", seeds=[0])

        def ours():
            calls["n"] = 0
            solve("dps", prior, op, y, **ours_kwargs)

        deepinv_seconds: list[float] = []

        def theirs_timed():  # deepinv times itself (its process start and model load stay outside)
            deepinv_run()
            deepinv_seconds.append(theirs["seconds"])

        ours_seconds = interleaved({"ours": ours, "deepinv": theirs_timed}, args.repeats, device)["ours"]
        worker.stdin.write("quit\n")
        worker.stdin.flush()
        worker.wait(timeout=60)
    d_sec = statistics.median(deepinv_seconds[1:] or deepinv_seconds)  # the first was the warm-up
    rows = [["diffstategrad", steps, calls["n"], ours_seconds / steps, ours_seconds / calls["n"]],
            [f"deepinv {ready['deepinv']}", steps, theirs["network_calls"], d_sec / steps, d_sec / theirs["network_calls"]]]
    report.add(f"DPS against deepinv's DPS (guided-diffusion FFHQ-256 architecture, {size}x{size}, {steps} steps)",
               table(["implementation", "steps", "network calls", "s / step", "s / network call"], rows)
               + f"\n\n(same random weights in the original layout, same image and inpainting mask, DDPM sampler; deepinv's "
               f"process times itself, its start and model load excluded; ours / deepinv per network call: "
               f"{(ours_seconds / calls['n']) / (d_sec / theirs['network_calls']):.3f}; deepinv torch {ready['torch']}; {args.repeats_note})",
               {"ours": ours_seconds, "deepinv": d_sec, "ours_calls": calls["n"], "deepinv_calls": theirs["network_calls"]}, "deepinv")


# ---------------------------------------------------------------------------------------------
# The GPU benchmark
# ---------------------------------------------------------------------------------------------


def _solver_table(report: Report, title: str, solver: str, prior, size: int, kwargs: dict, args, device: torch.device, key: str, note: str,
                  limit: int | None = None) -> None:
    x, op, y = fixed_problem(size, device)
    state_shape = (1, *prior.state_shape(tuple(x.shape[1:])))
    variants: dict[str, Callable] = {"network": network_pass(prior, state_shape, device)}
    for label, proj in projectors(device, limit).items():
        variants[label] = lambda p=proj: solve(solver, prior, op, y, shape=tuple(x.shape[1:]), seeds=[0], projector=p, **kwargs)
    sec = interleaved(variants, args.repeats, device)
    steps = kwargs["steps"]
    rows = [["network fwd+VJP", sec["network"] * 1e3, "", ""]]
    rows += [[label, sec[label] / steps * 1e3, sec[label] / steps / sec["network"], sec[label] / sec["without"]] for label in variants if label != "network"]
    report.add(title, table(["variant", "ms (per step; network: per call)", "step / network", "with / without"], rows) + f"\n\n({note}; {args.repeats_note})",
               {"seconds": sec, "steps": steps}, key)


def run_gpu(report: Report, args, device: torch.device) -> None:
    size = 32 if args.tiny else 256
    if "svd" in args.parts:
        part_svd(report, args, device)
    dps_steps = 3 if args.tiny else args.gpu_dps_steps
    gd = guided_diffusion_prior(device)
    dps_kwargs = dict(steps=dps_steps, guidance_scale=1.0, sampler="ddpm")
    _solver_table(report, f"DPS on the guided-diffusion FFHQ-256 architecture ({size}x{size}, {device})", "dps", gd, size, dps_kwargs,
                  args, device, "gpu_dps", f"93.6M-parameter UNet, random weights in the real layout, {dps_steps} DDPM steps, {TASK}")
    if "precision" in args.parts:
        steps = 3 if args.tiny else args.precision_steps
        _precision_table(report, f"Precision paths on the guided-diffusion FFHQ-256 architecture ({size}x{size}, {device})",
                         lambda: copy.deepcopy(gd), size, steps, args, device, "gpu_precision_gd",
                         f"DPS, {steps} steps; random weights, so the PSNR column only shows the paths agree; speed is the point")
        _precision_table(report, f"Precision paths on the built-in pixel prior ({size}x{size}, {device})",
                         lambda: load_prior("builtin").to(device), size, steps, args, device, "gpu_precision_builtin",
                         f"DPS with the `builtin` defaults at {steps} steps, {TASK} of chelsea: the PSNR change of a trained model")
    ldm = ldm_vq4_prior(device)
    rs_kwargs = dict(steps=6, pixel_iters=3, latent_iters=3, early_stop_window=1, hdc_every=2) if args.tiny else \
        dict(steps=args.gpu_resample_steps, pixel_iters=50, latent_iters=20, early_stop_window=10)
    _solver_table(report, f"ReSample on the LDM-VQ-4 architecture ({size}x{size} images, {size // 4}x{size // 4} latents, {device})", "resample", ldm,
                  size, rs_kwargs, args, device, "gpu_resample",
                  f"random weights in the real layout; {rs_kwargs['steps']} DDIM steps, hard data consistency every {rs_kwargs.get('hdc_every', 10)} "
                  f"steps with {rs_kwargs['pixel_iters']} pixel / {rs_kwargs['latent_iters']} latent iterations; network = the latent UNet",
                  limit=3)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU thread(s), "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default=None, help=f"comma-separated parts of {', '.join(ALL_PARTS)} (default: {', '.join(CPU_PARTS)})")
    parser.add_argument("--gpu", action="store_true", help="the 256x256 GPU benchmark (parts svd and precision can be left out with --part)")
    parser.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1, or all with --gpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per comparison (medians are reported)")
    parser.add_argument("--steps", default=None,
                        help="solver steps in the solvers / batch parts: N, or N,resample=M,... per solver (default: the builtin profile's)")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precision-steps", type=int, default=20, help="DPS steps of the precision part")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) in the precision part (compiling takes minutes on a CPU)")
    parser.add_argument("--deepinv-python", default=None, help="the python of deepinv's environment (part deepinv)")
    parser.add_argument("--deepinv-size", type=int, default=64)
    parser.add_argument("--deepinv-steps", type=int, default=10)
    parser.add_argument("--gpu-dps-steps", type=int, default=50)
    parser.add_argument("--gpu-resample-steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke settings (numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown tables here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw medians here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is available (pass --device cpu for a dry run)")
    torch.set_num_threads(args.threads or (torch.get_num_threads() if args.gpu else 1))
    args.parts = set((args.part or ",".join(("svd", "precision") if args.gpu else CPU_PARTS)).split(","))
    unknown = args.parts - set(ALL_PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(ALL_PARTS)}")
    args.solvers = [s for s in args.solvers.split(",") if s]
    try:
        args.steps = parse_steps(args.steps, SOLVER_NAMES) if args.steps else None
    except ValueError as error:
        parser.error(str(error))
    if args.tiny:
        args.repeats, args.size = 1, 32
    args.repeats_note = f"median of {args.repeats} interleaved rounds after a warm-up"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    header = f"`python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{_environment(device)}"
    report = Report(header, args.out, args.json)
    start = time.perf_counter()
    if args.gpu:
        run_gpu(report, args, device)
    else:
        for name in ALL_PARTS:
            if name in args.parts:
                globals()[f"part_{name}"](report, args, device)
    footer = f"\n(total {time.perf_counter() - start:.0f} s)\n"
    print(footer)
    report.write(footer)

if __name__ == "__main__":
    main()

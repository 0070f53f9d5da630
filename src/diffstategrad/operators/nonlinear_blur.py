"""Nonlinear blur: the bkse ``KernelWizard`` network with a fixed blur code (DPS / DiffStateGrad).

The blur model is the kernel encoder of Tran et al., "Explore Image Deblurring via Encoded Blur
Kernel Space" (CVPR 2021, github.com/VinAIResearch/blur-kernel-space-exploring, "bkse"), trained
on GOPRO with the VAE option (checkpoint ``GOPRO_wVAE.pth``). The network is re-implemented
here with the module and parameter names of bkse's models/kernel_encoding/kernel_wizard.py, so
that checkpoint's state_dict loads with ``strict=True``; options as bkse's
options/generate_blur/default.yml (input_nc 3, nf 64, front_RBs 10, back_RBs 20, kernel_dim 512,
use_vae, KernelExtractor: norm none, use_sharp, 4 blocks, reflect padding; Adapter: norm none).

The operator (official ``NonlinearBlurOperator``):

    A(x) = clamp(2 G((x + 1) / 2, k) - 1, -1, 1),   k = 1.2 * N(0, I) of shape (1, 512, 2, 2)

with G = ``adaptKernel`` (feature extractor, U-Net adapter with k injected at its innermost
level, reconstruction trunk, plus the input) and k the official draw after np.random.seed(0),
taken here from a private ``np.random.RandomState(0)`` so NumPy's global state is untouched.

Image sizes and the code grid: the feature extractor halves twice and the adapter halves
``adapter_levels`` more times (and concatenates skips, so every level must be even); the trunk
doubles twice. The network accepts H and W that are multiples of m = 4 * 2**adapter_levels and
its blur code has the grid (H / m, W / m): one code vector per m x m block of the image. bkse's
layout has 5 levels, m = 128, and the official code grid is 2x2 (256x256 images). The code is
always drawn the same way at the grid's size, RandomState(seed).randn(1, C, H / m, W / m) * 1.2
with C the adapter's innermost width (:func:`kernel_code`), which gives the official numbers at
256 with bkse's network; other sizes are rejected with an error.

The built-in stand-in (:func:`load_builtin_kernel_wizard`): the same architecture in a smaller
configuration (3 adapter levels, so m = 32 and a 2x2 code at 64x64, as the official network has
at 256x256), trained by :mod:`diffstategrad.train_blur` on motion blurs synthesised from the
training photographs. It ships in ``diffstategrad/weights/kernel_wizard/`` and is used when
the task asks for it (``weights: builtin``) or when no bkse file is present (docs/tasks.md,
docs/models.md). It is not the GOPRO network.

Weights are never random: :func:`load_kernel_wizard` loads a checkpoint strictly and names the
offending keys, and :func:`resolve_bkse_weights` explains where to put the file when it is
absent. Files are read with ``torch.load(weights_only=True)`` or safetensors: nothing in a
checkpoint runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffstategrad.operators.base import Operator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, register_operator
from diffstategrad.storage import CheckpointError, CheckpointMismatchError, atomic_write_text, build_on_meta, load_into, read_state_dict, save_safetensors

__all__ = [
    "BKSE_WEIGHTS_ENV",
    "BKSE_WEIGHTS_URL",
    "BUILTIN_WEIGHTS",
    "BlurNetworkSource",
    "KernelWizard",
    "KernelWizardConfig",
    "KernelWizardMismatchError",
    "KernelWizardWeightsError",
    "NonlinearBlur",
    "builtin_kernel_wizard_dir",
    "code_grid",
    "default_bkse_weights_path",
    "kernel_code",
    "load_blur_network",
    "load_builtin_kernel_wizard",
    "load_kernel_wizard",
    "read_kernel_wizard_folder",
    "resolve_blur_network",
    "resolve_bkse_weights",
    "save_kernel_wizard_folder",
]

BKSE_WEIGHTS_ENV = "DIFFSTATEGRAD_BKSE_WEIGHTS"
BKSE_WEIGHTS_FILE = "GOPRO_wVAE.pth"
# The "GOPRO wVAE" link of the bkse README's pretrained-model table.
BKSE_WEIGHTS_URL = "https://drive.google.com/file/d/1vRoDpIsrTRYZKsOMPNbPcMtFDpCT6Foy/view?usp=drive_link"
# The task value that selects the shipped stand-in network.
BUILTIN_WEIGHTS = "builtin"
# A network folder: the configuration and record (JSON) and the float32 weights (safetensors).
FOLDER_CONFIG = "kernel_wizard.json"
FOLDER_WEIGHTS = "model.safetensors"
FOLDER_FORMAT = "diffstategrad-kernel-wizard"


# Reading errors are the package's own (diffstategrad.storage), under the names this module
# has always given them.
KernelWizardWeightsError = CheckpointError
KernelWizardMismatchError = CheckpointMismatchError


@dataclass(frozen=True)
class KernelWizardConfig:
    """The architecture options (bkse names in brackets); defaults = generate_blur/default.yml.

    ``adapter_levels`` and ``tail_nf`` are constants of bkse's code (5 and 64), options here so
    that a smaller network of the same design can be built; the defaults are bkse's exactly.
    """

    input_nc: int = 3  # [input_nc] image channels
    nf: int = 64  # [nf] feature width
    front_blocks: int = 10  # [front_RBs] residual blocks of the feature extractor
    back_blocks: int = 20  # [back_RBs] residual blocks of the reconstruction trunk
    kernel_dim: int = 512  # [kernel_dim] kernel-encoder output channels (x2 with the VAE)
    use_vae: bool = True  # [use_vae]
    extractor_blocks: int = 4  # [KernelExtractor.n_blocks]
    use_sharp: bool = True  # [KernelExtractor.use_sharp]
    adapter_levels: int = 5  # U-Net down-samplings (= the kernel extractor's), bkse: 5
    tail_nf: int = 64  # width of the trunk's full-resolution tail, bkse: 64

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"KernelWizardConfig.{f.name} must be a non-negative integer, got {value!r}")
        if min(self.input_nc, self.nf, self.kernel_dim, self.tail_nf) < 1 or self.adapter_levels < 2:
            raise ValueError("KernelWizardConfig: input_nc, nf, kernel_dim and tail_nf must be positive and "
                             f"adapter_levels at least 2, got {self}")

    def level_width(self, level: int) -> int:
        """Channels of the U-Net adapter after its ``level``-th down-sampling (0-based):
        nf * min(2**level, 8), i.e. nf, 2 nf, 4 nf, 8 nf, 8 nf for bkse's five levels."""
        return self.nf * min(2**level, 8)

    @property
    def code_channels(self) -> int:
        """Channels of the blur code the adapter takes at its innermost level (8 nf in bkse)."""
        return self.level_width(self.adapter_levels - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (4 * 2**adapter_levels; 128 in bkse)."""
        return 4 * 2**self.adapter_levels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "KernelWizardConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KernelWizard option(s) {unknown}; valid: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_bkse_options(cls, options: Mapping) -> "KernelWizardConfig":
        """From the ``KernelWizard`` section of a bkse options YAML (only its supported layout:
        no normalisation, reflect padding, no dropout)."""
        extractor = dict(options.get("KernelExtractor", {}))
        adapter = dict(options.get("Adapter", {}))
        unsupported = {
            "KernelExtractor.norm": (extractor.get("norm", "none"), "none"),
            "KernelExtractor.padding_type": (extractor.get("padding_type", "reflect"), "reflect"),
            "KernelExtractor.use_dropout": (bool(extractor.get("use_dropout", False)), False),
            "Adapter.norm": (adapter.get("norm", "none"), "none"),
            "Adapter.use_dropout": (bool(adapter.get("use_dropout", False)), False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(f"bkse option {key}={value!r} is not supported (only {supported!r})")
        return cls(
            input_nc=int(options.get("input_nc", 3)),
            nf=int(options.get("nf", 64)),
            front_blocks=int(options.get("front_RBs", 10)),
            back_blocks=int(options.get("back_RBs", 20)),
            kernel_dim=int(options.get("kernel_dim", 512)),
            use_vae=bool(options.get("use_vae", True)),
            extractor_blocks=int(extractor.get("n_blocks", 4)),
            use_sharp=bool(extractor.get("use_sharp", True)),
        )


class _ResidualBlock(nn.Module):
    """x + conv2(relu(conv1(x))), 3x3 convolutions with bias (bkse ResidualBlock_noBN)."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class _ExtractorBlock(nn.Module):
    """x + [pad, conv, -, relu, pad, conv, -](x) without bias (bkse ResnetBlock, norm 'none').

    The nn.Identity entries stand where bkse's (absent) normalisation layers sit, so that the
    convolutions keep their checkpoint indices (conv_block.1, conv_block.5).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity(), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity(),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class _KernelExtractor(nn.Module):
    """The kernel encoder F (sharp and blurred features -> blur code mean and sigma).

    bkse's VAE head splits the output into a mean and a *standard deviation* sigma (not a
    log-variance; its sign is irrelevant): the training code samples mean + sigma * N(0, I).
    """

    def __init__(self, cfg: KernelWizardConfig):
        super().__init__()
        nf = cfg.nf
        self.kernel_dim = cfg.kernel_dim
        self.use_vae = cfg.use_vae
        in_channels = 2 * nf if cfg.use_sharp else nf
        out_channels = 2 * cfg.kernel_dim if cfg.use_vae else cfg.kernel_dim
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, nf, 7, bias=False), nn.Identity(), nn.ReLU()]
        for level in range(cfg.adapter_levels):
            inc = min(nf * 2**level, out_channels)
            ouc = min(nf * 2 ** (level + 1), out_channels)
            layers += [nn.Conv2d(inc, ouc, 3, stride=2, padding=1, bias=False), nn.Identity(), nn.ReLU()]
        layers += [_ExtractorBlock(out_channels) for _ in range(cfg.extractor_blocks)]
        self.model = nn.Sequential(*layers)

    def forward(self, sharp_features, blur_features):
        out = self.model(torch.cat((sharp_features, blur_features), dim=1))
        if self.use_vae:
            return out[:, : self.kernel_dim], out[:, self.kernel_dim:]
        return out, torch.zeros_like(out)


class _UnetLevel(nn.Module):
    """One level of the pix2pix-style U-Net adapter G (bkse UnetSkipConnectionBlock, norm 'none').

    bkse's LeakyReLU(0.2) at the start of ``down`` works in place, so the skip connection of the
    inner levels carries LeakyReLU(x), not x; the trained weights expect that, and it is
    reproduced explicitly here. The innermost level concatenates the blur code to its features.
    """

    def __init__(self, outer: int, inner: int, input_channels: int | None = None,
                 submodule: "nn.Module | None" = None, outermost: bool = False, innermost: bool = False):
        super().__init__()
        self.outermost, self.innermost = outermost, innermost
        input_channels = outer if input_channels is None else input_channels
        downconv = nn.Conv2d(input_channels, inner, 4, stride=2, padding=1, bias=False)
        if outermost:
            self.down = nn.Sequential(downconv)
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Tanh())
        elif innermost:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv)
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=False), nn.Identity())
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv, nn.Identity())
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=False), nn.Identity())

    def forward(self, x, code):
        if self.outermost:
            return self.up(self.submodule(self.down(x), code))
        skip = self.down[0](x)  # bkse: in-place LeakyReLU, so the skip sees the activated x
        inner = self.down[1:](skip)
        if self.innermost:
            return torch.cat((self.up(torch.cat((inner, code), dim=1)), skip), dim=1)
        return torch.cat((self.up(self.submodule(inner, code)), skip), dim=1)


class _KernelAdapter(nn.Module):
    """The U-Net adapter: ``adapter_levels`` nested levels, built from the innermost outwards
    (bkse: (8nf, 8nf) innermost, then (4nf, 8nf), (2nf, 4nf), (nf, 2nf) and the outermost (nf, nf))."""

    def __init__(self, cfg: KernelWizardConfig):
        super().__init__()
        width = cfg.level_width
        last = cfg.adapter_levels - 1
        level = _UnetLevel(width(last - 1), width(last), innermost=True)
        for depth in range(last - 1, 0, -1):
            level = _UnetLevel(width(depth - 1), width(depth), submodule=level)
        self.model = _UnetLevel(cfg.nf, cfg.nf, input_channels=cfg.nf, submodule=level, outermost=True)

    def forward(self, x, code):
        return self.model(x, code)


class KernelWizard(nn.Module):
    """bkse's KernelWizard: ``adapt_kernel(x, k)`` blurs sharp images x in [0, 1] with code k."""

    def __init__(self, config: KernelWizardConfig | None = None):
        super().__init__()
        cfg = config or KernelWizardConfig()
        self.config = cfg
        nf, act = cfg.nf, nn.LeakyReLU(0.1)
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(cfg.input_nc, nf, 3, 1, 1), act,
            nn.Conv2d(nf, nf, 3, 2, 1), act,
            nn.Conv2d(nf, nf, 3, 2, 1), act,
            *[_ResidualBlock(nf) for _ in range(cfg.front_blocks)],
        )
        self.kernel_extractor = _KernelExtractor(cfg)
        self.adapter = _KernelAdapter(cfg)
        tail = cfg.tail_nf  # bkse hard-codes 64 here (independent of nf)
        self.recon_trunk = nn.Sequential(
            *[_ResidualBlock(nf) for _ in range(cfg.back_blocks)],
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), act,
            nn.Conv2d(nf, tail * 4, 3, 1, 1), nn.PixelShuffle(2), act,
            nn.Conv2d(tail, tail, 3, 1, 1), act,
            nn.Conv2d(tail, cfg.input_nc, 3, 1, 1),
        )

    def code_grid(self, size) -> tuple[int, int]:
        """The (h, w) of the blur code for images of ``size`` = (H, W); errors for other sizes."""
        return code_grid(size, self.config)

    def _check_code(self, x: torch.Tensor, code: torch.Tensor) -> None:
        expected = (x.shape[0], self.config.code_channels, *self.code_grid(x.shape[-2:]))
        if tuple(code.shape) != expected:
            raise ValueError(f"blur code must have shape {expected} for images {tuple(x.shape)}, got {tuple(code.shape)}")

    def adapt_kernel(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """bkse ``adaptKernel``: x (B, input_nc, H, W) in [0, 1], code (B, C, H/m, W/m)."""
        self._check_code(x, code)
        return self.recon_trunk(self.adapter(self.feature_extractor(x), code)) + x

    adaptKernel = adapt_kernel  # bkse's name

    def forward(self, x_sharp: torch.Tensor, x_blur: torch.Tensor):
        """bkse ``forward``: the blur code (mean, sigma) of a sharp/blurred pair."""
        return self.kernel_extractor(self.feature_extractor(x_sharp), self.feature_extractor(x_blur))

    def reconstruct(self, x_sharp: torch.Tensor, x_blur: torch.Tensor, noise: torch.Tensor | None = None):
        """bkse's training pass: encode the pair, draw k = mean + sigma * noise (the mean when
        ``noise`` is None) and return (G(x_sharp, k), mean, sigma); the sharp features are
        computed once for the encoder and the adapter."""
        if self.config.kernel_dim != self.config.code_channels:
            raise ValueError(f"kernel_dim {self.config.kernel_dim} must equal the adapter's code channels "
                             f"{self.config.code_channels} to reconstruct through the encoder")
        sharp_features = self.feature_extractor(x_sharp)
        mean, sigma = self.kernel_extractor(sharp_features, self.feature_extractor(x_blur))
        code = mean if noise is None else mean + sigma * noise
        self._check_code(x_sharp, code)
        return self.recon_trunk(self.adapter(sharp_features, code)) + x_sharp, mean, sigma


def code_grid(size, config: KernelWizardConfig | None = None) -> tuple[int, int]:
    """The blur-code grid (H / m, W / m), m = ``config.size_multiple`` (128 for bkse's network),
    for images of ``size`` = (H, W); a ValueError for sides that are not positive multiples of m."""
    multiple = (config or KernelWizardConfig()).size_multiple
    height, width = int(size[0]), int(size[1])
    if height % multiple or width % multiple or min(height, width) < multiple:
        official = " the official operator uses 256x256 (a 2x2 code)" if multiple == 128 else ""
        raise ValueError(
            f"this KernelWizard needs image sides that are multiples of {multiple} "
            f"(it downsamples by {multiple} before injecting the blur code), got {height}x{width};{official}")
    return height // multiple, width // multiple


def kernel_code(channels: int, grid, seed: int = 0, scale: float = 1.2) -> torch.Tensor:
    """scale * RandomState(seed).randn(1, channels, *grid) as float64 (the official draw at 512, (2, 2))."""
    draw = np.random.RandomState(int(seed)).randn(1, int(channels), int(grid[0]), int(grid[1]))
    return torch.from_numpy(float(scale) * draw)


# ---------------------------------------------------------------------------------------------
# Reading and writing weights (weights_only / safetensors; strict key matching)
# ---------------------------------------------------------------------------------------------


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file or a torch file, read safely (diffstategrad.storage)."""
    return read_state_dict(path, what)


def _load_state(network: KernelWizard, state: Mapping[str, torch.Tensor], source, what: str) -> KernelWizard:
    """Strictly load ``state`` into a network built on the meta device (float32 copies)."""
    return load_into(network, state, source=source, what=what, dtype=torch.float32).eval().requires_grad_(False)


def _on_meta(config: KernelWizardConfig | None) -> KernelWizard:
    return build_on_meta(KernelWizard, config)  # no random weights, not even for a moment


def load_kernel_wizard(path, config: KernelWizardConfig | None = None) -> KernelWizard:
    """Build a :class:`KernelWizard` and load a bkse checkpoint into it, strictly and safely.

    The file must hold a state_dict (bkse saves ``network.state_dict()``); a leading ``module.``
    on the keys is removed, as bkse's own ``load_network`` does. ``.safetensors`` files are read
    by safetensors, others with ``torch.load(weights_only=True)``. A missing file raises
    FileNotFoundError, an unreadable one :class:`KernelWizardWeightsError` and a checkpoint of
    another layout :class:`KernelWizardMismatchError` naming the first missing, unexpected and
    mis-shaped keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"KernelWizard weights {path} do not exist")
    state = _read_tensors(path, "KernelWizard checkpoint")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return _load_state(_on_meta(config), state, path, "bkse KernelWizard" if config is None else "KernelWizard")


def save_kernel_wizard_folder(network: KernelWizard, folder, info: Mapping | None = None) -> Path:
    """Write ``network`` as a folder: ``kernel_wizard.json`` (format, configuration, ``info``)
    and ``model.safetensors`` (float32), through temporary files and atomic renames."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).cpu() for k, v in network.state_dict().items()}
    record = {"format": FOLDER_FORMAT, "version": 1, "config": network.config.to_dict(), "info": dict(info or {})}
    save_safetensors(tensors, folder / FOLDER_WEIGHTS, metadata={"format": FOLDER_FORMAT})
    atomic_write_text(folder / FOLDER_CONFIG, json.dumps(record, indent=2) + "\n")
    return folder


def read_kernel_wizard_folder(folder) -> tuple[KernelWizard, dict]:
    """(network, record) from a folder written by :func:`save_kernel_wizard_folder`."""
    folder = Path(folder).expanduser()
    config_path = folder / FOLDER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a KernelWizard folder: {FOLDER_CONFIG} is missing")
    record = json.loads(config_path.read_text())
    if record.get("format") != FOLDER_FORMAT:
        raise KernelWizardWeightsError(f"{config_path} has format {record.get('format')!r}, not {FOLDER_FORMAT!r}")
    config = KernelWizardConfig.from_dict(record["config"])
    state = _read_tensors(folder / FOLDER_WEIGHTS, "KernelWizard weights")
    return _load_state(_on_meta(config), state, folder / FOLDER_WEIGHTS, "KernelWizard of its config"), record


def builtin_kernel_wizard_dir() -> Path:
    """The shipped stand-in network: ``diffstategrad/weights/kernel_wizard/``."""
    return Path(__file__).resolve().parents[1] / "weights" / "kernel_wizard"


def load_builtin_kernel_wizard() -> tuple[KernelWizard, dict]:
    """(network, record) of the shipped stand-in (trained on synthetic motion blurs, not GOPRO)."""
    return read_kernel_wizard_folder(builtin_kernel_wizard_dir())


# ---------------------------------------------------------------------------------------------
# Which network a task uses
# ---------------------------------------------------------------------------------------------


def default_bkse_weights_path() -> Path:
    return Path.home() / ".cache" / "diffstategrad" / "bkse" / BKSE_WEIGHTS_FILE


def resolve_bkse_weights(weights=None) -> Path:
    """The checkpoint to load: ``weights`` if given, else $DIFFSTATEGRAD_BKSE_WEIGHTS if set,
    else ~/.cache/diffstategrad/bkse/GOPRO_wVAE.pth. A path that was asked for but does not
    exist is an error (no silent fallback to another file)."""
    if weights is not None:
        candidate, origin = Path(weights).expanduser(), "the task's operator.weights"
    elif os.environ.get(BKSE_WEIGHTS_ENV):
        candidate, origin = Path(os.environ[BKSE_WEIGHTS_ENV]).expanduser(), f"${BKSE_WEIGHTS_ENV}"
    else:
        candidate, origin = default_bkse_weights_path(), "the default location"
    if not candidate.is_file():
        raise FileNotFoundError(
            f"The nonlinear-blur operator needs the bkse KernelWizard weights {BKSE_WEIGHTS_FILE}, "
            f"not found at {candidate} ({origin}). Download 'GOPRO wVAE' from the bkse README "
            f"(github.com/VinAIResearch/blur-kernel-space-exploring): {BKSE_WEIGHTS_URL} and put it at "
            f"{default_bkse_weights_path()}, or point ${BKSE_WEIGHTS_ENV} or the task field "
            f"operator.weights at it (or set operator.weights: builtin for the built-in stand-in).")
    return candidate


@dataclass(frozen=True)
class BlurNetworkSource:
    """Where a task's blur network comes from: ``kind`` "bkse" (a bkse checkpoint file, bkse's
    configuration) or "folder" (a :func:`save_kernel_wizard_folder` folder, e.g. the built-in
    one), the ``path``, and ``note``, a sentence saying which network it is and why."""

    kind: str
    path: Path
    note: str

    @property
    def builtin(self) -> bool:
        return self.kind == "folder" and self.path == builtin_kernel_wizard_dir()

    def config(self) -> KernelWizardConfig:
        """The network's configuration (without loading its weights)."""
        if self.kind == "bkse":
            return KernelWizardConfig()
        return KernelWizardConfig.from_dict(json.loads((self.path / FOLDER_CONFIG).read_text())["config"])


_BUILTIN_NOTE = ("the built-in KernelWizard stand-in (trained here on synthetic motion blurs of the training "
                 "photographs, not bkse's GOPRO network)")


def resolve_blur_network(weights=None) -> BlurNetworkSource:
    """The network for the task field ``operator.weights``:

    - ``"builtin"``: the shipped stand-in;
    - a path: a KernelWizard folder (as :func:`save_kernel_wizard_folder` writes) or a bkse
      checkpoint file; it must exist;
    - ``None``: the bkse GOPRO file of :func:`resolve_bkse_weights` ($DIFFSTATEGRAD_BKSE_WEIGHTS,
      which must then exist, else the default cache path) when present, else the built-in
      stand-in, and the note says so.
    """
    if weights == BUILTIN_WEIGHTS:
        return BlurNetworkSource("folder", builtin_kernel_wizard_dir(), _BUILTIN_NOTE + " (operator.weights: builtin)")
    if weights is not None and Path(weights).expanduser().is_dir():
        folder = Path(weights).expanduser()
        if not (folder / FOLDER_CONFIG).is_file():
            raise FileNotFoundError(f"operator.weights {folder} is a folder without {FOLDER_CONFIG}; give a "
                                    "KernelWizard folder (python -m diffstategrad.train_blur export) or a bkse .pth")
        return BlurNetworkSource("folder", folder, f"the KernelWizard folder {folder} (operator.weights)")
    if weights is None and not os.environ.get(BKSE_WEIGHTS_ENV) and not default_bkse_weights_path().is_file():
        return BlurNetworkSource("folder", builtin_kernel_wizard_dir(), _BUILTIN_NOTE + (
            f": no bkse weights at ${BKSE_WEIGHTS_ENV} or {default_bkse_weights_path()}"))
    path = resolve_bkse_weights(weights)
    return BlurNetworkSource("bkse", path, f"bkse's KernelWizard from {path}")


def load_blur_network(source: BlurNetworkSource) -> KernelWizard:
    """The network a :class:`BlurNetworkSource` names, loaded strictly."""
    if source.kind == "bkse":
        return load_kernel_wizard(source.path)
    return read_kernel_wizard_folder(source.path)[0]


class NonlinearBlur(Operator):
    """A(x) = clamp(2 G((x + 1) / 2, k) - 1, -1, 1) with a KernelWizard G and a fixed code k.

    Args:
        network: a loaded :class:`KernelWizard` (see :func:`load_kernel_wizard`,
            :func:`load_builtin_kernel_wizard`); its parameters are frozen, the operator is
            differentiable in x only.
        code_seed, code_scale: k = code_scale * RandomState(code_seed).randn(...) (0 and 1.2).
        source: which network it is, for records and ``repr``.
    """

    def __init__(self, network: KernelWizard, code_seed: int = 0, code_scale: float = 1.2, source: str = ""):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.code_seed = int(code_seed)
        self.code_scale = float(code_scale)
        self.source = str(source)

    @classmethod
    def from_checkpoint(cls, weights=None, config: KernelWizardConfig | None = None,
                        code_seed: int = 0, code_scale: float = 1.2) -> "NonlinearBlur":
        """From a bkse checkpoint file (see :func:`resolve_bkse_weights`)."""
        path = resolve_bkse_weights(weights)
        network = load_kernel_wizard(path, config)
        return cls(network, code_seed=code_seed, code_scale=code_scale, source=f"bkse's KernelWizard from {path}")

    @classmethod
    def from_weights(cls, weights=None, code_seed: int = 0, code_scale: float = 1.2) -> "NonlinearBlur":
        """From the task field ``operator.weights`` (see :func:`resolve_blur_network`)."""
        source = resolve_blur_network(weights)
        return cls(load_blur_network(source), code_seed=code_seed, code_scale=code_scale, source=source.note)

    def check_size(self, size) -> tuple[int, int]:
        return self.network.code_grid(size)

    def code_for(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.network.code_grid(x.shape[-2:])
        code = kernel_code(self.network.config.code_channels, grid, self.code_seed, self.code_scale)
        return code.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blurred image. A one-channel (grayscale) image on an RGB network is blurred as the
        gray RGB image (the channel repeated) and the result's channels averaged back to one."""
        check_image_batch(x)
        nc = self.network.config.input_nc
        gray = x.shape[1] == 1 and nc == 3
        if x.shape[1] != nc and not gray:
            raise ValueError(f"the blur network takes {nc}-channel (or one-channel) images, got {x.shape[1]}")
        inp = x.expand(-1, 3, -1, -1) if gray else x
        blurred = self.network.adapt_kernel((inp + 1.0) / 2.0, self.code_for(x))
        if gray:
            blurred = blurred.mean(1, keepdim=True)
        return (blurred * 2.0 - 1.0).clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"code_seed={self.code_seed}, code_scale={self.code_scale}" + (f", network: {self.source}" if self.source else "")


def _scale(params: dict, size) -> dict:
    """The network is resolved here (which file, or the built-in stand-in) and its code grid
    checked at this size."""
    source = resolve_blur_network(params["weights"])
    try:
        grid = code_grid((size.height, size.width), source.config())
    except ValueError as exc:
        hint = "" if source.builtin else "; operator.weights: builtin selects the built-in stand-in"
        raise ValueError(f"nonlinear_blur with {source.note}: {exc}{hint}") from None
    return {**params, "weights": "builtin" if source.builtin else str(source.path), "network": source.note, "code_grid": grid}


def _build(params: dict, image_shape, seeds) -> NonlinearBlur:
    network = load_blur_network(resolve_blur_network(params["weights"]))
    operator = NonlinearBlur(network, code_seed=params["code_seed"], code_scale=params["code_scale"], source=params.get("network", ""))
    nc = operator.network.config.input_nc
    if image_shape[0] != nc and not (image_shape[0] == 1 and nc == 3):
        raise ValueError(f"nonlinear_blur takes {nc}-channel (or one-channel) images, got {image_shape[0]}")
    return operator


register_operator(OperatorSpec("nonlinear_blur", {"weights": None, "code_seed": 0, "code_scale": 1.2}, _build, _scale,
                               description="the bkse KernelWizard blur with a fixed code (GOPRO weights or the built-in stand-in)"))

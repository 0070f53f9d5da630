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

Image sizes: the feature extractor halves twice, the adapter halves five more times (and
concatenates skips, so every level must be even), and the trunk doubles twice: the network
accepts H and W that are multiples of 128, with a code grid of (H / 128, W / 128). The official
code grid is 2x2, i.e. 256x256 images. For other multiples of 128 the code is drawn the same
way at the grid's size (RandomState(seed).randn(1, 512, H / 128, W / 128) * 1.2), which gives the
official numbers at 256; other sizes are rejected with an error.

Weights are never random: :func:`load_kernel_wizard` loads a checkpoint strictly and names the
offending keys, and :func:`resolve_bkse_weights` explains where to put the file when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffstategrad.storage import CheckpointMismatchError, build_on_meta, load_state_dict_file
from diffstategrad.operators.base import Operator, check_image_batch
from diffstategrad.operators.registry import OperatorSpec, register_operator

__all__ = [
    "BKSE_WEIGHTS_ENV",
    "BKSE_WEIGHTS_URL",
    "CheckpointMismatchError",
    "KernelWizard",
    "KernelWizardConfig",
    "NonlinearBlur",
    "code_grid",
    "default_bkse_weights_path",
    "kernel_code",
    "load_kernel_wizard",
    "resolve_bkse_weights",
]

BKSE_WEIGHTS_ENV = "DIFFSTATEGRAD_BKSE_WEIGHTS"
BKSE_WEIGHTS_FILE = "GOPRO_wVAE.pth"
# The "GOPRO wVAE" link of the bkse README's pretrained-model table.
BKSE_WEIGHTS_URL = "https://drive.google.com/file/d/1vRoDpIsrTRYZKsOMPNbPcMtFDpCT6Foy/view?usp=drive_link"
# Total down-sampling between the image and the innermost U-Net level: 2 * 2 * 2**5.
SIZE_MULTIPLE = 128


@dataclass(frozen=True)
class KernelWizardConfig:
    """The architecture options (bkse names in brackets); defaults = generate_blur/default.yml."""

    input_nc: int = 3  # [input_nc] image channels
    nf: int = 64  # [nf] feature width
    front_blocks: int = 10  # [front_RBs] residual blocks of the feature extractor
    back_blocks: int = 20  # [back_RBs] residual blocks of the reconstruction trunk
    kernel_dim: int = 512  # [kernel_dim] kernel-encoder output channels (x2 with the VAE)
    use_vae: bool = True  # [use_vae]
    extractor_blocks: int = 4  # [KernelExtractor.n_blocks]
    use_sharp: bool = True  # [KernelExtractor.use_sharp]

    @property
    def code_channels(self) -> int:
        """Channels of the blur code the adapter takes at its innermost level (8 nf)."""
        return 8 * self.nf

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
    """The kernel encoder F (sharp and blurred features -> blur code mean / log-variance)."""

    def __init__(self, cfg: KernelWizardConfig):
        super().__init__()
        nf = cfg.nf
        self.kernel_dim = cfg.kernel_dim
        self.use_vae = cfg.use_vae
        in_channels = 2 * nf if cfg.use_sharp else nf
        out_channels = 2 * cfg.kernel_dim if cfg.use_vae else cfg.kernel_dim
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, nf, 7, bias=False), nn.Identity(), nn.ReLU()]
        for level in range(5):
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
    def __init__(self, nf: int):
        super().__init__()
        level = _UnetLevel(8 * nf, 8 * nf, innermost=True)
        level = _UnetLevel(4 * nf, 8 * nf, submodule=level)
        level = _UnetLevel(2 * nf, 4 * nf, submodule=level)
        level = _UnetLevel(nf, 2 * nf, submodule=level)
        self.model = _UnetLevel(nf, nf, input_channels=nf, submodule=level, outermost=True)

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
        self.adapter = _KernelAdapter(nf)
        # The 64s are hard-coded in bkse (independent of nf).
        self.recon_trunk = nn.Sequential(
            *[_ResidualBlock(nf) for _ in range(cfg.back_blocks)],
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), act,
            nn.Conv2d(nf, 64 * 4, 3, 1, 1), nn.PixelShuffle(2), act,
            nn.Conv2d(64, 64, 3, 1, 1), act,
            nn.Conv2d(64, cfg.input_nc, 3, 1, 1),
        )

    def code_grid(self, size) -> tuple[int, int]:
        """The (h, w) of the blur code for images of ``size`` = (H, W); errors for other sizes."""
        return code_grid(size)

    def adapt_kernel(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """bkse ``adaptKernel``: x (B, input_nc, H, W) in [0, 1], code (B, 8 nf, H/128, W/128)."""
        grid = self.code_grid(x.shape[-2:])
        expected = (x.shape[0], self.config.code_channels, *grid)
        if tuple(code.shape) != expected:
            raise ValueError(f"blur code must have shape {expected} for images {tuple(x.shape)}, got {tuple(code.shape)}")
        out = self.recon_trunk(self.adapter(self.feature_extractor(x), code))
        return out + x

    adaptKernel = adapt_kernel  # bkse's name

    def forward(self, x_sharp: torch.Tensor, x_blur: torch.Tensor):
        """bkse ``forward``: the blur code (mean, log-variance) of a sharp/blurred pair."""
        return self.kernel_extractor(self.feature_extractor(x_sharp), self.feature_extractor(x_blur))


def code_grid(size) -> tuple[int, int]:
    """The blur-code grid (H / 128, W / 128) for images of ``size`` = (H, W); a ValueError for
    sizes the network cannot take (sides that are not positive multiples of 128)."""
    height, width = int(size[0]), int(size[1])
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < SIZE_MULTIPLE:
        raise ValueError(
            f"the bkse KernelWizard needs image sides that are multiples of {SIZE_MULTIPLE} "
            f"(it downsamples by {SIZE_MULTIPLE} before injecting the blur code), got {height}x{width}; "
            f"the official operator uses 256x256 (a 2x2 code)")
    return height // SIZE_MULTIPLE, width // SIZE_MULTIPLE


def kernel_code(channels: int, grid, seed: int = 0, scale: float = 1.2) -> torch.Tensor:
    """scale * RandomState(seed).randn(1, channels, *grid) as float64 (the official draw at 512, (2, 2))."""
    draw = np.random.RandomState(int(seed)).randn(1, int(channels), int(grid[0]), int(grid[1]))
    return torch.from_numpy(float(scale) * draw)


def load_kernel_wizard(path, config: KernelWizardConfig | None = None) -> KernelWizard:
    """Build a :class:`KernelWizard` and load a bkse checkpoint into it, strictly and safely.

    The file must hold a state_dict (bkse saves ``network.state_dict()``); a leading ``module.``
    on the keys is removed, as bkse's own ``load_network`` does. Read through
    :mod:`diffstategrad.storage` (weights_only / restricted unpickling); a missing
    file raises FileNotFoundError and a checkpoint of another layout
    :class:`~diffstategrad.storage.CheckpointMismatchError` naming the first
    missing, unexpected and mis-shaped keys.
    """
    network = build_on_meta(KernelWizard, config)  # no random weights, not even for a moment
    load_state_dict_file(network, path, what="bkse KernelWizard", strip_prefixes=("module.",))
    return network.eval().requires_grad_(False)


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
            f"operator.weights at it.")
    return candidate


class NonlinearBlur(Operator):
    """A(x) = clamp(2 G((x + 1) / 2, k) - 1, -1, 1) with the bkse KernelWizard G and a fixed code k.

    Args:
        network: a loaded :class:`KernelWizard` (see :func:`load_kernel_wizard`); its
            parameters are frozen, the operator is differentiable in x only.
        code_seed, code_scale: k = code_scale * RandomState(code_seed).randn(...) (0 and 1.2).
    """

    def __init__(self, network: KernelWizard, code_seed: int = 0, code_scale: float = 1.2):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.code_seed = int(code_seed)
        self.code_scale = float(code_scale)

    @classmethod
    def from_checkpoint(cls, weights=None, config: KernelWizardConfig | None = None,
                        code_seed: int = 0, code_scale: float = 1.2) -> "NonlinearBlur":
        network = load_kernel_wizard(resolve_bkse_weights(weights), config)
        return cls(network, code_seed=code_seed, code_scale=code_scale)

    def check_size(self, size) -> tuple[int, int]:
        return self.network.code_grid(size)

    def code_for(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.network.code_grid(x.shape[-2:])
        code = kernel_code(self.network.config.code_channels, grid, self.code_seed, self.code_scale)
        return code.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        if x.shape[1] != self.network.config.input_nc:
            raise ValueError(f"the blur network takes {self.network.config.input_nc}-channel images, got {x.shape[1]}")
        blurred = self.network.adapt_kernel((x + 1.0) / 2.0, self.code_for(x))
        return (blurred * 2.0 - 1.0).clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"code_seed={self.code_seed}, code_scale={self.code_scale}"


def _scale(params: dict, size) -> dict:
    code_grid((size.height, size.width))  # raises for sizes the network cannot take
    return params


def _build(params: dict, image_shape, seeds) -> NonlinearBlur:
    operator = NonlinearBlur.from_checkpoint(params["weights"], code_seed=params["code_seed"], code_scale=params["code_scale"])
    if image_shape[0] != operator.network.config.input_nc:
        raise ValueError(f"nonlinear_blur takes {operator.network.config.input_nc}-channel images, got {image_shape[0]}")
    return operator


register_operator(OperatorSpec("nonlinear_blur", {"weights": None, "code_seed": 0, "code_scale": 1.2}, _build, _scale,
                               description="the bkse KernelWizard blur with a fixed code"))

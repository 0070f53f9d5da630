"""Image files in and out: loading to the package's tensor convention, saving, labelled comparison
figures and the bundled example photographs.

Tensor convention: float32 ``(1, C, H, W)`` with values in [-1, 1] (``C`` = 3 for RGB, 1 for
grayscale). 8-bit files map a pixel value v to ``v / 255 * 2 - 1`` and :func:`save_image` maps
back with rounding, so a load/save round trip of an 8-bit image is exact.

Conversions that change what the file holds (grayscale <-> RGB, alpha, palette, CMYK, 16-bit,
EXIF rotation, extra frames, resizing and cropping) are reported, not hidden: :func:`load_image`
returns the image together with a tuple of one-line notes, e.g.
``("converted grayscale to RGB by repeating its channel", "resized 600x400 to 256x256 after a
centre crop to 400x400")``. Callers print them (the CLI does) or ignore them.

Errors are :class:`ImageError` (a ``ValueError``) with a one-line message naming the file;
a missing file raises :class:`ImageNotFoundError`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "ImageNotFoundError",
    "LoadedImage",
    "FITS",
    "fashion_examples",
    "load_image",
    "resize_image",
    "to_tensor",
    "to_pil",
    "save_image",
    "comparison_figure",
    "list_examples",
    "example_path",
    "load_example",
    "DEFAULT_EXAMPLE",
]

FITS = ("crop", "resize")


class ImageError(ValueError):
    """An image file could not be used; the message is one line and names the file."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """The image file does not exist."""


class LoadedImage(NamedTuple):
    """What :func:`load_image` returns: ``image`` is ``(1, C, H, W)`` float32 in [-1, 1],
    ``notes`` the conversions applied, one short sentence each (empty if none)."""

    image: torch.Tensor
    notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file")
    try:
        im = Image.open(path)
        im.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image that Pillow can read (unknown format, or not an image at all)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path} is too large to load safely ({err})") from None
    except PermissionError:
        raise ImageError(f"cannot read {path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path} could not be decoded, it may be damaged or truncated ({err})") from None
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{path} is an empty image ({im.width}x{im.height})")
    return im


def _decode(im: Image.Image, notes: list[str]) -> np.ndarray:
    """A Pillow image as float32 (H, W, k) in [0, 1], k in {1, 2, 3, 4} (gray, gray+alpha, RGB,
    RGBA)."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        im.seek(0)
        notes.append(f"used the first of {frames} frames")
    if im.getexif().get(0x0112, 1) not in (0, 1):  # EXIF orientation tag
        im = ImageOps.exif_transpose(im)
        notes.append("rotated/flipped the image as its EXIF orientation tag says")

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        notes.append("read a 16-bit image (values scaled by 1/65535)")
        return np.clip(arr / 65535.0, 0.0, 1.0).astype(np.float32)[..., None]
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if arr.min() < 0.0 or arr.max() > 1.0:
            notes.append("clipped a floating-point image to [0, 1]")
        return np.clip(arr, 0.0, 1.0)[..., None]
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        notes.append(f"converted {mode} colours to RGB")
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _drop_alpha(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    if arr.shape[-1] not in (2, 4):
        return arr
    color, alpha = arr[..., :-1], arr[..., -1:]
    transparent = float((alpha < 1.0).mean())
    if transparent == 0.0:
        notes.append("dropped a fully opaque alpha channel")
        return color
    notes.append(f"composited the transparent pixels ({transparent:.0%} of the image) onto white and dropped the alpha channel")
    return color * alpha + (1.0 - alpha)


def _set_channels(arr: np.ndarray, channels: int | None, notes: list[str]) -> np.ndarray:
    have = arr.shape[-1]
    if channels is None or channels == have:
        return arr
    if channels == 3 and have == 1:
        notes.append("converted grayscale to RGB by repeating its channel")
        return np.repeat(arr, 3, axis=-1)
    if channels == 1 and have == 3:
        notes.append("converted RGB to grayscale (ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B)")
        return arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
    raise ValueError(f"channels must be 1, 3 or None, got {channels}")


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------


def _target(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return h, w


def _resize_array(arr: np.ndarray, size: tuple[int, int], fit: str) -> tuple[np.ndarray, str | None]:
    """Resize (H, W, k) float [0, 1] to ``size`` = (h, w) with Lanczos filtering in float;
    ``fit="crop"`` first cuts out the largest centred box of the target's aspect ratio."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    h0, w0 = arr.shape[:2]
    th, tw = size
    if (h0, w0) == (th, tw):
        return arr, None
    note = f"resized {w0}x{h0} to {tw}x{th}"
    if fit == "crop" and h0 * tw != w0 * th:
        # the largest centred box of the target's aspect ratio, in whole pixels, cut out first
        # so that no pixel outside it leaks in through the filter
        if w0 * th > h0 * tw:  # too wide
            bw = max(1, round(h0 * tw / th))
            x0 = (w0 - bw) // 2
            arr = arr[:, x0 : x0 + bw]
        else:  # too tall
            bh = max(1, round(w0 * th / tw))
            y0 = (h0 - bh) // 2
            arr = arr[y0 : y0 + bh]
        ch, cw = arr.shape[:2]
        if (ch, cw) == (th, tw):
            return arr, f"centre-cropped {w0}x{h0} to {tw}x{th}"
        note = f"centre-cropped {w0}x{h0} to {cw}x{ch} and resized it to {tw}x{th}"
    elif fit == "resize" and h0 * tw != w0 * th:
        note += " (aspect ratio not kept)"
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32)).resize((tw, th), Image.Resampling.LANCZOS))
        for c in range(arr.shape[-1])
    ]
    return np.clip(np.stack(out, axis=-1), 0.0, 1.0), note


def resize_image(image: torch.Tensor, size: int | Sequence[int], fit: str = "crop") -> tuple[torch.Tensor, str | None]:
    """Resize a ``(1, C, H, W)`` (or ``(C, H, W)``) tensor in [-1, 1] to ``size`` (an int for a
    square, or ``(height, width)``). ``fit="crop"`` keeps the aspect ratio by cropping the
    largest centred box of the target's shape first; ``fit="resize"`` stretches. Lanczos
    filtering in float32, result clipped to [-1, 1]. Returns ``(image, note)``, ``note`` being
    ``None`` when nothing changed."""
    x = _as_chw(image, "resize_image")
    arr = ((x.detach().float().cpu().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    out, note = _resize_array(arr, _target(size), fit)
    return to_tensor(out).to(image.device), note


# ---------------------------------------------------------------------------------------------
# Public loading / conversion
# ---------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """A Pillow image (L or RGB, 8-bit) or a float (H, W[, C]) array in [0, 1] as a
    ``(1, C, H, W)`` float32 tensor in [-1, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None] * 2.0 - 1.0


def load_image(path: str | os.PathLike, size: int | Sequence[int] | None = None, *, channels: int | None = 3, fit: str = "crop") -> LoadedImage:
    """Load an image file (anything Pillow reads: PNG, JPEG, WebP, TIFF, BMP, GIF, ...).

    Parameters
    ----------
    path:
        The file.
    size:
        ``None`` keeps the file's size; an int gives a square ``size x size``; ``(h, w)`` a
        rectangle. See ``fit``.
    channels:
        3 (default) for RGB, 1 for grayscale, ``None`` to keep what the file has (after alpha
        and palette handling). Grayscale files become RGB by repeating the channel; RGB files
        become grayscale by ITU-R 601 luma.
    fit:
        ``"crop"`` (default): centre-crop to the target's aspect ratio, then resize;
        ``"resize"``: stretch to the target.

    Alpha is removed: fully opaque alpha is dropped, transparent pixels are composited onto
    white. Returns :class:`LoadedImage` ``(image, notes)``: ``image`` is ``(1, C, H, W)``
    float32 in [-1, 1] and ``notes`` says, one sentence per item, what was converted.
    Raises :class:`ImageNotFoundError` or :class:`ImageError` with a one-line message.
    """
    path = Path(path).expanduser()
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    notes: list[str] = []
    with _open(path) as im:
        arr = _decode(im, notes)
    arr = _drop_alpha(arr, notes)
    arr = _set_channels(arr, channels, notes)
    if size is not None:
        arr, note = _resize_array(arr, _target(size), fit)
        if note:
            notes.append(note)
    return LoadedImage(to_tensor(arr), tuple(notes))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _as_chw(image: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what}: expected a torch tensor, got {type(image).__name__}")
    x = image
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{what}: expected one image, got a batch of {x.shape[0]}; index it first")
        x = x[0]
    elif x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{what}: expected (1, C, H, W), (C, H, W) or (H, W) with C = 1 or 3, got {tuple(image.shape)}")
    return x


def to_pil(image: torch.Tensor) -> Image.Image:
    """A tensor image in [-1, 1] (``(1, C, H, W)``, ``(C, H, W)`` or ``(H, W)``) as an 8-bit
    Pillow image (L or RGB). Values are clipped to [-1, 1]; NaN becomes mid-grey."""
    x = _as_chw(image, "to_pil").detach().float().cpu()
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    arr = ((x + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a tensor image in [-1, 1] as an 8-bit file (PNG unless the suffix names another
    format Pillow writes, e.g. ``.jpg``). Parent folders are created. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = None if path.suffix.lower() in Image.registered_extensions() else "PNG"
    to_pil(image).save(path, format=fmt)
    return path


# ---------------------------------------------------------------------------------------------
# Comparison figure
# ---------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _wrap(title: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Lines of ``title`` that fit ``width`` pixels: explicit newlines first, then breaks at
    double spaces (separating a label from its numbers), then greedy word wrapping."""

    def fits(text: str) -> bool:
        return draw.textlength(text, font=font) <= width

    lines: list[str] = []
    for paragraph in title.split("\n"):
        if fits(paragraph):
            lines.append(paragraph)
            continue
        for segment in (s.strip() for s in paragraph.split("  ")):
            if not segment:
                continue
            current = ""
            for word in segment.split():
                candidate = f"{current} {word}" if current else word
                if current and not fits(candidate):
                    lines.append(current)
                    current = word
                else:
                    current = candidate
            if current:
                lines.append(current)
    return lines or [""]


def comparison_figure(
    panels: Sequence[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    columns: int | None = None,
    panel_height: int | None = None,
    font_size: int | None = None,
    margin: int = 8,
) -> Path:
    """Write a labelled side-by-side figure (Pillow only) and return its path.

    ``panels`` is a list of ``(title, image)`` with images as for :func:`save_image` (grayscale
    panels are shown in gray). Every panel is scaled to ``panel_height`` (default: the tallest
    panel) keeping its aspect ratio, with nearest-neighbour upsampling so that a low-resolution
    measurement shows its pixels. Titles sit above their panels and wrap to the panel width
    (at newlines, then at double spaces, then between words), e.g.
    ``"without DiffStateGrad  PSNR 24.31 / SSIM 0.712 / LPIPS 0.231"``. ``columns`` (default:
    all panels in one row) wraps the panels into rows.

    The figure is ``columns * panel_width + (columns + 1) * margin`` pixels wide (panels of
    equal aspect) and, per row, ``panel_height + title block + margin`` high, plus ``margin``.
    """
    if not panels:
        raise ValueError("comparison_figure: no panels given")
    images = [to_pil(img).convert("RGB") for _, img in panels]
    height = int(panel_height or max(im.height for im in images))
    scaled = []
    for im in images:
        width = max(1, round(im.width * height / im.height))
        if (width, height) != im.size:
            upsampling = height > im.height
            im = im.resize((width, height), Image.Resampling.NEAREST if upsampling else Image.Resampling.LANCZOS)
        scaled.append(im)
    columns = len(scaled) if columns is None else max(1, min(int(columns), len(scaled)))
    rows = [list(range(i, min(i + columns, len(scaled)))) for i in range(0, len(scaled), columns)]
    col_width = max(im.width for im in scaled)
    font = _font(int(font_size or max(11, round(height / 19))))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_height = ascent + descent + 2
    wrapped = [_wrap(str(title), font, col_width, probe) for title, _ in panels]
    title_blocks = [max(len(wrapped[i]) for i in row) * line_height + margin // 2 for row in rows]

    fig_w = columns * col_width + (columns + 1) * margin
    fig_h = margin + sum(t + height + margin for t in title_blocks)
    fig = Image.new("RGB", (fig_w, fig_h), "white")
    draw = ImageDraw.Draw(fig)
    y = margin
    for row, block in zip(rows, title_blocks):
        for j, i in enumerate(row):
            x = margin + j * (col_width + margin)
            for k, line in enumerate(wrapped[i]):
                lw = draw.textlength(line, font=font)
                draw.text((x + (col_width - lw) / 2.0, y + k * line_height), line, fill="black", font=font)
            im = scaled[i]
            fig.paste(im, (x + (col_width - im.width) // 2, y + block))
        y += block + height + margin
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = None if path.suffix.lower() in Image.registered_extensions() else "PNG"
    fig.save(path, format=fmt)
    return path


# ---------------------------------------------------------------------------------------------
# Bundled example photographs (licences: examples/LICENSES.md, docs/metrics.md)
# ---------------------------------------------------------------------------------------------

_EXAMPLES = {
    "grace_hopper": "grace_hopper.jpg",
    "chelsea": "chelsea.jpg",
    "coffee": "coffee.jpg",
}
DEFAULT_EXAMPLE = "grace_hopper"


def list_examples() -> list[str]:
    """Names of the bundled example photographs (256 x 256 RGB), the default first."""
    return list(_EXAMPLES)


def example_path(name: str | None = None) -> Path:
    """Path of a bundled example photograph (``None``: the default, ``grace_hopper``)."""
    name = DEFAULT_EXAMPLE if name is None else name
    if name not in _EXAMPLES:
        raise ValueError(f"unknown example {name!r}; the bundled examples are: {', '.join(_EXAMPLES)}")
    path = Path(str(importlib.resources.files("diffstategrad").joinpath("examples", _EXAMPLES[name])))
    if not path.is_file():
        raise ImageNotFoundError(f"the bundled example {name!r} is missing from the installation ({path}); reinstall diffstategrad")
    return path


def fashion_examples() -> list[Path]:
    """The eight Fashion-MNIST test images shipped for demos (``examples/fashion/test-0000K.png``,
    32x32 grayscale, the first eight of the held-out test split; MIT licence, examples/LICENSES.md)."""
    folder = Path(str(importlib.resources.files("diffstategrad").joinpath("examples", "fashion")))
    files = sorted(folder.glob("test-*.png")) if folder.is_dir() else []
    if not files:
        raise ImageNotFoundError(f"the bundled Fashion-MNIST examples are missing from the installation ({folder}); reinstall diffstategrad")
    return files


def load_example(name: str | None = None, size: int | Sequence[int] | None = 256, *, channels: int = 3) -> torch.Tensor:
    """A bundled example photograph as a ``(1, C, H, W)`` float32 tensor in [-1, 1], resized
    (centre crop, Lanczos) to ``size`` (``None`` keeps the native 256 x 256)."""
    return load_image(example_path(name), size, channels=channels, fit="crop").image

"""Training photographs for the built-in priors: a reproducible dataset builder and random crops.

Sources (both available offline on Debian with scikit-image installed):

- the example images of Debian's ``opencv-doc`` package (``examples/data``; get them with
  ``apt-get download opencv-doc && dpkg -x opencv-doc_*.deb /tmp/opencv-doc`` or
  ``apt-get install opencv-doc``);
- the photographs bundled with scikit-image (``skimage.data``).

Every image of both sources was looked at. Only colour photographs of real scenes are kept;
``DROPPED`` lists every other image with the reason (synthetic, drawing, logo, text page,
calibration grid, strong blur, grayscale, near-duplicate of a held-out image). Whole images are
held out for validation (``VALIDATION_IMAGES``), chosen for variety: a face, two animals, an
object, an insect on leaves, architecture, a street scene and a fine texture.

Preprocessing: decoded to RGB uint8 at the original resolution (alpha dropped), nothing else.
The prepared folder (``build_dataset``, ``python -m diffstategrad.data build --out DIR``) holds
``train/NAME.png``, ``val/NAME.png`` and ``manifest.json`` (sources, sizes and the SHA-256 of
the decoded pixels, so that a rebuild can be checked bit for bit).

``RandomCrops`` serves training crops: pick an image uniformly, with probability
``native_prob`` take an exact pixel crop at the original resolution, otherwise downscale by a
factor drawn log-uniformly from ``scale_range`` (antialiased bicubic, done by resampling the
corresponding window of the original), flip horizontally with probability 1/2, and map to
[-1, 1]. Crop ``i`` is a pure function of ``(seed, i)``, so a training run that resumes at step
k sees exactly the crops an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "OPENCV_PHOTOS",
    "SKIMAGE_PHOTOS",
    "VALIDATION_IMAGES",
    "DROPPED",
    "find_opencv_data",
    "load_source_images",
    "build_dataset",
    "load_split",
    "RandomCrops",
    "ArrayImages",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

DATASET_VERSION = 1

# Colour photographs kept from opencv-doc's examples/data: name -> file name.
OPENCV_PHOTOS: dict[str, str] = {
    name: name + ext
    for name, ext in [
        ("aero1", ".jpg"), ("aero3", ".jpg"), ("aloeL", ".jpg"), ("aloeR", ".jpg"), ("apple", ".jpg"),
        ("baboon", ".jpg"), ("board", ".jpg"), ("building", ".jpg"), ("butterfly", ".jpg"),
        ("chicky_512", ".png"), ("ela_original", ".jpg"), ("fruits", ".jpg"), ("graf1", ".png"),
        ("graf3", ".png"), ("home", ".jpg"), ("left", ".jpg"), ("right", ".jpg"), ("leuvenA", ".jpg"),
        ("messi5", ".jpg"), ("orange", ".jpg"), ("pca_test1", ".jpg"), ("rubberwhale1", ".png"),
        ("rubberwhale2", ".png"), ("smarties", ".png"), ("squirrel_cls", ".jpg"), ("stuff", ".jpg"),
    ]
}

# Colour photographs kept from skimage.data: name -> (function, index into a tuple result or None).
SKIMAGE_PHOTOS: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "retina": ("retina", None),
    "motorcycle_left": ("stereo_motorcycle", 0),
    "motorcycle_right": ("stereo_motorcycle", 1),
}

# Whole images held out for validation (never cropped for training).
VALIDATION_IMAGES: tuple[str, ...] = (
    "astronaut",  # person, face (skimage)
    "chelsea",  # cat, fur and whiskers (skimage)
    "baboon",  # animal face, fine fur (opencv)
    "coffee",  # indoor object, smooth shading (skimage)
    "butterfly",  # insect on leaves, nature (opencv)
    "building",  # architecture, straight edges (opencv)
    "leuvenA",  # street scene, brick and cobbles (opencv; its twin leuvenB is dropped)
    "board",  # circuit board, dense fine texture (opencv)
)

_SYNTHETIC = "synthetic or rendered, not a photograph"
_CALIBRATION = "calibration chessboard photo (grayscale, dominated by the grid)"
DROPPED: dict[str, str] = {
    **{n: _SYNTHETIC for n in [
        "Blender_Suzanne1", "Blender_Suzanne2", "cards", "ml", "pic1", "pic2", "pic3", "pic4", "pic5",
        "pic6", "chessboard", "detect_blob", "ellipses", "gradient", "mask", "templ", "tmpl", "digits",
    ]},
    "HappyFish": "drawing",
    "starry_night": "painting (not a photograph), with a black frame",
    "LinuxLogo": "logo", "WindowsLogo": "logo", "opencv-logo": "logo", "opencv-logo-white": "logo",
    "notes": "music notation", "imageTextN": "text page", "imageTextR": "text page",
    "aloeGT": "disparity map (ground truth of aloeL/aloeR)",
    **{f"left{i:02d}": _CALIBRATION for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)},
    **{f"right{i:02d}": _CALIBRATION for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)},
    "sudoku": "photo of a printed text page", "text_defocus": "defocused photo of a text page",
    "text_motion": "motion-blurred photo of a text page",
    "licenseplate_motion": "strongly motion-blurred photo (the prior should model sharp images)",
    "basketball1": "grayscale photo", "basketball2": "grayscale photo", "box": "grayscale photo",
    "box_in_scene": "grayscale photo", "blox": "grayscale photo",
    "ela_modified": "ela_original with a drawing pasted in (near-duplicate)",
    "leuvenB": "second view of the held-out leuvenA (would leak validation content)",
    # skimage.data
    "camera": "grayscale photo", "brick": "grayscale photo", "grass": "grayscale photo",
    "gravel": "grayscale photo", "moon": "grayscale photo", "coins": "grayscale photo",
    "clock": "grayscale photo", "cell": "grayscale microscopy", "page": "text page", "text": "text",
    "colorwheel": _SYNTHETIC, "logo": "logo", "checkerboard": _SYNTHETIC, "binary_blobs": _SYNTHETIC,
    "shepp_logan_phantom": _SYNTHETIC, "horse": "binary silhouette", "microaneurysms": "tiny grayscale crop",
    "hubble_deep_field": "astronomy: mostly black sky with point sources, far from everyday photographs",
    "lfw_subset": "25x25 grayscale faces",
}

_OPENCV_CANDIDATES = (
    "/usr/share/doc/opencv-doc/examples/data",
    "/tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data",
)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def find_opencv_data(path: str | os.PathLike | None = None) -> Path:
    """The opencv-doc ``examples/data`` folder: ``path``, ``$DIFFSTATEGRAD_OPENCV_DATA`` or a
    standard location."""
    candidates = [path] if path else [os.environ.get("DIFFSTATEGRAD_OPENCV_DATA"), *_OPENCV_CANDIDATES]
    for c in candidates:
        if c and (Path(c) / "baboon.jpg").is_file():
            return Path(c)
    raise FileNotFoundError(
        "opencv-doc example images not found; install them with "
        "`cd /tmp && apt-get download opencv-doc && dpkg -x opencv-doc_*.deb /tmp/opencv-doc` "
        "(or `apt-get install opencv-doc`), or pass --opencv-dir .../examples/data"
    )


def _to_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] < 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB(A) uint8 image, got {array.shape} {array.dtype}")
    return np.ascontiguousarray(array[..., :3])


def load_source_images(opencv_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """All kept photographs as RGB uint8 arrays (H, W, 3), by name."""
    try:
        import skimage.data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("building the dataset needs scikit-image: pip install scikit-image") from err
    folder = find_opencv_data(opencv_dir)
    images: dict[str, np.ndarray] = {}
    for name, filename in OPENCV_PHOTOS.items():
        with Image.open(folder / filename) as im:
            images[name] = _to_rgb(np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")))
    for name, (func, index) in SKIMAGE_PHOTOS.items():
        result = getattr(skimage.data, func)()
        images[name] = _to_rgb(result[index] if index is not None else result)
    unknown = sorted(
        p.stem for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_EXTS and p.stem not in OPENCV_PHOTOS and p.stem not in DROPPED
    )
    if unknown:
        raise ValueError(f"opencv-doc images neither kept nor dropped (classify them in data.py): {unknown}")
    return images


def build_dataset(out: str | os.PathLike, opencv_dir: str | os.PathLike | None = None) -> dict:
    """Write the prepared dataset (train/*.png, val/*.png, manifest.json) to ``out``."""
    out = Path(out)
    images = load_source_images(opencv_dir)
    missing = set(VALIDATION_IMAGES) - set(images)
    if missing:
        raise ValueError(f"validation images not among the sources: {sorted(missing)}")
    records = []
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for name in sorted(images):
        split = "val" if name in VALIDATION_IMAGES else "train"
        array = images[name]
        Image.fromarray(array).save(out / split / f"{name}.png", optimize=False)
        source = "opencv-doc:" + OPENCV_PHOTOS[name] if name in OPENCV_PHOTOS else "skimage.data." + SKIMAGE_PHOTOS[name][0]
        records.append({
            "name": name, "split": split, "source": source, "height": int(array.shape[0]),
            "width": int(array.shape[1]), "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        })
    manifest = {
        "version": DATASET_VERSION,
        "description": "colour photographs from opencv-doc examples/data and skimage.data, RGB uint8, original resolution",
        "train": [r["name"] for r in records if r["split"] == "train"],
        "val": [r["name"] for r in records if r["split"] == "val"],
        "images": records,
        "dropped": DROPPED,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return manifest


def default_data_dir() -> Path:
    """The prepared dataset folder: $DIFFSTATEGRAD_DATA, else ./data/photos."""
    return Path(os.environ.get("DIFFSTATEGRAD_DATA", "data/photos")).expanduser()


def load_split(root: str | os.PathLike, split: str = "train") -> dict[str, np.ndarray]:
    """The images of one split of a prepared folder, as RGB uint8 arrays by name (sorted).

    A folder without manifest.json (e.g. a test fixture) is read as plain PNGs under ``split/``.
    """
    root = Path(root)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        names = json.loads(manifest_path.read_text())[split]
    else:
        names = sorted(p.stem for p in (root / split).glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no {split} images in {root}; build it with `python -m diffstategrad.data build --out {root}`")
    out = {}
    for name in sorted(names):
        with Image.open(root / split / f"{name}.png") as im:
            out[name] = np.asarray(im.convert("RGB"))
    return out


def to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


class RandomCrops(torch.utils.data.Dataset):
    """Random multi-scale crops (3, size, size) in [-1, 1]; item ``i`` depends only on (seed, i).

    Args:
        root: a prepared dataset folder (``build_dataset``) or any folder with ``split/*.png``.
        split: ``"train"`` or ``"val"``.
        size: crop side in pixels.
        scale_range: (min, max) downscaling factor, drawn log-uniformly; the minimum is raised
            per image so that the downscaled image still holds a full crop.
        native_prob: probability of an exact, unresampled crop at the original resolution.
        flip: random horizontal flips.
        length: nominal length (the index only seeds the draw, any non-negative int works).
    """

    def __init__(self, root, split: str = "train", size: int = 64, scale_range=(0.25, 1.0),
                 native_prob: float = 0.25, flip: bool = True, seed: int = 0, length: int = 2**31 - 1):
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 1, got {scale_range}")
        self.images = load_split(root, split)
        self.names = sorted(self.images)
        small = [n for n in self.names if min(self.images[n].shape[:2]) < size]
        if small:
            raise ValueError(f"images smaller than the crop size {size}: {small}")
        self._pil = {n: Image.fromarray(self.images[n]) for n in self.names}
        self.size, self.scale_range, self.native_prob = int(size), (lo, hi), float(native_prob)
        self.flip, self.seed, self.length = bool(flip), int(seed), int(length)

    def __len__(self) -> int:
        return self.length

    def crop_params(self, index: int) -> dict:
        """The random choices for item ``index``: image name, scale, window, flip."""
        rng = np.random.default_rng([self.seed, int(index)])
        name = self.names[int(rng.integers(len(self.names)))]
        H, W = self.images[name].shape[:2]
        S = self.size
        native = rng.random() < self.native_prob
        lo = max(self.scale_range[0], S / min(H, W))
        hi = max(self.scale_range[1], lo)
        scale = 1.0 if native else math.exp(rng.uniform(math.log(lo), math.log(hi)))
        window = S / scale
        if native:
            x0, y0 = float(rng.integers(W - S + 1)), float(rng.integers(H - S + 1))
        else:
            x0, y0 = rng.uniform(0, W - window), rng.uniform(0, H - window)
        flip = bool(self.flip and rng.random() < 0.5)
        return {"name": name, "scale": scale, "box": (x0, y0, x0 + window, y0 + window), "flip": flip, "native": native}

    def crop_array(self, index: int) -> np.ndarray:
        p = self.crop_params(index)
        S = self.size
        if p["native"]:
            x0, y0 = int(p["box"][0]), int(p["box"][1])
            crop = self.images[p["name"]][y0:y0 + S, x0:x0 + S]
        else:
            # PIL widens the bicubic kernel by the reduction factor: an antialiased resample of
            # exactly this window of the original (same as downscaling the image, then cropping).
            crop = np.asarray(self._pil[p["name"]].resize((S, S), Image.BICUBIC, box=p["box"]))
        if p["flip"]:
            crop = crop[:, ::-1]
        return crop

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.crop_array(index))

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        """Items start .. start + batch_size - 1 stacked into (B, 3, S, S)."""
        return torch.stack([self[i] for i in range(start, start + batch_size)])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): the strong-prior domain
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
FASHION_MNIST_LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """The folder with the Fashion-MNIST IDX files: ``path``, $DIFFSTATEGRAD_FASHION_MNIST or
    Debian's /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``)."""
    candidates = [Path(path).expanduser()] if path else []
    if os.environ.get("DIFFSTATEGRAD_FASHION_MNIST"):
        candidates.append(Path(os.environ["DIFFSTATEGRAD_FASHION_MNIST"]).expanduser())
    candidates.append(FASHION_MNIST_DIR)
    for c in candidates:
        if (c / FASHION_MNIST_FILES["train"]).is_file() or (c / FASHION_MNIST_FILES["test"]).is_file():
            return c
    raise FileNotFoundError("Fashion-MNIST not found (looked in " + ", ".join(map(str, candidates)) + "); "
                            "install it with `sudo apt-get install dataset-fashion-mnist` or set DIFFSTATEGRAD_FASHION_MNIST")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (the format of LeCun's MNIST files)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, labels: bool = False, pad: int = 2):
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000, held out) as uint8 (N, 28 + 2 pad,
    28 + 2 pad), zero (black) padded to 32x32 by default; with ``labels`` also the (N,) classes."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(root)
    images = _read_idx(folder / FASHION_MNIST_FILES[split])
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    if labels:
        return images, _read_idx(folder / FASHION_MNIST_LABEL_FILES[split])
    return images


def gray_to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 (..., 1, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).unsqueeze(-3).div_(127.5).sub_(1.0)


class ArrayImages(torch.utils.data.Dataset):
    """Whole images of a fixed-size dataset (Fashion-MNIST), (1, H, W) in [-1, 1], with random
    horizontal flips; item ``i`` is image ``perm_e[i mod N]`` of epoch e = i // N, with a
    permutation and flip drawn from (seed, e) and (seed, i): a pure function of (seed, i), so
    resumed training sees what an uninterrupted run would, and every epoch visits each image once."""

    def __init__(self, images: np.ndarray, flip: bool = True, seed: int = 0, length: int = 2**31 - 1):
        self.images = np.ascontiguousarray(images)
        self.flip, self.seed, self.length = bool(flip), int(seed), int(length)
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.length

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0xFA5]).permutation(len(self.images))
            self._perm_epoch = epoch
        return self._perm

    def item_array(self, index: int) -> np.ndarray:
        epoch, pos = divmod(int(index), len(self.images))
        image = self.images[self._permutation(epoch)[pos]]
        if self.flip and np.random.default_rng([self.seed, int(index), 0xF11]).random() < 0.5:
            image = image[:, ::-1]
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        return gray_to_model_range(self.item_array(index))

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        return torch.stack([self[i] for i in range(start, start + batch_size)])


def _main(argv=None):
    import click

    @click.group()
    def cli():
        """Build and inspect the training photographs of the built-in priors."""

    @cli.command("build")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (e.g. data/photos).")
    @click.option("--opencv-dir", default=None, type=click.Path(file_okay=False), help="opencv-doc examples/data folder.")
    def build(out, opencv_dir):
        """Write train/*.png, val/*.png and manifest.json from opencv-doc and skimage.data."""
        manifest = build_dataset(out, opencv_dir)
        click.echo(f"wrote {len(manifest['train'])} training and {len(manifest['val'])} validation images to {out}")
        click.echo("validation: " + ", ".join(manifest["val"]))

    @cli.command("sheet")
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    @click.option("--size", default=64, show_default=True)
    @click.option("--count", default=64, show_default=True)
    def sheet(data, out, size, count):
        """Save a grid of random training crops (to check the augmentation)."""
        ds = RandomCrops(data, size=size)
        side = math.ceil(math.sqrt(count))
        grid = np.zeros((side * size, side * size, 3), np.uint8)
        for i in range(count):
            r, c = divmod(i, side)
            grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = ds.crop_array(i)
        Image.fromarray(grid).save(out)

    cli.main(args=argv, prog_name="python -m diffstategrad.data")


if __name__ == "__main__":
    _main()

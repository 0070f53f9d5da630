"""Blur kernels: the Gaussian kernel of the official code and a seeded random motion kernel.

Both return a 2-D float64 NumPy array that sums to 1. They are plain functions of their
arguments (and of the NumPy ``Generator`` passed in), so a kernel is reproducible from a seed.

Gaussian: the official ``Blurkernel`` filters a centred delta of size k with
``scipy.ndimage.gaussian_filter(sigma)`` (truncate 4, mode 'reflect'). The result is the outer
product of the sampled, normalised 1-D Gaussian of radius int(4 sigma + 0.5) with itself, zero
beyond that radius; where the radius reaches past the kernel border, the reflect boundary folds
the tails back in. :func:`gaussian_kernel` computes exactly that, without calling SciPy.

Motion: the random-path kernel of Levi Borodenko's ``motionblur`` package (MIT licence,
github.com/LeviBorodenko/motionblur), re-implemented from its description with every draw taken
from a ``numpy.random.Generator``:

1. on a canvas twice the kernel size with diagonal D, the maximal path length is
   0.75 D (U(0, 1) + U(0, I^2)), for intensity I;
2. step lengths Beta(1, 30) (1 - I + 0.1) D are drawn (rejecting steps longer than the maximal
   length) until their sum reaches the maximal length;
3. the maximal angle is U(0, I pi) and the sign-flip probability ("jitter") Beta(2, 20); the
   first angle is U(-max, max), each next one has magnitude Triangular(0, I max, max + 0.1) and
   the previous angle's sign, flipped with the jitter probability;
4. the path is the cumulative sum of the steps as complex increments, centred on its mean,
   rotated by U(0, pi) and moved to the canvas centre;
5. it is drawn as a white polyline of width int(D / 150), Gaussian-blurred with radius
   int(0.01 D), resized to the kernel size with Lanczos, and normalised to sum 1.

One departure: the line is at least 1 pixel wide. For kernels smaller than 54 pixels
int(D / 150) is 0, Pillow then draws nothing and the package returns a NaN kernel; from 54 pixels
up (61 in the presets) the result is the package's, draw for draw.

Every length in steps 1-4 is proportional to D, so the same draws at another kernel size give the
same path scaled geometrically (only the integer line width and blur radius of step 5 change).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["gaussian_kernel", "motion_blur_kernel", "motion_blur_path"]

# The small constant of the motionblur package ("eps"): keeps (1 - I + eps) and the triangular
# upper limit positive at intensity 1 and 0.
_MOTION_EPS = 0.1


def _reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """SciPy's 'reflect' boundary (d c b a | a b c d | d c b a), for any integer index."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _gaussian_delta_response_1d(size: int, sigma: float, truncate: float) -> np.ndarray:
    """The 1-D Gaussian filter (scipy.ndimage conventions) applied to a centred delta."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / float(sigma) ** 2 * offsets.astype(np.float64) ** 2)
    weights /= weights.sum()
    centre = size // 2
    response = np.zeros(size, dtype=np.float64)
    # output[i] = sum_o weights[o] * delta[reflect(i + o)]: add each weight where its tap hits
    # the delta. Looping over taps keeps the reflect folding exact for any radius.
    for i in range(size):
        hits = _reflect_index(i + offsets, size) == centre
        response[i] = weights[hits].sum()
    return response


def gaussian_kernel(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The (size, size) Gaussian kernel of the official code: ``gaussian_filter`` of a centred delta.

    Args:
        size: kernel side (the official presets use odd sizes; 61 at 256x256).
        sigma: standard deviation in pixels (3.0 at 256x256).
        truncate: SciPy's truncation in standard deviations (its default, 4).
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"kernel size must be positive, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    line = _gaussian_delta_response_1d(size, sigma, truncate)
    return np.outer(line, line)


def motion_blur_path(canvas: int, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """The random motion path (complex points) on a (canvas x canvas) grid, steps 1-4 above."""
    diagonal = math.sqrt(2.0) * canvas
    max_length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0.0, intensity**2))

    steps = []
    total = 0.0
    while total < max_length:
        step = rng.beta(1, 30) * (1.0 - intensity + _MOTION_EPS) * diagonal
        if step < max_length:
            steps.append(step)
            total += step

    max_angle = rng.uniform(0.0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    while len(angles) < len(steps):
        magnitude = rng.triangular(0.0, intensity * max_angle, max_angle + _MOTION_EPS)
        sign = np.sign(angles[-1])
        angles.append(-sign * magnitude if rng.uniform() < jitter else sign * magnitude)

    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))
    path = path - path.mean()
    path = path * np.exp(1j * rng.uniform(0.0, math.pi))
    return path + (canvas + 1j * canvas) / 2.0


def motion_blur_kernel(size: int, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """A random (size, size) motion-blur kernel, non-negative and summing to 1.

    Args:
        size: kernel side (61 at 256x256 in the official presets).
        intensity: in [0, 1]; 0 gives near-linear paths, 1 long curved ones (official 0.5).
        rng: the NumPy generator all draws come from.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"kernel size must be positive, got {size}")
    if not 0.0 <= float(intensity) <= 1.0:
        raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
    canvas = 2 * size  # drawn at twice the size, then downsampled, for antialiasing
    diagonal = math.sqrt(2.0) * canvas
    path = motion_blur_path(canvas, float(intensity), rng)

    # 8-bit greyscale canvas: a white line blurred and resized equals the grey channel of the
    # package's RGB drawing (equal channels convert to grey exactly).
    image = Image.new("L", (canvas, canvas))
    width = max(1, int(diagonal / 150))  # the package's int(D / 150) is 0 below 54 px
    ImageDraw.Draw(image).line([(float(p.real), float(p.imag)) for p in path], fill=255, width=width)
    image = image.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    image = image.resize((size, size), resample=Image.LANCZOS)
    kernel = np.asarray(image, dtype=np.float64)
    total = kernel.sum()
    if total <= 0:
        # The path left the canvas entirely (not observed): a delta rather than a division by 0.
        kernel = np.zeros((size, size))
        kernel[size // 2, size // 2] = 1.0
        return kernel
    return kernel / total

"""Operators: adjointness, derivatives, and agreement with the official constructions."""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from diffstategrad.operators import (
    Blur,
    HighDynamicRange,
    Inpaint,
    PhaseRetrieval,
    Resize,
    box_mask,
    gaussian_kernel,
    motion_blur_kernel,
    random_mask,
    resize_matrix,
)
from diffstategrad.operators.blur import reflect_pad, reflect_pad_adjoint

SIZES = [(64, 64), (128, 128), (48, 80)]


def _kernel_size(size):
    """The scaling rule's kernel size (61 at 256)."""
    return 2 * math.ceil(30 * min(size) / 256) + 1


def _box(size):
    return (round(128 * size[0] / 256), round(128 * size[1] / 256)), (round(16 * size[0] / 256), round(16 * size[1] / 256))


def _linear_operators(size, batch):
    """Every linear operator at ``size`` with ``batch`` per-sample parameters (1 = shared)."""
    k = _kernel_size(size)
    rngs = [np.random.default_rng(100 + b) for b in range(batch)]
    box_size, margin = _box(size)
    return {
        "resize4": Resize(size, 4),
        "resize3": Resize(size, 3),
        "gaussian_blur": Blur(gaussian_kernel(k, 3.0 * min(size) / 256)),
        "motion_blur": Blur(np.stack([motion_blur_kernel(k, 0.5, r) for r in rngs])[:, None]),
        "box_inpainting": Inpaint(np.stack([box_mask(size, box_size, margin, r) for r in rngs])[:, None]),
        "random_inpainting": Inpaint(np.stack([random_mask(size, (0.7, 0.71), r) for r in rngs])[:, None]),
    }


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_adjointness(size, batch):
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for name, op in _linear_operators(size, batch).items():
        op = op.double()
        x = torch.randn(2, 2, *size, generator=gen, dtype=torch.float64)
        ax = op(x)
        y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
        aty = op.adjoint(y)
        lhs, rhs = (ax * y).sum(), (x * aty).sum()
        err = abs(lhs - rhs) / max(abs(lhs), abs(rhs))
        worst = max(worst, float(err))
        assert err < 1e-5, (name, float(err))
        # per-sample: the inner products also agree sample by sample
        per_lhs = (ax * y).flatten(1).sum(1)
        per_rhs = (x * aty).flatten(1).sum(1)
        assert torch.allclose(per_lhs, per_rhs, rtol=1e-10, atol=1e-10), name
    assert worst < 1e-10  # float64: exact up to rounding


def test_reflect_pad_adjoint_is_transpose():
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    for pad in (1, 3, 6):
        y = torch.randn(1, 2, 7 + 2 * pad, 9 + 2 * pad, dtype=torch.float64)
        assert torch.allclose((reflect_pad(x, pad) * y).sum(), (x * reflect_pad_adjoint(y, pad)).sum())
    assert torch.equal(reflect_pad(x, 3), torch.nn.ReflectionPad2d(3)(x))


def _directional_check(op, x, eps=1e-6, tol=1e-6, seed=0):
    """Central differences along random directions against autograd's directional derivative."""
    gen = torch.Generator().manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = op(x)
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    for _ in range(3):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            fd = ((op(x + eps * d) - op(x - eps * d)) * w).sum() / (2 * eps)
        ad = (grad * d).sum()
        assert abs(fd - ad) <= tol * max(1.0, abs(float(ad))), (type(op).__name__, float(fd), float(ad))


def test_finite_differences_linear():
    gen = torch.Generator().manual_seed(1)
    for name, op in _linear_operators((48, 80), 2).items():
        x = torch.rand(2, 3, 48, 80, generator=gen, dtype=torch.float64) * 2 - 1
        _directional_check(op.double(), x)
        # linear: the autograd vector-Jacobian product is the explicit adjoint
        xr = x.clone().requires_grad_(True)
        y = op.double()(xr)
        w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (vjp,) = torch.autograd.grad((y * w).sum(), xr)
        assert torch.allclose(vjp, op.adjoint(w), atol=1e-12), name


def test_finite_differences_phase_retrieval():
    gen = torch.Generator().manual_seed(2)
    op = PhaseRetrieval(oversample=2.0)
    x = torch.rand(2, 3, 24, 40, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    assert op(x).min() > 1e-6  # away from zero magnitudes, where |.| is not differentiable
    _directional_check(op, x, eps=1e-6, tol=1e-6)


def test_finite_differences_hdr():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 24, generator=gen, dtype=torch.float64) * 2 - 1
    # keep every pixel away from the kinks |2x| = 1
    x = torch.where((2 * x).abs().sub(1).abs() < 0.05, x * 0.5, x)
    op = HighDynamicRange(2.0)
    _directional_check(op, x, eps=1e-6, tol=1e-8)


# --- Resizer ---------------------------------------------------------------------------------


def _pil_bicubic(image, out_size):
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize(out_size[::-1], Image.BICUBIC), dtype=np.float64)


@pytest.mark.parametrize("size,factor", [((256, 256), 4), ((96, 160), 4), ((64, 64), 2), ((60, 90), 3)])
def test_resize_matches_pil_in_the_interior(size, factor):
    image = np.random.default_rng(0).uniform(-1, 1, size).astype(np.float32)
    op = Resize(size, factor).double()
    ours = op(torch.from_numpy(image).double()[None, None])[0, 0].numpy()
    assert ours.shape == (size[0] // factor, size[1] // factor)
    pil = _pil_bicubic(image, ours.shape)
    border = 2  # PIL clips its window at the border where Shocher's resizer mirrors
    assert np.abs(ours - pil)[border:-border, border:-border].max() < 1e-4


def test_resize_constants_and_shapes():
    for size, factor in [((256, 256), 4), ((50, 70), 4), ((48, 80), 3), ((9, 13), 2)]:
        op = Resize(size, factor).double()
        x = torch.full((2, 3, *size), 0.37, dtype=torch.float64)
        y = op(x)
        assert y.shape[-2:] == (math.ceil(size[0] / factor), math.ceil(size[1] / factor))
        assert torch.allclose(y, torch.full_like(y, 0.37), atol=1e-14, rtol=0)
    assert Resize((256, 256), 4).out_size == (64, 64)


def _naive_resize_matrix(n, f):
    """Shocher's construction written out entry by entry (1-based coordinates, mirror trick)."""
    s = 1.0 / f
    m = math.ceil(n / f)
    width = 4.0 / s

    def kernel(t):
        a = abs(s * t)
        core = 1.5 * a**3 - 2.5 * a**2 + 1 if a <= 1 else (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2 if a <= 2 else 0.0)
        return s * core

    mirror = list(range(n)) + list(range(n - 1, -1, -1))
    out = np.zeros((m, n))
    for o in range(1, m + 1):
        match = (o - (m - n * s) / 2) / s + 0.5 * (1 - 1 / s)
        left = math.floor(match - width / 2)
        fov = [left + i - 1 for i in range(int(math.ceil(width)) + 2)]
        weights = np.array([kernel(match - j - 1) for j in fov])
        weights /= weights.sum()
        for j, w in zip(fov, weights):
            out[o - 1, mirror[j % (2 * n)]] += w
    return out


@pytest.mark.parametrize("n,f", [(16, 4), (50, 4), (13, 2), (80, 3), (7, 4)])
def test_resize_matrix_matches_shocher_construction(n, f):
    assert np.allclose(resize_matrix(n, f), _naive_resize_matrix(n, f), atol=1e-14)


# --- Blur ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,sigma", [(61, 3.0), (31, 1.5), (17, 0.75), (121, 6.0), (9, 3.0), (5, 4.0)])
def test_gaussian_kernel_matches_scipy(size, sigma):
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    expected = scipy.ndimage.gaussian_filter(delta, sigma=sigma)
    ours = gaussian_kernel(size, sigma)
    assert ours.shape == (size, size)
    assert np.abs(ours - expected).max() < 1e-15
    if 4 * sigma + 0.5 < size // 2:  # no folding: zero outside radius int(4 sigma + 0.5)
        radius = int(4 * sigma + 0.5)
        c = size // 2
        assert ours[: c - radius].sum() == 0 and ours[:, c + radius + 1:].sum() == 0
        assert abs(ours.sum() - 1) < 1e-12


def test_blur_matches_official_structure():
    k = gaussian_kernel(9, 1.5)
    x = torch.randn(2, 3, 20, 30, dtype=torch.float64)
    ref = torch.nn.Sequential(torch.nn.ReflectionPad2d(4), torch.nn.Conv2d(3, 3, 9, bias=False, groups=3)).double()
    with torch.no_grad():
        ref[1].weight.copy_(torch.from_numpy(k).expand(3, 1, 9, 9))
        expected = ref(x)
    assert torch.allclose(Blur(k).double()(x), expected, atol=1e-13)


def test_blur_per_sample_kernels_are_independent():
    kernels = np.stack([motion_blur_kernel(9, 0.5, np.random.default_rng(s)) for s in (1, 2)])[:, None]
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    both = Blur(kernels).double()(x)
    for b in range(2):
        alone = Blur(kernels[b, 0]).double()(x[b:b + 1])
        assert torch.allclose(both[b:b + 1], alone, atol=1e-13)


def test_blur_rejects_padding_too_large():
    with pytest.raises(ValueError, match="reflection padding"):
        Blur(gaussian_kernel(33, 2.0))(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="per-sample kernels"):
        Blur(np.ones((2, 1, 3, 3)) / 9)(torch.zeros(3, 3, 16, 16))


def test_motion_kernel_properties():
    for size in (61, 31, 17):
        k = motion_blur_kernel(size, 0.5, np.random.default_rng(7))
        assert k.shape == (size, size)
        assert k.min() >= 0 and abs(k.sum() - 1) < 1e-12
        assert (k > 0).sum() > 5  # a path, not a dot
    a = motion_blur_kernel(61, 0.5, np.random.default_rng(1))
    b = motion_blur_kernel(61, 0.5, np.random.default_rng(1))
    c = motion_blur_kernel(61, 0.5, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def _spread(kernel):
    ii, jj = np.indices(kernel.shape)
    ci, cj = (kernel * ii).sum(), (kernel * jj).sum()
    return math.sqrt((kernel * ((ii - ci) ** 2 + (jj - cj) ** 2)).sum())


def test_motion_kernel_scales_geometrically():
    # same draws at twice the size: the path is twice as long (line width/blur are integers)
    ratios = [_spread(motion_blur_kernel(121, 0.5, np.random.default_rng(s)))
              / _spread(motion_blur_kernel(61, 0.5, np.random.default_rng(s))) for s in range(5)]
    assert all(1.6 < r < 2.4 for r in ratios), ratios


# --- Inpainting ------------------------------------------------------------------------------


def test_box_mask_official_geometry():
    corners = set()
    for seed in range(200):
        mask = box_mask((256, 256), 128, 16, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask == 0)
        assert rows.max() - rows.min() + 1 == 128 and cols.max() - cols.min() + 1 == 128
        assert (mask == 0).sum() == 128 * 128
        corners.add((rows.min(), cols.min()))
    tops = [t for t, _ in corners]
    lefts = [left for _, left in corners]
    assert min(tops) >= 16 and max(tops) <= 111 and min(lefts) >= 16 and max(lefts) <= 111
    with pytest.raises(ValueError, match="does not fit"):
        box_mask((64, 64), 64, 4, np.random.default_rng(0))


def test_random_mask_exact_count():
    for size in [(256, 256), (48, 80)]:
        mask = random_mask(size, (0.7, 0.71), np.random.default_rng(3))
        fraction = np.random.default_rng(3).uniform(0.7, 0.71)
        assert (mask == 0).sum() == int(size[0] * size[1] * fraction)
        assert set(np.unique(mask)) == {0.0, 1.0}
    op = Inpaint(random_mask((16, 16), 0.5, np.random.default_rng(0)))
    y = op(torch.ones(1, 3, 16, 16))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # same in all channels


# --- Phase retrieval and HDR -----------------------------------------------------------------


def test_phase_retrieval_values():
    x = np.random.default_rng(0).uniform(-1, 1, (1, 2, 32, 48))
    op = PhaseRetrieval(oversample=2.0)
    y = op(torch.from_numpy(x)).numpy()
    assert y.shape == (1, 2, 32 + 16, 48 + 24)  # pad int(2 / 8 * n) per side
    padded = np.pad((x + 1) / 2, ((0, 0), (0, 0), (8, 8), (12, 12)))
    expected = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)))
    assert np.allclose(y, expected, atol=1e-12)
    # orthonormal: Parseval
    assert np.allclose((y**2).sum(), (padded**2).sum())
    assert PhaseRetrieval(pad=64)(torch.zeros(1, 3, 256, 256)).shape[-2:] == (384, 384)
    assert PhaseRetrieval(oversample=2.0)(torch.zeros(1, 3, 256, 256)).shape[-2:] == (384, 384)


def test_hdr_values():
    x = torch.tensor([[[[-0.9, -0.5, -0.2, 0.0, 0.3, 0.6]]]])
    expected = torch.tensor([[[[-1.0, -1.0, -0.4, 0.0, 0.6, 1.0]]]])
    assert torch.allclose(HighDynamicRange(2.0)(x), expected)


def test_operators_reject_unbatched_input():
    for op in [Resize((8, 8), 2), Blur(np.ones((3, 3)) / 9), PhaseRetrieval(), HighDynamicRange()]:
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            op(torch.zeros(3, 8, 8))

"""Image loading, saving, conversions, resizing, comparison figures and bundled examples."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffstategrad import images
from diffstategrad.images import (
    ImageError,
    ImageNotFoundError,
    comparison_figure,
    example_path,
    list_examples,
    load_example,
    load_image,
    resize_image,
    save_image,
    to_tensor,
)


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im).copy()


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.image.shape == (1, 3, 20, 30) and loaded.image.dtype == torch.float32
    assert loaded.notes == ()
    assert loaded.image.min() >= -1 and loaded.image.max() <= 1
    assert torch.allclose(loaded.image, torch.from_numpy(arr).permute(2, 0, 1)[None] / 255.0 * 2 - 1)
    out = save_image(loaded.image, tmp_path / "sub" / "b.png")
    assert out.exists()
    assert np.array_equal(_pixels(out), arr)


def test_tensor_round_trip_quantises(tmp_path):
    x = torch.rand(1, 3, 9, 11) * 2 - 1
    back = load_image(save_image(x, tmp_path / "x.png")).image
    assert (back - x).abs().max() <= 1.0 / 255.0 + 1e-6


def test_save_image_clips_and_handles_nan(tmp_path):
    x = torch.tensor([[[[-3.0, -1.0, 0.0, 1.0, 2.0, float("nan")]]]])
    px = _pixels(save_image(x, tmp_path / "c.png"))
    assert px.shape == (1, 6)
    assert px.tolist() == [[0, 0, 128, 255, 255, 128]]
    assert save_image(x[0, 0], tmp_path / "d.png").exists()  # (H, W) works too
    with pytest.raises(ValueError, match="batch of 2"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "e.png")


def test_jpeg_loads(tmp_path):
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg").image.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors_are_clear(tmp_path):
    with pytest.raises(ImageNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageNotFoundError, FileNotFoundError) and issubclass(ImageError, ValueError)
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image that Pillow can read"):
        load_image(tmp_path / "notes.png")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or truncated") as err:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "full.png", channels=4)
    with pytest.raises(ValueError, match="fit"):
        load_image(tmp_path / "full.png", 32, fit="stretch")


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def test_grayscale_to_rgb_and_back(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png")
    assert rgb.image.shape == (1, 3, 12, 10)
    assert torch.equal(rgb.image[:, 0], rgb.image[:, 1]) and torch.equal(rgb.image[:, 1], rgb.image[:, 2])
    assert any("grayscale to RGB" in n for n in rgb.notes)
    kept = load_image(tmp_path / "g.png", channels=None)
    assert kept.image.shape == (1, 1, 12, 10) and kept.notes == ()
    arr = _rgb(8, 8)
    Image.fromarray(arr).save(tmp_path / "c.png")
    luma = load_image(tmp_path / "c.png", channels=1)
    assert luma.image.shape == (1, 1, 8, 8)
    assert any("RGB to grayscale" in n for n in luma.notes)
    expected = (arr.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0 * 2 - 1
    assert np.abs(luma.image[0, 0].numpy() - expected).max() < 1e-5


def test_alpha_is_removed_with_a_note(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 255
    Image.fromarray(arr).save(tmp_path / "opaque.png")
    opaque = load_image(tmp_path / "opaque.png")
    assert opaque.image.shape == (1, 3, 4, 4) and any("opaque alpha" in n for n in opaque.notes)
    arr[:2, :, 3] = 0  # top half fully transparent: becomes white
    Image.fromarray(arr).save(tmp_path / "half.png")
    half = load_image(tmp_path / "half.png")
    assert any("transparent pixels (50% of the image) onto white" in n for n in half.notes)
    assert torch.allclose(half.image[0, :, :2], torch.ones(3, 2, 4))
    assert torch.allclose(half.image[0, 0, 2:], torch.full((2, 4), 200 / 255 * 2 - 1))
    la = Image.fromarray(arr[..., 3]).convert("LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png", channels=None).image.shape == (1, 1, 4, 4)


def test_palette_cmyk_and_16_bit(tmp_path):
    Image.fromarray(_rgb(6, 6)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").image.shape == (1, 3, 6, 6)
    Image.fromarray(_rgb(6, 6)).convert("CMYK").save(tmp_path / "c.jpg")
    cmyk = load_image(tmp_path / "c.jpg")
    assert cmyk.image.shape == (1, 3, 6, 6) and any("CMYK" in n for n in cmyk.notes)
    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    loaded = load_image(tmp_path / "d.png", channels=None)
    assert any("16-bit" in n for n in loaded.notes)
    assert torch.allclose(loaded.image[0, 0], torch.from_numpy(deep / 65535.0 * 2 - 1).float(), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(_rgb(10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "o.jpg", exif=exif)
    loaded = load_image(tmp_path / "o.jpg")
    assert loaded.image.shape == (1, 3, 20, 10)
    assert any("EXIF" in n for n in loaded.notes)


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------


def test_centre_crop_and_resize(tmp_path):
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, 30:60] = 255  # white centre square, black sides
    Image.fromarray(arr).save(tmp_path / "wide.png")
    crop = load_image(tmp_path / "wide.png", 30)
    assert crop.image.shape == (1, 3, 30, 30)
    assert torch.equal(crop.image, torch.ones(1, 3, 30, 30))  # exactly the centre square
    assert crop.notes == ("centre-cropped 90x30 to 30x30",)
    small = load_image(tmp_path / "wide.png", 16)
    assert small.image.shape == (1, 3, 16, 16)
    assert small.image.min() > 0.9
    assert "centre-cropped 90x30 to 30x30 and resized it to 16x16" in small.notes
    rect = load_image(tmp_path / "wide.png", (10, 20))
    assert rect.image.shape == (1, 3, 10, 20)
    stretched = load_image(tmp_path / "wide.png", 16, fit="resize")
    assert stretched.image.shape == (1, 3, 16, 16)
    assert stretched.image[..., 0].max() < -0.9  # the black sides are kept
    assert any("aspect ratio not kept" in n for n in stretched.notes)
    same = load_image(tmp_path / "wide.png", (30, 90))
    assert same.notes == ()


def test_resize_image_tensor():
    x = to_tensor(np.linspace(0, 1, 24 * 36).reshape(24, 36))
    assert x.shape == (1, 1, 24, 36)
    y, note = resize_image(x, 12)
    assert y.shape == (1, 1, 12, 12) and "centre-cropped" in note
    z, note = resize_image(x, (24, 36))
    assert note is None and torch.allclose(z, x)
    assert y.min() >= -1 and y.max() <= 1


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def test_comparison_figure_size(tmp_path):
    x = load_example("coffee", 32)
    panels = [("ground truth", x), ("measurement", x[:, :, ::2, ::2]), ("with DiffStateGrad", x[:, :1])]
    path = comparison_figure(panels, tmp_path / "fig" / "comparison.png", margin=8)
    assert path.exists()
    with Image.open(path) as fig:
        w, h = fig.size
        assert fig.mode == "RGB"
    assert w == 3 * 32 + 4 * 8
    assert 32 + 2 * 8 < h < 32 + 2 * 8 + 40  # one line of title
    long = panels[:2] + [("without DiffStateGrad  PSNR 24.31 / SSIM 0.712 / LPIPS 0.231", x)]
    with Image.open(comparison_figure(long, tmp_path / "long.png", margin=8)) as fig:
        assert fig.size[0] == w and fig.size[1] > h  # the long title wraps onto more lines
    with Image.open(comparison_figure(panels + panels[:1], tmp_path / "grid.png", columns=2, margin=8)) as fig:
        assert fig.size[0] == 2 * 32 + 3 * 8
        assert fig.size[1] > 2 * (32 + 8)
    with Image.open(comparison_figure(panels, tmp_path / "big.png", panel_height=64, margin=8)) as fig:
        assert fig.size[0] == 3 * 64 + 4 * 8
    with pytest.raises(ValueError, match="no panels"):
        comparison_figure([], tmp_path / "none.png")


# ---------------------------------------------------------------------------------------------
# Bundled examples
# ---------------------------------------------------------------------------------------------


def test_bundled_examples():
    names = list_examples()
    assert names[0] == images.DEFAULT_EXAMPLE and len(names) == 3
    licences = (example_path().parent / "LICENSES.md").read_text()
    for name in names:
        path = example_path(name)
        assert path.stat().st_size < 60_000
        assert path.name in licences
        x = load_example(name)
        assert x.shape == (1, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
        assert x.std() > 0.1
    assert load_example(size=64).shape == (1, 3, 64, 64)
    assert load_example("chelsea", (32, 48)).shape == (1, 3, 32, 48)
    assert load_example("coffee", 32, channels=1).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="grace_hopper, chelsea, coffee"):
        example_path("lena")


def test_examples_are_not_training_images():
    """LICENSES.md and docs/metrics.md say so; keep them true if the held-out list changes."""
    data = pytest.importorskip("diffstategrad.data")
    held = getattr(data, "VALIDATION_IMAGES", None)
    if held is None:
        pytest.skip("diffstategrad.data has no VALIDATION_IMAGES")
    assert {"chelsea", "coffee"} <= set(held)

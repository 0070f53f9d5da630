"""The photo dataset builder without the Debian packages: the source tables and splits, package
photographs read from a fixture tree (EXIF orientation, rotation, crop, downscaling), the
near-duplicate check, writing and re-reading the three splits bit for bit, and the fetch step
on a .deb built here with a stand-in apt-get."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffstategrad import data as D
from diffstategrad.data import (
    MAX_SIDE,
    PACKAGE_PHOTOS,
    TUNING_IMAGES,
    VALIDATION_IMAGES,
    PackageSource,
    Photo,
    RandomCrops,
    fetch_packages,
    find_near_duplicates,
    find_package_roots,
    load_package_images,
    load_split,
    split_of,
    write_dataset,
)


def _texture(h, w, seed):
    """A smooth random colour image with structure at every scale (like a photograph)."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)
    x += 40 * rng.normal(size=(h, w, 3)).cumsum(1) / np.sqrt(w)
    x = (x - x.min()) / (x.max() - x.min())
    return np.asarray(Image.fromarray((255 * x).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)))


def test_held_out_set_is_unchanged_and_the_splits_are_disjoint():
    assert VALIDATION_IMAGES == ("astronaut", "chelsea", "baboon", "coffee", "butterfly", "building", "leuvenA", "board")
    assert 4 <= len(TUNING_IMAGES) <= 6 and not set(TUNING_IMAGES) & set(VALIDATION_IMAGES)
    new_names = {name for source in PACKAGE_PHOTOS.values() for name, _ in source.items()}
    assert set(TUNING_IMAGES) <= new_names  # tuning images come from the version-2 sources only
    assert not new_names & (set(D.OPENCV_PHOTOS) | set(D.SKIMAGE_PHOTOS))
    assert {split_of(n) for n in VALIDATION_IMAGES} == {"val"}
    assert {split_of(n) for n in TUNING_IMAGES} == {"tune"}
    assert split_of("mate-garden") == "train"


def test_package_table_is_well_formed():
    names = [name for source in PACKAGE_PHOTOS.values() for name, _ in source.items()]
    assert len(names) == len(set(names)) and len(names) > 300
    assert all(name == name.lower() and " " not in name for name in names)
    for package, source in PACKAGE_PHOTOS.items():
        assert source.licence and not source.base.startswith("/") and source.base.endswith("/"), package
        assert package in D.PACKAGE_NOTES, package
        assert package not in D.REJECTED_PACKAGES, package
        for _, photo in source.items():
            assert photo.rotate in (0, 90, 180, 270) and not photo.path.startswith("/")


@pytest.fixture
def fixture_package(tmp_path):
    """A fake package tree: a sideways photo with an EXIF orientation tag, one stored sideways
    without a tag (the table rotates it), one with a strip to crop, an RGBA one and a large one."""
    root = tmp_path / "cache" / "root" / "fake-photos"
    base = root / "usr/share/fake"
    base.mkdir(parents=True)
    images = {"tagged": _texture(40, 60, 1), "sideways": _texture(50, 30, 2), "strip": _texture(64, 64, 3),
              "alpha": _texture(48, 48, 4), "large": _texture(100, 2 * MAX_SIDE + 10, 5)}
    exif = Image.Exif()
    exif[274] = 6  # stored rotated: display needs 90 degrees clockwise
    Image.fromarray(images["tagged"]).save(base / "tagged.jpg", exif=exif, quality=95)
    Image.fromarray(images["sideways"]).save(base / "sideways.png")
    Image.fromarray(images["strip"]).save(base / "strip.png")
    Image.fromarray(np.dstack([images["alpha"], np.full((48, 48), 255, np.uint8)])).save(base / "alpha.png")
    Image.fromarray(images["large"]).save(base / "large.png")
    (root / ".version").write_text("1.0-1\n")
    table = {"fake-photos": PackageSource("fake", "CC0-1.0", "usr/share/fake/", {
        "tagged": "tagged.jpg", "sideways": Photo("sideways.png", rotate=90), "strip": Photo("strip.png", crop=(0, 0, 64, 50)),
        "alpha": "alpha.png", "large": "large.png"})}
    return tmp_path / "cache", table, images


def test_package_photos_are_read_upright_cropped_and_capped(fixture_package):
    cache, table, originals = fixture_package
    roots = find_package_roots(cache, table=table)
    assert roots == {"fake-photos": (cache / "root" / "fake-photos", "1.0-1")}
    images, records = load_package_images(roots, table)
    assert images["fake-tagged"].shape == (60, 40, 3)  # EXIF orientation applied
    np.testing.assert_array_equal(images["fake-sideways"], np.rot90(originals["sideways"], k=-1))  # clockwise
    np.testing.assert_array_equal(images["fake-strip"], originals["strip"][:50])
    np.testing.assert_array_equal(images["fake-alpha"], originals["alpha"])
    assert max(images["fake-large"].shape[:2]) == MAX_SIDE
    assert records["fake-large"]["original_width"] == 2 * MAX_SIDE + 10
    assert records["fake-sideways"]["rotate"] == 90 and records["fake-strip"]["crop"] == [0, 0, 64, 50]
    assert records["fake-alpha"]["source"] == "deb:fake-photos=1.0-1:/usr/share/fake/alpha.png"
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in images.values())


def test_missing_package_file_is_a_clear_error(fixture_package):
    cache, table, _ = fixture_package
    roots = find_package_roots(cache, table=table)
    (cache / "root/fake-photos/usr/share/fake/strip.png").unlink()
    with pytest.raises(FileNotFoundError, match="strip.png is missing"):
        load_package_images(roots, table)


def test_near_duplicates_catch_copies_rescales_and_crops_only():
    wide = _texture(480, 640, 10)
    held = wide[100:340, 150:470]  # the held-out photograph is a crop of a wider one
    crop = np.asarray(Image.fromarray(held[40:200, 60:260]).resize((150, 120), Image.BICUBIC))
    rescaled = np.asarray(Image.fromarray(held).resize((160, 120), Image.LANCZOS))
    candidates = {"crop": crop, "rescaled": rescaled, "wider": wide, "copy": held.copy(),
                  "other": _texture(240, 320, 11), "flat": np.full_like(held, 128)}
    hits = find_near_duplicates(candidates, {"held": held})
    assert {h[0] for h in hits} == {"crop", "rescaled", "wider", "copy"}
    assert all(h[1] == "held" and h[2] >= 0.85 for h in hits)
    assert next(h[2] for h in hits if h[0] == "copy") > 0.99


def test_written_splits_reload_bit_for_bit(tmp_path):
    names = ["astronaut", TUNING_IMAGES[0], "mate-garden", "opencv-plant"]
    images = {n: _texture(40 + 8 * i, 48, 20 + i) for i, n in enumerate(names)}
    sources = {n: {"source": f"test:{n}"} for n in names}
    first = write_dataset(tmp_path / "a", images, sources)
    second = write_dataset(tmp_path / "b", images, sources)
    assert first["images"] == second["images"]
    assert first["val"] == ["astronaut"] and first["tune"] == [TUNING_IMAGES[0]]
    assert first["train"] == ["mate-garden", "opencv-plant"]
    assert first["version"] == D.DATASET_VERSION
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for split in ("train", "val", "tune"):
        reloaded = load_split(tmp_path / "a", split)
        for name, array in reloaded.items():
            np.testing.assert_array_equal(array, images[name])
            record = next(r for r in manifest["images"] if r["name"] == name)
            assert record["split"] == split and record["sha256"] == D.hashlib.sha256(array.tobytes()).hexdigest()
    crops = RandomCrops(tmp_path / "a", split="tune", size=16, seed=0)
    assert crops.names == [TUNING_IMAGES[0]] and tuple(crops[3].shape) == (3, 16, 16)
    assert RandomCrops(tmp_path / "a", size=16).names == ["mate-garden", "opencv-plant"]  # train excludes val and tune


def test_version1_manifest_has_no_tune_split(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(_texture(32, 32, 0)).save(tmp_path / "train" / "x.png")
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "train": ["x"], "val": []}))
    assert list(load_split(tmp_path, "train")) == ["x"]
    with pytest.raises(FileNotFoundError, match="no tune images"):
        load_split(tmp_path, "tune")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_fetch_downloads_and_extracts_without_root(tmp_path, monkeypatch):
    """A real .deb built here; a stand-in apt-get 'downloads' it into the current folder."""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/fake").mkdir(parents=True)
    Image.fromarray(_texture(32, 48, 7)).save(pkg / "usr/share/fake/a.png")
    (pkg / "DEBIAN" / "control").write_text("Package: fake-photos\nVersion: 2.5-1\nArchitecture: all\n"
                                            "Maintainer: test <t@example.org>\nDescription: test\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(repo / "fake-photos_2.5-1_all.deb")],
                   check=True, capture_output=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    apt = bindir / "apt-get"
    apt.write_text(f'#!/bin/sh\n[ "$1" = download ] && [ -f "{repo}/$2_2.5-1_all.deb" ] && cp "{repo}/$2_2.5-1_all.deb" . && exit 0\n'
                   'echo "E: Unable to locate package $2" >&2; exit 100\n')
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    table = {"fake-photos": PackageSource("fake", "CC0-1.0", "usr/share/fake/", {"a": "a.png"}),
             "not-there": PackageSource("none", "CC0-1.0", "usr/share/none/", {"b": "b.png"})}
    log = []
    roots = fetch_packages(tmp_path / "cache", ["fake-photos"], table, echo=log.append)
    assert roots == {"fake-photos": (tmp_path / "cache/root/fake-photos", "2.5-1")} and log == ["apt-get download fake-photos"]
    assert fetch_packages(tmp_path / "cache", ["fake-photos"], table, echo=log.append) == roots and len(log) == 1  # cached
    images, _ = load_package_images(roots, table)
    assert images["fake-a"].shape == (32, 48, 3)
    with pytest.raises(RuntimeError, match="could not download: not-there"):
        fetch_packages(tmp_path / "cache", None, table, echo=log.append)
    with pytest.raises(ValueError, match="not among the photo packages"):
        fetch_packages(tmp_path / "cache", ["nope"], table)

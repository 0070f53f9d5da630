"""The Fashion-MNIST domain: the data reader, the image files for the file-based commands, the
shipped test images and the shipped `fashion` model (loaded by name, never the default)."""

import gzip
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffstategrad import load_prior
from diffstategrad.data import fashion_image_files, load_fashion_mnist
from diffstategrad.images import fashion_examples, load_image


def write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    folder = tmp_path / "fashion"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    monkeypatch.setenv("DIFFSTATEGRAD_FASHION_MNIST", str(folder))
    monkeypatch.setenv("DIFFSTATEGRAD_CACHE", str(tmp_path / "cache"))
    return images


def test_the_reader_pads_to_32_and_keeps_the_pixels(fake_fashion):
    images, labels = load_fashion_mnist("test", labels=True)
    assert images.shape == (5, 32, 32) and labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(images[:, 2:30, 2:30], fake_fashion) and images[:, :2].max() == 0


def test_image_files_round_trip_and_are_kept(fake_fashion, tmp_path):
    paths = fashion_image_files(3, "test")
    assert [p.name for p in paths] == ["test-00000.png", "test-00001.png", "test-00002.png"]
    x = load_image(paths[1], None, channels=1).image
    assert x.shape == (1, 1, 32, 32)
    torch.testing.assert_close(x[0, 0, 2:30, 2:30], torch.from_numpy(fake_fashion[1]).float() / 127.5 - 1, rtol=0, atol=1e-6)
    stamp = paths[0].stat().st_mtime_ns
    assert fashion_image_files(3, "test")[0].stat().st_mtime_ns == stamp  # right content: not rewritten
    with pytest.raises(ValueError, match="holds 5 images"):
        fashion_image_files(6, "test")


def test_a_missing_dataset_is_one_line_from_the_cli(tmp_path, monkeypatch):
    from diffstategrad.cli import main

    monkeypatch.setenv("DIFFSTATEGRAD_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setattr("diffstategrad.data.FASHION_MNIST_DIR", tmp_path / "nowhere-either")
    r = CliRunner().invoke(main, ["evaluate", "--images", "fashion-test:4", "--tasks", "box_inpainting", "--solvers", "tv",
                                  "--out", str(tmp_path / "eval")])
    assert r.exit_code == 1 and "dataset-fashion-mnist" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "eval").exists()


def test_shipped_test_images():
    files = fashion_examples()
    assert len(files) == 8
    x = torch.cat([load_image(p, None, channels=1).image for p in files])
    assert x.shape == (8, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.3


def test_the_fashion_model_loads_by_name_and_is_not_the_default():
    from diffstategrad.pipeline import default_size, resolve_model
    from diffstategrad.priors.builtin import list_builtin, load_builtin

    prior = load_prior("fashion")
    assert prior.kind == "pixel" and prior.channels == 1 and prior.info["default"] is False
    assert default_size(prior) == 32
    x = torch.zeros(2, 1, 32, 32)
    eps = prior.eps(x, torch.tensor([10, 900]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert resolve_model(None, "dps", torch.device("cpu"))[1] == "builtin:pixel"
    assert load_builtin().channels == 3  # the default pixel model stays the photo model
    assert [m["name"] for m in list_builtin()][:2] == ["pixel", "fashion"]


def test_models_lists_it_without_the_default_tag():
    from diffstategrad.cli import main

    out = CliRunner().invoke(main, ["models"]).output
    assert "pixel (default)" in out and "\nfashion\n" in out
    rows = json.loads(CliRunner().invoke(main, ["models", "--json"]).output)
    assert next(r for r in rows if r["name"] == "fashion")["info"]["image_size"] == 32


def test_evaluate_on_the_shipped_images_with_the_fashion_model(tmp_path):
    from diffstategrad.cli import main

    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", "--images", "fashion-examples", "--model", "fashion", "--tasks", "super_resolution",
                                  "--solvers", "tv,dps", "--steps", "3", "--out", str(out), "--lpips", "none"])
    assert r.exit_code in (0, 3), r.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {rec["image"] for rec in records} == {p.stem for p in fashion_examples()}
    assert {rec["solver"] for rec in records} == {"tv", "dps"}


@pytest.mark.parametrize("task", ["box_inpainting", "super_resolution", "gaussian_deblur", "motion_deblur", "phase_retrieval",
                                  "rand_inpainting", "hdr", "nonlinear_deblur"])
def test_every_task_runs_on_one_channel_images(task):
    from diffstategrad import DiffStateGrad, load_task, solve

    prior = load_prior("fashion")
    x = torch.cat([load_image(p, None, channels=1).image for p in fashion_examples()[:2]])
    problem = load_task(task).build((1, 32, 32), seeds=[0, 1])
    y = problem.measure(x)
    for solver in ("dps", "tv"):
        r = solve(solver, prior, problem.operator, y, shape=(1, 32, 32), seeds=[0, 1],
                  projector=DiffStateGrad() if solver == "dps" else None, **({"steps": 2} if solver == "dps" else {"steps": 5}))
        assert r.x.shape == (2, 1, 32, 32) and torch.isfinite(r.x).all(), (task, solver)

"""benchmarks/tune_builtin.py: tunes the builtin profile on tuning images only, with and without
DiffStateGrad, and prints each task's best value."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from diffstategrad.images import example_path
from diffstategrad.presets import solver_defaults

sys.path.insert(0, str(Path(__file__).parent))

from script_helpers import load_script  # noqa: E402


@pytest.fixture(scope="module")
def tune():
    return load_script("benchmarks/tune_builtin.py")


def _run(tune, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["tune_builtin.py", *args])
    tune.main()


def test_it_prints_the_best_multiple_of_the_plain_default_for_the_projected_run(tune, tmp_path, monkeypatch, capsys):
    images = tmp_path / "tune-images"
    images.mkdir()
    shutil.copy(example_path("grace_hopper"), images / "tuning-photo.png")
    out = tmp_path / "out"
    _run(tune, monkeypatch, "--images", str(images), "--limit-images", "1", "--solvers", "dps", "--tasks", "box_inpainting",
         "--multipliers", "0.3,3", "--size", "16", "--diffstategrad", "with", "--workers", "1", "--out", str(out))
    printed = capsys.readouterr().out
    assert "builtin.with_diffstategrad.tasks" in printed
    records = [json.loads(line) for line in (out / "dps-with-dsg" / "records.jsonl").read_text().splitlines()]
    assert {r["diffstategrad"] for r in records} == {True}
    plain = solver_defaults("dps", "box_inpainting", "builtin")["guidance_scale"]
    # shared defaults: the multiples are of the plain value, whatever the profile holds for the projected run
    assert sorted(r["guidance_scale"] for r in records) == pytest.approx(sorted([0.3 * plain, 3 * plain]))
    best = max(records, key=lambda r: r["psnr"] if r["psnr"] is not None else float("-inf"))
    value = float(re.search(r"box_inpainting: \{guidance_scale: ([0-9.e+-]+)\}", printed).group(1))
    assert value == pytest.approx(best["guidance_scale"], rel=1e-2)


def test_it_refuses_held_out_images(tune, tmp_path, monkeypatch):
    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(example_path("chelsea"), images / "chelsea.png")  # chelsea is one of the held-out photographs
    with pytest.raises(SystemExit, match="held-out"):
        _run(tune, monkeypatch, "--images", str(images), "--limit-images", "1", "--solvers", "dps", "--tasks", "box_inpainting",
             "--out", str(tmp_path / "out"))

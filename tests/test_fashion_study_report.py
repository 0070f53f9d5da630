"""scripts/fashion_study_report.py: one report over the study's per-task folders and its noise run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from script_helpers import load_script  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return load_script("scripts/fashion_study_report.py")


def _write(folder: Path, task: str, gain: dict, tv: float) -> None:
    folder.mkdir(parents=True)
    lines = []
    for seed in (0, 1):
        for image in ("a", "b"):
            lines.append({"task": task, "solver": "tv", "diffstategrad": False, "guidance_multiplier": 1.0, "seed": seed, "image": image,
                          "samples": 1, "psnr": tv, "failed": False, "seconds": 0.01})
            for mult in (1.0, 3.0):
                base = 20.0 - mult
                for dsg in (False, True):
                    psnr = base + (gain[seed] * mult if dsg else 0.0)
                    lines.append({"task": task, "solver": "dps", "diffstategrad": dsg, "guidance_multiplier": mult, "seed": seed,
                                  "image": image, "samples": 1, "psnr": psnr, "failed": False, "seconds": 0.2})
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_report_pairs_seeds_and_labels_the_noise_run(report, tmp_path, capsys):
    study = tmp_path / "fashion-study-full"
    _write(study / "box_inpainting", "box_inpainting", {0: 1.0, 1: 0.5}, tv=15.0)
    _write(tmp_path / "fashion-study-full-noise0.2", "box_inpainting", {0: 2.0, 1: 2.0}, tv=12.0)
    report.main([str(study), "--figures", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    # x3: seed 0 gains 3 dB, seed 1 1.5 dB; 4 pairs per cell (2 images x 2 seeds)
    assert "| box_inpainting | dps | 3 | 4 | 17.00 | 19.25 | +2.25" in out
    assert "+3.00 / +1.50" in out
    assert "| box_inpainting@noise0.2 | dps | 1 | 4 | 19.00 | 21.00 | +2.00" in out
    # own best: without x1 (19.00), with x1 too (19.75 against 17 + 2.25 at x3)
    assert "| box_inpainting | 15.00 | dps | 19.00 (x1) | 19.75 (x1) | +0.75 |" in out
    assert "| box_inpainting@noise0.2 | 12.00 | dps |" in out
    assert (tmp_path / "fig_paired.png").stat().st_size > 0 and (tmp_path / "fig_robustness.png").stat().st_size > 0


def test_an_empty_study_folder_says_so(report, tmp_path):
    with pytest.raises(SystemExit, match="no records"):
        report.main([str(tmp_path)])

"""benchmarks/results_table.py: the solver x task table, and every solver beside a classical one."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from script_helpers import load_script  # noqa: E402


def _module():
    return load_script("benchmarks/results_table.py")


def _records(path: Path) -> Path:
    lines = []
    for image in ("a", "b"):
        base = dict(image=image, seed=0, samples=1, failed=False, seconds=0.1, ssim=0.5, guidance_multiplier=1.0)
        lines.append({**base, "task": "box", "solver": "tv", "diffstategrad": False, "psnr": 20.0, "lpips": 0.25, "guidance_scale": None})
        lines.append({**base, "task": "box", "solver": "dps", "diffstategrad": False, "psnr": 21.0, "lpips": 0.20, "guidance_scale": 15.0})
        lines.append({**base, "task": "box", "solver": "dps", "diffstategrad": True, "psnr": 20.5, "lpips": 0.24, "guidance_scale": 4.5})
        lines.append({**base, "task": "deblur", "solver": "tv", "diffstategrad": False, "psnr": 30.0, "lpips": 0.05, "guidance_scale": None})
        lines.append({**base, "task": "deblur", "solver": "dps", "diffstategrad": False, "psnr": 28.0, "lpips": 0.04, "guidance_scale": 3.0})
        lines.append({**base, "task": "deblur", "solver": "dps", "diffstategrad": True, "psnr": 27.0, "lpips": 0.06, "guidance_scale": 3.0})
        # another multiple: left out of the x1 table
        lines.append({**base, "task": "box", "solver": "dps", "diffstategrad": True, "psnr": 5.0, "lpips": 0.9, "guidance_scale": 45.0,
                      "guidance_multiplier": 10.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_every_solver_beside_tv_with_the_verdict_per_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(_records(tmp_path / "records.jsonl")), "--against", "tv"])
    _module().main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    box, deblur = rows
    assert box[1].strip() == "box" and box[2].strip() == "20.00 / 0.250" and box[4].strip() == "21.00 / 0.200"
    assert box[5].strip() == "20.50 / 0.240" and box[6].strip() == "-0.50"  # the x10 record is not averaged in
    assert box[7].strip().startswith("yes (dps: LPIPS -0.050, PSNR +1.00)")
    assert deblur[7].strip().startswith("no (dps: LPIPS -0.010")  # lower LPIPS, but by less than 0.03 and with a lower PSNR


def test_the_plain_table_reads_the_multiplier_not_the_absolute_value(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(_records(tmp_path / "records.jsonl"))])
    _module().main()
    out = capsys.readouterr().out
    assert "| dps | box | 2 | 21.00 | 20.50 | -0.50 |" in out and "| dps | deblur | 2 | 28.00 | 27.00 | -1.00 |" in out

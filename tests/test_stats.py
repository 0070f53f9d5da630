"""Paired comparisons with bootstrap intervals (diffstategrad.stats)."""

import math

import numpy as np

from diffstategrad.stats import bootstrap_mean_ci, paired_differences, paired_figure, write_paired


def test_the_interval_covers_the_true_mean_at_about_its_level():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        _, lo, hi = bootstrap_mean_ci(rng.normal(0.3, 1.0, 60), reps=1000, seed=int(rng.integers(1 << 30)))
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / 200 <= 0.99  # percentile bootstrap: close to 95 % at n = 60


def test_interval_edges():
    assert bootstrap_mean_ci([2.0]) [0] == 2.0 and math.isnan(bootstrap_mean_ci([2.0])[1])
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    mean, lo, hi = bootstrap_mean_ci([1.0, 1.0, 1.0])
    assert mean == lo == hi == 1.0


def record(image, seed, dsg, psnr, mult=1.0, failed=False, solver="dps"):
    return {"task": "box_inpainting", "solver": solver, "image": image, "seed": seed, "samples": 1, "diffstategrad": dsg,
            "guidance_multiplier": mult, "psnr": psnr, "failed": failed}


def test_pairs_are_matched_by_image_and_seed(tmp_path):
    recs = []
    for i in range(10):
        for seed in (0, 1):
            base = 20.0 + i + seed
            recs += [record(f"im{i}", seed, False, base), record(f"im{i}", seed, True, base + 0.5 + 0.1 * seed, failed=(i == 0))]
    recs.append(record("lonely", 0, True, 99.0))  # no partner: not paired
    recs.append(record("im0", 0, False, 20.0, solver="tv"))  # a classical solver has one mode only: no row
    rows = paired_differences(recs)
    assert len(rows) == 1
    r = rows[0]
    assert r["pairs"] == 20 and math.isclose(r["difference"], 0.55) and r["ci_low"] <= 0.55 <= r["ci_high"]
    assert r["better_share"] == 1.0 and r["with_failure_rate"] == 0.1 and r["without_failure_rate"] == 0.0
    assert math.isclose(r["without_p05"], float(np.percentile([20.0 + i + s for i in range(10) for s in (0, 1)], 5)))
    write_paired(rows, tmp_path)
    paired_figure(rows, tmp_path / "paired_psnr.png")
    assert "+0.55" in (tmp_path / "paired_psnr.md").read_text() and (tmp_path / "paired_psnr.csv").is_file()
    assert (tmp_path / "paired_psnr.png").stat().st_size > 1000


def test_lower_is_better_metrics_flip_the_better_share():
    recs = [record("a", 0, False, 0.3), record("a", 0, True, 0.2), record("b", 0, False, 0.3), record("b", 0, True, 0.4)]
    for r in recs:
        r["lpips"] = r.pop("psnr")
    row = paired_differences(recs, "lpips", higher_is_better=False)[0]
    assert row["better_share"] == 0.5 and math.isclose(row["without_p05"], 0.3)

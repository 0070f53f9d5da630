import json

import pytest

from diffstategrad.evaluate import item_key, make_grid, robustness_figure, summarize, write_summary
from diffstategrad.records import RecordStore


def _rec(image="a", task="hdr", solver="dps", dsg=False, scale=1.0, seed=0, psnr=20.0, failed=False):
    return dict(image=image, task=task, solver=solver, diffstategrad=dsg, guidance_scale=scale, seed=seed, psnr=psnr, ssim=0.5, lpips=0.3, failed=failed, seconds=1.0)


def test_store_appends_once_and_reloads(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, item_key)
    assert store.append(_rec(seed=0)) and store.append(_rec(seed=1))
    assert not store.append(_rec(seed=1, psnr=99.0))  # same key: never written twice
    again = RecordStore(path, item_key)
    assert len(again) == 2 and item_key(_rec(seed=1)) in again
    assert len(path.read_text().splitlines()) == 2


def test_store_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    good = json.dumps(_rec())
    path.write_text(good + "\n" + good[: len(good) // 2])  # a crash in the middle of a write
    store = RecordStore(path, item_key)
    assert len(store) == 1 and store.dropped_lines == 1
    assert path.read_text() == good + "\n"  # repaired on disk
    store.append(_rec(seed=5))
    assert [json.loads(line)["seed"] for line in path.read_text().splitlines()] == [0, 5]


def test_grid_covers_every_combination_once():
    items = make_grid(["a", "b"], ["hdr", "box_inpainting"], ["dps"], [0.5, 1.0, 2.0], [0, 1])
    assert len(items) == 2 * 2 * 1 * 3 * 2 * 2
    assert len({it.key for it in items}) == len(items)


def test_summary_statistics_and_files(tmp_path):
    records = [_rec(seed=s, psnr=p, failed=f) for s, p, f in [(0, 20.0, False), (1, 22.0, False), (2, 12.0, True)]]
    records += [_rec(seed=0, dsg=True, psnr=25.0)]
    rows = summarize(records)
    assert len(rows) == 2
    base = next(r for r in rows if not r["diffstategrad"])
    assert base["n"] == 3 and base["psnr_mean"] == pytest.approx(18.0) and base["psnr_worst"] == 12.0
    assert base["failure_rate"] == pytest.approx(1 / 3) and base["lpips_worst"] == 0.3
    write_summary(rows, tmp_path)
    assert (tmp_path / "summary.csv").read_text().startswith("task,solver,diffstategrad,guidance_scale,n,")
    md = (tmp_path / "summary.md").read_text()
    assert "18.00 +- " in md and "33%" in md
    robustness_figure(rows, tmp_path / "robustness_psnr.png")
    assert (tmp_path / "robustness_psnr.png").stat().st_size > 1000

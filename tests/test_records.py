import json

import pytest

from diffstategrad.evaluate import item_key, make_grid, robustness_figure, summarize, write_summary
from diffstategrad.records import FolderInUseError, FolderLock, RecordStore, guidance_multiplier


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
    assert (tmp_path / "summary.csv").read_text().startswith("task,solver,diffstategrad,guidance_multiplier,n,")
    md = (tmp_path / "summary.md").read_text()
    assert "18.00 +- " in md and "33%" in md
    robustness_figure(rows, tmp_path / "robustness_psnr.png")
    assert (tmp_path / "robustness_psnr.png").stat().st_size > 1000


def test_legacy_records_keep_their_keys():
    """Records written before the rename kept the multiplier under guidance_scale."""
    legacy = _rec(scale=2.0)
    new = {**_rec(), "guidance_multiplier": 2.0, "guidance_scale": 0.6}
    assert guidance_multiplier(legacy) == guidance_multiplier(new) == 2.0
    assert item_key(legacy) == item_key(new)


def test_fifth_percentile_and_classical_items():
    records = [_rec(seed=s, psnr=float(s)) for s in range(21)]
    (row,) = summarize(records)
    assert row["psnr_p05"] == pytest.approx(1.0) and row["lpips_p05"] == pytest.approx(0.3)
    items = make_grid(["a"], ["hdr"], ["tv", "dps"], [0.5, 1.0], [0])
    assert sum(it.solver == "tv" for it in items) == 1  # no guidance, no projector to vary
    assert sum(it.solver == "dps" for it in items) == 4


def test_folder_lock_names_the_holder(tmp_path):
    import os
    import subprocess
    import sys

    with FolderLock(tmp_path):
        code = ("import sys; from diffstategrad.records import FolderLock, FolderInUseError\n"
                "try:\n FolderLock(sys.argv[1]).acquire()\nexcept FolderInUseError as e:\n print(e); sys.exit(7)")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 7 and f"pid {os.getpid()}" in r.stdout
    FolderLock(tmp_path).acquire().release()  # free again once released


def test_records_without_the_cost_fields_still_summarise(tmp_path):
    """Records written before wall_seconds / network_calls / peak_memory_mb existed: NaN in the
    summary's cost columns, "-" in summary.md; new and old records mix in one cell."""
    import math

    (row,) = summarize([_rec(seed=0), _rec(seed=1)])
    assert row["seconds_mean"] == 1.0
    for key in ("wall_seconds_mean", "network_calls_mean", "autoencoder_calls_mean", "peak_memory_mb_mean", "peak_memory_mb_max"):
        assert math.isnan(row[key]), key
    assert row["peak_memory_kind"] is None
    write_summary([row], tmp_path)
    assert "| 1.00 | - | - |" in (tmp_path / "summary.md").read_text()
    new = {**_rec(seed=2), "wall_seconds": 3.0, "network_calls": 50, "autoencoder_calls": 0, "peak_memory_mb": 812.5,
           "peak_memory_kind": "cuda_max_allocated", "device": "cuda:1"}
    (row,) = summarize([_rec(seed=0), new])
    assert row["network_calls_mean"] == 50 and row["peak_memory_mb_max"] == 812.5 and row["wall_seconds_mean"] == 3.0
    write_summary([row], tmp_path)
    assert "| 50 | 812 (CUDA) |" in (tmp_path / "summary.md").read_text()



def test_network_calls_are_counted_per_thread():
    """Two threads sharing one prior each count their own passes, and one thread's pass in
    progress does not make the other's look nested (before: one flag and one counter per prior,
    so B's passes, made while A was inside one, ran plainly and uncounted)."""
    import threading

    import torch

    from diffstategrad.priors.analytic import GaussianPrior
    from diffstategrad.priors.base import count_network_calls

    inside, release = threading.Event(), threading.Event()

    class HeldPrior(GaussianPrior):  # thread A stays inside its first pass until released
        def eps(self, x_t, t):
            if threading.current_thread().name == "A" and not inside.is_set():
                inside.set()
                assert release.wait(10)
            return super().eps(x_t, t)

    prior = HeldPrior(shape=(1, 4, 4))
    x = torch.zeros(1, 1, 4, 4)
    counted = {}

    def worker(n):
        with count_network_calls(prior) as calls:
            for _ in range(n):
                prior.eps(x, 10)
        counted[threading.current_thread().name] = calls.network

    a = threading.Thread(target=worker, args=(3,), name="A")
    b = threading.Thread(target=worker, args=(5,), name="B")
    a.start()
    assert inside.wait(10)
    b.start()
    b.join(10)
    release.set()
    a.join(10)
    assert counted == {"A": 3, "B": 5}
    assert prior.network_calls == 8

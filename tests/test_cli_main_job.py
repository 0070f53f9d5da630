"""End to end: `diffstategrad solve` and `diffstategrad evaluate` on a tiny model folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from diffstategrad.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_solve_compare_writes_every_output(tiny_model, tmp_path):
    out = tmp_path / "solve"
    r = _run(["solve", "--task", "super_resolution", "--compare", "--model", tiny_model, "--steps", "4", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("ground_truth.png", "measurement.png", "reconstruction.png", "reconstruction_baseline.png", "reconstruction_tv.png",
                 "comparison.png", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("psnr", "ssim", "lpips", "seconds"):
        assert key in metrics and key in metrics["baseline"] and key in metrics["diffstategrad"] and key in metrics["tv"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["solver_kwargs"]["steps"] == 4 and config["diffstategrad"]["var_cutoff"] == 0.99
    # the classical panel runs at its own preset settings: --steps 4 does not cut TV's iterations
    assert config["classical"] == "tv" and config["classical_kwargs"]["steps"] == 300
    assert metrics["tv"]["network_calls"] == 0
    # five panels in one row: ground truth, measurement, TV, without, with
    width, height = Image.open(out / "comparison.png").size
    assert width > 3.5 * height  # (two rows would be about 1.3 times as wide as high)
    assert config["task"]["name"] == "super_resolution" and config["size"] == 64
    # the super-resolution measurement is shown upsampled to the image size
    assert Image.open(out / "measurement.png").size == (64, 64)
    # an existing folder is refused without --overwrite, accepted with it
    again = CliRunner().invoke(main, ["solve", "--task", "hdr", "--model", tiny_model, "--steps", "2", "--out", str(out), "--quiet"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert _run(["solve", "--task", "hdr", "--model", tiny_model, "--steps", "2", "--out", str(out), "--quiet", "--overwrite", "--no-diffstategrad"]).exit_code == 0


def test_solve_converts_grayscale_and_reports_it(tiny_model, tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (80, 80), 128).save(gray)
    r = CliRunner().invoke(main, ["solve", "--task", "hdr", "--image", str(gray), "--model", tiny_model, "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0 and "grayscale" in r.output.lower()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nope"], "unknown task"),
        (["--task", "hdr", "--solver", "nope"], "unknown solver"),
        (["--task", "hdr", "--model", "no-such-model"], "unknown model"),
        (["--task", "hdr", "--image", "/no/such/file.png"], "image not found"),
        (["--task", "hdr", "--size", "60"], "multiples of 8"),
        (["--task", "hdr", "--solver", "resample"], "latent"),
        (["--task", "hdr", "--compare", "--no-diffstategrad"], "exclude"),
        (["--task", "hdr", "--compare", "--classical", "dps"], "not a classical solver"),
        (["--task", "hdr", "--compare", "--classical", "nope"], "unknown solver"),
        (["--task", "hdr", "--task-option", "noise.sigmaa=1"], "unknown override"),
    ],
)
def test_solve_errors_are_one_line(tiny_model, tmp_path, args, message):
    if "--model" not in args:
        args = args + ["--model", tiny_model]
    r = CliRunner().invoke(main, ["solve", *args, "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_solve_refuses_a_classical_solver_the_task_does_not_allow_before_the_long_solves(tiny_model, tmp_path):
    r = CliRunner().invoke(main, ["solve", "--task", "phase_retrieval", "--compare", "--classical", "pseudo-inverse", "--model", tiny_model,
                                  "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: --classical pseudo-inverse:") and "nonlinear" in last
    assert not (tmp_path / "o" / "reconstruction.png").exists()


def test_solve_rejects_an_unreadable_image(tiny_model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = CliRunner().invoke(main, ["solve", "--task", "hdr", "--image", str(bad), "--model", tiny_model, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "error:" in r.output and "Traceback" not in r.output


EVAL = ["evaluate", "--tasks", "box_inpainting,hdr", "--solvers", "dps", "--guidance-scales", "0.5,1", "--seeds", "0,1", "--steps", "3", "--quiet"]


def test_evaluate_grid_summary_and_figures(tiny_model, tmp_path):
    out = tmp_path / "eval"
    r = _run([*EVAL, "--model", tiny_model, "--out", str(out), "--workers", "2"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 1 * 2 * 2 * 2  # images x tasks x solvers x scales x seeds x projector
    for key in ("image", "task", "solver", "diffstategrad", "guidance_multiplier", "guidance_scale", "seed", "psnr", "ssim", "lpips", "failed", "seconds"):
        assert key in records[0]
    assert (out / "summary.csv").is_file() and "| box_inpainting | dps |" in (out / "summary.md").read_text()
    for name in ("robustness_psnr.png", "image_grid.png"):
        assert (out / name).stat().st_size > 1000
    # same command again: nothing to do, nothing duplicated
    assert _run([*EVAL, "--model", tiny_model, "--out", str(out)]).exit_code == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == len(records)
    # another experiment in the same folder is refused
    other = CliRunner().invoke(main, [*EVAL[:-1], "--model", tiny_model, "--out", str(out), "--period", "2"])
    assert other.exit_code != 0 and "other settings" in other.output


def test_evaluate_survives_being_killed(tiny_model, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffstategrad.cli", *EVAL, "--model", tiny_model, "--out", str(out)]
    cmd[cmd.index("3")] = "15"  # slower items, so the kill lands mid-run
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(records.read_text().splitlines())
    assert 3 <= partial < 48
    with open(records, "a") as f:  # and a record torn in half by the kill
        f.write('{"image": "chelsea", "task": "hd')
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 3), r.stderr  # 3: some of the tiny random model's 15-step results are worse than grey
    assert "resuming" in r.stderr
    lines = records.read_text().splitlines()
    keys = [(d["image"], d["task"], d["solver"], d["diffstategrad"], d["guidance_multiplier"], d["seed"]) for d in map(json.loads, lines)]
    assert len(keys) == 48 and len(set(keys)) == 48


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def _alive(pids) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("how", ["SIGINT", "SIGINT to the group", "SIGTERM", "SIGKILL"])
def test_stopping_evaluate_stops_its_workers(tiny_model, tmp_path, how):
    """SIGINT (`kill -INT`; Ctrl-C in a terminal, which signals the whole process group, workers
    included) and SIGTERM end the run (exit 130, workers stopped at once); after a SIGKILL of the
    parent the orphaned workers exit by themselves instead of computing on."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "diffstategrad.cli", *EVAL, "--model", tiny_model, "--out", str(out), "--workers", "2"]
    cmd[cmd.index("3")] = "400"  # items far longer than the test
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and len(workers) < 2:  # two pool workers (plus the resource tracker)
        time.sleep(0.5)
        workers = {p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")}
    assert len(workers) == 2
    time.sleep(3)  # let them start on their items
    if how == "SIGINT to the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=60)
    if how != "SIGKILL":
        assert code == 130 and "interrupted" in proc.stderr.read()
    deadline = time.time() + 30
    while time.time() < deadline and _alive(workers):
        time.sleep(0.2)
    assert not _alive(workers)


def test_evaluate_on_a_local_ray_instance(tiny_model, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    r = _run(["evaluate", "--images", "examples", "--tasks", "hdr", "--solvers", "dps", "--seeds", "0", "--steps", "2", "--quiet", "--model", tiny_model, "--out", str(out), "--ray", "local"])
    assert r.exit_code == 0, r.output
    assert len((out / "records.jsonl").read_text().splitlines()) == 3 * 2


def test_batched_evaluation_gives_the_same_records(tiny_model, tmp_path):
    args = ["evaluate", "--tasks", "motion_deblur", "--solvers", "dps", "--seeds", "3", "--steps", "4", "--quiet", "--model", tiny_model]
    assert _run([*args, "--batch", "1", "--out", str(tmp_path / "one")]).exit_code == 0
    assert _run([*args, "--batch", "3", "--out", str(tmp_path / "three")]).exit_code == 0

    def load(name):
        rows = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        return {(r["image"], r["diffstategrad"]): r for r in rows}

    one, three = load("one"), load("three")
    assert one.keys() == three.keys() and len(one) == 6
    assert {r["batch"] for r in three.values()} == {3}
    for k in one:
        assert abs(one[k]["psnr"] - three[k]["psnr"]) < 1e-3 and abs(one[k]["ssim"] - three[k]["ssim"]) < 1e-4

"""`diffstategrad serve` without a browser: the request checks, the upload checks, the adapter
(`Engine.run_pair`: progress, both runs, latent decoding, cancel, one-line errors, downloads) and
the running server (two sessions at once do not mix their results; the CLI's one-line errors)."""

import json
import socket
import threading

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffstategrad.cli import main
from diffstategrad.web import RUNS, Engine, JobCancelled, JobError, JobRequest, Limits, RequestError, validate_request

TASKS = ["box_inpainting", "super_resolution", "nonlinear_deblur"]
SOLVERS = ["dps", "psld", "daps"]
EXAMPLES = ["grace_hopper", "chelsea", "coffee"]


def form(**changes) -> dict:
    values = dict(task="box_inpainting", solver="dps", image="grace_hopper", upload=None, size=32, steps=4, guidance_scale=15.0,
                  seed=0, noise_sigma=0.01, task_value=128, var_cutoff=0.99, period=1, rank_rule="reference")
    values.update(changes)
    return values


def check(values: dict, limits: Limits = Limits()) -> JobRequest:
    return validate_request(values, tasks=TASKS, solvers=SOLVERS, examples=EXAMPLES, limits=limits)


def request(**changes) -> JobRequest:
    return check(form(**changes))


@pytest.fixture(scope="module")
def engine():
    return Engine("cpu", threads=1)


# ---------------------------------------------------------------------------------------------
# requests and uploads
# ---------------------------------------------------------------------------------------------


def test_a_valid_form_becomes_a_typed_request():
    r = check(form(size=64.0, steps="10", seed="3", period=0, task_value=96))
    assert (r.size, r.steps, r.seed, r.period, r.task_value) == (64, 10, 3, 0, 96)
    assert isinstance(r.steps, int) and r.upload is None and r.example == "grace_hopper"
    assert check(form(task="nonlinear_deblur", task_value=5)).task_value is None  # no key parameter offered
    uploaded = check(form(image="upload", upload="/tmp/x.png"))
    assert uploaded.upload == "/tmp/x.png"
    assert check(form(image="chelsea", upload="/tmp/x.png")).upload is None  # an example wins when picked


@pytest.mark.parametrize("changes, words", [
    ({"steps": "nan"}, "steps must be a finite number"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 2.5}, "whole number"),
    ({"steps": 5000}, "steps must be <= 1000"),
    ({"guidance_scale": 0}, "guidance step size must be > 0"),
    ({"guidance_scale": float("inf")}, "finite"),
    ({"guidance_scale": "abc"}, "must be a number"),
    ({"var_cutoff": 0}, "tau must be > 0"),
    ({"var_cutoff": 1.5}, "tau must be <= 1"),
    ({"size": 512}, "image size must be <= 256"),
    ({"noise_sigma": -0.1}, "noise sigma must be >= 0"),
    ({"task_value": 1000}, "box side"),
    ({"task": "denoise"}, "unknown task 'denoise'"),
    ({"solver": "ddrm"}, "unknown solver 'ddrm'"),
    ({"image": "upload"}, "no image uploaded"),
    ({"image": "lena"}, "unknown image 'lena'"),
    ({"rank_rule": "max"}, "unknown rank rule"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_bad_form_values_are_refused_in_one_line(changes, words):
    with pytest.raises(RequestError) as err:
        check(form(**changes))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_uploads_are_checked_for_bytes_pixels_and_format(tmp_path):
    engine = Engine("cpu", Limits(max_upload_bytes=5000, max_pixels=100 * 100))
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    big = tmp_path / "big.png"
    Image.new("RGB", (101, 100), "white").save(big)  # 10100 pixels, a few hundred bytes
    heavy = tmp_path / "heavy.bmp"
    Image.new("RGB", (60, 60)).save(heavy)  # 10854 bytes, 3600 pixels
    good = tmp_path / "good.png"
    Image.new("RGB", (100, 100), "red").save(good)
    for path, words in [(text, "notes.png is not an image"), (big, "101x100 (0.0101 megapixels); uploads are limited to 0.01 megapixels"),
                        (heavy, "heavy.bmp is 0.0104 MB; uploads are limited to 0.00477 MB"), (tmp_path / "gone.png", "cannot be read")]:
        with pytest.raises(RequestError) as err:
            engine.check_upload(str(path))
        assert words in str(err.value), str(err.value)
    engine.check_upload(str(good))
    picture, notes = engine.preview("upload", str(good), 32)
    assert picture.size == (32, 32) and picture.getpixel((5, 5)) == (255, 0, 0) and any("resized" in n for n in notes)


def test_an_uploaded_copy_of_an_example_gives_the_same_ground_truth(tmp_path, engine):
    from diffstategrad.images import example_path

    copy = tmp_path / "copy.jpg"
    copy.write_bytes(example_path("chelsea").read_bytes())
    a, label_a, _ = engine.load_input(request(image="chelsea"))
    b, label_b, _ = engine.load_input(request(image="upload", upload=str(copy)))
    assert torch.equal(a, b) and a.shape == (1, 3, 32, 32)
    assert label_a == "example:chelsea" and label_b == "upload:copy.jpg"


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------


def test_defaults_come_from_the_presets(engine):
    assert engine.task_defaults("box_inpainting") == {"noise_sigma": 0.01, "task_value": 128}
    assert engine.task_defaults("rand_inpainting")["task_value"] == 0.7
    assert engine.task_defaults("nonlinear_deblur")["task_value"] is None
    assert engine.solver_defaults("dps", "box_inpainting") == {"steps": 200, "guidance_scale": 15.0}


def test_run_pair_reports_progress_and_scores_both_runs(tmp_path, engine):
    events = []
    result = engine.run_pair(request(steps=4), events.append)
    assert events[0].stage == "measured" and set(events[0].images) == {"ground_truth", "measurement"}
    steps = [(e.stage, e.step, e.total) for e in events[1:]]
    assert steps == [(run, i, 4) for run in RUNS for i in range(1, 5)]
    previews = [e for e in events[1:] if e.images]
    assert {run for e in previews for run in e.images} == set(RUNS) and all(p.size == (32, 32) for e in previews for p in e.images.values())
    assert set(result.images) == {"ground_truth", "measurement", *RUNS}
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in result.images.values())
    for run in RUNS:
        assert {"psnr", "ssim", "lpips", "seconds", "failed", "residual"} <= set(result.metrics[run])
        assert 0 < result.metrics[run]["psnr"] < 60
    assert result.images["baseline"].tobytes() != result.images["diffstategrad"].tobytes()  # the projector changed something
    assert result.config["diffstategrad"]["var_cutoff"] == 0.99 and result.config["solver_kwargs"]["steps"] == 4
    assert result.config["task_parameters_at_size"]["box_size"] == [16, 16]  # 128 at 256 -> 16 at 32

    files = engine.write_outputs(result, tmp_path / "job")
    assert sorted(p.name for p in files) == sorted(["ground_truth.png", "measurement.png", "without_diffstategrad.png",
                                                    "with_diffstategrad.png", "comparison.png", "metrics.json"])
    saved = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert saved["baseline"]["psnr"] == pytest.approx(result.metrics["baseline"]["psnr"])
    assert saved["config"]["request"]["steps"] == 4
    assert Image.open(tmp_path / "job" / "with_diffstategrad.png").tobytes() == result.images["diffstategrad"].tobytes()


def test_a_page_job_gives_the_numbers_of_solve_compare(tmp_path, engine):
    out = CliRunner().invoke(main, ["solve", "--task", "box_inpainting", "--compare", "--steps", "3", "--size", "32", "--seed", "2",
                                    "--image", "coffee", "--quiet", "--out", str(tmp_path / "solve")])
    assert out.exit_code == 0, out.output
    cli = json.loads((tmp_path / "solve" / "metrics.json").read_text())
    page = engine.run_pair(request(steps=3, seed=2, image="coffee")).metrics
    for run in RUNS:
        for metric in ("psnr", "ssim", "lpips", "residual"):
            assert page[run][metric] == pytest.approx(cli[run][metric], rel=1e-6), (run, metric)


def test_task_parameters_reach_the_operator(engine):
    from diffstategrad.operators import load_task

    # a latent solver: its callbacks carry latents (8x8 here), which the previews decode to images
    events = []
    result = engine.run_pair(request(task="super_resolution", solver="psld", task_value=8, steps=2, guidance_scale=1.0), events.append)
    assert result.config["task"]["operator"]["factor"] == 8
    assert load_task("super_resolution").operator["factor"] == 4  # the preset itself is untouched
    previews = [im for e in events for name, im in e.images.items() if name in RUNS]
    assert previews and all(im.size == (32, 32) for im in previews)


def test_cancel_stops_the_job_at_the_next_step(engine):
    stop = threading.Event()
    seen = []

    def on_progress(event):
        seen.append(event.stage)
        if event.stage == "baseline":
            stop.set()

    with pytest.raises(JobCancelled):
        engine.run_pair(request(steps=50), on_progress, stop)
    assert seen == ["measured", "baseline"]


@pytest.mark.parametrize("changes, words", [
    ({"size": 36}, "image size 36"),                                            # the pixel model takes multiples of 8
    ({"solver": "psld", "size": 36}, "image size 36"),                          # and so does the latent one
])
def test_jobs_that_cannot_run_fail_in_one_line(engine, changes, words):
    with pytest.raises(JobError) as err:
        engine.run_pair(request(**changes))
    assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    import os

    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    from diffstategrad.web import serve

    app = serve(port=free_port(), device="cpu", concurrency=2, threads=1, block=False)
    yield app
    app.close()


def test_two_sessions_at_once_get_their_own_results(server, tmp_path):
    from gradio_client import Client

    url = f"http://127.0.0.1:{server.server_port}/"
    assert server.server_name == "127.0.0.1"
    jobs = {"a": dict(image="chelsea", seed=1, task_value=96, steps=2), "b": dict(image="coffee", seed=2, task_value=160, steps=2)}
    results, clients = {}, {}
    for name in jobs:  # one client per session, both submitted before either finishes
        clients[name] = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / name))
    submitted = {}
    for name, changes in jobs.items():
        f = form(**changes)
        submitted[name] = clients[name].submit(
            f["image"], f["upload"], f["task"], f["task_value"], f["noise_sigma"], f["solver"], f["steps"], f["guidance_scale"],
            f["size"], f["seed"], f["var_cutoff"], f["period"], f["rank_rule"], api_name="/run")
    for name, job in submitted.items():
        results[name] = job.result(timeout=300)
    for name, changes in jobs.items():
        status, gt, measurement, without, with_, metrics, files = results[name]
        assert status.startswith("done"), status
        assert "without DiffStateGrad" in metrics and "with DiffStateGrad" in metrics
        saved = json.loads(open(next(f for f in files if f.endswith("metrics.json"))).read())
        assert saved["config"]["request"]["seed"] == changes["seed"]
        assert saved["config"]["image"] == f"example:{changes['image']}"
        assert saved["config"]["task"]["operator"]["box_size"] == changes["task_value"]
        assert str(tmp_path / name) in gt  # each client downloaded its own files
    assert Image.open(results["a"][1]).tobytes() != Image.open(results["b"][1]).tobytes()


def test_a_bad_request_through_the_server_is_a_message(server):
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{server.server_port}/", verbose=False, analytics_enabled=False)
    f = form(guidance_scale=0)  # the page's number box takes 0; the request check refuses it
    status, *_ = client.predict(f["image"], f["upload"], f["task"], f["task_value"], f["noise_sigma"], f["solver"], f["steps"],
                                f["guidance_scale"], f["size"], f["seed"], f["var_cutoff"], f["period"], f["rank_rule"], api_name="/run")
    assert "error" in status and "guidance step size must be > 0" in status


def test_serve_without_gradio_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    out = CliRunner().invoke(main, ["serve", "--port", str(free_port())])
    assert out.exit_code == 1 and "error: the web page needs Gradio" in out.output and "Traceback" not in out.output


def test_serve_on_a_taken_port_is_one_line():
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = CliRunner().invoke(main, ["serve", "--port", str(taken.getsockname()[1]), "--device", "cpu"])
    assert out.exit_code == 1 and "error: cannot serve on 127.0.0.1" in out.output, out.output


def test_serve_options_are_checked():
    for option in ("--max-upload-mb", "--max-megapixels"):
        out = CliRunner().invoke(main, ["serve", option, "nan"])
        assert out.exit_code == 1 and "finite" in out.output
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    for option in ("--host", "--port", "--device", "--concurrency", "--threads", "--max-upload-mb", "--max-megapixels", "--max-size"):
        assert option in help_text


def test_a_page_left_at_the_default_step_gives_each_run_its_own_tuned_default(engine):
    from diffstategrad.presets import solver_defaults

    tuned = solver_defaults("dps", "box_inpainting", "builtin", diffstategrad=True)["guidance_scale"]
    assert tuned != 15.0  # the profile holds a value tuned with DiffStateGrad for this cell
    own = engine.run_pair(request(steps=2)).config
    assert own["solver_kwargs"]["guidance_scale"] == 15.0 and own["solver_kwargs_diffstategrad"]["guidance_scale"] == tuned
    typed = engine.run_pair(request(steps=2, guidance_scale=7.0)).config  # a value the user typed: both runs take it
    assert typed["solver_kwargs"]["guidance_scale"] == 7.0 and "solver_kwargs_diffstategrad" not in typed

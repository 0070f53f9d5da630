"""The performance options of `solve` / `evaluate` (--precision, --channels-last, --compile,
--devices) and what every record says an item cost (time, network calls, peak memory), on the
tiny model folder of test_cli_main_job.py. No timing assertions: only that the numbers are
there and the counts are right."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from diffstategrad.cli import main
from diffstategrad.cli_support import PRECISION
from diffstategrad.pipeline import EvalContext
from diffstategrad.precision import PRECISIONS, configure_network
from diffstategrad.priors import count_network_calls
from diffstategrad.priors.builtin import BuiltinPixelPrior
from diffstategrad.priors.unet import TINY_UNET_CONFIG
from diffstategrad.schedules import make_schedule

COST = ("seconds", "wall_seconds", "network_calls", "autoencoder_calls", "peak_memory_mb", "peak_memory_kind", "device")
MEASURED = {"seconds", "wall_seconds", "peak_memory_mb"}  # differ from run to run


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _one_line_error(r):
    assert r.exit_code == 1, r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------
# --precision / --channels-last / --compile
# ---------------------------------------------------------------------------------------------

# The fixed problem: DPS (with DiffStateGrad) on the tiny model, Gaussian deblurring of the first
# example at 16x16, 4 steps, seed 0. Stated tolerances against fp32: channels-last and compile
# change float rounding only (0.01 dB); bf16 autocast of the network 0.5 dB (the built-in
# prior's own bf16 test, tests/test_precision.py, states the same). bf16 is ~50x slower than
# fp32 on this CPU, hence the tiny size.
SOLVE = ["solve", "--task", "gaussian_deblur", "--steps", "4", "--size", "16", "--quiet"]
PATHS = {"channels-last": (["--channels-last"], 0.01), "compile (eager backend)": (["--compile", "eager"], 0.01),
         "bf16": (["--precision", "bf16"], 0.5)}


def test_every_cpu_precision_path_runs_through_solve_within_its_psnr_tolerance(tiny_model, tmp_path):
    def solve(name, extra):
        out = tmp_path / name.split()[0]
        r = _run([*SOLVE, "--model", tiny_model, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((out / "metrics.json").read_text()), yaml.safe_load((out / "config.yaml").read_text())

    ref, config = solve("fp32", [])
    assert config["network"] == {"precision": "fp32", "channels_last": False, "compile": False}
    assert math.isfinite(ref["psnr"])
    configs = {}
    for name, (extra, tolerance) in PATHS.items():
        metrics, configs[name] = solve(name, extra)
        assert abs(metrics["psnr"] - ref["psnr"]) < tolerance, (name, metrics["psnr"], ref["psnr"])
        assert metrics["network_calls"] == 4, name  # a compiled / bf16 pass is still one call
    assert configs["bf16"]["network"] == {"precision": "bf16", "channels_last": False, "compile": False}
    assert configs["channels-last"]["network"]["channels_last"] is True
    assert configs["compile (eager backend)"]["network"]["compile"] == "eager"


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_cuda_only_precisions_on_the_cpu_are_one_line_errors_and_write_nothing(tiny_model, tmp_path, precision):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [*SOLVE, "--model", tiny_model, "--device", "cpu", "--precision", precision, "--out", str(out)])
    _one_line_error(r)
    assert precision in r.output and not out.exists()
    r = CliRunner().invoke(main, ["evaluate", "--tasks", "hdr", "--steps", "2", "--size", "16", "--lpips", "none", "--quiet", "--model",
                                  tiny_model, "--device", "cpu", "--precision", precision, "--out", str(out)])
    _one_line_error(r)
    assert precision in r.output and not out.exists()


def test_bad_network_options_are_one_line_errors(tiny_model, tmp_path):
    out = tmp_path / "out"
    for extra, message in [(["--compile", "no-such-backend"], "not a torch.compile backend"), (["--precision", "int8"], "int8")]:
        r = CliRunner().invoke(main, [*SOLVE, "--model", tiny_model, "--out", str(out), *extra])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()
    assert list(PRECISION.choices) == list(PRECISIONS)


def test_evaluate_stores_the_network_options_and_refuses_to_resume_with_others(tiny_model, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--images", "examples", "--tasks", "hdr", "--solvers", "dps", "--diffstategrad", "with", "--steps", "2",
            "--size", "16", "--lpips", "none", "--batch", "3", "--quiet", "--model", tiny_model, "--out", str(out)]
    assert _run([*args, "--precision", "bf16"]).exit_code == 0
    settings = json.loads((out / "evaluate.json").read_text())
    assert settings["precision"] == "bf16" and "channels_last" not in settings  # defaults are left out (older folders resume)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["network_calls"] == 2 for r in records)
    for other in ([], ["--precision", "bf16", "--channels-last"]):
        r = CliRunner().invoke(main, [*args, *other])
        assert r.exit_code == 1 and "other settings" in r.output and "Traceback" not in r.output, r.output
    assert _run([*args, "--precision", "bf16"]).exit_code == 0  # the same settings resume (nothing left to do)


def test_settings_leave_the_network_defaults_out():
    base = dict(images={}, solvers=("dps",), size=16, out="x")
    assert not {"precision", "channels_last", "compile", "devices"} & set(EvalContext(**base).settings())
    assert EvalContext(**base, precision="bf16", compile="inductor").settings()["compile"] == "inductor"
    multi = EvalContext(**base, devices=("cuda:0", "cuda:1"))
    assert multi.settings()["device"] == "cuda:0,cuda:1" and multi.on_device("cuda:1").device == "cuda:1"
    assert multi.on_device("cuda:1").devices == ()


def test_a_compiled_network_compiles_once_not_once_per_timestep():
    """An integer timestep would be a dynamo constant (a recompilation every step, then eager
    past the recompile limit); the compiled pass gets it as a tensor."""
    from torch._dynamo import register_backend

    compiled = []

    @register_backend(name="diffstategrad_test_counting")
    def counting(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    torch.manual_seed(0)
    prior = configure_network(BuiltinPixelPrior(TINY_UNET_CONFIG, make_schedule("linear")), compile="diffstategrad_test_counting")
    plain = BuiltinPixelPrior(TINY_UNET_CONFIG, make_schedule("linear"))
    plain.load_state_dict(prior.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for t in (999, 700, 400, 100, 5):
            torch.testing.assert_close(prior.eps(x, t), plain.eps(x, t), rtol=1e-5, atol=1e-6)
    assert 1 <= len(compiled) <= 2  # one graph (two if dynamo splits it), whatever the steps


# ---------------------------------------------------------------------------------------------
# time, network calls and peak memory in metrics.json, records.jsonl and the summaries
# ---------------------------------------------------------------------------------------------


def test_dps_with_n_steps_makes_n_network_calls(tiny_model):
    from diffstategrad.operators import load_task
    from diffstategrad.pipeline import Job, run_job
    from diffstategrad.priors import load_prior

    prior = load_prior("converted", tiny_model)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for steps in (3, 7):
        with count_network_calls(prior) as calls:
            batch = run_job(prior, Job("hdr", "dps", steps=steps), x, [0, 1])
        assert calls.network == steps and calls.autoencoder == 0
        assert [m["network_calls"] for m in batch.metrics] == [steps, steps]  # per item, whatever the batch
    assert prior.network_calls == 10
    m = batch.metrics[0]
    assert m["peak_memory_kind"] == "cpu_max_rss" and m["peak_memory_mb"] > 0 and m["device"] == "cpu"
    assert m["wall_seconds"] > 0 and m["seconds"] > 0
    tv = run_job(None, Job("hdr", "tv", steps=3), x, [0, 1])
    assert tv.metrics[0]["network_calls"] == 0  # a classical solver runs no network


def test_solve_metrics_and_evaluate_records_say_what_an_item_cost(tiny_model, tmp_path):
    out = tmp_path / "solve"
    assert _run([*SOLVE, "--model", tiny_model, "--compare", "--out", str(out)]).exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for m in (metrics, metrics["baseline"], metrics["diffstategrad"]):
        assert set(COST) <= set(m) and m["network_calls"] == 4 and m["peak_memory_kind"] == "cpu_max_rss"
    out = tmp_path / "eval"
    r = _run(["evaluate", "--images", "examples", "--tasks", "hdr", "--solvers", "dps,tv", "--steps", "3", "--size", "16", "--lpips", "none",
              "--quiet", "--model", tiny_model, "--out", str(out)])
    assert r.exit_code in (0, 3), r.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 + 3
    for record in records:
        assert set(COST) <= set(record)
        assert record["network_calls"] == (3 if record["solver"] == "dps" else 0)
    rows = list(__import__("csv").DictReader((out / "summary.csv").read_text().splitlines()))
    dps = next(r for r in rows if r["solver"] == "dps")
    assert float(dps["network_calls_mean"]) == 3 and float(dps["peak_memory_mb_max"]) > 0 and dps["peak_memory_kind"] == "cpu_max_rss"
    md = (out / "summary.md").read_text()
    assert "network calls" in md and "peak memory (MiB)" in md and "(CPU RSS)" in md


# ---------------------------------------------------------------------------------------------
# --devices
# ---------------------------------------------------------------------------------------------


def test_two_device_workers_give_the_records_of_one_device(tiny_model, tmp_path):
    args = ["evaluate", "--images", "examples", "--tasks", "hdr,box_inpainting", "--solvers", "dps", "--seeds", "0,1", "--steps", "3",
            "--size", "16", "--lpips", "none", "--batch", "2", "--quiet", "--model", tiny_model]
    assert _run([*args, "--device", "cpu", "--out", str(tmp_path / "one")]).exit_code in (0, 3)
    assert _run([*args, "--devices", "cpu,cpu", "--out", str(tmp_path / "two")]).exit_code in (0, 3)

    def load(name):
        rows = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        return {(r["image"], r["task"], r["diffstategrad"], r["seed"]): r for r in rows}

    one, two = load("one"), load("two")
    assert one.keys() == two.keys() and len(one) == 3 * 2 * 2 * 2
    for key in one:
        assert {k: v for k, v in one[key].items() if k not in MEASURED} == {k: v for k, v in two[key].items() if k not in MEASURED}, key
    assert json.loads((tmp_path / "two" / "evaluate.json").read_text())["device"] == "cpu,cpu"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--devices", "gpu7"], "unknown device"),
        (["--devices", "cpu,,"], None),  # empty entries are skipped: one CPU worker (runs)
        (["--devices", ","], "--devices is empty"),
        (["--devices", "cpu,cuda:0" if torch.cuda.is_available() else "cuda:0"], "cuda" if not torch.cuda.is_available() else "mixes"),
        (["--devices", f"cuda:{torch.cuda.device_count() + 3}"], "cuda"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "exclude each other"),
        (["--devices", "cpu,cpu", "--workers", "2"], "exclude each other"),
    ],
)
def test_device_list_errors_are_one_line(tiny_model, tmp_path, extra, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["evaluate", "--images", "examples", "--tasks", "hdr", "--steps", "1", "--size", "16", "--lpips", "none",
                                  "--diffstategrad", "without", "--quiet", "--model", tiny_model, "--out", str(out), *extra])
    if message is None:
        assert r.exit_code in (0, 3), r.output
        return
    _one_line_error(r)
    assert message in r.output and "--device" in r.output and not out.exists()


def test_devices_on_a_local_ray_instance_give_the_same_records(tiny_model, tmp_path):
    pytest.importorskip("ray")
    args = ["evaluate", "--images", "examples", "--tasks", "hdr", "--solvers", "dps", "--steps", "2", "--size", "16", "--lpips", "none",
            "--quiet", "--model", tiny_model]
    assert _run([*args, "--device", "cpu", "--out", str(tmp_path / "one")]).exit_code in (0, 3)
    assert _run([*args, "--devices", "cpu,cpu", "--ray", "local", "--out", str(tmp_path / "ray")]).exit_code in (0, 3)

    def load(name):
        rows = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        return {(r["image"], r["diffstategrad"]): {k: v for k, v in r.items() if k not in MEASURED} for r in rows}

    assert load("one") == load("ray") and len(load("one")) == 6


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_precision_paths_through_solve_within_their_psnr_tolerance(tiny_model, tmp_path):
    """The same fixed problem on the GPU: every reduced precision within 0.5 dB of fp32, the
    layout and compile paths within 0.01 dB; peak memory is CUDA's max allocated."""
    paths = {"tf32": 0.5, "fp16": 0.5, "channels-last": 0.01}
    if torch.cuda.get_device_capability() < (8, 0):
        paths.pop("tf32")
    if torch.cuda.is_bf16_supported():
        paths["bf16"] = 0.5

    def solve(name):
        extra = ["--channels-last"] if name == "channels-last" else ([] if name == "fp32" else ["--precision", name])
        out = tmp_path / name
        r = _run([*SOLVE, "--model", tiny_model, "--device", "cuda", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((out / "metrics.json").read_text())

    ref = solve("fp32")
    assert ref["peak_memory_kind"] == "cuda_max_allocated" and ref["peak_memory_mb"] > 0 and ref["device"].startswith("cuda")
    for name, tolerance in paths.items():
        metrics = solve(name)
        assert abs(metrics["psnr"] - ref["psnr"]) < tolerance, (name, metrics["psnr"], ref["psnr"])
        assert metrics["network_calls"] == 4


@CUDA
def test_two_workers_on_cuda_give_the_records_of_one(tiny_model, tmp_path):
    """--devices cuda:0,cuda:0 (or cuda:0,cuda:1 where there are two GPUs) against --device
    cuda:0. Within 1e-3 dB rather than bit for bit: cuDNN's convolution backward (DPS's VJP)
    may use atomics, which reorder float sums from run to run even on one device."""
    devices = "cuda:0,cuda:1" if torch.cuda.device_count() > 1 else "cuda:0,cuda:0"
    args = ["evaluate", "--images", "examples", "--tasks", "hdr", "--solvers", "dps", "--seeds", "0,1", "--steps", "3", "--size", "16",
            "--lpips", "none", "--batch", "2", "--quiet", "--model", tiny_model]
    assert _run([*args, "--device", "cuda:0", "--out", str(tmp_path / "one")]).exit_code in (0, 3)
    assert _run([*args, "--devices", devices, "--out", str(tmp_path / "two")]).exit_code in (0, 3)

    def load(name):
        rows = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        return {(r["image"], r["diffstategrad"], r["seed"]): r for r in rows}

    one, two = load("one"), load("two")
    assert one.keys() == two.keys() and len(one) == 3 * 2 * 2
    for key in one:
        assert abs(one[key]["psnr"] - two[key]["psnr"]) < 1e-3 and one[key]["network_calls"] == two[key]["network_calls"] == 3
        assert two[key]["peak_memory_kind"] == "cuda_max_allocated"
    assert {r["device"] for r in two.values()} == set(devices.split(","))


def test_steps_take_one_count_or_one_per_solver():
    from diffstategrad.pipeline import parse_steps, steps_for

    assert parse_steps("20") == 20  # one count stays an int: folders written before resume
    steps = parse_steps("15, daps=12")
    assert steps == {"*": 15, "daps": 12}
    assert steps_for(steps, "daps") == 12 and steps_for(steps, "dps") == 15 and steps_for(None, "dps") is None
    assert steps_for(parse_steps("daps=12"), "dps") is None  # no bare count: the others keep their preset's
    for bad, message in (("0", "positive"), ("dps=x", "positive"), ("nope=3", "unknown solver"), ("4,4", "twice"), (",", "empty")):
        with pytest.raises(ValueError, match=message):
            parse_steps(bad)


def test_evaluate_runs_each_solver_at_its_own_step_count(tiny_model, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--images", "examples", "--tasks", "box_inpainting", "--solvers", "dps,daps", "--diffstategrad", "without",
            "--size", "16", "--lpips", "none", "--batch", "3", "--quiet", "--model", tiny_model, "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--steps", "3,daps=2"])
    assert result.exit_code in (0, 3), result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {(r["solver"], r["steps"]) for r in records} == {("dps", 3), ("daps", 2)}
    assert json.loads((out / "evaluate.json").read_text())["steps"] == {"*": 3, "daps": 2}
    again = CliRunner().invoke(main, [*args, "--steps", "3"])  # other step counts: refused, not mixed in
    assert again.exit_code == 1 and "other settings" in again.output, again.output
    bad = CliRunner().invoke(main, [*args, "--steps", "3,dsp=2"])
    assert bad.exit_code != 0 and "unknown solver 'dsp'" in bad.output and "Traceback" not in bad.output, bad.output


def test_evaluate_gives_the_projected_run_its_own_tuned_defaults_or_shares_them(tmp_path, monkeypatch):
    from diffstategrad import presets

    real = presets.solver_table()
    builtin = real["dps"]["builtin"]  # the fashion model's block (builtin.fashion) gets values tuned with the projector
    tuned = {"guidance_scale": 4.5, "projector": {"var_cutoff": 0.999}}
    fashion = {**(builtin.get("fashion") or {}), "with_diffstategrad": {"tasks": {"box_inpainting": tuned}}}
    monkeypatch.setattr(presets, "solver_table", lambda: {**real, "dps": {**real["dps"], "builtin": {**builtin, "fashion": fashion}}})
    from diffstategrad import pipeline

    cutoffs, real_solve = set(), pipeline.solve

    def solve(*a, projector=None, **k):  # what the solver is handed
        cutoffs.add(None if projector is None else projector.var_cutoff)
        return real_solve(*a, projector=projector, **k)

    monkeypatch.setattr(pipeline, "solve", solve)
    plain = presets.solver_defaults("dps", "box_inpainting", "builtin:fashion")["guidance_scale"]
    assert plain != 4.5
    args = ["evaluate", "--images", "fashion-examples", "--model", "fashion", "--tasks", "box_inpainting", "--solvers", "dps",
            "--steps", "2", "--guidance-multipliers", "1,2", "--lpips", "none", "--batch", "8", "--quiet"]
    scales = {}
    for mode in ("own", "shared"):
        out = tmp_path / mode
        result = CliRunner().invoke(main, [*args, "--dsg-defaults", mode, "--out", str(out)])
        assert result.exit_code in (0, 3), result.output
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        scales[mode] = {(r["diffstategrad"], r["guidance_multiplier"]): r["guidance_scale"] for r in records}
        # the projector's tuned tau too, where the caller left --var-cutoff at its default; recorded
        assert {json.dumps(r.get("projector_tuned")) for r in records if r["diffstategrad"]} == \
            {json.dumps({"var_cutoff": 0.999}) if mode == "own" else "null"}
        assert cutoffs == ({None, 0.999} if mode == "own" else {None, 0.99}), cutoffs
        cutoffs.clear()
    assert scales["own"] == {(False, 1.0): plain, (False, 2.0): 2 * plain, (True, 1.0): 4.5, (True, 2.0): 9.0}
    assert scales["shared"] == {(False, 1.0): plain, (False, 2.0): 2 * plain, (True, 1.0): plain, (True, 2.0): 2 * plain}
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "shared")])  # the default, own: not mixed into a shared folder
    assert again.exit_code == 1 and "other settings (dsg_defaults)" in again.output, again.output
    chosen = CliRunner().invoke(main, [*args, "--var-cutoff", "0.95", "--out", str(tmp_path / "chosen")])  # the caller's tau stays
    assert chosen.exit_code in (0, 3), chosen.output
    assert cutoffs == {None, 0.95}
    assert not any("projector_tuned" in json.loads(line) for line in (tmp_path / "chosen" / "records.jsonl").read_text().splitlines())

"""Every bad input a clear one-line error, exit codes that say what happened, nothing left
behind, one process per evaluation folder (issue 13's hardening list)."""

import os

import click
import pytest
import torch
from click.testing import CliRunner

from diffstategrad.cli import EXIT_SOME_FAILED, main
from diffstategrad.records import FolderLock


def _invoke(args):
    return CliRunner().invoke(main, args)


def _one_line_error(r, *words):
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1, r.output
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


SOLVE = ["solve", "--task", "hdr", "--steps", "2", "--quiet"]
EVAL = ["evaluate", "--tasks", "hdr", "--steps", "2", "--quiet", "--images", "examples"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_non_finite_or_non_positive_steps_are_refused(tiny_model, tmp_path, value):
    out = tmp_path / "o"
    _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--guidance-scale", value, "--out", str(out)]), "--guidance-scale")
    _one_line_error(_invoke([*EVAL, "--model", tiny_model, "--guidance-multipliers", f"1,{value}", "--out", str(out)]), "--guidance-multipliers")
    _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--var-cutoff", value, "--out", str(out)]), "--var-cutoff")
    assert not out.exists()


def test_usage_errors_are_one_line_too():
    _one_line_error(_invoke(["solve", "--steps", "2"]), "--task")
    _one_line_error(_invoke(["solve", "--task", "hdr", "--bogus"]), "--bogus")


def test_a_failed_solve_exits_3_and_keeps_its_outputs(tiny_model, tmp_path):
    out = tmp_path / "diverged"
    r = _invoke([*SOLVE, "--model", tiny_model, "--guidance-scale", "1e30", "--out", str(out)])
    assert r.exit_code == EXIT_SOME_FAILED, r.output
    assert "FAILED" in r.output and (out / "reconstruction.png").is_file()
    ok = _invoke([*SOLVE, "--model", tiny_model, "--out", str(tmp_path / "fine")])
    assert ok.exit_code == 0, ok.output


def test_evaluate_exits_3_when_items_failed(tiny_model, tmp_path):
    r = _invoke([*EVAL, "--model", tiny_model, "--guidance-multipliers", "1e30", "--diffstategrad", "without", "--lpips", "none",
                 "--out", str(tmp_path / "e")])
    assert r.exit_code == EXIT_SOME_FAILED and "failed" in r.output


def test_out_naming_a_file_says_so(tiny_model, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--out", str(f), *extra]), "is a file")
    _one_line_error(_invoke([*EVAL, "--model", tiny_model, "--out", str(f)]), "is a file")
    _one_line_error(_invoke([*EVAL, "--model", tiny_model, "--out", str(f / "sub")]), "is a file")
    assert f.read_text() == "keep me"


def test_unwritable_out_is_one_line(tiny_model):
    # /proc refuses new folders even to root (os.access would say yes)
    _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--out", "/proc/diffstategrad-test"]), "cannot write")
    _one_line_error(_invoke([*EVAL, "--model", tiny_model, "--out", "/proc/diffstategrad-test"]), "cannot write")


def test_a_bad_image_leaves_nothing_behind(tiny_model, tmp_path):
    out = tmp_path / "o"
    _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--image", str(tmp_path / "missing.png"), "--out", str(out)]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    _one_line_error(_invoke([*SOLVE, "--model", tiny_model, "--image", str(bad), "--out", str(out)]))
    assert not out.exists()


def test_a_second_evaluation_on_one_folder_is_refused(tiny_model, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    with FolderLock(out):  # another process would hold it the same way
        r = _invoke([*EVAL, "--model", tiny_model, "--out", str(out)])
        _one_line_error(r, "in use", f"pid {os.getpid()}")
    assert not (out / "records.jsonl").exists()


def test_every_option_has_help():
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing


def test_a_bounded_but_useless_result_is_marked_failed():
    """DPS on the built-in model with a step a million times too large keeps its clipped
    estimates finite but explains the data worse than a grey image: failed (rule 4)."""
    from diffstategrad.images import load_example
    from diffstategrad.pipeline import Job, resolve_model, run_job

    prior, _ = resolve_model(None, "dps", torch.device("cpu"))
    x = load_example(None, 64)
    bad = run_job(prior, Job("box_inpainting", "dps", steps=20, guidance_scale=1e6, profile="builtin"), x, [0])
    good = run_job(prior, Job("box_inpainting", "dps", steps=20, profile="builtin"), x, [0])
    assert bad.metrics[0]["failed"] and not good.metrics[0]["failed"]
    assert bad.metrics[0]["psnr"] < good.metrics[0]["psnr"] - 5


def test_a_residual_that_grows_back_fails_the_sample():
    from diffstategrad.solvers.base import FailureTracker

    y = torch.ones(2, 100)
    tracker = FailureTracker(y, growth_factor=10.0)
    state = torch.zeros(2, 1, 2, 2)
    for step, r in enumerate([[9.0, 9.0], [0.5, 0.5], [2.0, 6.0]]):  # ||y|| = 10; sample 1 grows 12x its best, past ||y|| / 2
        tracker.update(step, state, torch.tensor(r))
    assert tracker.failed.tolist() == [False, True] and tracker.failed_step.tolist() == [-1, 2]
    tracker = FailureTracker(y)
    for step, r in enumerate([[1e-3, 1e-3], [5e-2, 5e-2]]):  # growth at the noise floor is not divergence
        tracker.update(step, state, torch.tensor(r))
    assert not tracker.failed.any()

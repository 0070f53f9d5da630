"""The README's commands are the ones CI runs, and its Python example runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    setup, test = _block_after("Set up"), _block_after("Test")
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)


def test_ci_installs_the_browser_before_the_readme_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    install = [i for i, line in enumerate(ci) if "apt-get install" in line and "chromium chromium-driver" in line]
    assert install and install[0] < ci.index(_block_after("Set up"))


def test_readme_usage_example_runs():
    code = re.search(r"## Usage\n.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    assert "steps=100" in code
    exec(compile(code.replace("steps=100", "steps=5"), "README-usage", "exec"), namespace)
    result = namespace["result"]
    assert result.x.shape == (2, 3, 64, 64)


def test_readme_main_job_is_a_solve_that_runs(tiny_model, tmp_path):
    """The README's main job, as written, on the tiny model and 2 steps: it parses and writes the
    five-panel comparison (classical, without, with) the README shows."""
    import json
    import shlex

    from click.testing import CliRunner

    from diffstategrad.cli import main

    args = shlex.split(_block_after("Run"))
    assert args[0].endswith("diffstategrad") and args[1] == "solve" and "--compare" in args
    out = tmp_path / "main-job"
    r = CliRunner().invoke(main, [*args[1:], "--model", tiny_model, "--steps", "2", "--out", str(out), "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code in (0, 3), r.output  # 3: a 2-step solve on a random network may be flagged as failed
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"tv", "baseline", "diffstategrad"} <= set(metrics)
    assert (out / "comparison.png").is_file()

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

import json

from click.testing import CliRunner

from diffstategrad.cli import main
from diffstategrad.operators import list_tasks


def test_tasks_lists_every_preset_as_text_and_json():
    runner = CliRunner()
    text = runner.invoke(main, ["tasks"])
    assert text.exit_code == 0
    for name in list_tasks():
        assert name in text.output
    data = json.loads(runner.invoke(main, ["tasks", "--json"]).output)
    assert [d["name"] for d in data] == list_tasks()
    sr = next(d for d in data if d["name"] == "super_resolution")
    assert sr["operator"]["factor"] == 4 and sr["noise"] == {"name": "gaussian", "sigma": 0.01}


def test_demo_runs_and_reports_json():
    out = CliRunner().invoke(main, ["demo", "--guidance-scales", "3", "--samples", "2", "--steps", "20", "--json"])
    assert out.exit_code == 0
    records = json.loads(out.output)
    assert {r["diffstategrad"] for r in records} == {"none", "reference", "per_channel"}


def test_bad_input_is_one_line_and_nonzero():
    out = CliRunner().invoke(main, ["demo", "--guidance-scales", "x"])
    assert out.exit_code != 0 and "error:" in out.output and "Traceback" not in out.output

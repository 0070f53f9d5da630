import inspect
from dataclasses import fields

import pytest

from diffstategrad.operators import list_tasks
from diffstategrad.presets import solver_defaults, solver_source, solver_table
from diffstategrad.solvers import SOLVERS, solver_spec
from diffstategrad.solvers.daps import DAPSConfig
from diffstategrad.solvers.resample import ReSampleConfig


def _accepted(name):
    params = set(inspect.signature(SOLVERS[name]).parameters)
    if name == "resample":
        params |= {f.name for f in fields(ReSampleConfig)}
    if name in ("daps", "latent-daps"):
        params |= {f.name for f in fields(DAPSConfig)} - {"latent"}
    return params


def test_every_solver_has_a_row_and_every_key_is_a_real_argument():
    table = solver_table()
    assert set(table) == set(SOLVERS)
    tasks = set(list_tasks())
    for name, entry in table.items():
        assert solver_source(name)
        assert set(entry.get("tasks") or {}) <= tasks
        for task in [None, *tasks]:
            kwargs = solver_defaults(name, task)
            assert set(kwargs) <= _accepted(name), (name, set(kwargs) - _accepted(name))
            if task is not None:
                assert "guidance_scale" in kwargs or name == "resample" or not solver_spec(name).needs_prior


def test_task_values_override_shared_ones():
    assert solver_defaults("daps", "nonlinear_deblur")["mcmc_steps"] == 200
    assert solver_defaults("daps", "hdr")["mcmc_steps"] == 100
    assert solver_defaults("dps", "phase_retrieval")["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="unknown solver"):
        solver_defaults("nope", "hdr")


def test_configs_dir_prefers_the_wheel_copy(tmp_path, monkeypatch):
    import importlib.resources

    from diffstategrad import resources

    (tmp_path / "_configs").mkdir()
    (tmp_path / "_configs" / "solvers.yaml").write_text("dps: {}\n")
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert resources.configs_dir() == tmp_path / "_configs"
    assert resources.config_path("solvers.yaml").read_text() == "dps: {}\n"
    with pytest.raises(FileNotFoundError):
        resources.config_path("missing.yaml")

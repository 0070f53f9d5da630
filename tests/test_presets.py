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


def test_the_builtin_profile_values_tuned_with_diffstategrad_are_real_arguments():
    from diffstategrad.presets import projector_defaults
    from diffstategrad.projection import DiffStateGrad

    tasks = set(list_tasks())
    for name, entry in solver_table().items():
        builtin = entry.get("builtin") or {}
        assert set(builtin) <= {"all", "tasks", "with_diffstategrad", "fashion"}, name
        for block in (builtin.get("with_diffstategrad") or {}, builtin.get("fashion") or {}):
            assert set(block) <= {"all", "tasks", "with_diffstategrad"}, name
            assert set(block.get("tasks") or {}) <= tasks, name
        for task in [None, *tasks]:
            for profile in ("builtin", "builtin:fashion"):
                kwargs = solver_defaults(name, task, profile, diffstategrad=True) if "builtin" in entry else {}
                assert set(kwargs) <= _accepted(name), (name, profile, set(kwargs) - _accepted(name))
                if "builtin" in entry:  # the projector settings tuned with it build a projector
                    DiffStateGrad(**projector_defaults(name, task, profile))


def test_a_projected_run_takes_its_own_tuned_defaults_unless_told_to_share(monkeypatch):
    from diffstategrad import presets
    from diffstategrad.pipeline import EvalContext, Job, PipelineError
    from diffstategrad.projection import DiffStateGrad

    table = {"dps": {"all": {"steps": 1000}, "tasks": {"box_inpainting": {"guidance_scale": 0.5}},
                     "builtin": {"all": {"steps": 200}, "tasks": {"box_inpainting": {"guidance_scale": 15.0}},
                                 "with_diffstategrad": {"tasks": {"box_inpainting": {"guidance_scale": 45.0}}}}}}
    monkeypatch.setattr(presets, "solver_table", lambda: table)
    assert solver_defaults("dps", "box_inpainting", "builtin") == {"steps": 200, "guidance_scale": 15.0}
    assert solver_defaults("dps", "box_inpainting", "builtin", diffstategrad=True) == {"steps": 200, "guidance_scale": 45.0}
    assert solver_defaults("dps", "box_inpainting", diffstategrad=True)["guidance_scale"] == 0.5  # no profile: the official value
    plain = Job("box_inpainting", "dps", profile="builtin", guidance_multiplier=2.0)
    projected = plain.with_projector(DiffStateGrad())
    assert plain.kwargs()["guidance_scale"] == 30.0
    assert projected.kwargs()["guidance_scale"] == 90.0  # the multiplier scales each side's own default
    assert Job("box_inpainting", "dps", DiffStateGrad(), profile="builtin", dsg_defaults="shared").kwargs()["guidance_scale"] == 15.0
    assert Job("box_inpainting", "dps", DiffStateGrad(), profile="builtin", guidance_scale=7.0).kwargs()["guidance_scale"] == 7.0
    with pytest.raises(PipelineError, match="dsg_defaults"):
        Job("box_inpainting", "dps", profile="builtin", dsg_defaults="mine").kwargs()
    # a folder written before the tuned values existed ran "shared": it resumes as such, not as "own"
    context = EvalContext(images={}, solvers=("dps",), size=32, out="x")
    assert context.settings()["dsg_defaults"] == "own"
    assert "dsg_defaults" not in EvalContext(images={}, solvers=("dps",), size=32, out="x", dsg_defaults="shared").settings()


def test_a_projected_run_takes_the_projector_settings_tuned_with_it_unless_the_caller_chose(monkeypatch):
    from diffstategrad import presets
    from diffstategrad.pipeline import Job
    from diffstategrad.presets import projector_defaults
    from diffstategrad.projection import DiffStateGrad

    with_dsg = {"tasks": {"gaussian_deblur": {"guidance_scale": 2.0, "projector": {"var_cutoff": 0.999}}}}
    table = {"dps": {"all": {"steps": 1000}, "tasks": {"gaussian_deblur": {"guidance_scale": 0.3}},
                     "builtin": {"tasks": {"gaussian_deblur": {"guidance_scale": 3.0, "projector": {"var_cutoff": 0.5}}},
                                 "with_diffstategrad": with_dsg}}}
    monkeypatch.setattr(presets, "solver_table", lambda: table)
    # a solver argument it is not; only the block tuned with the projector sets it
    assert solver_defaults("dps", "gaussian_deblur", "builtin", diffstategrad=True) == {"steps": 1000, "guidance_scale": 2.0}
    assert solver_defaults("dps", "gaussian_deblur", "builtin") == {"steps": 1000, "guidance_scale": 3.0}
    assert projector_defaults("dps", "gaussian_deblur", "builtin") == {"var_cutoff": 0.999}
    assert projector_defaults("dps", "box_inpainting", "builtin") == {} and projector_defaults("dps", "gaussian_deblur") == {}
    job = Job("gaussian_deblur", "dps", DiffStateGrad(period=2), profile="builtin")
    assert job.projector_tuned() == {"var_cutoff": 0.999}
    assert job.run_projector() == DiffStateGrad(var_cutoff=0.999, period=2)  # the caller's other settings kept
    assert Job("gaussian_deblur", "dps", DiffStateGrad(var_cutoff=0.9), profile="builtin").run_projector().var_cutoff == 0.9
    assert Job("gaussian_deblur", "dps", DiffStateGrad(), profile="builtin", dsg_defaults="shared").run_projector().var_cutoff == 0.99
    assert Job("gaussian_deblur", "dps", profile="builtin").run_projector() is None
    assert Job("gaussian_deblur", "dps", DiffStateGrad()).projector_tuned() == {}  # no profile: the official settings


def test_the_fashion_model_keeps_the_values_its_study_ran_with():
    # docs/claims.md's Fashion-MNIST grid ran at these x1 values (its records hold them); retuning the
    # photo models' profile must not move them, or `scripts/fashion_study.sh` would no longer reproduce it
    from diffstategrad.pipeline import defaults_profile

    assert defaults_profile("builtin:fashion") == "builtin:fashion" and defaults_profile("builtin:pixel") == "builtin"
    assert defaults_profile("converted:/models/x") is None
    study = {"dps": {"box_inpainting": 15.0, "super_resolution": 9.0, "gaussian_deblur": 3.0, "motion_deblur": 3.0, "phase_retrieval": 10.0},
             "daps": {"box_inpainting": 5e-5, "super_resolution": 3e-4, "gaussian_deblur": 1e-4, "motion_deblur": 5e-5, "phase_retrieval": 5e-5},
             "diffpir": dict.fromkeys(["box_inpainting", "super_resolution", "gaussian_deblur", "motion_deblur", "phase_retrieval"], 14.3)}
    for solver, tasks in study.items():
        for task, value in tasks.items():
            for dsg in (False, True):
                assert solver_defaults(solver, task, "builtin:fashion", diffstategrad=dsg)["guidance_scale"] == pytest.approx(value), (solver, task)
    assert solver_defaults("dps", "super_resolution", "builtin")["guidance_scale"] != 9.0  # the photo models' own value differs

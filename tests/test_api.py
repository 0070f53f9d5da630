"""The entry points a user types first: ``from diffstategrad import load_prior, load_task, solve, DiffStateGrad``."""

import subprocess
import sys

import torch


def test_the_first_entry_points_solve_a_problem():
    from diffstategrad import DiffStateGrad, load_prior, load_task, solve
    from diffstategrad.images import load_example

    prior = load_prior("pixel")  # the name `diffstategrad models` lists
    problem = load_task("box_inpainting").build((3, 32, 32), seeds=[0, 1])
    x = load_example("grace_hopper", size=32).repeat(2, 1, 1, 1)
    y = problem.measure(x)
    result = solve("dps", prior, problem.operator, y, shape=problem.image_shape, steps=4, seeds=[0, 1], projector=DiffStateGrad())
    assert result.x.shape == (2, 3, 32, 32) and torch.isfinite(result.x).all()


def test_import_stays_light():
    code = "import sys, diffstategrad; print(int('diffstategrad.solvers' in sys.modules), int('diffstategrad.priors' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_unknown_attribute_is_an_attribute_error():
    import diffstategrad

    try:
        diffstategrad.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")

"""Task presets: loading, overrides, the scaling rule, building and measuring."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffstategrad.operators import (
    Blur,
    GaussianNoise,
    Inpaint,
    InverseProblem,
    PoissonNoise,
    Resize,
    list_tasks,
    load_task,
    scale_operator_params,
)
from diffstategrad.operators.nonlinear_blur import BKSE_WEIGHTS_ENV
from diffstategrad.operators.tasks import tasks_dir

TASKS = ["box_inpainting", "gaussian_deblur", "hdr", "motion_deblur", "nonlinear_deblur",
         "phase_retrieval", "rand_inpainting", "super_resolution"]
# without bkse weights the nonlinear preset uses the built-in KernelWizard (test_nonlinear_blur.py)
BUILDABLE = TASKS


@pytest.fixture(autouse=True)
def _no_bkse_weights(monkeypatch, tmp_path):
    """Point the weights lookup at an empty folder so a user's cached file cannot leak in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(BKSE_WEIGHTS_ENV, raising=False)


def test_list_and_official_values():
    assert list_tasks() == TASKS
    expected_operators = {
        "super_resolution": {"name": "super_resolution", "factor": 4},
        "gaussian_deblur": {"name": "gaussian_blur", "kernel_size": 61, "sigma": 3.0},
        "motion_deblur": {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5},
        "box_inpainting": {"name": "box_inpainting", "box_size": 128, "margin": 16},
        "rand_inpainting": {"name": "random_inpainting", "missing_fraction": [0.7, 0.71]},
        "nonlinear_deblur": {"name": "nonlinear_blur", "weights": None, "code_seed": 0, "code_scale": 1.2},
        "phase_retrieval": {"name": "phase_retrieval", "oversample": 2.0},
        "hdr": {"name": "high_dynamic_range", "scale": 2.0},
    }
    for name in TASKS:
        task = load_task(name)
        assert task.name == name
        assert task.operator == expected_operators[name]
        assert task.noise == {"name": "gaussian", "sigma": 0.01}
        assert task.reference_size == 256 and task.scale_with_size is True
        assert task.source.startswith("Anima-Lab/DiffStateGrad configs/tasks/")
        assert task.description
        data = task.to_dict()
        assert set(data) == {"name", "description", "source", "reference_size", "scale_with_size", "operator", "noise"}
        assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain YAML/JSON types


def test_load_from_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"operator": {"name": "gaussian_blur", "kernel_size": 21},
                                    "noise": {"name": "none"}}))
    task = load_task(path)
    assert task.name == "mine" and task.operator == {"name": "gaussian_blur", "kernel_size": 21, "sigma": 3.0}
    assert load_task(str(path)).operator == task.operator
    with pytest.raises(ValueError, match="unknown task"):
        load_task("deblur")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"operator": {"name": "gaussian_blur", "size": 21}, "noise": {"name": "none"}}))
    with pytest.raises(ValueError, match="unknown operator field"):
        load_task(bad)
    even = tmp_path / "even.yaml"
    even.write_text(yaml.safe_dump({"operator": {"name": "gaussian_blur", "kernel_size": 60}, "noise": {"name": "none"}}))
    with pytest.raises(ValueError, match="odd"):
        load_task(even)


def test_tasks_dir_is_the_checkout_or_the_wheel():
    folder = tasks_dir()
    assert folder.joinpath("hdr.yaml").is_file()
    checkout = Path(__file__).resolve().parents[1] / "configs" / "tasks"
    assert sorted(p.stem for p in checkout.glob("*.yaml")) == TASKS


def test_overrides():
    task = load_task("box_inpainting", overrides={"noise.sigma": 0.05, "operator.box_size": 64})
    assert task.noise == {"name": "gaussian", "sigma": 0.05} and task.operator["box_size"] == 64
    assert load_task("box_inpainting").noise["sigma"] == 0.01  # the preset itself is untouched

    poisson = load_task("hdr", overrides={"noise.name": "poisson"})
    assert poisson.noise == {"name": "poisson", "rate": 1.0}
    poisson = load_task("hdr", overrides={"noise.name": "poisson", "noise.rate": 3})
    assert poisson.noise == {"name": "poisson", "rate": 3.0}
    assert load_task("hdr", overrides={"noise.name": "none"}).noise == {"name": "none"}

    nested = load_task("gaussian_deblur", overrides={"operator": {"sigma": 2}, "scale_with_size": False})
    assert nested.operator["sigma"] == 2.0 and nested.scale_with_size is False
    cli = load_task("rand_inpainting", overrides={"operator.missing_fraction": "[0.5, 0.6]", "noise.sigma": "0.1",
                                                  "scale_with_size": "false"})
    assert cli.operator["missing_fraction"] == [0.5, 0.6] and cli.noise["sigma"] == 0.1 and not cli.scale_with_size
    assert load_task("box_inpainting", overrides={"operator.box_size": [64, 32]}).operator["box_size"] == [64, 32]

    with pytest.raises(ValueError, match="unknown override 'noise.sigmaa'.*valid keys"):
        load_task("hdr", overrides={"noise.sigmaa": 0.1})
    with pytest.raises(ValueError, match="unknown override 'operator.kernel_size'"):
        load_task("hdr", overrides={"operator.kernel_size": 3})
    with pytest.raises(ValueError, match="unknown override 'noise.sigma'"):
        load_task("hdr", overrides={"noise.name": "poisson", "noise.sigma": 0.1})
    with pytest.raises(ValueError, match="unknown override 'name'"):
        load_task("hdr", overrides={"name": "x"})
    with pytest.raises(ValueError, match="unknown noise"):
        load_task("hdr", overrides={"noise.name": "speckle"})
    with pytest.raises(ValueError, match="must be an integer"):
        load_task("super_resolution", overrides={"operator.factor": 2.5})
    with pytest.raises(ValueError, match="must be a number"):
        load_task("hdr", overrides={"noise.sigma": "abc"})


@pytest.mark.parametrize("size,kernel_size,sigma", [
    ((256, 256), 61, 3.0), ((128, 128), 31, 1.5), ((64, 64), 17, 0.75), ((512, 512), 121, 6.0),
    ((48, 80), 13, 0.5625), ((512, 256), 61, 3.0)])
def test_scaling_rule_blur(size, kernel_size, sigma):
    params = load_task("gaussian_deblur").operator_params(size)
    assert params == {"kernel_size": kernel_size, "sigma": sigma}
    assert load_task("motion_deblur").operator_params(size) == {"kernel_size": kernel_size, "intensity": 0.5}


def test_scaling_rule_other_operators():
    box = load_task("box_inpainting")
    assert box.operator_params((256, 256)) == {"box_size": (128, 128), "margin": (16, 16)}
    assert box.operator_params((128, 128)) == {"box_size": (64, 64), "margin": (8, 8)}
    assert box.operator_params((64, 64)) == {"box_size": (32, 32), "margin": (4, 4)}
    assert box.operator_params((512, 512)) == {"box_size": (256, 256), "margin": (32, 32)}
    assert box.operator_params((48, 80)) == {"box_size": (24, 40), "margin": (3, 5)}
    phase = load_task("phase_retrieval")
    assert phase.operator_params((256, 256))["pad"] == (64, 64)
    assert phase.operator_params((64, 64))["pad"] == (16, 16)
    assert phase.operator_params((48, 80))["pad"] == (12, 20)
    assert phase.operator_params((512, 512))["pad"] == (128, 128)
    for size in [(64, 64), (512, 512), (48, 80)]:
        assert load_task("super_resolution").operator_params(size) == {"factor": 4}
        assert load_task("rand_inpainting").operator_params(size) == {"missing_fraction": (0.7, 0.71)}
        assert load_task("hdr").operator_params(size) == {"scale": 2.0}


def test_no_scaling_uses_reference_values():
    fixed = {"scale_with_size": False}
    assert load_task("gaussian_deblur", overrides=fixed).operator_params((64, 64)) == {"kernel_size": 61, "sigma": 3.0}
    assert load_task("phase_retrieval", overrides=fixed).operator_params((64, 64))["pad"] == (64, 64)
    with pytest.raises(ValueError, match="reflection padding 30"):
        load_task("gaussian_deblur", overrides=fixed).build((3, 24, 24), seeds=[0])
    with pytest.raises(ValueError, match="does not fit"):
        load_task("box_inpainting", overrides=fixed).build((3, 64, 64), seeds=[0])
    assert scale_operator_params({"name": "box_inpainting", "box_size": 16, "margin": 2}, (64, 64),
                                 scale_with_size=False) == {"box_size": (16, 16), "margin": (2, 2)}


@pytest.mark.parametrize("name", BUILDABLE)
@pytest.mark.parametrize("size", [64, 256])
def test_every_preset_builds_and_measures(name, size):
    problem = load_task(name).build((3, size, size), seeds=[0, 1])
    assert isinstance(problem, InverseProblem) and problem.task.name == name
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = problem.measure(x)
    clean = problem.operator(x)
    assert y.shape == clean.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert abs(float((y - clean).std()) - 0.01) < 0.002  # sigma 0.01 on every measurement
    if name == "super_resolution":
        assert y.shape[-2:] == (size // 4, size // 4)
    if name == "phase_retrieval":
        assert y.shape[-2:] == (size * 3 // 2, size * 3 // 2)


def test_nonlinear_preset_without_bkse_weights():
    """No bkse file: the built-in stand-in, which says so; sizes follow its rule (multiples of 32)."""
    params = load_task("nonlinear_deblur").operator_params((64, 64))
    assert params["weights"] == "builtin" and params["code_grid"] == (2, 2)
    assert "built-in KernelWizard stand-in" in params["network"] and "no bkse weights" in params["network"]
    assert load_task("nonlinear_deblur").operator_params((128, 96))["code_grid"] == (4, 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        load_task("nonlinear_deblur").build((3, 48, 48), seeds=[0])


@pytest.mark.parametrize("name", ["motion_deblur", "box_inpainting", "rand_inpainting"])
def test_random_parameters_reproducible_and_per_sample(name):
    task = load_task(name)
    shape = (3, 64, 64)
    attr = "kernel" if name == "motion_deblur" else "mask"
    pair = getattr(task.build(shape, seeds=[3, 4]).operator, attr)
    assert pair.shape[0] == 2
    again = getattr(task.build(shape, seeds=[3, 4]).operator, attr)
    assert torch.equal(pair, again)
    assert not torch.equal(pair[0], pair[1])
    # sample 1's parameters do not depend on sample 0
    assert torch.equal(getattr(task.build(shape, seeds=[4]).operator, attr)[0], pair[1])
    assert torch.equal(getattr(task.build(shape, seeds=[9, 4]).operator, attr)[1], pair[1])
    # one seed: one kernel/mask shared by the batch
    shared = task.build(shape, seeds=[3])
    assert getattr(shared.operator, attr).shape[0] == 1
    x = torch.rand(2, *shape) * 2 - 1
    assert shared.measure(x, seeds=[0, 1]).shape[0] == 2


@pytest.mark.parametrize("name", ["motion_deblur", "box_inpainting", "super_resolution", "phase_retrieval"])
def test_measurement_batch_independence(name):
    task = load_task(name)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = task.build((3, 64, 64), seeds=[10, 11, 12]).measure(x)
    alone = task.build((3, 64, 64), seeds=[11]).measure(x[1:2])
    assert torch.equal(y[1:2], alone)
    # noise seeds are independent of operator seeds and of the other samples
    y2 = task.build((3, 64, 64), seeds=[10, 11, 12]).measure(x, seeds=[10, 11, 99])
    assert torch.equal(y2[:2], y[:2]) and not torch.equal(y2[2], y[2])


def test_build_options():
    problem = load_task("super_resolution").build((1, 32, 48), seeds=5, dtype=torch.float64)
    assert isinstance(problem.operator, Resize) and problem.operator.rows.dtype == torch.float64
    assert problem.seeds == [5] and problem.image_shape == (1, 32, 48)
    assert isinstance(problem.noise, GaussianNoise)
    y = problem.measure(torch.zeros(1, 1, 32, 48, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (1, 1, 8, 12)
    assert isinstance(load_task("gaussian_deblur").build((3, 64, 64)).operator, Blur)
    assert isinstance(load_task("rand_inpainting").build((3, 64, 64)).operator, Inpaint)
    poisson = load_task("hdr", overrides={"noise.name": "poisson"}).build((3, 8, 8), seeds=[0])
    assert isinstance(poisson.noise, PoissonNoise)
    with pytest.raises(ValueError, match="one noise seed per sample"):
        problem.measure(torch.zeros(2, 1, 32, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="built for images"):
        problem.measure(torch.zeros(1, 3, 32, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        load_task("hdr").build((64, 64))


def test_gaussian_preset_kernel_is_official_at_256():
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((61, 61))
    delta[30, 30] = 1
    kernel = load_task("gaussian_deblur").build((3, 256, 256), dtype=torch.float64).operator.kernel[0, 0]
    assert np.abs(kernel.numpy() - gaussian_filter(delta, 3.0)).max() < 1e-15


@pytest.mark.parametrize("name", BUILDABLE)
def test_measurement_same_on_every_device(name, device):
    """Kernels, masks and noise are drawn on the CPU: a seed gives the same y on CPU and CUDA."""
    task = load_task(name)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    on_cpu = task.build((3, 64, 64), seeds=[0, 1]).measure(x)
    here = task.build((3, 64, 64), seeds=[0, 1], device=device).measure(x.to(device))
    assert here.device.type == device.type
    # the blur network's convolutions may round differently (TF32) on a GPU
    assert torch.allclose(here.cpu(), on_cpu, atol=5e-3 if name == "nonlinear_deblur" else 1e-5)


def test_an_operator_registered_in_the_catalogue_runs_from_a_yaml_preset(tmp_path):
    """What adding an operator takes: one spec registered by its module, one YAML preset."""
    import torch

    from diffstategrad.operators.base import LinearOperator
    from diffstategrad.operators.registry import OperatorSpec, operator_names, register_operator

    assert {"super_resolution", "gaussian_blur", "motion_blur", "box_inpainting", "random_inpainting", "phase_retrieval",
            "high_dynamic_range", "nonlinear_blur"} <= set(operator_names())

    class Scale(LinearOperator):
        def __init__(self, gain):
            super().__init__()
            self.gain = gain

        def forward(self, x):
            return self.gain * x

        def adjoint(self, y):
            return self.gain * y

    register_operator(OperatorSpec("test_gain", {"gain": 2.0}, lambda p, shape, seeds: Scale(p["gain"] * len(seeds)),
                                   lambda p, size: {**p, "gain": p["gain"] * size.s}))
    preset = tmp_path / "gain.yaml"
    preset.write_text("name: gain\noperator: {name: test_gain, gain: 3.0}\nnoise: {name: none}\n")
    problem = load_task(str(preset)).build((1, 128, 128), seeds=[0])
    assert problem.params == {"gain": 1.5}
    torch.testing.assert_close(problem.measure(torch.ones(1, 1, 128, 128)), torch.full((1, 1, 128, 128), 1.5))

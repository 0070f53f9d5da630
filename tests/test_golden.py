"""Golden outputs: every solver, with and without DiffStateGrad, on the tiny test networks.

A fixed-seed slice of each solver's output and its per-sample residuals are pinned here
(diffusers style), so that a refactor that changes the numbers fails. Only a deliberate change
of a solver's behaviour may update a value, in its own commit that says why:

    python tests/test_golden.py      # prints the current values in the layout of GOLDEN
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from diffstategrad import DiffStateGrad  # noqa: E402
from diffstategrad.operators.base import MatrixOperator  # noqa: E402
from diffstategrad.solvers import solve  # noqa: E402
from tiny_models import TinyLatent, TinyPixel  # noqa: E402

SHAPE = (3, 8, 12)
CASES = {
    "dps": dict(steps=6, guidance_scale=0.5),
    "dps-ddim": dict(solver="dps", steps=6, guidance_scale=0.5, sampler="ddim", eta=0.5),
    "psld": dict(steps=6, guidance_scale=0.5),
    "resample": dict(steps=30, pixel_iters=5, latent_iters=5, early_stop_window=2),
    "resample-reference": dict(solver="resample", setting="reference", steps=30, pixel_iters=5, latent_iters=5, early_stop_window=2),
    # loss_tol 0.2 makes the inner loops' stop fire (sample 1): pins the official step-then-stop order
    "resample-reference-stop": dict(solver="resample", setting="reference", steps=30, pixel_iters=5, latent_iters=5, early_stop_window=2, loss_tol=0.2),
    "daps": dict(steps=4, mcmc_steps=3, guidance_scale=1e-5),
    "latent-daps": dict(steps=4, mcmc_steps=3, guidance_scale=1e-4),
    "diffpir": dict(steps=6, guidance_scale=10.0, data_iters=3),
    "diffpir-latent": dict(solver="diffpir", latent=True, steps=6, guidance_scale=10.0, data_iters=3),
}
LATENT = ("psld", "resample", "latent-daps")


def run_case(case: str, projected: bool):
    kw = dict(CASES[case])
    name = kw.pop("solver", case)
    prior = TinyLatent() if name in LATENT or kw.pop("latent", False) else TinyPixel()
    op = MatrixOperator(torch.randn(20, 3 * 8 * 12, generator=torch.Generator().manual_seed(1)) / 10, SHAPE)
    y = torch.randn(2, 20, generator=torch.Generator().manual_seed(2)) * 0.1
    projector = DiffStateGrad(var_cutoff=0.9) if projected else None
    return solve(name, prior, op, y, shape=SHAPE, seeds=[0, 1], projector=projector, **kw)


def golden_of(result) -> dict:
    return {
        "slice": [round(float(v), 6) for v in result.x[1, :, 2, 3:6].flatten()],
        "residual": [round(float(v), 6) for v in result.residual],
    }


# fmt: off
GOLDEN = {
    "diffpir/plain": {'slice': [0.623341, 0.374169, -0.602117, 1.0, -1.0, -0.932913, 1.0, -0.925441, -0.372888], 'residual': [1.741175, 1.549919]},
    "diffpir/diffstategrad": {'slice': [-0.129612, 0.535676, 0.031186, 1.0, -0.820812, -0.914631, 0.999997, -0.646917, -0.174934], 'residual': [1.836614, 1.384687]},
    "diffpir-latent/plain": {'slice': [-1.0, 1.0, -1.0, -1.0, 0.999965, 1.0, -1.0, -1.0, 1.0], 'residual': [7.362324, 5.585114]},
    "diffpir-latent/diffstategrad": {'slice': [-1.0, 1.0, -1.0, -1.0, 0.99999, 1.0, -1.0, -1.0, 1.0], 'residual': [8.239701, 6.387263]},
    "daps/plain": {'slice': [0.97972, -0.241203, -1.068866, 0.96535, -0.005013, -0.799986, 0.969266, -0.357641, -0.970776], 'residual': [2.646882, 1.938538]},
    "daps/diffstategrad": {'slice': [1.050651, -0.066704, -1.10469, 0.93949, 0.199971, -0.897993, 0.976158, -0.296926, -1.027619], 'residual': [4.767838, 3.617171]},
    "dps/plain": {'slice': [-0.340385, 0.999989, -1.00002, 0.999996, -0.999937, -0.731387, 1.000043, -0.053984, -0.040861], 'residual': [3.19455, 4.507944]},
    "dps/diffstategrad": {'slice': [-0.291354, 0.939003, -0.972885, 1.014225, -0.993147, -0.759963, 0.990006, -0.1, -0.058225], 'residual': [5.337778, 5.968164]},
    "dps-ddim/plain": {'slice': [0.842307, -1.046255, -1.000029, 0.99997, -0.99993, -0.977364, 1.00002, -0.999932, -0.466347], 'residual': [4.940938, 4.101686]},
    "dps-ddim/diffstategrad": {'slice': [0.684025, -0.521367, -0.893026, 0.990874, -0.930542, -0.905017, 0.989397, -1.00646, -0.478274], 'residual': [6.01213, 5.583282]},
    "latent-daps/plain": {'slice': [-0.999177, 0.984346, -0.824658, -0.999997, -0.936563, -0.421263, -0.999981, -0.99308, 0.864329], 'residual': [3.282336, 2.770676]},
    "latent-daps/diffstategrad": {'slice': [-0.999186, 0.968726, -0.669045, -0.999998, -0.511655, 0.607779, -0.999988, -0.998449, 0.96164], 'residual': [4.758901, 4.333773]},
    "psld/plain": {'slice': [-1.0, 0.980434, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0], 'residual': [7.580459, 5.514764]},
    "psld/diffstategrad": {'slice': [-1.0, 0.967106, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0], 'residual': [8.110327, 6.072306]},
    "resample/plain": {'slice': [0.365545, 0.875699, 0.319826, 0.057377, -0.835415, -0.489821, -0.234547, -0.246813, -0.2573], 'residual': [2.447439, 1.70101]},
    "resample/diffstategrad": {'slice': [0.364974, 0.874537, 0.321037, 0.067972, -0.834046, -0.488704, -0.227775, -0.243632, -0.259267], 'residual': [2.464718, 1.724962]},
    "resample-reference/plain": {'slice': [0.370401, 0.875223, 0.320916, 0.054078, -0.83406, -0.486848, -0.233945, -0.248607, -0.255643], 'residual': [2.447632, 1.714245]},
    "resample-reference/diffstategrad": {'slice': [0.370096, 0.87405, 0.322078, 0.065356, -0.832712, -0.485848, -0.226762, -0.245287, -0.257729], 'residual': [2.465522, 1.733503]},
    "resample-reference-stop/plain": {'slice': [0.374862, 0.877657, 0.326079, 0.062844, -0.836399, -0.486596, -0.226917, -0.250184, -0.2535], 'residual': [2.447632, 1.766742]},
    "resample-reference-stop/diffstategrad": {'slice': [0.375079, 0.876506, 0.327248, 0.065835, -0.83506, -0.48557, -0.224561, -0.246891, -0.255567], 'residual': [2.465522, 1.770989]},
}
# fmt: on


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "diffstategrad"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_output(case, projected):
    torch.set_num_threads(1)
    result = run_case(case, projected)
    got = golden_of(result)
    want = GOLDEN[f"{case}/{'diffstategrad' if projected else 'plain'}"]
    torch.testing.assert_close(torch.tensor(got["slice"]), torch.tensor(want["slice"]), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(torch.tensor(got["residual"]), torch.tensor(want["residual"]), rtol=1e-4, atol=2e-5)


def test_the_projector_changes_every_solver_output():
    """The pinned values would not catch a projector that silently stopped applying."""
    for case in CASES:
        a, b = GOLDEN[f"{case}/plain"], GOLDEN[f"{case}/diffstategrad"]
        assert a["slice"] != b["slice"], case


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("GOLDEN = {")
    for case in sorted(CASES):
        for projected in (False, True):
            g = golden_of(run_case(case, projected))
            print(f'    "{case}/{"diffstategrad" if projected else "plain"}": {g},')
    print("}")


def test_every_solver_calls_back_with_one_key_set():
    from diffstategrad.solvers import CALLBACK_KEYS

    for case in CASES:
        kw = dict(CASES[case])
        name = kw.pop("solver", case)
        prior = TinyLatent() if name in LATENT or kw.pop("latent", False) else TinyPixel()
        op = MatrixOperator(torch.randn(20, 3 * 8 * 12, generator=torch.Generator().manual_seed(1)) / 10, SHAPE)
        y = torch.randn(1, 20, generator=torch.Generator().manual_seed(2)) * 0.1
        seen = []
        solve(name, prior, op, y, shape=SHAPE, seeds=[0], projector=DiffStateGrad(var_cutoff=0.9), callback=seen.append, **kw)
        assert seen and all(tuple(s) == CALLBACK_KEYS for s in seen), case
        assert [s["step"] for s in seen] == list(range(seen[0]["steps"])), case
        assert all(s["x0"].shape == s["x"].shape and s["sigma"] >= 0 and isinstance(s["t"], int) for s in seen), case

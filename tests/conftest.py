import os

import pytest
import torch

# Two cores on CI: one thread per test process keeps xdist workers from oversubscribing.
torch.set_num_threads(int(os.environ.get("DIFFSTATEGRAD_TEST_THREADS", "1")))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A converted folder of the tiny EDM-preconditioned pixel UNet (random weights) for CLI tests."""
    from diffstategrad.priors.builtin import BuiltinPixelPrior
    from diffstategrad.priors.converted import save_converted
    from diffstategrad.priors.unet import TINY_UNET_CONFIG
    from diffstategrad.schedules import make_schedule

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "pixel"
    save_converted(BuiltinPixelPrior(TINY_UNET_CONFIG, make_schedule("linear"), info={"crop": 64}, preconditioning={"kind": "edm"}), folder)
    return str(folder)

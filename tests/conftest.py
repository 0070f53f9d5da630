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

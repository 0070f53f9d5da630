"""deepinv's DPS, timed on request: the other side of ``benchmarks/speed.py --part deepinv``.

Runs in deepinv's own virtual environment (it imports neither diffstategrad nor anything but
torch and deepinv), started by speed.py, never by hand:

    DEEPINV_PYTHON benchmarks/deepinv_dps.py --data DIR --steps N --threads T --device D

``DIR`` holds what speed.py wrote: ``weights.pt`` (a guided-diffusion FFHQ-256 UNet state_dict in
the original layout, which deepinv's ``DiffUNet`` loads strictly), ``problem.pt`` (the image in
[0, 1] and the inpainting mask). The worker builds deepinv's ``DPS`` (its defaults: VP schedule,
DDPM solver, residual-norm guidance, float32 here) and prints one JSON line ``{"ready": ...}``;
then each ``run`` line on stdin runs one full DPS solve and prints
``{"seconds": s, "network_calls": n}``; ``quit`` ends it. The interleaving with the project's
own DPS happens in speed.py.

deepinv imports torchvision, whose compiled operators do not load beside a CPU build of torch
(the wheel the index serves is built for CUDA). The two operators torchvision registers fake
kernels for at import time (``torchvision::nms``, ``torchvision::qnms``) are declared here first
(schema only, no kernel): torchvision then imports, and nothing in DPS uses them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _declare_torchvision_ops() -> None:
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already there: torchvision's compiled operators did load
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        _declare_torchvision_ops()
    import deepinv
    from deepinv.models import DiffUNet
    from deepinv.physics import Inpainting
    from deepinv.sampling import DPS

    device = torch.device(args.device)
    model = DiffUNet(in_channels=3, out_channels=3, pretrained=str(args.data / "weights.pt")).to(device).eval()
    problem = torch.load(args.data / "problem.pt", weights_only=True)
    x, mask = problem["x"].to(device), problem["mask"].to(device)
    physics = Inpainting(img_size=tuple(x.shape[1:]), mask=mask, device=device)
    y = physics.A(x)
    calls = {"n": 0}
    forward = model.forward_diffusion

    def counted(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    model.forward_diffusion = counted
    dps = DPS(model, num_steps=args.steps, device=device, dtype=torch.float32)
    print(json.dumps({"ready": True, "deepinv": deepinv.__version__, "torch": torch.__version__,
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        calls["n"] = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = dps(y, physics, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "network_calls": calls["n"], "finite": bool(torch.isfinite(out).all())}), flush=True)


if __name__ == "__main__":
    main()

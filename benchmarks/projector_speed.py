"""Time the DiffStateGrad projector (basis + projection) per state size, full vs randomized SVD.

    python benchmarks/projector_speed.py [--device cuda] [--repeats 20]

Prints one row per (state shape, SVD mode): milliseconds for the basis (SVD + rank) and for one
projection, and the ranks chosen, all measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffstategrad import DiffStateGrad


def _time(fn, repeats, device):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"{'state':<16} {'svd':<18} {'basis ms':>9} {'project ms':>11}  ranks")
    for shape in [(1, 3, 64, 64), (1, 3, 256, 256), (8, 3, 256, 256), (1, 4, 64, 64), (1, 3, 512, 512)]:
        state = torch.randn(shape, generator=gen).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        for label, proj in [
            ("full", DiffStateGrad()),
            ("randomized q=16", DiffStateGrad(rank_rule="per_channel", svd="randomized", lowrank_q=16)),
            ("randomized q=64", DiffStateGrad(rank_rule="per_channel", svd="randomized", lowrank_q=64)),
        ]:
            t_basis, basis = _time(lambda: proj.basis(state), args.repeats, device)
            t_proj, _ = _time(lambda: proj.project(grad, basis), args.repeats, device)
            print(f"{'x'.join(map(str, shape)):<16} {label:<18} {t_basis:>9.2f} {t_proj:>11.2f}  {basis.ranks.tolist()[:4]}")


if __name__ == "__main__":
    main()

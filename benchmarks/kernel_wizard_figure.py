"""The model-card figure of the built-in KernelWizard (docs/models.md).

    python benchmarks/kernel_wizard_figure.py src/diffstategrad/weights/kernel_wizard --data data/photos \
        --out docs/images/kernel_wizard.png

For ``--count`` held-out pairs of the evaluation stream (``train_blur.evaluate_network``'s seed
1234, ``val`` split, 64x64 crops, a motion kernel in linear light per crop), one row each: the
sharp crop x, its real motion blur y, the network's reproduction G(x, F(x, y)) with the PSNRs of
x and of G against y, and the fixed-code operator A(x) of the nonlinear_deblur preset.
"""

from __future__ import annotations

import argparse

import torch

from diffstategrad.images import comparison_figure
from diffstategrad.operators.nonlinear_blur import NonlinearBlur
from diffstategrad.train_blur import BlurPairs, load_network


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(((a - b) ** 2).flatten(1).mean(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a KernelWizard folder or a train_blur run folder")
    parser.add_argument("--data", required=True, help="the prepared photo folder (its val split is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    network, _ = load_network(args.source)
    sharp, blurred = BlurPairs(args.data, "val", crop=64, seed=args.seed).batch(0, args.count)
    with torch.no_grad():
        fake = network.reconstruct(sharp, blurred)[0].clamp(0, 1)
        applied = (NonlinearBlur(network)(sharp * 2 - 1) + 1) / 2
    identity, reproduced = _psnr(sharp, blurred), _psnr(fake, blurred)
    panels = []
    for i in range(args.count):
        panels += [("sharp x (held out)", sharp[i:i + 1]),
                   (f"motion blur y  (x: {float(identity[i]):.1f} dB)", blurred[i:i + 1]),
                   (f"G(x, F(x, y))  {float(reproduced[i]):.1f} dB", fake[i:i + 1]),
                   ("A(x), the preset's fixed code", applied[i:i + 1])]
    path = comparison_figure([(t, im * 2 - 1) for t, im in panels], args.out, columns=4, panel_height=192)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

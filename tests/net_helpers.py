"""Helpers for tests of the built-in networks."""

import torch


def randomise_zero_inits(model):
    """The output conv and each block's second conv start at zero; perturb them so that every
    path is exercised and outputs depend on the input."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model

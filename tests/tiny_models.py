"""Tiny random networks shared by the solver tests (fixed weights from a seed)."""

import torch
from torch import nn

from diffstategrad.priors import DiffusionPrior, LatentDiffusionPrior
from diffstategrad.schedules import make_schedule

LDM = make_schedule("sqrt_linear")


class TinyLatent(LatentDiffusionPrior):
    """Random conv encoder/decoder (factor 2, 3 latent channels) and a random conv eps net."""

    def __init__(self, seed=0):
        super().__init__(LDM, latent_channels=3, downsampling=2)
        torch.manual_seed(seed)
        self.enc = nn.Conv2d(3, 3, 2, stride=2)
        self.dec = nn.ConvTranspose2d(3, 3, 2, stride=2)
        self.net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.eval()

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return torch.tanh(self.dec(z))

    def eps(self, z, t):
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0]).view(-1, 1, 1, 1) / 1000
        return self.net(torch.cat([z, t.expand(-1, 1, *z.shape[2:])], 1))


class TinyPixel(DiffusionPrior):
    def __init__(self, seed=0):
        super().__init__(make_schedule("linear"), channels=3)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.eval()

    def eps(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1) / 1000
        return self.net(torch.cat([x, t.expand(-1, 1, *x.shape[2:])], 1))

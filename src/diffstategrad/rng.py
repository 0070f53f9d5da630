"""Per-sample random number generation.

Every random draw a solver or a noise model makes for sample b of a batch comes from that
sample's own ``torch.Generator`` (NVlabs EDM's StackedRandomGenerator idea), so the result for
(image, seed) is the same whatever else is in the batch and whatever the batch size. Draws are
made on the CPU and moved to the target device, so a seed gives the same numbers on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["SampleGenerators", "as_generators", "derive_seed", "STREAMS"]

# Independent random streams derived from one user seed. Using the seed directly for all of them
# would make, say, the measurement noise and the initial diffusion noise the same draws.
STREAMS = ("operator", "noise", "solver")


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed for ``stream`` derived from the user's ``seed`` (NumPy SeedSequence).

    ``operator`` seeds kernels and masks, ``noise`` the measurement noise, ``solver`` every draw
    a solver makes. Streams are statistically independent of each other for the same seed.
    ``index`` numbers independent draws of one stream (posterior sample k of an item uses
    ``derive_seed(seed, "solver", k)``); index 0 is the stream itself.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; choose one of {STREAMS}")
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, STREAMS.index(stream) + 1] + ([int(index)] if index else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class SampleGenerators:
    """One CPU ``torch.Generator`` per batch element."""

    def __init__(self, seeds: Sequence[int]):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("at least one seed is needed")
        self.seeds = seeds
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, index) -> "SampleGenerators":
        """A view on a subset of the samples (the generators are shared, not copied)."""
        sub = object.__new__(SampleGenerators)
        idx = range(len(self))[index] if isinstance(index, slice) else index
        if isinstance(idx, int):
            idx = [idx]
        sub.seeds = [self.seeds[i] for i in idx]
        sub.generators = [self.generators[i] for i in idx]
        return sub

    def randn(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        """A (B, *shape) standard normal tensor, row b drawn from generator b."""
        out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        self._check_batch(x)
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        self._check_batch(x)
        out = torch.stack([torch.rand(tuple(x.shape[1:]), generator=g) for g in self.generators])
        return out.to(device=x.device, dtype=x.dtype)

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Poisson draws with per-element rates (B, ...), row b from generator b."""
        self._check_batch(rates)
        cpu = rates.detach().to("cpu", torch.float64)
        out = torch.stack([torch.poisson(cpu[b], generator=g) for b, g in enumerate(self.generators)])
        return out.to(device=rates.device, dtype=rates.dtype)

    def numpy(self, index: int = 0) -> np.random.Generator:
        """A NumPy generator derived from sample ``index``'s seed (for kernels and masks)."""
        return np.random.default_rng(self.seeds[index])

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} samples but {len(self)} generators")


def as_generators(seeds, batch_size: int) -> SampleGenerators:
    """Normalise ``seeds`` (None, an int, a sequence of ints, or SampleGenerators) to one
    generator per sample. An int s gives seeds s, s+1, ..., s+B-1; None gives 0..B-1."""
    if isinstance(seeds, SampleGenerators):
        gens = seeds
    elif seeds is None:
        gens = SampleGenerators(range(batch_size))
    elif isinstance(seeds, (int, np.integer)):
        gens = SampleGenerators(range(int(seeds), int(seeds) + batch_size))
    else:
        gens = SampleGenerators(list(seeds))
    if len(gens) != batch_size:
        raise ValueError(f"{len(gens)} seeds for a batch of {batch_size}")
    return gens

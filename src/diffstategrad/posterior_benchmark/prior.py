"""The benchmark's prior: a Gaussian mixture fitted to image patches, with exact scores.

Construction (docs/posterior-benchmark.md, "The prior"):

1. Patches: every ``size`` x ``size`` window, stride ``size // 4``, of the bundled example
   photographs (``diffstategrad.images.list_examples``) resized to 4 x and 8 x the patch size,
   and their mirror images, in [-1, 1], one channel (luminance as ``load_example`` gives it) or
   three.
2. Clusters: k-means (k-means++ start from a seeded generator, Lloyd iterations to a fixed
   point) on the patches with each channel's own mean removed, so that components differ by
   structure (edges, gradients, flat areas) rather than by brightness alone.
3. Components: for cluster k, the mean m_k of its (original) patches, its top ``rank``
   principal directions F_k (the leading right singular vectors scaled by the standard
   deviations) and an isotropic floor s^2 shared by all components:
   Sigma_k = F_k F_k^T + s^2 I (``GaussianPrior.low_rank``), weight w_k = cluster share.

The data manifold of this prior is the union of the affine subspaces m_k + range(F_k); the
floor s = 0.01 keeps every component a proper density (so responsibilities exist at t = 0) and
is far below the signal (per-pixel standard deviations of 0.2-0.5).

:class:`PatchMixturePrior` is a :class:`GaussianMixturePrior` whose components share the floor,
which lets it evaluate all components with a few stacked matrix products: the exact posterior
mean of the mixture under x_t = sqrt(a) x0 + sqrt(1 - a) n is

    E[x0 | x_t] = sum_k pi_k(x_t) [ m_k + g_perp r_k + Q_k ((g_k - g_perp) * Q_k^T r_k) ],
    r_k = x_t - sqrt(a) m_k,  g_k = sqrt(a) lam_k / (a lam_k + 1 - a),  g_perp = sqrt(a) s^2 / (a s^2 + 1 - a),

the same numbers as the parent class (the tests check it), at a fraction of its cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffstategrad.images import list_examples, load_example
from diffstategrad.priors.analytic import GaussianMixturePrior, GaussianPrior

__all__ = ["PatchMixturePrior", "fit_patch_mixture", "image_patches", "kmeans"]


class PatchMixturePrior(GaussianMixturePrior):
    """A Gaussian mixture whose components share one isotropic floor, evaluated all at once.

    Besides the exact denoiser (``posterior_mean``, ``responsibilities``, hence ``eps`` and
    ``denoise``) it gives the clean-data quantities the benchmark reports:
    ``log_component_density`` (log w_k N(x; m_k, Sigma_k)), ``component_labels`` (the most
    responsible component) and ``off_manifold`` (the distance to the nearest m_k + range(Q_k)).
    """

    def __init__(self, weights: Sequence[float], components: Sequence[GaussianPrior]):
        super().__init__(weights, components)
        floors = {float(c.perp_var) for c in components}
        if len(floors) != 1 or next(iter(floors)) <= 0:
            raise ValueError("PatchMixturePrior needs one positive perp_var shared by all components")
        self.floor = floors.pop()
        ranks = [c.eigvals.numel() for c in components]
        seg = torch.zeros(sum(ranks), len(components), dtype=torch.float64)
        start = 0
        for k, r in enumerate(ranks):
            seg[start : start + r, k] = 1.0
            start += r
        Q = torch.cat([c.eigvecs for c in components], dim=1)  # (d, R)
        M = torch.stack([c.mean for c in components])  # (K, d)
        self.register_buffer("stacked_eigvecs", Q)
        self.register_buffer("stacked_eigvals", torch.cat([c.eigvals for c in components]))
        self.register_buffer("segments", seg)  # column j belongs to component k: seg[j, k] = 1
        self.register_buffer("means", M)
        self.register_buffer("mean_coords", (Q * (seg @ M).T).sum(0))  # q_j . m_k(j), (R,)
        self.register_buffer("mean_sqnorms", (M**2).sum(1))
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"prior over {self.shape}, got states of shape {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def _stats(self, x: torch.Tensor, a: torch.Tensor):
        """Per-component statistics of flat x (B, d) at alpha_bar a (B, 1): the coordinates
        Q_k^T r_k (B, R), log w_k + log N(x; sqrt(a) m_k, a Sigma_k + (1 - a) I) (B, K) and the
        per-column and floor variances."""
        sa = a.sqrt()
        par = x @ self.stacked_eigvecs - sa * self.mean_coords
        r2 = (x * x).sum(1, keepdim=True) - 2 * sa * (x @ self.means.T) + a * self.mean_sqnorms
        var_par = a * self.stacked_eigvals + 1 - a
        var_perp = a * self.floor + 1 - a
        par2 = par**2
        maha = (par2 / var_par) @ self.segments + (r2 - par2 @ self.segments) / var_perp
        logdet = var_par.log() @ self.segments + (self.dim - self.ranks) * var_perp.log()
        logp = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi)) + self.log_weights
        return par, logp, var_par, var_perp

    def responsibilities(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        a = alpha_bar.to(torch.float64).reshape(-1, 1)
        return torch.softmax(self._stats(self._flat(x_t), a)[1], dim=-1)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        x = self._flat(x_t)
        a = alpha_bar.to(torch.float64).reshape(-1, 1)
        sa = a.sqrt()
        par, logp, var_par, var_perp = self._stats(x, a)
        resp = torch.softmax(logp, dim=-1)  # (B, K)
        g_par = sa * self.stacked_eigvals / var_par
        g_perp = sa * self.floor / var_perp
        column_resp = resp @ self.segments.T  # (B, R): the responsibility of each column's component
        out = g_perp * x + (resp * (1 - g_perp * sa)) @ self.means
        return out + (column_resp * (g_par - g_perp) * par) @ self.stacked_eigvecs.T

    # -- the clean-data view (t = 0) ---------------------------------------------------------------

    def log_component_density(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; m_k, Sigma_k) for images x (B, C, H, W): (B, K) float64."""
        flat = self._flat(x)
        return self._stats(flat, torch.ones(flat.shape[0], 1, dtype=torch.float64))[1]

    def component_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The most responsible component of each image: (B,) int64. Given x, the measurement
        carries no information on the component, so this is also the argmax under the
        posterior."""
        return self.log_component_density(x).argmax(dim=1)

    def off_manifold(self, x: torch.Tensor) -> torch.Tensor:
        """min_k ||(I - Q_k Q_k^T)(x - m_k)||: the distance of each image to the nearest
        component's principal affine subspace, (B,) float64."""
        flat = self._flat(x)
        par = flat @ self.stacked_eigvecs - self.mean_coords
        r2 = (flat * flat).sum(1, keepdim=True) - 2 * (flat @ self.means.T) + self.mean_sqnorms
        return (r2 - par**2 @ self.segments).clamp(min=0).min(dim=1).values.sqrt()

    def sample_with_labels(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws (n, C, H, W) float64 and the component each was drawn from (n,)."""
        labels = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        draws = [self.components[int(k)].sample(1, generator) for k in labels]
        return torch.cat(draws), labels


def image_patches(channels: int, size: int = 16, images: Sequence[str] | None = None) -> torch.Tensor:
    """Every size x size window (stride size // 4) of the example photographs resized to 4x and
    8x ``size``, plus the mirrored windows: (N, channels, size, size) float64 in [-1, 1]."""
    stride = max(size // 4, 1)
    out = []
    for name in images or list_examples():
        for side in (4 * size, 8 * size):
            image = load_example(name, side, channels=channels)[0].to(torch.float64)
            windows = image.unfold(1, size, stride).unfold(2, size, stride)  # (C, nh, nw, size, size)
            windows = windows.permute(1, 2, 0, 3, 4).reshape(-1, channels, size, size)
            out += [windows, windows.flip(-1)]
    return torch.cat(out)


def _nearest(points: torch.Tensor, sqnorms: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of the nearest centre of every point (``sqnorms``: ||p||^2, (N, 1))."""
    d2 = sqnorms - 2 * points @ centres.T + (centres**2).sum(1)
    best = d2.min(dim=1)
    return best.indices, best.values.clamp(min=0)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Cluster labels (N,) of ``points`` (N, D) by k-means: a k-means++ start drawn from
    ``generator``, then Lloyd iterations until the labels stop changing (at most
    ``iterations``)."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    sqnorms = (points**2).sum(1, keepdim=True)
    centres = points[torch.randint(n, (1,), generator=generator)]
    for _ in range(k - 1):
        d2 = _nearest(points, sqnorms, centres)[1]
        centres = torch.cat([centres, points[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
    labels = _nearest(points, sqnorms, centres)[0]
    for _ in range(iterations):
        onehot = torch.nn.functional.one_hot(labels, k).to(points.dtype)
        counts = onehot.sum(0)[:, None]
        centres = torch.where(counts > 0, onehot.T @ points / counts.clamp(min=1), centres)
        new = _nearest(points, sqnorms, centres)[0]
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def fit_patch_mixture(shape: Sequence[int], components: int = 8, rank: int = 16, floor_std: float = 0.01, seed: int = 0,
                      images: Sequence[str] | None = None) -> PatchMixturePrior:
    """The benchmark prior for images of ``shape`` (C, S, S), fitted as the module docstring
    describes. Deterministic given (shape, components, rank, floor_std, seed, images)."""
    channels, height, width = (int(s) for s in shape)
    if height != width:
        raise ValueError(f"the patch prior needs square images, got {height}x{width}")
    patches = image_patches(channels, height, images)
    n = patches.shape[0]
    flat = patches.reshape(n, -1)
    structure = (patches - patches.mean(dim=(-2, -1), keepdim=True)).reshape(n, -1)
    labels = kmeans(structure, components, torch.Generator().manual_seed(int(seed)))
    weights, comps = [], []
    for k in range(components):
        members = flat[labels == k]
        if members.shape[0] <= rank:
            raise ValueError(f"cluster {k} has {members.shape[0]} patches, too few for rank {rank}; use fewer components")
        mean = members.mean(0)
        centred = members - mean
        var, vecs = torch.linalg.eigh(centred.T @ centred / (members.shape[0] - 1))  # ascending
        factor = vecs[:, -rank:].flip(1) * var[-rank:].flip(0).clamp(min=0).sqrt()
        comps.append(GaussianPrior.low_rank((channels, height, width), mean, factor, perp_var=floor_std**2))
        weights.append(float(members.shape[0]))
    return PatchMixturePrior(weights, comps)

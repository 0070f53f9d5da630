"""DiffStateGrad: project a measurement-guidance gradient onto the low-rank subspace of the
current diffusion state (Zirvi, Tolooshams, Anandkumar, "Diffusion State-Guided Projected
Gradient for Inverse Problems", ICLR 2025).

For a state Z (one sample: C channels of H x W matrices) and a gradient G of the same shape,
each channel is factored Z_c = U_c diag(s_c) V_c^T, a rank r is chosen from the energy of the
singular values (variance cutoff tau), and

    P(G)_c = U_{c,r} U_{c,r}^T  G_c  V_{c,r} V_{c,r}^T          (two-sided "core" projection)

is returned in place of G. The projection is orthogonal (P(P(G)) = P(G), ||P(G)|| <= ||G||),
keeps the guidance on the directions the state itself occupies, and is the identity at full
rank when H = W.

Two faces:
- :class:`DiffStateGrad`, the projector class solvers use: per-sample bases and ranks, two rank
  rules, an optional fixed rank, four SVD back-ends (``"auto"``, ``"full"``, ``"gram"``,
  ``"randomized"``), the basis optionally computed on the host while the network runs
  (:meth:`DiffStateGrad.basis_async`), any dtype/device;
- :func:`compute_rank_for_explained_variance`, :func:`compute_svd_and_adaptive_rank` and
  :func:`apply_diffstategrad`, drop-in replacements for the three helpers of the official code
  (same signatures, same results for batch size 1; see their docstrings for the differences).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = [
    "DiffStateGrad",
    "StateBasis",
    "PendingBasis",
    "RANK_RULES",
    "SVD_BACKENDS",
    "SVD_DEVICES",
    "auto_svd_backend",
    "rank_from_energy",
    "compute_rank_for_explained_variance",
    "compute_svd_and_adaptive_rank",
    "apply_diffstategrad",
]

RANK_RULES = ("reference", "per_channel")


# ---------------------------------------------------------------------------------------------
# Rank rules
# ---------------------------------------------------------------------------------------------


def _cutoff_index(energy: np.ndarray, cutoff: float) -> np.ndarray:
    """Number of leading entries of ``energy`` (last axis, descending) whose cumulative share
    first reaches ``cutoff``: searchsorted(cumsum / sum, cutoff, side='left') + 1; K where the
    share never reaches it (all-zero energy)."""
    total = energy.sum(axis=-1, keepdims=True)
    share = energy.cumsum(axis=-1) / np.where(total > 0, total, 1.0)
    reached = share >= cutoff
    return np.where(reached.any(axis=-1), reached.argmax(axis=-1), energy.shape[-1] - 1) + 1


def rank_from_energy(energy: torch.Tensor, cutoff: float, rule: str = "reference") -> torch.Tensor:
    """Adaptive rank from per-channel squared singular values.

    Args:
        energy: (B, C, K) squared singular values, each channel in descending order.
        cutoff: variance cutoff tau in (0, 1].
        rule: ``"reference"`` — the official code: the C channel spectra are concatenated
            (channel 0 first), the cutoff is found on the flattened cumulative energy and the
            position is divided by the number of channels (the official code divides by a
            hard-coded 3 and only ever sees C = 3); ``"per_channel"`` — the official docstring's
            intent: each channel's own cutoff rank, averaged over channels (floor, as the
            official division).

    Returns:
        (B,) int64 ranks in [0, K] on the device of ``energy``. Rank 0 is possible (e.g.
        tau = 0.5 with the reference rule). The rule runs in float64 NumPy on the host: a few
        hundred numbers, for which a dozen small torch kernels cost more than the arithmetic.
    """
    if energy.ndim != 3:
        raise ValueError(f"energy must be (B, C, K), got {tuple(energy.shape)}")
    if not 0.0 < cutoff <= 1.0:
        raise ValueError(f"var_cutoff must be in (0, 1], got {cutoff}")
    if rule not in RANK_RULES:
        raise ValueError(f"unknown rank_rule {rule!r}; choose one of {RANK_RULES}")
    e = energy.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(_ranks(e, cutoff, rule)).to(energy.device)


def _ranks(energy: np.ndarray, cutoff: float, rule: str) -> np.ndarray:
    """:func:`rank_from_energy` on a float64 (B, C, K) array: (B,) int64."""
    B, C, K = energy.shape
    if rule == "reference":
        ranks = _cutoff_index(energy.reshape(B, C * K), cutoff) // C
    else:
        ranks = _cutoff_index(energy, cutoff).sum(axis=-1) // C
    return np.minimum(np.maximum(ranks, 0), K).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# SVD of the state: the back-ends
# ---------------------------------------------------------------------------------------------

SVD_BACKENDS = ("auto", "full", "gram", "randomized")
SVD_DEVICES = ("auto", "state", "cpu")

# The gram back-end gets the other side's singular vectors as Z^T u_i / s_i. Their loss of
# orthonormality is about eps64 (s_1 / s_i)^2, below 1e-8 while every singular value a sample
# uses is above this fraction of the largest; for the (nearly rank-deficient) matrices where
# one is not, that side is orthonormalised by a QR factorisation of Z^T U_r instead.
GRAM_DIVISION_FLOOR = 1e-4

# ``svd="auto"``: the exact back-end per device and state size (min(H, W)), measured with
# benchmarks/speed.py --part svd (docs/performance.md). On the CPU (MKL) the float64 Gram
# eigendecomposition was no faster than the float32 SVD at any size measured, so auto is the
# full SVD there (None: never gram). On CUDA (untested: no GPU was available when the rule was
# written; it only applies with svd_device="state") the full SVD for K <= 32, where cuSOLVER
# has a batched Jacobi SVD, and the Gram back-end above.
AUTO_GRAM_MIN_SIZE = {"cpu": None, "cuda": 33}


def _svd_dtype(x: torch.Tensor) -> torch.dtype:
    """SVD precision: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def auto_svd_backend(device, dtype: torch.dtype, height: int, width: int) -> str:
    """The exact back-end ``svd="auto"`` uses for states of this device, dtype and size:
    ``"full"`` or ``"gram"`` (see ``AUTO_GRAM_MIN_SIZE``). float64 states always get the full
    SVD: the Gram matrix squares the condition number, which float64 arithmetic no longer
    absorbs when the state itself is float64."""
    if dtype == torch.float64:
        return "full"
    threshold = AUTO_GRAM_MIN_SIZE.get(torch.device(device).type)
    return "gram" if threshold is not None and min(height, width) >= threshold else "full"


def _randomized_svd(z: torch.Tensor, q: int, oversample: int = 8, power_iters: int = 2):
    """Top-q SVD of each (H, W) matrix in ``z`` (..., H, W) by a randomized range finder
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) with a fixed test matrix, so the result is
    deterministic and independent of the global RNG and of the batch."""
    H, W = z.shape[-2:]
    k = min(q + oversample, H, W)
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    omega = torch.randn(W, k, generator=gen, dtype=z.dtype).to(z.device)
    Y = z @ omega
    Q, _ = torch.linalg.qr(Y)
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(z.transpose(-1, -2) @ Q)
        Q, _ = torch.linalg.qr(z @ Q)
    small = Q.transpose(-1, -2) @ z  # (..., k, W)
    Ub, s, Vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ Ub
    return U[..., :q], s[..., :q], Vh[..., :q, :]


def _gram_eigh(z64: torch.Tensor):
    """Eigendecomposition of the smaller Gram matrix of every (H, W) matrix of ``z64`` (float64):
    Z Z^T (H x H) when H <= W, else Z^T Z (W x W). Returns (energy, E, tall): the eigenvalues
    (..., K) in descending order clamped at 0 (the squared singular values), the eigenvectors
    E (..., K, K) in the same order (U when not tall, V when tall) and tall = H > W."""
    tall = z64.shape[-2] > z64.shape[-1]
    gram = z64.transpose(-1, -2) @ z64 if tall else z64 @ z64.transpose(-1, -2)
    energy, E = torch.linalg.eigh(gram)
    return energy.flip(-1).clamp(min=0), E.flip(-1), tall


def _gram_other_side(z64: torch.Tensor, E_r: torch.Tensor, energy: torch.Tensor, ranks: torch.Tensor, tall: bool) -> torch.Tensor:
    """The other side's top-R singular vectors from the Gram side's top-R eigenvectors E_r
    (..., K, R): Z^T u_i / s_i (or Z v_i / s_i when tall), orthonormal to ~1e-8 while each
    sample's smallest used singular value is above ``GRAM_DIVISION_FLOOR`` * s_1; for the
    matrices where it is not (and for all-zero ones) the Q factor of Z^T U_r, an orthonormal
    basis of the same subspace that stays orthonormal whatever the singular values.
    ``ranks`` (B,) are the samples' ranks; columns beyond a sample's rank are finite but unused."""
    R = E_r.shape[-1]
    scaled = (z64 @ E_r) if tall else (z64.transpose(-1, -2) @ E_r)  # columns s_i v_i (or s_i u_i)
    if R == 0:
        return scaled
    s = energy[..., :R].sqrt()
    other = scaled / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-2)
    used = (ranks.to(s.device).clamp(min=1) - 1).view(-1, *([1] * (s.ndim - 1))).expand(*s.shape[:-1], 1)
    smallest_used = s.gather(-1, used).squeeze(-1)
    fine = smallest_used > GRAM_DIVISION_FLOOR * energy[..., 0].sqrt()
    fine |= (ranks.to(s.device) == 0).view(-1, *([1] * (s.ndim - 2)))
    if not bool(fine.all()):
        other[~fine] = torch.linalg.qr(scaled[~fine]).Q
    return other


@dataclass
class StateBasis:
    """Per-sample, per-channel SVD bases of a state and the rank chosen for each sample.

    U: (B, C, H, R), Vh: (B, C, R, W) with R = max(ranks) (columns beyond a sample's own rank are
    never used), singular_values: (B, C, K') with K' = K (full SVD, gram) or q (randomized),
    ranks: (B,) int64 (on the CPU), backend: the SVD back-end that produced it.

    With the ``gram`` back-end the leading R columns of U and rows of Vh span the same
    subspaces as the SVD's (which is all the projection uses); for nearly rank-deficient
    matrices the side computed by QR is an orthonormal basis of the subspace rather than the
    individual singular vectors.

    A basis remembers how often it was used: the first projection uses the r x r core form
    (cheapest once); from the second on, the dense projectors P_U = U_r U_r^T and
    P_V = V_r V_r^T are built once (:meth:`dense_projectors`) and every projection is two
    batched matrix products (DAPS's MCMC loop and ReSample's inner optimisation reuse a basis
    tens to thousands of times).
    """

    U: torch.Tensor
    Vh: torch.Tensor
    singular_values: torch.Tensor
    ranks: torch.Tensor
    backend: str = "full"
    uses: int = field(default=0, repr=False, compare=False)
    _dense: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.U.shape[0]

    def to(self, device) -> "StateBasis":
        """The same basis with its factors on ``device`` (ranks stay on the CPU)."""
        return StateBasis(U=self.U.to(device), Vh=self.Vh.to(device), singular_values=self.singular_values.to(device),
                          ranks=self.ranks, backend=self.backend)

    def dense_projectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_U, P_V): (B, C, H, H) and (B, C, W, W), each sample's U_r U_r^T and V_r V_r^T at its
        own rank; built on first call and kept."""
        if self._dense is None:
            B, C, H, _ = self.U.shape
            W = self.Vh.shape[-1]
            P_U = self.U.new_zeros(B, C, H, H)
            P_V = self.U.new_zeros(B, C, W, W)
            for b in range(B):
                r = int(self.ranks[b])
                if r:
                    U, Vh = self.U[b, :, :, :r], self.Vh[b, :, :r, :]
                    P_U[b] = U @ U.transpose(-1, -2)
                    P_V[b] = Vh.transpose(-1, -2) @ Vh
            self._dense = (P_U, P_V)
        return self._dense


class PendingBasis:
    """A basis on its way (:meth:`DiffStateGrad.basis_async`); :meth:`result` waits for it and
    returns it on the state's device."""

    def __init__(self, future: Future, device: torch.device):
        self._future = future
        self._device = device

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> StateBasis:
        basis = self._future.result()
        return basis if basis.U.device == self._device else basis.to(self._device)


_WORKER: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    """One background thread for host-side bases (LAPACK releases the GIL)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffstategrad-basis")
    return _WORKER


# ---------------------------------------------------------------------------------------------
# The projector
# ---------------------------------------------------------------------------------------------


@dataclass
class DiffStateGrad:
    """The DiffStateGrad gradient projector.

    Args:
        var_cutoff: variance cutoff tau for the adaptive rank (official default 0.99).
        period: project when ``step % period == 0``; 0 disables projection (official default 1).
            Solvers decide what a step is (a sampler step, or an inner optimiser iteration in
            ReSample) and document it.
        rank_rule: ``"reference"`` (default; the official code's flattened rule) or
            ``"per_channel"`` (the documented intent). See :func:`rank_from_energy`. The default
            is the reference rule because it is the rule every published DiffStateGrad number was
            produced with; the per-channel rule projects much harder (ranks of 24-50 instead of
            174-178 for clean 256x256 photographs) and is offered for study.
        rank: a fixed rank used instead of the adaptive one (clamped to [0, K]).
        min_rank: lower bound on the adaptive rank. Default 1: a rank of 0 would zero the whole
            guidance gradient (the official code does exactly that for low cutoffs, silently);
            set 0 to reproduce it.
        svd: the SVD back-end. ``"full"``: torch.linalg.svd (exact). ``"gram"``: the
            eigendecomposition of the smaller Gram matrix (Z Z^T or Z^T Z) in float64, the other
            side from Z^T U / s (exact to float rounding; see :func:`_gram_other_side`).
            ``"randomized"``: the top ``lowrank_q`` triplets by a deterministic randomized range
            finder (inexact; ranks are computed against the exact Frobenius energy with the
            unseen tail spread evenly, and capped at q). ``"auto"`` (default): the faster exact
            one for the device and size (:func:`auto_svd_backend`).
        lowrank_q: number of singular triplets the randomized SVD computes.
        svd_device: where the basis of a state that is not on the CPU is computed: ``"state"``
            (its own device), ``"cpu"`` (copied to the host and back: the host's LAPACK is
            faster than cuSOLVER for these many small matrices, and :meth:`basis_async` can then
            overlap it with the network pass) or ``"auto"`` (default: ``"cpu"``; untested on a
            GPU when written, see docs/performance.md). CPU states are always decomposed in place.
    """

    var_cutoff: float = 0.99
    period: int = 1
    rank_rule: str = "reference"
    rank: int | None = None
    min_rank: int = 1
    svd: str = "auto"
    lowrank_q: int = 64
    svd_device: str = "auto"

    def __post_init__(self):
        if not 0.0 < float(self.var_cutoff) <= 1.0:
            raise ValueError(f"var_cutoff must be in (0, 1], got {self.var_cutoff}")
        if self.period is None or int(self.period) != self.period or self.period < 0:
            raise ValueError(f"period must be a non-negative integer (0 disables), got {self.period!r}")
        if self.rank_rule not in RANK_RULES:
            raise ValueError(f"unknown rank_rule {self.rank_rule!r}; choose one of {RANK_RULES}")
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.min_rank < 0:
            raise ValueError(f"min_rank must be >= 0, got {self.min_rank}")
        if self.svd not in SVD_BACKENDS:
            raise ValueError(f"svd must be one of {', '.join(SVD_BACKENDS)}, got {self.svd!r}")
        if self.lowrank_q < 1:
            raise ValueError(f"lowrank_q must be >= 1, got {self.lowrank_q}")
        if self.svd_device not in SVD_DEVICES:
            raise ValueError(f"svd_device must be one of {', '.join(SVD_DEVICES)}, got {self.svd_device!r}")

    # -- configuration ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> "DiffStateGrad":
        return cls(**config)

    # -- gating ----------------------------------------------------------------------------

    def applies_at(self, step: int) -> bool:
        """Whether the projection applies at this step (``period`` gating)."""
        return self.period != 0 and int(step) % self.period == 0

    # -- basis -----------------------------------------------------------------------------

    def basis_device(self, state: torch.Tensor) -> torch.device:
        """The device the basis of ``state`` is computed on (see ``svd_device``)."""
        if state.device.type == "cpu" or self.svd_device == "state":
            return state.device
        return torch.device("cpu")

    def backend_for(self, state: torch.Tensor) -> str:
        """The back-end that decomposes ``state``: ``svd`` with ``"auto"`` resolved, and
        ``"randomized"`` falling back to ``"full"`` when ``lowrank_q`` >= min(H, W)."""
        H, W = state.shape[-2:]
        if self.svd == "randomized":
            return "randomized" if self.lowrank_q < min(H, W) else "full"
        if self.svd == "auto":
            return auto_svd_backend(self.basis_device(state), _svd_dtype(state), H, W)
        return self.svd

    def basis(self, state: torch.Tensor) -> StateBasis:
        """SVD of every channel of every sample of ``state`` (B, C, H, W) and one rank per sample,
        on the state's device."""
        where = self._check_state(state)
        if where == state.device:
            return self._decompose(state.detach())
        return self._decompose(state.detach().to(where)).to(state.device)

    def basis_async(self, state: torch.Tensor) -> PendingBasis:
        """Start the basis of ``state``; ``.result()`` returns what :meth:`basis` would.

        When the basis is computed on the host for a state on an accelerator (``svd_device``),
        the state is copied to the host now and decomposed by a background thread, so that a
        solver can run the network pass in the meantime (DPS does: its subspace is that of x_t,
        known before the network is called). Otherwise the basis is computed right away."""
        where = self._check_state(state)
        if where == state.device:
            future: Future = Future()
            future.set_result(self._decompose(state.detach()))
            return PendingBasis(future, state.device)
        host = state.detach().to(where)
        return PendingBasis(_worker().submit(self._decompose, host), state.device)

    def _check_state(self, state) -> torch.device:
        if not isinstance(state, torch.Tensor) or state.ndim != 4:
            raise ValueError(f"state must be a (B, C, H, W) tensor, got {getattr(state, 'shape', type(state))}")
        return self.basis_device(state)

    def _decompose(self, state: torch.Tensor) -> StateBasis:
        z = state.to(_svd_dtype(state))
        if not math.isfinite(float(z.sum())):  # one reduction: any inf / nan (or overflow) shows
            raise FloatingPointError("DiffStateGrad: the state has non-finite values; cannot take its SVD")
        B, C, H, W = z.shape
        K = min(H, W)
        backend = self.backend_for(z)
        cap = K
        if backend == "randomized":
            U, s, Vh = _randomized_svd(z, self.lowrank_q)
            energy = _padded_energy(s, z, K)
            cap = self.lowrank_q
        elif backend == "full":
            U, s, Vh = torch.linalg.svd(z, full_matrices=False)
            energy = s
        else:
            z64 = z.to(torch.float64)
            energy, E, tall = _gram_eigh(z64)
            s = energy.sqrt().to(z.dtype)
        if self.rank is not None:
            ranks = np.full(B, min(int(self.rank), cap), dtype=np.int64)
        else:
            e = energy.to("cpu", torch.float64).numpy()
            ranks = _ranks(e * e if backend == "full" else e, self.var_cutoff, self.rank_rule)
            ranks = np.minimum(np.maximum(ranks, min(self.min_rank, cap)), cap)
        R = int(ranks.max()) if B else 0
        ranks = torch.from_numpy(ranks)
        if backend == "gram":
            E_r = E[..., :R]
            other = _gram_other_side(z64, E_r, energy, ranks, tall)
            U, V = (other, E_r) if tall else (E_r, other)
            return StateBasis(U=U.to(z.dtype), Vh=V.transpose(-1, -2).to(z.dtype), singular_values=s, ranks=ranks, backend=backend)
        return StateBasis(U=U[..., :R], Vh=Vh[..., :R, :], singular_values=s, ranks=ranks, backend=backend)

    # -- projection ------------------------------------------------------------------------

    def project(self, grad: torch.Tensor, basis: StateBasis) -> torch.Tensor:
        """P(G) for every sample with its own basis and rank; keeps G's shape, dtype and device.

        The first projection with a basis uses the r x r core form per sample; later ones the
        basis's dense projectors (two batched matrix products; see :class:`StateBasis`)."""
        if grad.ndim != 4:
            raise ValueError(f"grad must be (B, C, H, W), got {tuple(grad.shape)}")
        B, C, H, W = grad.shape
        if basis.U.shape[0] not in (1, B) or basis.U.shape[1] != C or basis.U.shape[2] != H or basis.Vh.shape[3] != W:
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} does not match the state basis "
                f"(U {tuple(basis.U.shape)}, Vh {tuple(basis.Vh.shape)})"
            )
        basis.uses += 1
        if basis.uses > 1:
            P_U, P_V = basis.dense_projectors()
            return (P_U @ grad.to(P_U.dtype) @ P_V).to(grad.dtype)
        ranks = basis.ranks.tolist()
        out = []
        for b in range(B):
            j = b if basis.U.shape[0] == B else 0
            out.append(_project_sample(grad[b], basis.U[j, :, :, : ranks[j]], basis.Vh[j, :, : ranks[j], :]))
        return torch.stack(out) if B > 1 else out[0].unsqueeze(0)

    def __call__(self, grad: torch.Tensor, state: torch.Tensor | None = None, step: int = 0, basis: StateBasis | None = None) -> torch.Tensor:
        """Project ``grad`` if ``applies_at(step)``, with ``basis`` or the basis of ``state``."""
        if not self.applies_at(step):
            return grad
        if basis is None:
            if state is None:
                raise ValueError("DiffStateGrad needs the diffusion state (or a precomputed basis) to project")
            basis = self.basis(state)
        return self.project(grad, basis)


def _padded_energy(s: torch.Tensor, z: torch.Tensor, K: int) -> torch.Tensor:
    """Energy spectrum (B, C, K) from the top-q singular values: the exact Frobenius energy not
    seen in the top q is spread evenly over the remaining K - q positions."""
    top = s.to(torch.float64) ** 2
    total = z.to(torch.float64).pow(2).sum(dim=(-2, -1))
    rest = (total - top.sum(-1)).clamp(min=0)
    q = top.shape[-1]
    tail = (rest / (K - q)).unsqueeze(-1).expand(*rest.shape, K - q)
    return torch.cat([top, tail], dim=-1)


def _project_sample(g: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """U U^T g V V^T per channel for one sample; g (C, H, W), U (C, H, r), Vh (C, r, W)."""
    if U.shape[-1] == 0:
        return torch.zeros_like(g)
    work = g.to(U.dtype)
    core = U.transpose(-1, -2) @ work @ Vh.transpose(-1, -2)  # (C, r, r)
    return (U @ core @ Vh).to(g.dtype)


# ---------------------------------------------------------------------------------------------
# Drop-in replacements for the official helpers (diffstategrad_utils.py)
# ---------------------------------------------------------------------------------------------


def compute_rank_for_explained_variance(singular_values, cutoff: float) -> int:
    """The official rank rule, as the official code runs it.

    ``singular_values`` is what the official code passes: a list holding one (C, K) array (or a
    list of 1-D per-channel arrays, or a bare array/tensor, which is treated as a one-element
    list). For each element the squared values are flattened, the cumulative share is searched
    for ``cutoff`` (``side='left'``) and the position + 1 is added to a total, which is divided
    by 3 and truncated. With the official call this is the flattened "reference" rule, e.g. for
    s = [[4, 2, 1, .5], [3, 1, .5, .1], [2, 1, .2, .1]]: tau 0.9 -> 3, 0.99 -> 3, 0.5 -> 0.
    Unlike the official file this module imports NumPy itself.
    """
    if isinstance(singular_values, (torch.Tensor, np.ndarray)):
        singular_values = [singular_values]
    total = 0
    for s in singular_values:
        s = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        squared = np.square(s).ravel()
        share = np.cumsum(squared) / np.sum(squared)
        total += int(np.searchsorted(share, cutoff)) + 1
    return int(total / 3)


def compute_svd_and_adaptive_rank(z_t: torch.Tensor, var_cutoff: float = 0.99):
    """SVD of the state and its adaptive rank, as the official helper.

    For a batch of one (the only case the official code supports) it returns exactly the
    official outputs: U (C, H, K), s (C, K), Vh (C, K, W) of ``z_t[0]`` (``full_matrices=False``)
    and ``adaptive_rank`` (int) from :func:`compute_rank_for_explained_variance`.

    Differences from the official code: for B > 1 every sample gets its own SVD and rank
    (the official code silently uses sample 0 for all): U (B, C, H, K), s (B, C, K),
    Vh (B, C, K, W) and ``adaptive_rank`` a list of B ints. Low-precision states (bfloat16,
    float16) are decomposed in float32, which ``torch.linalg.svd`` needs.
    """
    if not isinstance(z_t, torch.Tensor) or z_t.ndim != 4:
        raise ValueError(f"z_t must be a (B, C, H, W) tensor, got {getattr(z_t, 'shape', type(z_t))}")
    z = z_t.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    U, s, Vh = torch.linalg.svd(z, full_matrices=False)
    ranks = [compute_rank_for_explained_variance([s[b]], var_cutoff) for b in range(z.shape[0])]
    if z.shape[0] == 1:
        return U[0], s[0], Vh[0], ranks[0]
    return U, s, Vh, ranks


def apply_diffstategrad(norm_grad, iteration_count, period, U=None, s=None, Vh=None, adaptive_rank=None):
    """Project a gradient with a basis from :func:`compute_svd_and_adaptive_rank`, as the
    official helper: only when ``period != 0 and iteration_count % period == 0`` (otherwise the
    gradient is returned unchanged), with the same rank for every channel and the two-sided
    projection U_r U_r^T G V_r V_r^T.

    Differences from the official code: a gradient batch (B, C, H, W) with a batched basis is
    projected sample by sample with each sample's own basis and rank (an unbatched basis is
    applied to every sample); the output keeps the gradient's dtype (the official code casts to
    float32) and its batch size (the official output always has batch 1). ``period=None``
    raises TypeError and a missing basis raises ValueError, as in the official code.
    """
    if period is None:
        raise TypeError("apply_diffstategrad: period must be an integer (0 disables the projection), got None")
    if period == 0 or iteration_count % period != 0:
        return norm_grad
    if U is None or s is None or Vh is None or adaptive_rank is None:
        raise ValueError("apply_diffstategrad: U, s, Vh and adaptive_rank are required when a projection is due")
    g = norm_grad if norm_grad.ndim == 4 else norm_grad.unsqueeze(0)
    if U.ndim == 3:
        U, Vh = U.unsqueeze(0), Vh.unsqueeze(0)
    ranks = [adaptive_rank] if isinstance(adaptive_rank, (int, np.integer)) else list(adaptive_rank)
    basis = StateBasis(U=U, Vh=Vh, singular_values=s, ranks=torch.tensor(ranks, dtype=torch.long))
    out = DiffStateGrad(period=1).project(g, basis)
    return out if norm_grad.ndim == 4 else out[0]

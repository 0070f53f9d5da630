"""Fast paths for the prior's network: reduced precision, channels-last layout, torch.compile.

``configure_network(prior, precision=..., channels_last=..., compile=...)`` makes every network
pass of a prior run in the requested mode, for every solver at once: the hook is in
:class:`~diffstategrad.priors.base.DiffusionPrior`, whose subclasses' ``eps`` and
``eps_and_variance`` (and, on request, a latent prior's ``encode`` / ``decode``) are wrapped
when the class is defined (``DiffusionPrior.__init_subclass__``). ``x0``, ``score`` and
``denoise`` go through ``eps``, so DPS, PSLD, ReSample and (latent) DAPS all see it. The CLI's
``--precision`` / ``--channels-last`` / ``--compile`` on ``solve`` and ``evaluate`` apply it
through ``diffstategrad.pipeline.configure_prior`` (the autoencoder left in float32).

What runs where:

- **The network pass** (the epsilon network, including the prior's own pre/post-conditioning
  arithmetic) runs under ``torch.autocast`` in the requested precision, and its outputs are cast
  back to the input's dtype (float32), so the solver sees float32 tensors.
- **Everything else stays float32**: the solver state and its update, the DiffStateGrad SVD and
  projection, the operator and the data term. A latent prior's decoder and encoder count as
  part of the data term by default (``A(D(z))``; ReSample optimises through it to a tolerance of
  1e-6 in MSE): they run in float32 unless ``autoencoder=True``.
- The backward pass of a network pass (DPS's VJP) follows autocast's rule: each operation's
  gradient is computed in the dtype the forward used. tf32 is a CUDA math mode rather than a
  dtype: it is switched on around the forward pass only (restored afterwards), so a VJP taken
  later runs at the global setting (``torch.backends.cuda.matmul.allow_tf32``).

Precisions (``PRECISIONS``):

=========  =====================================================================================
``fp32``   the default; nothing changes.
``tf32``   CUDA only, compute capability 8.0 (Ampere) or newer: TensorFloat-32 matmuls and
           convolutions (10-bit mantissa, float32 range). An error elsewhere: there is no such
           mode on a CPU.
``bf16``   bfloat16 autocast (float32 range, 8-bit mantissa). CUDA where
           ``torch.cuda.is_bf16_supported()``, and the CPU (correct but slow without AVX-512
           BF16 / AMX: about 50x slower than fp32 on the AVX2 development machine).
``fp16``   float16 autocast, CUDA only (the CPU's float16 kernels are slower than float32 and
           the range is the problem fp16 brings). Guard: every forward pass is checked for
           non-finite outputs (one device synchronisation per call); a pass that overflowed is
           redone in float32, with a warning the first time. The backward pass is not guarded:
           a gradient that overflows makes the state non-finite, which the solvers' failure
           tracking reports as a failed sample.
=========  =====================================================================================

``channels_last=True`` converts every 4-D weight of the prior (network and autoencoder: a
layout, not a precision) and the network's input to ``torch.channels_last``; ``compile=True``
compiles the network pass with ``torch.compile`` (inductor; a string picks another backend,
e.g. ``"aot_eager"`` to check that a model traces). Both change speed, not the maths (to float
rounding). A compiled pass gets an integer timestep as the (B,) int64 tensor the priors make of
it (``as_timesteps``), so one graph serves every step instead of one compilation per timestep.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch

__all__ = ["PRECISIONS", "PrecisionError", "NetworkConfig", "configure_network", "network_config", "check_precision", "run_network"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision / layout / compile option the prior or its device cannot run."""


@dataclass(frozen=True)
class NetworkConfig:
    """How a prior's network passes run (see the module docstring)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False
    autoencoder: bool = False

    @property
    def is_default(self) -> bool:
        return self == NetworkConfig()

    def to_dict(self) -> dict:
        return asdict(self)


def check_precision(precision: str, device) -> None:
    """Raise :class:`PrecisionError` (one line) if ``device`` cannot run ``precision``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return
    if device.type == "cpu":
        if precision == "fp16":
            raise PrecisionError("precision fp16 needs a CUDA device; on the CPU use bf16 (or fp32)")
        if precision == "tf32":
            raise PrecisionError("precision tf32 is a CUDA (Ampere or newer) math mode; on the CPU use fp32 or bf16")
        return
    if device.type != "cuda":
        raise PrecisionError(f"precision {precision} is supported on cuda and cpu devices, not {device.type}")
    if precision == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"precision tf32 needs compute capability 8.0 or newer; {name} has {torch.cuda.get_device_capability(device)}")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or tf32")


def _prior_device(prior) -> torch.device | None:
    for tensor in list(prior.parameters()) + list(prior.buffers()):
        return tensor.device
    return None


def configure_network(prior, precision: str = "fp32", *, channels_last: bool = False, compile: bool | str = False,
                      autoencoder: bool = False):
    """Make every network pass of ``prior`` run with these options (on the device the prior is
    on now); returns the prior. ``configure_network(prior)`` restores the defaults.

    Raises :class:`PrecisionError` for an unknown precision, one the prior's device cannot run,
    options for a prior without a network (the analytic priors) and ``autoencoder=True`` for a
    pixel prior."""
    config = NetworkConfig(precision, bool(channels_last), compile if isinstance(compile, str) else bool(compile), bool(autoencoder))
    device = _prior_device(prior)
    if not config.is_default and not any(True for _ in prior.parameters()):
        raise PrecisionError(f"{type(prior).__name__} has no network to run in {config.precision}"
                             + (" / channels-last / compiled" if config.channels_last or config.compile else ""))
    check_precision(config.precision, device if device is not None else "cpu")
    if config.autoencoder and prior.kind != "latent":
        raise PrecisionError("autoencoder=True needs a latent prior")
    if config.compile and not hasattr(torch, "compile"):
        raise PrecisionError(f"compile needs torch.compile (torch >= 2.0); this is torch {torch.__version__}")
    prior.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    prior._network_config = None if config.is_default else config
    prior._network_compiled = {}
    prior._network_device_type = None if device is None else device.type
    return prior


def network_config(prior) -> NetworkConfig:
    """The options ``prior``'s network passes run with."""
    return getattr(prior, "_network_config", None) or NetworkConfig()


@contextmanager
def _tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _precision_context(precision: str, device_type: str):
    if precision == "tf32":
        return _tf32()
    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[precision])
    return nullcontext()


def _cast(out, dtype: torch.dtype):
    """Floating tensors of a network output (a tensor, or a tuple with tensors / None) to ``dtype``."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_cast(o, dtype) for o in out)
    return out


def _finite(out) -> bool:
    if isinstance(out, torch.Tensor):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, tuple):
        return all(_finite(o) for o in out)
    return True


_WARNED_FP16 = False


def _python_int(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _compiled(prior, name: str, fn: Callable, config: NetworkConfig) -> Callable:
    """``fn`` (an unbound prior method), with its precision context, compiled once per prior
    and method when ``config.compile`` is set."""
    cache = prior._network_compiled
    if name not in cache:
        def network_pass(self, precision, device_type, *args, **kwargs):
            with _precision_context(precision, device_type):
                return fn(self, *args, **kwargs)

        if config.compile:
            backend = config.compile if isinstance(config.compile, str) else "inductor"
            network_pass = torch.compile(network_pass, backend=backend)
        cache[name] = network_pass
    return cache[name]


def run_network(prior, name: str, fn: Callable, x: torch.Tensor, args: tuple, kwargs: dict):
    """One network pass ``fn(prior, x, *args, **kwargs)`` under the prior's configuration (called
    by the wrapped ``eps`` / ``eps_and_variance`` / ``encode`` / ``decode`` of every prior, which
    counts the pass and marks the prior active around it, so nested calls run plainly)."""
    global _WARNED_FP16
    config = prior._network_config
    if name in ("encode", "decode") and not config.autoencoder:
        return fn(prior, x, *args, **kwargs)
    device_type = x.device.type
    if device_type != prior._network_device_type:
        check_precision(config.precision, x.device)
        prior._network_device_type = device_type
    if config.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if config.compile and name in ("eps", "eps_and_variance") and args and _python_int(args[0]):
        # a Python-int timestep is a constant to dynamo: every new value would recompile (and past
        # the recompile limit fall back to eager); as the (B,) tensor every prior's as_timesteps
        # makes of it, one graph serves every step
        args = (torch.full((x.shape[0],), int(args[0]), dtype=torch.long, device=x.device), *args[1:])
    call = _compiled(prior, name, fn, config)
    out = _cast(call(prior, config.precision, device_type, x, *args, **kwargs), x.dtype)
    if config.precision == "fp16" and not _finite(out):
        if not _WARNED_FP16:
            warnings.warn(f"{type(prior).__name__}.{name}: the fp16 network pass overflowed; redone in fp32 "
                          "(warned once; bf16 has the float32 range)", RuntimeWarning, stacklevel=3)
            _WARNED_FP16 = True
        out = _cast(fn(prior, x, *args, **kwargs), x.dtype)
    return out

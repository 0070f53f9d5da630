"""Everything the package reads from or writes to disk besides images: checkpoints read
safely and matched strictly against a network, safetensors files, and atomic writes.

It sits below operators, priors, training, metrics and records (it imports none of them), so
that every part of the package that touches weights or result files gets the same guarantees.

Writing: every file is written to a temporary name beside its target, flushed, and moved into
place with ``os.replace`` (``atomic_write_text``, ``atomic_torch_save``, ``save_safetensors``),
so a crash leaves the old file or the new one, never a torn one.

Reading: every loader of the package (guided-diffusion, CompVis LDM, diffusers, bkse, converted
folders, the trainer's checkpoints, the LPIPS cache) goes through the functions here:

- No code from a checkpoint ever runs. ``.safetensors`` files are read by the safetensors
  library (no pickle at all); ``.pt`` / ``.ckpt`` / ``.pth`` files are read with
  ``torch.load(weights_only=True)``. Lightning checkpoints also carry training metadata
  (callback states keyed by class, hyper-parameters, numpy scalars) that ``weights_only``
  refuses; those files are read again with :class:`RestrictedUnpickler`, which resolves only
  tensors and plain containers and stands an inert :class:`OpaqueObject` in for metadata
  objects from a short list of training libraries (Lightning, omegaconf, numpy, ...). Their
  classes are never imported and their code never runs. Any other global (``os.system``,
  ``builtins.eval``, ...) refuses the whole file with :class:`UnsafeCheckpointError`.
- Nothing is silently random-initialised. Networks are built on the meta device (no weights
  at all) and receive every tensor from the file; missing, unexpected (other than the
  explicitly ignored ones) and mis-shaped keys raise one :class:`CheckpointMismatchError`
  that names the file and the first offending keys.
- A missing, empty, truncated or wrong-format file raises :class:`CheckpointNotFoundError` or
  :class:`CheckpointFormatError` naming the file.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "OpaqueObject",
    "RestrictedUnpickler",
    "restricted_pickle",
    "read_checkpoint",
    "read_state_dict",
    "read_safetensors",
    "extract_state_dict",
    "match_state_dict",
    "load_into",
    "load_state_dict_file",
    "build_on_meta",
    "save_safetensors",
    "read_safetensors_metadata",
    "atomic_write_text",
    "atomic_torch_save",
    "format_keys",
]

SHOWN_KEYS = 5  # how many offending keys an error lists


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """Base class of every checkpoint problem (a ValueError)."""


class CheckpointNotFoundError(FileNotFoundError, CheckpointError):
    """The checkpoint (or config) file does not exist."""


class CheckpointFormatError(CheckpointError):
    """The file is empty, truncated, corrupt or not a checkpoint of the expected kind."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The file's pickle refers to code that a weights file has no reason to call."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the network that should receive them."""


def format_keys(keys: Iterable[str], limit: int = SHOWN_KEYS) -> str:
    """``a, b, c, ... (N in all)``: the first ``limit`` keys of a list, for error messages."""
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    more = ", ..." if len(keys) > limit else ""
    return f"{shown}{more} ({len(keys)} in all)"


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------


class OpaqueObject:
    """An inert stand-in for a metadata object of a training library (a Lightning callback
    class used as a dict key, an omegaconf node, a numpy scalar, ...).

    It records the global's name, the constructor arguments and the pickled state, and does
    nothing else: the real class is never imported and none of its code runs."""

    _global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # container opcodes (SETITEMS / APPENDS) on dict or list subclasses such as defaultdict
    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self) -> str:
        return f"<opaque {self._global_name}>"


_OPAQUE_TYPES: dict[str, type] = {}


def _opaque_type(module: str, name: str) -> type:
    """One inert subclass of OpaqueObject per global name (a type, so NEWOBJ accepts it)."""
    key = f"{module}.{name}"
    if key not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[key] = type(f"Opaque[{key}]", (OpaqueObject,), {"_global_name": key})
    return _OPAQUE_TYPES[key]


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor, for opaque classes only (protocol 0/1 pickles of objects)."""
    if isinstance(cls, type) and issubclass(cls, OpaqueObject):
        obj = cls()
        obj.state = state
        return obj
    raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed in a checkpoint")


def _tensor_globals() -> dict[str, Any]:
    """The globals a pickle of tensors and plain containers needs (the subset of torch's own
    weights_only allowlist that concerns dense tensors)."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": nn.Parameter,
        "torch.device": torch.device,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.storage.UntypedStorage": torch.storage.UntypedStorage,
        "torch.storage.TypedStorage": torch.storage.TypedStorage,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "_codecs.encode": __import__("codecs").encode,  # how protocol 2 stores bytes
        "copyreg._reconstructor": _safe_reconstructor,
    }
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, fn):
            allowed[f"torch._utils.{fn}"] = getattr(torch._utils, fn)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "complex", "bool", "slice", "range", "object"):
        allowed[f"builtins.{name}"] = getattr(__import__("builtins"), name)
    return allowed


_TENSOR_GLOBALS = _tensor_globals()

# Training libraries whose objects appear as metadata in Lightning / CompVis checkpoints.
METADATA_NAMESPACES = frozenset({
    "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "omegaconf", "argparse",
    "numpy", "pathlib", "collections", "datetime", "typing", "enum", "ldm", "taming",
})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves tensor and container globals; other globals of ``METADATA_NAMESPACES`` become
    inert :class:`OpaqueObject` types; everything else raises :class:`UnsafeCheckpointError`."""

    def find_class(self, module: str, name: str):
        # protocol 0-2 pickles name Python 2 modules (__builtin__.set); map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        if module.split(".")[0] in METADATA_NAMESPACES:
            return _opaque_type(module, name)
        raise UnsafeCheckpointError(
            f"the pickle refers to {key}, which a weights file has no reason to use; refusing to load it "
            "(nothing from the file was executed)")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# A module-like object for torch.load(pickle_module=...): torch wraps its Unpickler (adding
# storage handling) and calls its load() for the small records of the legacy format.
restricted_pickle = SimpleNamespace(
    __name__="diffstategrad_restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=_restricted_load,
    UnpicklingError=pickle.UnpicklingError,
)


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _check_file(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointFormatError(f"{what} {path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{what} {path} is empty (0 bytes): an interrupted download?")
    return path


def _sniff(path: Path) -> str:
    """``zip`` (torch >= 1.6), ``pickle`` (legacy torch.save), ``safetensors`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _weights_only_refusal(exc: Exception) -> bool:
    return isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower()


def _torch_load(path: Path, kind: str, restricted: bool, mmap: bool = True):
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if kind == "zip" and mmap:
        kwargs["mmap"] = True  # tensors are paged in only when used (Lightning files hold optimiser states)
    try:
        if restricted:
            return torch.load(path, weights_only=False, pickle_module=restricted_pickle, **kwargs)
        return torch.load(path, weights_only=True, **kwargs)
    except RuntimeError as exc:
        if "mmap" in kwargs and "mmap" in str(exc).lower():  # an archive mmap cannot map: read it whole
            return _torch_load(path, kind, restricted, mmap=False)
        raise


def read_checkpoint(path, what: str = "checkpoint") -> Any:
    """Read a ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.safetensors`` file without running
    any code from it.

    Returns the stored object: a dict of tensors, or for Lightning files the whole checkpoint
    dict (``state_dict`` plus metadata, with metadata objects as :class:`OpaqueObject`).
    Raises CheckpointNotFoundError, CheckpointFormatError (empty / truncated / not a
    checkpoint) or UnsafeCheckpointError (the pickle refers to code).
    """
    path = _check_file(path, what)
    kind = _sniff(path)
    if kind == "unknown":
        with open(path, "rb") as f:
            head = f.read(24)
        raise CheckpointFormatError(
            f"{what} {path} is not a PyTorch (.pt/.pth/.ckpt/.bin) or safetensors file "
            f"(it starts with {head!r}); check that the right file was given")
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointFormatError(f"{what} {path} is a truncated or corrupt safetensors file: {exc}") from None
    try:
        try:
            return _torch_load(path, kind, restricted=False)
        except pickle.UnpicklingError as exc:
            if not _weights_only_refusal(exc):
                raise
        # weights_only refused a global: a Lightning checkpoint with metadata objects, or worse
        return _torch_load(path, kind, restricted=True)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{what} {path}: {exc}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, struct.error, UnicodeDecodeError,
            ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as exc:
        raise CheckpointFormatError(
            f"{what} {path} could not be read as a PyTorch checkpoint; it is probably truncated or corrupt "
            f"(an interrupted download?): {type(exc).__name__}: {exc}") from None


def read_safetensors(path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing anything else (no pickle is ever involved)."""
    path = _check_file(path, what)
    if _sniff(path) != "safetensors":
        raise CheckpointFormatError(f"{what} {path} is not a safetensors file")
    return read_checkpoint(path, what)


def extract_state_dict(obj: Any, source, what: str = "checkpoint", key: str | None = None) -> dict[str, torch.Tensor]:
    """The dict of tensors inside a loaded checkpoint object.

    ``key`` names the entry to take (``"state_dict"`` for Lightning files); with ``key=None``
    a plain state_dict is expected, and a Lightning wrapper is unwrapped when present.
    Every value must be a tensor."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{what} {source} holds a {type(obj).__name__}, not a dict of tensors")
    if key is not None:
        if key not in obj:
            raise CheckpointFormatError(
                f"{what} {source} has no {key!r} entry; its top-level keys are {format_keys(map(str, obj))}")
        obj = obj[key]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{what} {source}: the state_dict is a {type(obj).__name__}, not a dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(
            f"{what} {source} is not a state_dict of tensors: entries {format_keys(bad)} are not tensors")
    return dict(obj)


def read_state_dict(path, what: str = "checkpoint", key: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` followed by :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path, what), Path(path).expanduser(), what, key)


# ---------------------------------------------------------------------------------------------
# Strict matching
# ---------------------------------------------------------------------------------------------


def match_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    *,
    source,
    what: str,
    ignore_prefixes: Iterable[str] = (),
    ignore_keys: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Check ``found`` against ``expected`` (name -> tensor of the right shape, e.g. a meta
    module's state_dict) and return ``found`` restricted to the expected keys.

    Keys that start with one of ``ignore_prefixes`` or are in ``ignore_keys`` are dropped
    first (loss / discriminator weights, EMA copies, schedule buffers). Anything else that
    does not match raises one CheckpointMismatchError naming ``source`` and the first
    missing, unexpected and mis-shaped keys."""
    prefixes = tuple(ignore_prefixes)
    skip = set(ignore_keys)
    kept = {k: v for k, v in found.items() if k not in skip and not (prefixes and k.startswith(prefixes))}
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    misshaped = [
        f"{k} {tuple(kept[k].shape)} (network {tuple(v.shape)})"
        for k, v in expected.items()
        if k in kept and tuple(kept[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {format_keys(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped keys: {format_keys(misshaped)}")
        raise CheckpointMismatchError(
            f"{source} does not match the {what}: " + "; ".join(problems)
            + ". Check the checkpoint and its configuration (preset, YAML) belong together.")
    return {k: kept[k] for k in expected}


def build_on_meta(factory, *args, **kwargs) -> nn.Module:
    """Build a network on the meta device: shapes only, no (random) weights at all."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source,
    what: str,
    ignore_prefixes: Iterable[str] = (),
    ignore_keys: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Strictly load ``state`` into ``module`` (typically built with :func:`build_on_meta`).

    Floating tensors are cast to ``dtype`` (None keeps the checkpoint's); the module takes
    its own copies (``assign=True``), so a module built on the meta device ends with real
    tensors everywhere, or the call raises."""
    expected = module.state_dict()
    matched = match_state_dict(expected, state, source=source, what=what,
                               ignore_prefixes=ignore_prefixes, ignore_keys=ignore_keys)
    tensors = {}
    for k, v in matched.items():
        if expected[k].is_floating_point():
            target = dtype if dtype is not None else (v.dtype if v.is_floating_point() else expected[k].dtype)
        else:
            target = expected[k].dtype
        tensors[k] =  v.detach().to(dtype=target, device="cpu", copy=True).contiguous()
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatchError(
            f"{source}: after loading, the {what} still has tensors without values: {format_keys(left)}")
    return module


def load_state_dict_file(
    module: nn.Module,
    path,
    *,
    what: str = "network",
    key: str | None = None,
    strip_prefixes: Iterable[str] = (),
    ignore_prefixes: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Read ``path`` safely and load it strictly into ``module``: the one call for a file that
    holds (or wraps under ``key``) a plain state_dict. A leading prefix from
    ``strip_prefixes`` (e.g. ``module.`` of DataParallel) is removed from every key first."""
    path = Path(path).expanduser()
    state = read_state_dict(path, what=f"{what} checkpoint", key=key)
    strip = tuple(strip_prefixes)
    if strip:
        renamed = {}
        for k, v in state.items():
            for p in strip:
                if k.startswith(p):
                    k = k[len(p):]
                    break
            renamed[k] = v
        state = renamed
    return load_into(module, state, source=path, what=what, ignore_prefixes=ignore_prefixes, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace(tmp: Path, path: Path, mode: int | None = None) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` (tensors and plain values only, so ``weights_only=True`` reads it back)
    through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        torch.save(obj, tmp)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None, mode: int | None = None) -> Path:
    """Write a dict of tensors as safetensors (contiguous CPU copies; no shared storage),
    atomically; ``mode`` sets the file's permissions."""
    from safetensors.torch import save_file

    path = Path(path)
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = _temporary(path)
    try:
        save_file(data, str(tmp), metadata=dict(metadata or {}))
        _replace(tmp, path, mode)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_safetensors_metadata(path, what: str = "weights file") -> dict[str, str]:
    """The string metadata of a safetensors file (no tensors are read)."""
    from safetensors import safe_open

    path = _check_file(path, what)
    if _sniff(path) != "safetensors":
        raise CheckpointFormatError(f"{what} {path} is not a safetensors file")
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


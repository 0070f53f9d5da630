"""Shards: moving files of more than 16 MiB through a channel that refuses them.

``split_shards`` cuts a safetensors file into shards of at most 15 MiB (each itself a
safetensors file); ``join_shards`` puts them back together and checks every tensor against the
digest the shards carry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from diffstategrad.storage import read_safetensors, read_safetensors_metadata, save_safetensors

__all__ = ["SHARD_MAX_BYTES", "split_shards", "join_shards"]

SHARD_MAX_BYTES = 15 * 2**20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_shards(path: str | os.PathLike, prefix: str | os.PathLike, max_bytes: int = SHARD_MAX_BYTES) -> list[Path]:
    """Cut a safetensors file into ``PREFIX.partI.safetensors`` files of at most ``max_bytes``
    each (whole tensors per shard; each shard is itself a safetensors file). Every shard's
    metadata carries the original metadata, the shard count and a digest of all tensors, which
    ``join_shards`` checks."""
    path, prefix = Path(path), Path(prefix)
    metadata = read_safetensors_metadata(path)
    tensors = read_safetensors(path)
    digest = _tensor_digest(tensors)
    budget = max_bytes - 256 * 1024  # room for the JSON header
    groups: list[list[str]] = [[]]
    used = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if nbytes > budget:
            raise ValueError(f"tensor {k} ({nbytes} bytes) does not fit in a shard of {max_bytes} bytes")
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += nbytes
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for old in prefix.parent.glob(prefix.name + ".part*.safetensors"):
        old.unlink()
    paths = []
    for i, keys in enumerate(groups):
        shard = prefix.with_name(f"{prefix.name}.part{i}.safetensors")
        meta = {"diffstategrad_shard": "1", "shard": str(i), "shards": str(len(groups)), "original_name": path.name,
                "original_sha256": _sha256_file(path), "tensors_sha256": digest, "original_metadata": json.dumps(metadata)}
        save_safetensors({k: tensors[k] for k in keys}, shard, metadata=meta)
        if shard.stat().st_size > max_bytes:
            raise RuntimeError(f"{shard} came out larger than {max_bytes} bytes")
        paths.append(shard)
    return paths


def join_shards(parts, out: str | os.PathLike) -> Path:
    """Reassemble the shards of ``split_shards`` into the safetensors file ``out``.

    Checks that every shard is present once and that every tensor (name, dtype, shape, bytes)
    equals the original's; the metadata is restored. (The file's bytes may differ from the
    original's: safetensors does not fix the order of the metadata keys.)

    From a shell:  python -m diffstategrad.training join-shards OUT.safetensors PREFIX.part*.safetensors
    """
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("no shards given")
    metas = []
    for p in parts:
        meta = read_safetensors_metadata(p)
        if meta.get("diffstategrad_shard") != "1":
            raise ValueError(f"{p} is not a shard written by split_shards")
        metas.append(meta)
    count, digest = int(metas[0]["shards"]), metas[0]["tensors_sha256"]
    indices = sorted(int(m["shard"]) for m in metas)
    if indices != list(range(count)) or any(m["tensors_sha256"] != digest for m in metas):
        raise ValueError(f"expected shards 0..{count - 1} of one file, got indices {indices}")
    tensors: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in read_safetensors(p).items():
            if k in tensors:
                raise ValueError(f"tensor {k} appears in two shards")
            tensors[k] = v
    if _tensor_digest(tensors) != digest:
        raise ValueError("the joined tensors differ from the original file's (a shard is damaged)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, out, metadata=json.loads(metas[0]["original_metadata"]))

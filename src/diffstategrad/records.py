"""Where results live: record keys, the paths of saved images, the crash-safe record store and
the lock that keeps one process per evaluation folder.

An evaluation item is (image, task, solver, with/without DiffStateGrad, guidance multiplier,
seed); ``item_key`` is its identity in ``records.jsonl`` and ``batch_key`` what items solved
together in one solver call share (everything but the image).

The store is append-only: each record is written with one ``os.write`` of a whole line on an
``O_APPEND`` descriptor and flushed to disk, so a crash leaves either the whole record or, at
worst, a partial last line. Opening the store drops such a partial line (rewriting the file
atomically), and records are keyed, so a resumed run skips what is finished and never writes a
key twice. ``FolderLock`` makes a second process on the same folder stop with a message that
names the holder, instead of appending its own copies of the records.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from diffstategrad.storage import atomic_write_text

__all__ = ["RecordStore", "FolderLock", "FolderInUseError", "atomic_write_text", "item_key", "batch_key", "guidance_multiplier",
           "safe_name", "reconstruction_path", "RECORDS_FILE", "SETTINGS_FILE"]

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "evaluate.json"
LOCK_FILE = ".lock"


def guidance_multiplier(record: dict) -> float:
    """The item's multiple of the solver's default guidance. (Records written before version
    0.2 kept it under ``guidance_scale``, with the absolute value under ``guidance_value``.)"""
    if "guidance_multiplier" in record:
        return float(record["guidance_multiplier"])
    return float(record["guidance_scale"])


def item_key(record: dict) -> str:
    """The identity of a record: one per (image, task, solver, projector, multiplier, seed)."""
    return "|".join([record["image"], record["task"], record["solver"], str(bool(record["diffstategrad"])),
                     repr(guidance_multiplier(record)), str(int(record["seed"]))])


def batch_key(item: dict) -> tuple:
    """What items solved together in one solver call share: everything but the image."""
    return (item["task"], item["solver"], bool(item["diffstategrad"]), guidance_multiplier(item), int(item["seed"]))


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def reconstruction_path(out_dir, record: dict, suffix: str = "") -> Path:
    """Where an evaluation saves (and its image grid finds) one item's reconstruction
    (``suffix``: "_mean" / "_std" for the posterior mean and standard deviation)."""
    return Path(out_dir) / "images" / f"{safe_name(item_key(record))}{suffix}.png"


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive, advisory lock on a folder (``.lock`` inside it, holding the holder's pid);
    released when the process exits, however it exits."""

    def __init__(self, folder, what: str = "evaluation"):
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self._fh = None

    def acquire(self) -> "FolderLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise FolderInUseError(f"{self.path.parent} is in use by another {self.what} (pid {holder}); "
                                   "wait for it to finish or use another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RecordStore:
    """Records (dicts) in ``path``, one JSON object per line, unique by ``key(record)``."""

    def __init__(self, path, key: Callable[[dict], str] = item_key):
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict] = {}
        self.dropped_lines = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        good_lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                k = self.key(record)
            except (json.JSONDecodeError, KeyError, TypeError):
                self.dropped_lines += 1  # a partial line from a crash mid-write
                continue
            if k in self.records:
                self.dropped_lines += 1
                continue
            self.records[k] = record
            good_lines.append(line)
        if self.dropped_lines:
            atomic_write_text(self.path, "".join(f"{line}\n" for line in good_lines))

    def __contains__(self, k: str) -> bool:
        return k in self.records

    def __len__(self) -> int:
        return len(self.records)

    def values(self) -> Iterable[dict]:
        return self.records.values()

    def append(self, record: dict) -> bool:
        """Append ``record`` unless its key is already stored; returns whether it was written."""
        k = self.key(record)
        if k in self.records:
            return False
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[k] = record
        return True

"""An append-only JSON-lines record store that survives crashes.

Each record is written with one ``os.write`` of a whole line on an ``O_APPEND`` descriptor and
flushed to disk, so a crash leaves either the whole record or, at worst, a partial last line.
Opening the store drops such a partial line (rewriting the file atomically), and records are
keyed, so a resumed run skips what is finished and never writes a key twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from diffstategrad.storage import atomic_write_text

__all__ = ["RecordStore", "atomic_write_text"]


class RecordStore:
    """Records (dicts) in ``path``, one JSON object per line, unique by ``key(record)``."""

    def __init__(self, path, key: Callable[[dict], str]):
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

"""Resumable append-only outputs: how `prepare` continues a source where it was interrupted.

A stage appends to its output files and, every few thousand documents, fsyncs them and writes a
small progress record atomically (`llamaworks.atomic`):

    {"version", "fingerprint", "files": {name: {"bytes", "sha256"}}, "state", "checksum"}

`state` is the stage's own position (documents done, counters); `fingerprint` the settings the
outputs depend on. On restart the files are truncated to the recorded lengths after their
prefixes are checked against the recorded SHA-256, and the stage skips what `state` says is done.
A record that is unreadable, edited (checksum), written for other settings (fingerprint), or
whose files are shorter than or differ from what it records, is never trusted: the source
restarts from its first document with a `ResumeWarning` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

from llamaworks.atomic import atomic_write_json

VERSION = 1
CHECKPOINT_DOCS = 4096  # default documents between progress records


class ResumeWarning(UserWarning):
    """A progress record could not be used; the stage restarts that source from the start."""


class _Unusable(Exception):
    pass


def _checksum(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def _prefix_sha256(path: Path, n: int) -> Any:  # -> hashlib object
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0:
            block = f.read(min(n, 1 << 20))
            if not block:
                break
            h.update(block)
            n -= len(block)
    return h


class ResumableFiles:
    """Named output files written append-only, resumable through a progress record.

    `open()` returns the recorded state (files truncated to match it) or None (files emptied);
    then `write`, `checkpoint(state)` every so often, `close()`, and `discard_record()` once the
    stage has marked the source complete."""

    def __init__(self, record: Path, files: dict[str, Path], fingerprint: dict[str, Any],
                 what: str) -> None:
        self.record, self.paths, self.what = Path(record), dict(files), what
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self._fh: dict[str, BinaryIO] = {}
        self._sha: dict[str, Any] = {}
        self._size: dict[str, int] = {}

    def open(self) -> dict[str, Any] | None:
        """Open every file for appending; resume from a valid record, else start empty."""
        state = None
        if self.record.exists():
            try:
                state = self._load()
            except _Unusable as e:
                self._warn(str(e))
        if state is None:
            self._open_empty()
        return state

    def restart(self, reason: str) -> None:
        """Give up the recorded progress (e.g. its state is inconsistent) and start empty."""
        self._warn(reason)
        self.close()
        self._open_empty()

    def _warn(self, reason: str) -> None:
        warnings.warn(f"{self.what}: {reason}; restarting this source from its first document",
                      ResumeWarning, stacklevel=3)

    def _open_empty(self) -> None:
        self.record.unlink(missing_ok=True)
        for name, p in self.paths.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            self._fh[name] = open(p, "wb")  # noqa: SIM115 (closed in close())
            self._sha[name], self._size[name] = hashlib.sha256(), 0

    def _load(self) -> dict[str, Any]:
        try:
            rec = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Unusable(f"progress record {self.record} is unreadable ({e})") from None
        try:
            if rec.get("version") != VERSION:
                raise _Unusable(f"progress record {self.record} has version "
                                f"{rec.get('version')!r}, expected {VERSION}")
            body = {k: v for k, v in rec.items() if k != "checksum"}
            if rec.get("checksum") != _checksum(body):
                raise _Unusable(f"progress record {self.record} fails its checksum (corrupt or "
                                "edited)")
            if rec["fingerprint"] != self.fingerprint:
                raise _Unusable(f"progress record {self.record} was written for other settings")
            files, state = rec["files"], rec["state"]
            if set(files) != set(self.paths) or not isinstance(state, dict):
                raise _Unusable(f"progress record {self.record} is malformed")
            sha, size = {}, {}
            for name, p in self.paths.items():
                n = int(files[name]["bytes"])
                if not p.is_file() or p.stat().st_size < n:
                    raise _Unusable(f"{p} is shorter than the {n} bytes its progress record "
                                    "says were written")
                sha[name] = _prefix_sha256(p, n)
                if sha[name].hexdigest() != files[name]["sha256"]:
                    raise _Unusable(f"the first {n} bytes of {p} differ from what its progress "
                                    "record says was written")
                size[name] = n
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise _Unusable(f"progress record {self.record} is malformed ({e!r})") from None
        for name, p in self.paths.items():
            fh = open(p, "r+b")  # noqa: SIM115 (closed in close())
            fh.truncate(size[name])
            fh.seek(size[name])
            self._fh[name] = fh
        self._sha, self._size = sha, size
        return state

    def write(self, name: str, data: bytes) -> None:
        self._fh[name].write(data)
        self._sha[name].update(data)
        self._size[name] += len(data)

    def size(self, name: str) -> int:
        return self._size[name]

    def _sync(self) -> None:
        for fh in self._fh.values():
            fh.flush()
            os.fsync(fh.fileno())

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Make everything written so far durable, then record it with `state`."""
        self._sync()
        body = {"version": VERSION, "fingerprint": self.fingerprint, "state": state,
                "files": {n: {"bytes": self._size[n], "sha256": self._sha[n].hexdigest()}
                          for n in self.paths}}
        atomic_write_json(self.record, {**body, "checksum": _checksum(body)})

    def close(self) -> None:
        """Flush, fsync and close the files (the record stays until `discard_record`)."""
        if self._fh:
            try:
                self._sync()
            finally:
                for fh in self._fh.values():
                    fh.close()
                self._fh = {}

    def discard_record(self) -> None:
        self.record.unlink(missing_ok=True)

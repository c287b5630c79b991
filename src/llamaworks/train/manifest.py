"""Checkpoint manifests: every file's size and sha256, recorded in `manifest.json` after the
files are written, so a resume can tell an intact checkpoint from a truncated, corrupt or
half-written one before loading anything from it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llamaworks.atomic import atomic_write_json

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    """The files under `folder`, less the manifest and `atomic_path`'s leftover temporaries."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def unseal(folder: Path) -> None:
    """Drop the manifest before a folder is rewritten, so a crash mid-rewrite reads as damaged."""
    (folder / MANIFEST).unlink(missing_ok=True)


def seal(folder: Path) -> None:
    """Record size + sha256 of each file under `folder`, atomically, once they are all written."""
    atomic_write_json(folder / MANIFEST, {"files": {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)}})


def verify(folder: Path, require: tuple[str, ...] = ()) -> str | None:
    """None when the manifest lists every name in `require` and each listed file has its
    recorded size and sha256; otherwise what is wrong, for the warning that skips it."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        records = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name in require:
        if name not in records:
            return f"{MANIFEST} lists no {name}"
    for rel, (size, digest) in records.items():
        p = folder / rel
        try:
            got = p.stat().st_size
            if got != size:
                return f"{rel} has {got} bytes, {size} were written"
            if _sha256(p) != digest:
                return f"{rel} does not match the sha256 recorded when it was written"
        except OSError as e:
            return f"{rel} cannot be read ({type(e).__name__}: {e})"
    return None

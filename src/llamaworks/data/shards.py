"""Token shards: flat little-endian uint16 (vocab <= 65536) or uint32 `.bin` files read by memmap,
described by `manifest.json` (tokens per shard, sources, tokenizer hash)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.errors import LlamaworksError

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_tokens(path: str | Path, tokens: np.ndarray) -> None:
    """Write a flat token array atomically."""
    with atomic_path(path) as tmp:
        tokens.tofile(tmp)


def read_tokens(path: str | Path, dtype: np.dtype | str) -> np.memmap | np.ndarray:
    """Memory-map a shard (an empty file reads as an empty array)."""
    p = Path(path)
    if p.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(p, dtype=dtype, mode="r")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise LlamaworksError(f"{p} not found; prepare the data first with `llamaworks data "
                              "prepare --config RECIPE --out DIR`")
    return json.loads(p.read_text())


def split_tokens(folder: str | Path, split: str) -> list[np.ndarray]:
    """The memmapped shards of `split` ('train' or 'val') listed in a folder's manifest."""
    m = read_manifest(folder)
    return [read_tokens(Path(folder) / s["file"], m["dtype"]) for s in m[split]]

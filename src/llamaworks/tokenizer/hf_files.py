"""Hugging Face tokenizer files: read `tokenizer_config.json` / `special_tokens_map.json` /
`chat_template.jinja` beside a tokenizer, and write a directory `transformers` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamaworks.atomic import atomic_write_text
from llamaworks.errors import TokenizerError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    """A special token as written in HF configs: a string or {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _chat_template(v: Any) -> str | None:
    """`chat_template` may be a string or a list of {"name", "template"} (pick "default")."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        named = {t.get("name"): t.get("template") for t in v if isinstance(t, dict)}
        t = named.get("default")
        return t if isinstance(t, str) else None
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """bos/eos/unk/pad token strings, add_bos/add_eos flags, chat template, max length from the
    HF files in `folder` (each key present only if some file gives it)."""
    out: dict[str, Any] = {}
    stm = folder / "special_tokens_map.json"
    cfg_path = folder / "tokenizer_config.json"
    sources = [_read_json(stm)] if stm.is_file() else []
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    sources.append(cfg)  # tokenizer_config.json wins
    for src in sources:
        for name in ("bos", "eos", "unk", "pad"):
            text = _token_text(src.get(f"{name}_token"))
            if text is not None:
                out[f"{name}_token"] = text
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(cfg.get(key), bool):
            out[key] = cfg[key]
    template = _chat_template(cfg.get("chat_template"))
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    json_file = folder / "chat_template.json"
    if template is None and json_file.is_file():
        template = _chat_template(_read_json(json_file).get("chat_template"))
    if template is not None:
        out["chat_template"] = template
    mml = cfg.get("model_max_length")
    if isinstance(mml, int) and 0 < mml < 10**12:
        out["model_max_length"] = mml
    return out


def tokenizer_config(*, bos: str | None, eos: str | None, unk: str | None, pad: str | None,
                     add_bos: bool, add_eos: bool, chat_template: str | None,
                     model_max_length: int | None) -> dict[str, Any]:
    """The `tokenizer_config.json` content for `PreTrainedTokenizerFast`."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for name, text in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad)):
        if text is not None:
            cfg[f"{name}_token"] = text
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    return cfg


def save_files(folder: str | os.PathLike[str], tokenizer_json: str, config: dict[str, Any]
               ) -> Path:
    """Write tokenizer.json and tokenizer_config.json atomically into `folder`."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenizerError(f"cannot create {out} ({e}); pick a writable directory") from None
    atomic_write_text(out / "tokenizer.json", tokenizer_json)
    atomic_write_text(out / "tokenizer_config.json",
                 json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out

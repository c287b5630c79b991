"""Mixture recipes in TOML: sources (kind, path, text field, weight, epochs), filter thresholds,
dedup switches, tokenizer, and optional [model]/[train] sections read by `pretrain`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaworks.data.filters import QualityThresholds
from llamaworks.data.readers import KINDS
from llamaworks.errors import LlamaworksError

BAD_RECORDS = ("stop", "skip")


@dataclass
class Source:
    name: str
    kind: str
    path: str
    weight: float
    epochs: float = 1.0  # most passes over this source the mixture may take
    text_field: str = "text"


@dataclass
class Recipe:
    sources: list[Source]
    filters: QualityThresholds = field(default_factory=QualityThresholds)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8
    val_fraction: float = 0.01
    seed: int = 0
    vocab_size: int = 512
    tokenizer: str | None = None  # an existing tokenizer.json / dir; None = train a BPE
    shard_tokens: int = 1 << 26
    bad_records: str = "stop"  # a record no reader can read: "stop", or "skip" (counted)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


def load_recipe(path: str | Path, paths: dict[str, str] | None = None) -> Recipe:
    """Parse a recipe; `paths` overrides source paths by name (e.g. from `--path name=DIR`).
    Relative paths resolve against the recipe's folder."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlamaworksError(f"recipe {p} not found; pass --config with a TOML recipe "
                              "(see recipes/demo.toml)") from None
    except tomllib.TOMLDecodeError as e:
        raise LlamaworksError(f"recipe {p}: invalid TOML: {e}") from None
    paths = paths or {}
    sources = []
    for s in d.get("sources", []):
        try:
            src = Source(name=s["name"], kind=s["kind"], path=str(paths.get(s["name"], s["path"])),
                         weight=float(s["weight"]), epochs=float(s.get("epochs", 1.0)),
                         text_field=s.get("text_field", "text"))
        except KeyError as e:
            raise LlamaworksError(f"recipe {p}: a [[sources]] entry lacks {e.args[0]!r}") from None
        if src.kind not in KINDS:
            raise LlamaworksError(f"recipe {p}: source {src.name!r} has kind {src.kind!r}; use "
                                  f"one of {', '.join(KINDS)}")
        if src.kind != "bundled" and not Path(src.path).expanduser().is_absolute():
            src.path = str((p.parent / src.path).resolve())
        if src.weight <= 0 or src.epochs <= 0:
            raise LlamaworksError(f"recipe {p}: source {src.name!r} needs weight > 0, epochs > 0")
        sources.append(src)
    if not sources:
        raise LlamaworksError(f"recipe {p}: no [[sources]]; add at least one")
    dd, data, tk = d.get("dedup", {}), d.get("data", {}), d.get("tokenizer", {})
    try:
        filters = QualityThresholds.from_dict(d.get("filters", {}))
    except ValueError as e:
        raise LlamaworksError(f"recipe {p}: {e}") from None
    bad_records = data.get("bad_records", "stop")
    if bad_records not in BAD_RECORDS:
        raise LlamaworksError(f"recipe {p}: [data] bad_records = {bad_records!r}; use "
                              f"{' or '.join(map(repr, BAD_RECORDS))}")
    tok_path = tk.get("path") or None
    if tok_path and not Path(tok_path).is_absolute():
        tok_path = str((p.parent / tok_path).resolve())
    return Recipe(sources=sources, filters=filters, exact_dedup=bool(dd.get("exact", True)),
                  near_dedup=bool(dd.get("near", True)),
                  near_threshold=float(dd.get("near_threshold", 0.8)),
                  val_fraction=float(data.get("val_fraction", 0.01)),
                  seed=int(data.get("seed", 0)), vocab_size=int(tk.get("vocab_size", 512)),
                  tokenizer=tok_path, shard_tokens=int(data.get("shard_tokens", 1 << 26)),
                  bad_records=bad_records,
                  model=dict(d.get("model", {})), train=dict(d.get("train", {})), path=p)

"""Small prepared datasets for the data/train tests: two JSONL sources cut from the bundled
corpus, a BPE trained on them, shards ready for `PackedLoader` and the trainer."""

from __future__ import annotations

import json
from pathlib import Path

from llamaworks.data.corpus import bundled_documents


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def small_sources(folder: Path, n_kjv: int = 60, n_jargon: int = 300) -> dict[str, Path]:
    kjv = [d for _, d in zip(range(n_kjv), bundled_documents("kjv"), strict=False)]
    jar = [d for _, d in zip(range(n_jargon), bundled_documents("jargon"), strict=False)]
    return {"kjv": write_jsonl(folder / "kjv.jsonl", kjv),
            "jargon": write_jsonl(folder / "jargon.jsonl", jar)}


def write_recipe(folder: Path, sources: dict[str, Path], weights: dict[str, float],
                 epochs: dict[str, float] | None = None, extra: str = "") -> Path:
    lines = ["[data]", "val_fraction = 0.05", "seed = 0", ""]
    for name, path in sources.items():
        lines += ["[[sources]]", f'name = "{name}"', 'kind = "jsonl"', f'path = "{path}"',
                  f"weight = {weights[name]}", f"epochs = {(epochs or {}).get(name, 3.0)}", ""]
    lines += ["[filters]", "min_words = 10", "", "[tokenizer]", "vocab_size = 400", "", extra]
    p = folder / "recipe.toml"
    p.write_text("\n".join(lines))
    return p


def prepare_small(folder: Path) -> Path:
    """Prepared shards (BPE of 400 tokens) from a slice of the bundled corpus."""
    from llamaworks.data.pipeline import prepare
    from llamaworks.data.recipe import load_recipe

    src = small_sources(folder, n_kjv=40, n_jargon=200)
    recipe = write_recipe(folder, src, {"kjv": 0.6, "jargon": 0.4})
    prepare(load_recipe(recipe), folder / "data", progress=False)
    return folder / "data"


def small_train_config(**kw):
    from llamaworks.train.config import TrainConfig

    base = dict(lr=3e-3, micro_batch=4, seq_len=32, max_steps=40, eval_every=20, eval_rows=8,
                log_every=1, save_every=10, keep_last=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                      .splitlines())}

"""`prepare`: recipe -> cleaned, filtered, deduplicated documents -> tokenizer -> token shards.

Stages write their outputs under `out/` and are skipped when already complete, so an interrupted
run resumes where it stopped (per source for cleaning/tokenizing):
  clean/NAME.jsonl        kept documents ({"id", "text", "split"}) + clean/NAME.stats.json
  tokenizer/              tokenizer.json (+ config), trained on the kept train documents
  tokens/NAME.{train,val}.bin + NAME.lengths.npy   per-source token streams
  train_NNNNN.bin, val_00000.bin, manifest.json, report.json   the mixture, ready to load
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llamaworks.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from llamaworks.data.clean import clean_text
from llamaworks.data.dedup import ExactDedup, NearDedup
from llamaworks.data.filters import quality_reason
from llamaworks.data.mixture import mixture_targets, sample_documents
from llamaworks.data.readers import read_source
from llamaworks.data.recipe import Recipe
from llamaworks.data.shards import file_sha256, token_dtype, write_manifest, write_tokens
from llamaworks.tokenizer import Tokenizer


def is_val(doc_id: str, source: str, fraction: float, seed: int) -> bool:
    """Deterministic train/val assignment by hashing the document id."""
    h = hashlib.blake2b(f"{seed}/{source}/{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def _clean_sources(recipe: Recipe, out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    clean_dir = out / "clean"
    clean_dir.mkdir(parents=True, exist_ok=True)
    exact = ExactDedup() if recipe.exact_dedup else None
    near = NearDedup(recipe.near_threshold) if recipe.near_dedup else None
    stats: dict[str, dict[str, Any]] = {}
    for src in recipe.sources:
        stats_path = clean_dir / f"{src.name}.stats.json"
        if stats_path.exists():
            # Finished before a restart: rebuild the dedup state from its kept texts (the near
            # index holds exactly those; nothing is unpickled from the output directory).
            stats[src.name] = json.loads(stats_path.read_text())
            for text in _docs(out, src.name):
                for d in (exact, near):
                    if d is not None:
                        d.seen(text)
            continue
        dropped: Counter[str] = Counter()
        kept = 0
        with atomic_path(clean_dir / f"{src.name}.jsonl") as tmp, open(tmp, "w") as fh:
            docs = read_source(src.kind, src.path, src.text_field)
            for doc in tqdm(docs, desc=f"clean {src.name}", unit="doc", disable=not progress):
                text = clean_text(doc["text"])
                reason = quality_reason(text, recipe.filters)
                if reason is None and exact is not None and exact.seen(text):
                    reason = "exact_dup"
                if reason is None and near is not None and near.seen(text):
                    reason = "near_dup"
                if reason is not None:
                    dropped[reason] += 1
                    continue
                kept += 1
                split = "val" if is_val(doc["id"], src.name, recipe.val_fraction,
                                        recipe.seed) else "train"
                fh.write(json.dumps({"id": doc["id"], "text": text, "split": split},
                                    ensure_ascii=False) + "\n")
        stats[src.name] = {"kept": kept, "dropped": dict(sorted(dropped.items())),
                           "read": kept + sum(dropped.values())}
        atomic_write_json(stats_path, stats[src.name])
    return stats


def _docs(out: Path, name: str, split: str | None = None):
    with open(out / "clean" / f"{name}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            if split is None or d["split"] == split:
                yield d["text"]


def _tokenizer(recipe: Recipe, out: Path) -> Tokenizer:
    tdir = out / "tokenizer"
    if recipe.tokenizer:
        return Tokenizer.load(recipe.tokenizer)
    if (tdir / "tokenizer.json").exists():
        return Tokenizer.from_dir(tdir)
    from llamaworks.tokenizer.train import train_bpe

    texts = (t for s in recipe.sources for t in _docs(out, s.name, "train"))
    tok = train_bpe(texts, recipe.vocab_size)
    tok.save(tdir)
    return tok


def _tokenize_source(tok: Tokenizer, out: Path, name: str, dtype: np.dtype, progress: bool
                     ) -> None:
    tdir = out / "tokens"
    tdir.mkdir(exist_ok=True)
    if (tdir / f"{name}.done").exists():
        return
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    for split in ("train", "val"):
        texts = list(_docs(out, name, split))
        chunks, lengths = [], []
        bar = tqdm(total=len(texts), desc=f"tokenize {name}/{split}", unit="doc",
                   disable=not progress)
        for i in range(0, len(texts), 256):  # tokenizers encodes a batch on all cores
            for enc in tok.backend.encode_batch(texts[i:i + 256], add_special_tokens=False):
                ids = bos + enc.ids + eos
                chunks.append(np.asarray(ids, dtype=dtype))
                lengths.append(len(ids))
            bar.update(min(256, len(texts) - i))
        bar.close()
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        write_tokens(tdir / f"{name}.{split}.bin", flat)
        with atomic_path(tdir / f"{name}.{split}.lengths.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(lengths, dtype=np.int64))
    atomic_write_bytes(tdir / f"{name}.done", b"")


def _load_source(out: Path, name: str, split: str, dtype: np.dtype
                 ) -> tuple[np.ndarray, np.ndarray]:
    flat = np.fromfile(out / "tokens" / f"{name}.{split}.bin", dtype=dtype)
    lengths = np.load(out / "tokens" / f"{name}.{split}.lengths.npy")
    return flat, lengths


def prepare(recipe: Recipe, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stats = _clean_sources(recipe, out, progress)
    tok = _tokenizer(recipe, out)
    if not (out / "tokenizer" / "tokenizer.json").exists():
        tok.save(out / "tokenizer")
    dtype = token_dtype(tok.vocab_size)
    for src in recipe.sources:
        _tokenize_source(tok, out, src.name, dtype, progress)

    # Mixture: whole documents per source, repeated up to `epochs`, so tokens follow the weights.
    weights = recipe.weights()
    avail, parts = {}, {}
    for src in recipe.sources:
        flat, lengths = _load_source(out, src.name, "train", dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        parts[src.name] = (flat, lengths, offsets)
        avail[src.name] = int(lengths.sum())
    if not any(avail.values()):
        raise ValueError("every document was filtered out; relax [filters] in the recipe")
    targets = mixture_targets({k: max(v, 1) for k, v in avail.items()}, weights,
                              {s.name: s.epochs for s in recipe.sources})
    rng = np.random.default_rng(recipe.seed)
    picks: list[tuple[str, int]] = []
    for src in recipe.sources:
        flat, lengths, offsets = parts[src.name]
        if avail[src.name]:
            picks += [(src.name, i) for i in sample_documents(lengths.tolist(),
                                                             targets[src.name], rng)]
    order = rng.permutation(len(picks))  # interleave sources
    mixed_tokens: Counter[str] = Counter()
    train_files, buf, buf_len = [], [], 0

    def flush() -> None:
        nonlocal buf, buf_len
        if buf:
            name = f"train_{len(train_files):05d}.bin"
            write_tokens(out / name, np.concatenate(buf))
            train_files.append({"file": name, "tokens": buf_len})
            buf, buf_len = [], 0

    for j in order:
        name, i = picks[j]
        flat, _, offsets = parts[name]
        doc = flat[offsets[i]:offsets[i + 1]]
        buf.append(doc)
        buf_len += len(doc)
        mixed_tokens[name] += len(doc)
        if buf_len >= recipe.shard_tokens:
            flush()
    flush()
    val = [_load_source(out, s.name, "val", dtype)[0] for s in recipe.sources]
    val_flat = np.concatenate(val) if val else np.zeros(0, dtype=dtype)
    write_tokens(out / "val_00000.bin", val_flat)
    total = sum(mixed_tokens.values())
    sources = {s.name: {
        "weight": weights[s.name], "epochs": s.epochs, "available_tokens": avail[s.name],
        "train_tokens": mixed_tokens[s.name],
        "fraction": mixed_tokens[s.name] / total if total else 0.0,
        "val_tokens": int(len(_load_source(out, s.name, "val", dtype)[0])),
        **clean_stats[s.name]} for s in recipe.sources}
    manifest = {
        "dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": file_sha256(out / "tokenizer" / "tokenizer.json"),
        "tokenizer": "tokenizer", "train": train_files,
        "val": [{"file": "val_00000.bin", "tokens": int(len(val_flat))}],
        "train_tokens": total, "sources": sources,
        "recipe": str(recipe.path) if recipe.path else None,
    }
    write_manifest(out, manifest)
    atomic_write_json(out / "report.json", {"sources": sources, "train_tokens": total,
                                            "val_tokens": int(len(val_flat))})
    return manifest


def format_report(manifest: dict[str, Any]) -> str:
    """Human-readable table: documents kept/dropped per rule and tokens per source."""
    lines = [f"{'source':<16}{'read':>8}{'kept':>8}{'tokens':>12}{'share':>8}{'weight':>8}  "
             "dropped"]
    for name, s in manifest["sources"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"{name:<16}{s['read']:>8}{s['kept']:>8}{s['train_tokens']:>12}"
                     f"{s['fraction']:>8.1%}{s['weight']:>8.1%}  {dropped}")
    lines.append(f"train tokens {manifest['train_tokens']}, val tokens "
                 f"{manifest['val'][0]['tokens']}, dtype {manifest['dtype']}")
    return "\n".join(lines)

"""`prepare`: recipe -> cleaned, filtered, deduplicated documents -> tokenizer -> token shards.

Stages write their outputs under `out/` and are skipped when already complete, so an interrupted
run resumes where it stopped:
  clean/NAME.jsonl        kept documents ({"id", "text", "split"}) + clean/NAME.stats.json
  tokenizer/              tokenizer.json (+ config), trained on the kept train documents
  tokens/NAME.{train,val}.bin + NAME.{train,val}.lengths.npy   per-source token streams
  train_NNNNN.bin, val_00000.bin, manifest.json, report.json   the mixture, ready to load

Cleaning and tokenizing also resume *inside* a source: they append to their outputs and every
`checkpoint_docs` documents record their position in clean/NAME.progress.json or
tokens/NAME.progress.json (see `llamaworks.data.resume`). On restart the outputs are cut back to
the recorded length, the documents already done are skipped, and the dedup indexes are rebuilt
by replaying the kept documents, so a resumed run writes the same bytes as an uninterrupted one.

`workers` processes, or the workers of a Dask cluster (`executor`), do the per-document work
(see `llamaworks.data.parallel`); results are used in input order and dedup stays in this
process, so every output is byte-identical for any number of workers and either executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llamaworks.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from llamaworks.data.dedup import ExactDedup, NearDedup
from llamaworks.data.mixture import mixture_targets, sample_documents
from llamaworks.data.parallel import (
    CleanSpec,
    EncodeSpec,
    WorkerPool,
    batched,
    clean_chunk,
    dedup_chunk,
    default_workers,
    encode_chunk,
    is_val,
    make_pool,
)
from llamaworks.data.readers import read_source
from llamaworks.data.recipe import Recipe
from llamaworks.data.resume import CHECKPOINT_DOCS, ResumableFiles
from llamaworks.data.shards import file_sha256, token_dtype, write_manifest, write_tokens
from llamaworks.errors import LlamaworksError
from llamaworks.tokenizer import Tokenizer

__all__ = ["prepare", "format_report", "is_val"]

CHUNK_DOCS = 256          # documents per task handed to a worker


def _clean_spec(recipe: Recipe, name: str) -> CleanSpec:
    return CleanSpec(source=name, filters=recipe.filters, val_fraction=recipe.val_fraction,
                     seed=recipe.seed, exact=recipe.exact_dedup, near=recipe.near_dedup)


def _replay(path: Path, spec: CleanSpec, exact: ExactDedup | None, near: NearDedup | None,
            pool: WorkerPool) -> None:
    """Put the kept documents of a clean/NAME.jsonl into the dedup indexes, in order."""
    if exact is None and near is None:
        return
    with open(path, "rb") as fh:
        for keys in pool.imap(dedup_chunk, batched(fh, CHUNK_DOCS), spec):
            for key, sig in keys:
                if exact is not None:
                    exact.add(key)
                if near is not None:
                    near.insert(sig)


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            n += block.count(b"\n")
    return n


def _clean_sources(recipe: Recipe, out: Path, progress: bool, pool: WorkerPool | None = None,
                   checkpoint_docs: int = CHECKPOINT_DOCS) -> dict[str, dict[str, Any]]:
    clean_dir = out / "clean"
    clean_dir.mkdir(parents=True, exist_ok=True)
    pool = pool or WorkerPool(1)
    if not all((clean_dir / f"{s.name}.stats.json").exists() for s in recipe.sources):
        pool.start()  # processes boot while this one imports datasketch and reads
    exact = ExactDedup() if recipe.exact_dedup else None
    near = NearDedup(recipe.near_threshold) if recipe.near_dedup else None
    stats: dict[str, dict[str, Any]] = {}
    replay: list[str] = []  # finished sources whose kept documents the indexes have not seen
    for i, src in enumerate(recipe.sources):
        stats_path = clean_dir / f"{src.name}.stats.json"
        if stats_path.exists():
            stats[src.name] = json.loads(stats_path.read_text())
            (clean_dir / f"{src.name}.progress.json").unlink(missing_ok=True)
            replay.append(src.name)
            continue
        # Finished before a restart: rebuild the dedup state from their kept texts (the indexes
        # hold exactly those; nothing is unpickled from the output directory).
        for name in replay:
            _replay(clean_dir / f"{name}.jsonl", _clean_spec(recipe, name), exact, near, pool)
        replay = []
        stats[src.name] = _clean_source(recipe, out, i, exact, near, pool, progress,
                                        checkpoint_docs)
        atomic_write_json(stats_path, stats[src.name])
        (clean_dir / f"{src.name}.progress.json").unlink(missing_ok=True)
    return stats


def _input_stamp(kind: str, path: str) -> str:
    """Digest of the names, sizes and mtimes of a source's input files: a resumed run must read
    the same input, or its skipped documents would not be the ones it cleaned before."""
    p = Path(path).expanduser()
    if kind == "bundled" or not p.exists():
        return ""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _clean_source(recipe: Recipe, out: Path, index: int, exact: ExactDedup | None,
                  near: NearDedup | None, pool: WorkerPool, progress: bool,
                  checkpoint_docs: int) -> dict[str, Any]:
    """Clean one source into clean/NAME.jsonl, resuming from its progress record."""
    src = recipe.sources[index]
    path = out / "clean" / f"{src.name}.jsonl"
    spec = _clean_spec(recipe, src.name)
    fingerprint = {"stage": "clean", "source": [src.kind, src.path, src.text_field],
                   "input": _input_stamp(src.kind, src.path),
                   "before": [s.name for s in recipe.sources[:index]],
                   "filters": dataclasses.asdict(recipe.filters), "exact": recipe.exact_dedup,
                   "near": recipe.near_dedup, "near_threshold": recipe.near_threshold,
                   "val_fraction": recipe.val_fraction, "seed": recipe.seed}
    files = ResumableFiles(out / "clean" / f"{src.name}.progress.json", {"jsonl": path},
                           fingerprint, f"cleaning {src.name}")
    state = files.open()
    read, kept, dropped = 0, 0, Counter[str]()
    if state is not None:
        try:
            read, kept = int(state["read"]), int(state["kept"])
            dropped = Counter({str(k): int(v) for k, v in state["dropped"].items()})
            ok = read == kept + sum(dropped.values()) and _count_lines(path) == kept
        except (AttributeError, KeyError, TypeError, ValueError):
            ok = False
        if ok:
            _replay(path, spec, exact, near, pool)
        else:
            files.restart(f"the progress record of {path} does not match its lines")
            read, kept, dropped = 0, 0, Counter()
    with contextlib.ExitStack() as stack:
        stack.callback(files.close)
        docs = read_source(src.kind, src.path, src.text_field,
                           skip_bad=recipe.bad_records == "skip")
        todo = ((d["id"], d["text"]) for d in itertools.islice(docs, read, None))
        since = 0
        bar = stack.enter_context(tqdm(desc=f"clean {src.name}", unit="doc", initial=read,
                                       disable=not progress))
        for results in pool.imap(clean_chunk, batched(todo, CHUNK_DOCS), spec):
            for reason, line, key, sig in results:
                if reason is None and exact is not None and key in exact:
                    reason = "exact_dup"
                if reason is None and near is not None and near.near(sig):
                    reason = "near_dup"
                if reason is not None:
                    dropped[reason] += 1
                    continue
                # only kept documents enter the indexes, so replaying the output rebuilds them
                if exact is not None:
                    exact.add(key)
                if near is not None:
                    near.insert(sig)
                files.write("jsonl", line)
                kept += 1
            read += len(results)
            since += len(results)
            bar.update(len(results))
            if since >= checkpoint_docs:
                files.checkpoint({"read": read, "kept": kept, "dropped": dict(dropped)})
                since = 0
    return {"kept": kept, "dropped": dict(sorted(dropped.items())), "read": read}


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


def _tokenize_source(spec: EncodeSpec, out: Path, name: str, n_docs: int, progress: bool,
                     pool: WorkerPool, checkpoint_docs: int = CHECKPOINT_DOCS,
                     shared: Any = None) -> None:
    """Tokenize clean/NAME.jsonl into tokens/NAME.{train,val}.{bin,lengths.npy}, resuming from
    tokens/NAME.progress.json. `shared`: the tokenizer as `pool.share` sent it (or None)."""
    tdir = out / "tokens"
    tdir.mkdir(exist_ok=True)
    record = tdir / f"{name}.progress.json"
    parts = {f"{s}_lengths": tdir / f"{name}.{s}.lengths.part" for s in ("train", "val")}
    if (tdir / f"{name}.done").exists():
        for p in (record, *parts.values()):
            p.unlink(missing_ok=True)
        return
    clean = out / "clean" / f"{name}.jsonl"
    fingerprint = {"stage": "tokenize", "tokenizer_sha256": spec.tokenizer_sha256,
                   "bos": spec.bos, "eos": spec.eos, "dtype": spec.dtype,
                   "clean_bytes": clean.stat().st_size, "clean_docs": n_docs,
                   "clean_mtime_ns": clean.stat().st_mtime_ns}
    files = ResumableFiles(record, {"train": tdir / f"{name}.train.bin",
                                    "val": tdir / f"{name}.val.bin", **parts},
                           fingerprint, f"tokenizing {name}")
    state = files.open()
    done, offset = 0, 0
    if state is not None:
        try:
            done, offset = int(state["docs"]), int(state["clean_bytes"])
        except (KeyError, TypeError, ValueError):
            files.restart(f"the progress record {record} is malformed")
    with contextlib.ExitStack() as stack:
        stack.callback(files.close)
        fh = stack.enter_context(open(clean, "rb"))
        fh.seek(offset)
        bar = stack.enter_context(tqdm(total=n_docs, initial=done, desc=f"tokenize {name}",
                                       unit="doc", disable=not progress))
        since = 0
        for n, nbytes, splits in pool.imap(encode_chunk, batched(fh, CHUNK_DOCS), spec, shared):
            for s, (ids, lengths) in splits.items():
                files.write(s, ids.tobytes())
                files.write(f"{s}_lengths", lengths.astype("<i8").tobytes())
            done, offset, since = done + n, offset + nbytes, since + n
            bar.update(n)
            if since >= checkpoint_docs:
                files.checkpoint({"docs": done, "clean_bytes": offset})
                since = 0
    if done != n_docs:
        raise LlamaworksError(f"{clean} holds {done} documents but its stats say {n_docs}; "
                              f"delete {out / 'clean'} and {tdir} and prepare again")
    for s in ("train", "val"):
        lengths = np.fromfile(parts[f"{s}_lengths"], dtype="<i8").astype(np.int64)
        with atomic_path(tdir / f"{name}.{s}.lengths.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, lengths)
    atomic_write_bytes(tdir / f"{name}.done", b"")
    for p in (record, *parts.values()):
        p.unlink(missing_ok=True)


def _load_source(out: Path, name: str, split: str, dtype: np.dtype
                 ) -> tuple[np.ndarray, np.ndarray]:
    flat = np.fromfile(out / "tokens" / f"{name}.{split}.bin", dtype=dtype)
    lengths = np.load(out / "tokens" / f"{name}.{split}.lengths.npy")
    return flat, lengths


def prepare(recipe: Recipe, out: str | Path, progress: bool = True, workers: int | None = None,
            checkpoint_docs: int = CHECKPOINT_DOCS, executor: str | None = None
            ) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the manifest.

    `workers`: processes for cleaning, filtering, dedup keys and tokenization (default: the
    usable CPUs, at most 8; 1 = all in this process; > 1 needs the caller's script to have an
    `if __name__ == "__main__":` guard). Outputs do not depend on it. `executor`: run that work
    on a Dask cluster instead, `dask://HOST:PORT` (an existing scheduler) or `dask-local:N`
    (N local worker processes; the same guard); the outputs are the same bytes.
    `checkpoint_docs`: documents between progress records within a source (the most work an
    interruption loses)."""
    out = Path(out)
    if executor is not None and workers is not None:
        raise LlamaworksError("workers sets the local process pool; with an executor the "
                              "cluster's workers do the work (dask-local:N starts N)")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise LlamaworksError(f"workers must be at least 1 (got {workers}); 1 runs in-process")
    if checkpoint_docs < 1:
        raise LlamaworksError(f"checkpoint_docs must be at least 1 (got {checkpoint_docs})")
    pool = make_pool(workers, executor)  # parses the executor before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with pool:
        clean_stats = _clean_sources(recipe, out, progress, pool, checkpoint_docs)
        tok = _tokenizer(recipe, out)
        tok_json = out / "tokenizer" / "tokenizer.json"
        if not tok_json.exists():
            tok.save(out / "tokenizer")
        dtype = token_dtype(tok.vocab_size)
        # every worker count tokenizes with the saved file (the one the manifest names)
        spec = EncodeSpec(tokenizer_json=str(tok_json.resolve()),
                          tokenizer_sha256=file_sha256(tok_json), bos=tok.bos_id,
                          eos=tok.eos_id, dtype=dtype.str)
        todo = [s.name for s in recipe.sources if not (out / "tokens" / f"{s.name}.done").exists()]
        # a cluster's workers get the tokenizer itself, not a path they may not have
        shared = pool.share(tok_json.read_bytes()) if todo else None
        for src in recipe.sources:  # processes beat encode_batch's threads (see parallel.py)
            _tokenize_source(spec, out, src.name, clean_stats[src.name]["kept"], progress,
                             pool, checkpoint_docs, shared)

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

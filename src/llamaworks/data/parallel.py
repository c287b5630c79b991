"""Process-parallel per-document work for `prepare`, with results in input order.

What runs in workers: the pure per-document functions below. `clean_chunk` does `clean_text`,
the Gopher rules, the train/val split, the JSON line, and the dedup keys (exact hash and MinHash
signature); `dedup_chunk` recomputes those keys for kept documents when a restarted run rebuilds
its dedup indexes; `encode_chunk` tokenizes kept documents. The stateful dedup (seen keys, LSH
index) and every write stay in the parent, which consumes the results chunk by chunk in input
order. So the output is byte-identical for any number of workers, and `workers=1` runs the same
functions in-process (no pool at all).

Why processes: cleaning, filtering and MinHash are pure Python and hold the GIL. Workers come
from a forkserver (or `spawn` where there is none), never a fork of the parent, so everything
they run is importable, top-level and picklable; they ignore SIGINT so Ctrl-C reaches the parent,
which cancels what is queued. As with any spawn-style pool, a script calling `prepare` with
workers > 1 needs the `if __name__ == "__main__":` guard.

Tokenization: `tokenizers`' `encode_batch` is already multithreaded in Rust, so with workers > 1
we measured both on the 2-core development machine (the demo recipe's 3,196 kept documents,
2.5M tokens, pool already started by cleaning, 8 alternating runs each): `encode_batch` on 2
threads in the parent took 1.46-2.07 s (mean 1.73 s), two worker processes with one tokenizer
thread each 1.31-1.80 s (mean 1.53 s), because processes also parallelize the JSON parsing and
array building around the Rust call. So `workers > 1` tokenizes in the processes (one thread
each, no oversubscription) and `workers=1` uses `encode_batch`'s threads in-process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llamaworks.data.clean import clean_text
from llamaworks.data.dedup import exact_key, minhash_signature, normalized
from llamaworks.data.filters import QualityThresholds, quality_reason

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 8  # the parent (reading, dedup, writing) is serial: more rarely helps


def default_workers() -> int:
    """CPUs this process may use, capped at MAX_DEFAULT_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_WORKERS))


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of `n` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _init_worker(owner: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cancels
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process

    def exit_with_owner() -> None:  # owner = read end of a pipe only the parent can write
        try:
            owner.recv_bytes()  # EOFError once the parent is gone, even after SIGKILL
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=exit_with_owner, daemon=True).start()


def _context() -> Any:  # -> multiprocessing context
    """forkserver where there is one (a clean single-threaded server that has imported this
    module and datasketch once, then forks workers cheaply: ~0.7 s to a ready pool of 2 instead
    of ~1.6 s with spawn here), else spawn. Never a fork of this (possibly threaded) process."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "datasketch"])
        return ctx
    return multiprocessing.get_context("spawn")


class WorkerPool:
    """`imap(fn, chunks, *args)` maps a picklable top-level `fn` over chunks and yields the
    results in input order, with at most `2 * workers` chunks in flight (bounded memory).
    `workers=1` calls `fn` in this process instead. Processes start at the first `imap` or at
    `start()`, which a caller uses to overlap their start-up with its own work."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._owner: tuple[Any, Any] = (None, None)
        self.tasks_sent = 0  # chunks handed to worker processes so far

    def start(self) -> None:
        """Start the worker processes now (no-op for `workers=1`) without waiting for them."""
        if self.workers > 1 and self._pool is None:
            ctx = _context()
            # Workers exit when this pipe closes: a killed parent would otherwise leave them
            # blocked on the task queue forever.
            self._owner = ctx.Pipe(duplex=False)
            self._pool = ProcessPoolExecutor(self.workers, ctx, initializer=_init_worker,
                                             initargs=(self._owner[0],))
            for _ in range(self.workers):  # spawn-style pools start a process per submit
                self._pool.submit(int)

    def imap(self, fn: Callable[..., R], chunks: Iterable[Any], *args: Any) -> Iterator[R]:
        if self.workers == 1:
            for chunk in chunks:
                yield fn(chunk, *args)
            return
        self.start()
        assert self._pool is not None
        pending: deque[Future[R]] = deque()
        try:
            for chunk in chunks:
                pending.append(self._pool.submit(fn, chunk, *args))
                self.tasks_sent += 1
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for end in self._owner:
                end.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the per-document work (pure functions; they run in worker processes) ---------------------

def is_val(doc_id: str, source: str, fraction: float, seed: int) -> bool:
    """Deterministic train/val assignment by hashing the document id."""
    h = hashlib.blake2b(f"{seed}/{source}/{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass(frozen=True)
class CleanSpec:
    """What `clean_chunk` needs from the recipe for one source."""

    source: str
    filters: QualityThresholds
    val_fraction: float
    seed: int
    exact: bool
    near: bool
    num_perm: int = 128
    ngram: int = 5
    minhash_seed: int = 1


# (reason it was dropped or None, JSON line to write if kept, exact key, MinHash signature)
CleanResult = tuple[str | None, bytes, bytes | None, np.ndarray | None]


def clean_chunk(docs: list[tuple[str, str | None]], spec: CleanSpec) -> list[CleanResult]:
    """Clean, filter and key `(id, raw text)` documents. Dedup is left to the caller, which
    sees the results in order; documents failing a quality rule carry no keys, and a record the
    reader skipped (text None) is dropped as `bad_record`."""
    out: list[CleanResult] = []
    for doc_id, raw in docs:
        if raw is None:
            out.append(("bad_record", b"", None, None))
            continue
        text = clean_text(raw)
        reason = quality_reason(text, spec.filters)
        if reason is not None:
            out.append((reason, b"", None, None))
            continue
        split = "val" if is_val(doc_id, spec.source, spec.val_fraction, spec.seed) else "train"
        line = json.dumps({"id": doc_id, "text": text, "split": split}, ensure_ascii=False)
        out.append((None, (line + "\n").encode("utf-8"), *_keys(text, spec)))
    return out


def _keys(text: str, spec: CleanSpec) -> tuple[bytes | None, np.ndarray | None]:
    norm = normalized(text) if spec.exact or spec.near else ""
    return (exact_key(norm) if spec.exact else None,
            minhash_signature(norm, spec.num_perm, spec.ngram, spec.minhash_seed)
            if spec.near else None)


def dedup_chunk(lines: list[bytes], spec: CleanSpec
                ) -> list[tuple[bytes | None, np.ndarray | None]]:
    """The dedup keys of kept documents (lines of clean/NAME.jsonl), to rebuild the indexes."""
    return [_keys(json.loads(line)["text"], spec) for line in lines]


@dataclass(frozen=True)
class EncodeSpec:
    """The tokenizer file (checked against its hash) and how to frame each document."""

    tokenizer_json: str
    tokenizer_sha256: str
    bos: int | None
    eos: int | None
    dtype: str


_TOKENIZERS: dict[str, Any] = {}


def _backend(spec: EncodeSpec) -> Any:
    tok = _TOKENIZERS.get(spec.tokenizer_sha256)
    if tok is None:
        from tokenizers import Tokenizer as HFTokenizer

        with open(spec.tokenizer_json, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != spec.tokenizer_sha256:
            raise RuntimeError(f"{spec.tokenizer_json} changed while tokenizing")
        tok = _TOKENIZERS[spec.tokenizer_sha256] = HFTokenizer.from_str(data.decode("utf-8"))
    return tok


# (lines, bytes of input consumed, {split: (token ids, per-document lengths)})
EncodeResult = tuple[int, int, dict[str, tuple[np.ndarray, np.ndarray]]]


def encode_chunk(lines: list[bytes], spec: EncodeSpec) -> EncodeResult:
    """Tokenize kept documents (lines of clean/NAME.jsonl) as [BOS] ids [EOS], per split."""
    docs = [json.loads(line) for line in lines]
    encs = _backend(spec).encode_batch([d["text"] for d in docs], add_special_tokens=False)
    bos = [spec.bos] if spec.bos is not None else []
    eos = [spec.eos] if spec.eos is not None else []
    dtype = np.dtype(spec.dtype)
    out = {}
    for split in ("train", "val"):
        ids = [bos + e.ids + eos for d, e in zip(docs, encs, strict=True) if d["split"] == split]
        flat = (np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids
                else np.zeros(0, dtype=dtype))
        out[split] = (flat, np.asarray([len(x) for x in ids], dtype=np.int64))
    return len(lines), sum(len(x) for x in lines), out

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

On a cluster (`executor="dask://HOST:PORT"`, an existing Dask scheduler, or `"dask-local:N"`, a
LocalCluster of N one-thread worker processes for the run): the same functions, the same
ordered-results loop, through `distributed.Client.get_executor()`, which is a
`concurrent.futures.Executor`; only the connection (`DaskPool`) differs. Dask was chosen over Ray
by weight and interface, measured here (2 cores, a 2-worker local cluster, 200 ordered 0.5 MB
tasks of 256 documents): Dask is 14 MB installed (pure Python but msgpack, tornado), Ray 285 MB
(plus its own protobuf), started in 1.6-3.6 s against 7.2 s, and is a standard Executor; Ray's
round trip was faster (2 ms against 13-21 ms a task; 30-40 ms with real chunks), which is
10-20% of a 256-document cleaning task's ~0.2 s here. On this machine's 2 busy cores a local
cluster is slower than the process pool (BENCHMARKS.md): it is for workers on other machines.
Workers must import the same llamaworks: connecting checks a digest of the code and library
versions that decide the output bytes (`worker_digest`) on every worker. The
tokenizer is sent to the workers once (`share`) rather than read from a path they may not have.

Tokenization: `tokenizers`' `encode_batch` is already multithreaded in Rust, so with workers > 1
we measured both on the 2-core development machine (the demo recipe's 3,196 kept documents,
2.5M tokens, pool already started by cleaning, 8 alternating runs each): `encode_batch` on 2
threads in the parent took 1.46-2.07 s (mean 1.73 s), two worker processes with one tokenizer
thread each 1.31-1.80 s (mean 1.53 s), because processes also parallelize the JSON parsing and
array building around the Rust call. So `workers > 1` tokenizes in the processes (one thread
each, no oversubscription) and `workers=1` uses `encode_batch`'s threads in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llamaworks.data.clean import clean_text
from llamaworks.data.dedup import exact_key, minhash_signature, normalized
from llamaworks.data.filters import QualityThresholds, quality_reason
from llamaworks.errors import LlamaworksError

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

    in_process_when_one = True  # a cluster runs even one worker's tasks remotely

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: Executor | None = None
        self._owner: tuple[Any, Any] = (None, None)
        self.tasks_sent = 0  # chunks handed to worker processes so far

    def start(self) -> None:
        """Start the worker processes now (no-op for `workers=1`) without waiting for them."""
        if self.workers > 1 and self._pool is None:
            ctx = _context()
            # Workers exit when this pipe closes: a killed parent would otherwise leave them
            # blocked on the task queue forever.
            self._owner = ctx.Pipe(duplex=False)
            pool = ProcessPoolExecutor(self.workers, ctx, initializer=_init_worker,
                                       initargs=(self._owner[0],))
            for _ in range(self.workers):  # spawn-style pools start a process per submit
                pool.submit(int)
            self._pool = pool

    def share(self, data: Any) -> Any:
        """A handle for `data` that tasks receive as an argument: here `None` (processes on
        this machine read files themselves); a cluster sends it to its workers once."""
        return None

    def _result(self, future: Future[R]) -> R:
        return future.result()

    def imap(self, fn: Callable[..., R], chunks: Iterable[Any], *args: Any) -> Iterator[R]:
        if self.workers == 1 and self.in_process_when_one:
            for chunk in chunks:
                yield fn(chunk, *args)
            return
        self.start()
        assert self._pool is not None
        pending: deque[Future[R]] = deque()
        try:
            for chunk in chunks:
                pending.append(self._submit(fn, chunk, *args))
                self.tasks_sent += 1
                if len(pending) >= 2 * self.workers:
                    yield self._result(pending.popleft())
            while pending:
                yield self._result(pending.popleft())
        finally:
            for f in pending:
                f.cancel()

    def _submit(self, fn: Callable[..., R], chunk: Any, *args: Any) -> Future[R]:
        assert self._pool is not None
        return self._pool.submit(fn, chunk, *args)

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


# -- a Dask cluster instead of local processes -------------------------------------------------

DASK_PORT = 8786           # `dask scheduler`'s default port
CONNECT_TIMEOUT_S = 20.0   # to reach the scheduler, and then to see its first worker
LOST_WORKERS_S = 60.0      # a task waits this long on a cluster with no workers, then fails
POLL_S = 5.0               # how often a waiting task checks that the cluster has workers


@dataclass(frozen=True)
class ExecutorSpec:
    """A parsed `--executor`: `address` of an existing scheduler, or `local` worker count."""

    text: str
    address: str | None = None
    local: int | None = None


def parse_executor(text: str) -> ExecutorSpec:
    """`dask://HOST[:PORT]` (an existing scheduler, port 8786 by default; `tcp://HOST:PORT`
    as a scheduler prints it also works) or `dask-local:N` (N worker processes for this run)."""
    if text.startswith("dask-local:"):
        n = text.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise LlamaworksError(f"--executor {text}: dask-local:N needs N >= 1 workers")
        return ExecutorSpec(text, local=int(n))
    for scheme in ("dask://", "tcp://"):
        if text.startswith(scheme):
            host = text[len(scheme):].rstrip("/")
            if not host or "/" in host:
                break
            if ":" not in host.rsplit("]", 1)[-1]:
                host = f"{host}:{DASK_PORT}"
            return ExecutorSpec(text, address=f"tcp://{host}")
    raise LlamaworksError(f"--executor {text}: expected dask://HOST[:PORT] (an existing Dask "
                          "scheduler) or dask-local:N (start N local worker processes)")


def _on_worker(fn: Callable[..., R], chunk: Any, *args: Any) -> R:
    """Run one task on a Dask worker: one tokenizer thread per task (threads_per_worker=1
    processes are the parallelism, as with the local pool)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return fn(chunk, *args)


def worker_digest() -> str:
    """SHA-256 of what decides the output bytes on a worker: the source of the per-document
    modules and the versions of the libraries they call. Equal on the parent and on every
    worker, or a cluster run could write other bytes than a local one."""
    import importlib.metadata as md

    from llamaworks.data import clean, dedup, filters

    h = hashlib.sha256()
    for mod in (clean, dedup, filters, sys.modules[__name__]):
        with open(mod.__file__ or "", "rb") as f:
            h.update(f.read())
    for pkg in ("numpy", "datasketch", "tokenizers"):
        h.update(f"{pkg}=={md.version(pkg)}\n".encode())
    return h.hexdigest()


class DaskPool(WorkerPool):
    """`WorkerPool` on a Dask cluster: `imap` submits to `Client.get_executor()` and yields
    in input order exactly as with processes; `workers` becomes the cluster's thread count
    once connected (2 tasks in flight per thread). Connecting fails with a LlamaworksError,
    never a hang: an unreachable scheduler, one without workers within `timeout` s, or workers
    whose llamaworks differs from ours (`worker_digest`)."""

    in_process_when_one = False

    def __init__(self, spec: ExecutorSpec, timeout: float | None = None) -> None:
        super().__init__(spec.local or 1)
        self.spec = spec
        self.timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
        self._client: Any = None
        self._cluster: Any = None

    def start(self) -> None:
        if self._pool is not None:
            return
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise LlamaworksError(f"--executor {self.spec.text} needs Dask's `distributed` "
                                  f"package ({e}); pip install distributed") from None
        try:
            if self.spec.local is not None:
                self._cluster = LocalCluster(
                    n_workers=self.spec.local, threads_per_worker=1, processes=True,
                    dashboard_address=":0", env={"TOKENIZERS_PARALLELISM": "false",
                                                 "OMP_NUM_THREADS": "1"})
                self._client = Client(self._cluster, timeout=self.timeout)
            else:
                self._client = Client(self.spec.address, timeout=self.timeout)
        except (OSError, TimeoutError) as e:
            self.close()
            raise LlamaworksError(
                f"--executor {self.spec.text}: no Dask scheduler answered at "
                f"{self.spec.address or 'a local cluster'} within {self.timeout:g} s ({e}). "
                "Start one with `dask scheduler` and workers with `dask worker ADDRESS "
                "--nthreads 1`") from None
        try:
            self._client.wait_for_workers(1, timeout=self.timeout)
        except (OSError, TimeoutError):
            self.close()
            raise LlamaworksError(f"--executor {self.spec.text}: the scheduler has no workers "
                                  f"after {self.timeout:g} s; start some with `dask worker "
                                  f"{self.spec.address} --nthreads 1`") from None
        self._check_workers()
        self.workers = max(1, sum(self._client.nthreads().values()))
        self._pool = self._client.get_executor(pure=False)

    def _check_workers(self) -> None:
        try:
            digests = self._client.run(worker_digest)
        except Exception as e:  # the workers cannot unpickle our functions: no llamaworks
            self.close()
            raise LlamaworksError(
                f"--executor {self.spec.text}: the workers cannot run llamaworks' data "
                f"functions ({type(e).__name__}: {e}); install this llamaworks (and its "
                "dependencies) in the workers' environment") from None
        ours = worker_digest()
        other = sorted(w for w, d in digests.items() if d != ours)
        if other:
            self.close()
            raise LlamaworksError(
                f"--executor {self.spec.text}: workers {', '.join(other)} run other llamaworks "
                "data code or other numpy/datasketch/tokenizers versions than this process, "
                "so their output could differ; install the same versions there")

    def share(self, data: Any) -> Any:
        """Send `data` to every worker once; tasks get it by reference (a Dask future)."""
        self.start()
        return self._client.scatter(data, broadcast=True, hash=False)

    def _submit(self, fn: Callable[..., R], chunk: Any, *args: Any) -> Future[R]:
        assert self._pool is not None
        return self._pool.submit(_on_worker, fn, chunk, *args)

    def _result(self, future: Future[R]) -> R:
        """The task's result; fails (instead of waiting forever) if the cluster has had no
        workers for LOST_WORKERS_S, or if the scheduler went away (Dask cancels then)."""
        idle = 0.0
        while True:
            try:
                return future.result(timeout=POLL_S)
            except FutureTimeout:
                idle = idle + POLL_S if not self._client.nthreads() else 0.0
                if idle >= LOST_WORKERS_S:
                    raise LlamaworksError(f"--executor {self.spec.text}: the cluster has had "
                                          f"no workers for {idle:g} s") from None
            except CancelledError:
                raise LlamaworksError(f"--executor {self.spec.text}: a task was cancelled "
                                      "(lost the connection to the scheduler?)") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        for name in ("_client", "_cluster"):
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()


def make_pool(workers: int, executor: str | None = None) -> WorkerPool:
    """The local process pool, or a `DaskPool` for an `--executor` string."""
    return DaskPool(parse_executor(executor)) if executor else WorkerPool(workers)


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


def _backend(spec: EncodeSpec, data: bytes | None = None) -> Any:
    """The tokenizer, built once per process from `data` (sent by the parent) or its file."""
    tok = _TOKENIZERS.get(spec.tokenizer_sha256)
    if tok is None:
        from tokenizers import Tokenizer as HFTokenizer

        if data is None:
            with open(spec.tokenizer_json, "rb") as f:
                data = f.read()
        if hashlib.sha256(data).hexdigest() != spec.tokenizer_sha256:
            raise RuntimeError(f"{spec.tokenizer_json} changed while tokenizing")
        tok = _TOKENIZERS[spec.tokenizer_sha256] = HFTokenizer.from_str(data.decode("utf-8"))
    return tok


# (lines, bytes of input consumed, {split: (token ids, per-document lengths)})
EncodeResult = tuple[int, int, dict[str, tuple[np.ndarray, np.ndarray]]]


def encode_chunk(lines: list[bytes], spec: EncodeSpec, tokenizer: bytes | None = None
                 ) -> EncodeResult:
    """Tokenize kept documents (lines of clean/NAME.jsonl) as [BOS] ids [EOS], per split.
    `tokenizer`: the tokenizer.json bytes, for workers that cannot read `spec`'s path."""
    docs = [json.loads(line) for line in lines]
    encs = _backend(spec, tokenizer).encode_batch([d["text"] for d in docs],
                                                  add_special_tokens=False)
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

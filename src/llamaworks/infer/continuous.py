"""Continuous batching: one scheduler thread owns the model and a pool of KV-cache rows.

Each cache row holds one sequence at its own position (`KVCache(per_row=True)`). A new request
is prefilled into free rows (n > 1 takes n rows sharing one prefill) and joins the running decode
batch between steps; every step decodes all busy rows at once; a finished or cancelled row is
free again before the next step. Sampling, stop ids/strings, logprobs and finish reasons are
`LLM`'s own (`LLM._rows`, `_advance`, `_releasable`), so greedy output matches `LLM.generate`.

Results go to each request's `sink` callback from the scheduler thread (thread-safe queues:
`queue.Queue.put`, or `loop.call_soon_threadsafe` for asyncio).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llamaworks.errors import LlamaworksError
from llamaworks.infer.engine import LLM, Prompt, RequestOutput, _Row
from llamaworks.infer.sampling import SamplingParams
from llamaworks.model import KVCache

log = logging.getLogger(__name__)


class QueueFullError(LlamaworksError):
    """The waiting queue is at `max_queue`: retry later (HTTP 429)."""


@dataclass
class Event:
    """What one step produced for one sequence (`index`), or the end of the whole request.

    text: newly releasable text (never part of a stop string); token_ids/logprobs: new tokens.
    done: the request is over; `result` then holds every sequence (unless `error`)."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    done: bool = False
    result: RequestOutput | None = None
    error: str | None = None


Sink = Callable[[Event], None]


class Request:
    """A submitted prompt: its rows, its sink, and a cancel flag checked between steps."""

    _ids = itertools.count()

    def __init__(self, prompt: RequestOutput, params: SamplingParams, sink: Sink):
        self.id = next(self._ids)
        self.result, self.params, self.sink = prompt, params, sink
        self.rows: list[_Row] = []
        self.slots: list[int] = []
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.first_token: float | None = None

    def cancel(self) -> None:
        """Stop generating; the rows are freed before the next decode step."""
        self.cancelled.set()


class _RowSlice:
    """Rows [lo, hi) of a per-row KVCache as a cache the model can write into (views)."""

    per_row = True
    update = KVCache.update

    def __init__(self, pool: KVCache, lo: int, hi: int):
        self.k, self.v = pool.k[:, lo:hi], pool.v[:, lo:hi]
        self.max_seq_len = pool.max_seq_len


@dataclass
class Stats:
    """Counters for /metrics (read without locking: approximate by design)."""

    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    batch_size: int = 0
    queue_depth: int = 0


class ContinuousEngine:
    """Serve many requests concurrently from one `LLM`'s model and tokenizer.

    max_batch: cache rows (sequences decoded together). max_queue: waiting requests before
    `submit` raises QueueFullError. context: tokens per row (default min(model context, 4096));
    the row buffers grow in powers of two as sequences get longer."""

    def __init__(self, llm: LLM, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or 4096, self.model.config.max_seq_len)
        self.stats = Stats()
        self._pool = self._new_pool(min(256, self.context))
        self._slots: list[_Row | None] = [None] * max_batch
        self._owner: list[Request | None] = [None] * max_batch
        self._next_tok = [0] * max_batch
        self._pos = [0] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: set[Request] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------------
    def start(self) -> ContinuousEngine:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="llamaworks-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the scheduler thread after the current step."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row (a cancelled one no longer counts, though the scheduler
        drops it only before its next step)."""
        return sum(not r.cancelled.is_set() for r in self._waiting)

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt ids as `LLM` makes them; ValueError if empty or too long for a row."""
        ids = self.llm._encode(prompt)
        if len(ids) >= self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens; this server's context is "
                             f"{self.context}")
        return ids

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; events go to `sink` from the scheduler thread."""
        return self.submit_all([prompt], params, [sink])[0]

    def submit_all(self, prompts: Sequence[Prompt], params: SamplingParams,
                   sinks: Sequence[Sink]) -> list[Request]:
        """Queue several prompts (one sink each) all together or none of them: QueueFullError
        when the queue lacks room for all, so a refused request leaves nothing behind that
        would refuse the next ones; ValueError when they are more than the whole queue."""
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} exceeds the server's batch of {self.max_batch} rows")
        if len(prompts) > max(self.max_queue, 1):
            raise ValueError(f"{len(prompts)} prompts are more than this server queues at once "
                             f"({self.max_queue}, --max-queue)")
        reqs = []
        for prompt, sink in zip(prompts, sinks, strict=True):
            ids = self.encode(prompt)
            res = RequestOutput(prompt if isinstance(prompt, str) else None, ids)
            req = Request(res, params, sink)
            req.rows = self.llm._rows([res], [params])
            reqs.append(req)
        with self._cv:
            waiting = self.queue_depth
            if waiting + len(reqs) > self.max_queue:
                raise QueueFullError(f"the queue is full ({waiting} requests wait for a batch "
                                     "row, the --max-queue limit); retry shortly")
            self._waiting.extend(reqs)
            self.stats.queue_depth = len(self._waiting)
            self._cv.notify_all()
        return reqs

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Submit all prompts at once and wait for every result (convenience for scripts)."""
        params = params or SamplingParams()
        done: queue.Queue[Event] = queue.Queue()

        def sink(ev: Event) -> None:
            if ev.done:
                done.put(ev)

        reqs = [self.submit(p, params, sink) for p in prompts]
        for _ in reqs:
            ev = done.get(timeout=timeout)
            if ev.error:
                raise RuntimeError(ev.error)
        return [r.result for r in reqs]

    # -- scheduler -------------------------------------------------------------------------------
    def _new_pool(self, length: int) -> KVCache:
        return KVCache(self.model.config, self.max_batch, length, self.model.dtype,
                       self.model.device, per_row=True)

    def _ensure_len(self, length: int) -> None:
        """Grow every row's buffer (powers of two, capped at `context`) to hold `length`."""
        old = self._pool.max_seq_len
        if length <= old:
            return
        size = old
        while size < length:
            size *= 2
        pool = self._new_pool(min(size, self.context))
        pool.k[:, :, :, :old] = self._pool.k
        pool.v[:, :, :, :old] = self._pool.v
        self._pool = pool

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    self._fail_all("the server is shutting down")
                    return
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._decode()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("scheduler step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _take(self, n: int) -> list[int] | None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        return free[:n] if len(free) >= n else None

    def _admit(self) -> None:
        """Prefill waiting requests (FIFO) while their rows fit."""
        while True:
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting[0]
                slots = self._take(len(req.rows))
                if slots is None:
                    break
                self._waiting.popleft()
                self.stats.queue_depth = len(self._waiting)
            self._prefill(req, slots)

    def _prefill(self, req: Request, slots: list[int]) -> None:
        ids = req.result.prompt_token_ids
        n = len(ids)
        self._ensure_len(n + 1)
        device = self._pool.k.device
        tokens = torch.tensor([ids], device=device)
        pos = torch.arange(n, device=device)
        mask = (pos[None, :] <= pos[:, None])[None, None]  # causal [1, 1, n, n]
        first = slots[0]
        req.slots = slots
        self._running.add(req)  # from here on a failure reaches the request (`_fail_all`)
        logits = self.model(tokens, pos[None], _RowSlice(self._pool, first, first + 1), mask,
                            n)[0, -1]
        for s in slots[1:]:  # n > 1: every sequence starts from the same cache
            self._pool.k[:, s, :, :n] = self._pool.k[:, first, :, :n]
            self._pool.v[:, s, :, :n] = self._pool.v[:, first, :, :n]
        self.stats.requests += 1
        self.stats.prompt_tokens += n
        for s, row in zip(slots, req.rows, strict=True):
            self._slots[s], self._owner[s], self._pos[s] = row, req, n
        self._after_step([(s, logits) for s in slots])

    def _decode(self) -> None:
        busy = [s for s, r in enumerate(self._slots) if r is not None]
        hi = busy[-1] + 1
        kv_len = max(self._pos[s] for s in busy) + 1
        self._ensure_len(kv_len)
        device = self._pool.k.device
        tokens = torch.tensor([[self._next_tok[s]] for s in range(hi)], device=device)
        pos = torch.tensor([[self._pos[s] if self._slots[s] is not None else 0] for s in range(hi)],
                           device=device)
        mask = (torch.arange(kv_len, device=device)[None, :] <= pos)[:, None, None]
        rows = _RowSlice(self._pool, 0, hi)
        fused = self.llm.step.fused
        if fused is not None and rows.k.dtype == torch.float32:
            logits = fused(tokens[:, 0], pos[:, 0], pos[:, 0], rows.k, rows.v, mask[:, 0, 0])
        else:
            logits = self.model(tokens, pos, rows, mask, kv_len, last_only=True)[:, -1]
        self.stats.steps += 1
        self.stats.batch_size = len(busy)
        for s in busy:
            self._pos[s] += 1
        self._after_step([(s, logits[s]) for s in busy])

    def _after_step(self, picks: list[tuple[int, torch.Tensor]]) -> None:
        """Sample each row's next token, send its events, free finished rows and requests."""
        for s, logits in picks:
            row, req = self._slots[s], self._owner[s]
            assert row is not None and req is not None
            n_lp = len(row.logprobs) if row.logprobs is not None else 0
            tok = self.llm._advance(row, logits, len(row.ids), self.context)
            self._next_tok[s] = tok
            self.stats.generation_tokens += 1
            if req.first_token is None:
                req.first_token = time.monotonic()
            lps = row.logprobs[n_lp:] if row.logprobs is not None else None
            self._send(req, Event(row.index, self.llm._releasable(row), [tok], lps, row.finish))
            if row.finish:
                self._slots[s] = self._owner[s] = None
        for req in [r for r in self._running if all(row.finish for row in r.rows)]:
            self._finish(req)

    def _finish(self, req: Request, error: str | None = None) -> None:
        self._running.discard(req)
        for s in req.slots:
            if self._owner[s] is req:
                self._slots[s] = self._owner[s] = None
        req.result.outputs = [row.output() for row in req.rows]
        self._send(req, Event(done=True, result=req.result, error=error))

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
            self.stats.queue_depth = len(self._waiting)
        gone += [r for r in self._running if r.cancelled.is_set()]
        for req in gone:
            self.stats.cancelled += 1
            for row in req.rows:
                row.finish = row.finish or "cancelled"
            self._finish(req)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            reqs = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for req in reqs:
            self._finish(req, message)

    @staticmethod
    def _send(req: Request, ev: Event) -> None:
        try:
            req.sink(ev)
        except Exception:  # noqa: BLE001 - a closed client loop must not stop the scheduler
            log.debug("dropping an event for request %d", req.id, exc_info=True)
            req.cancel()


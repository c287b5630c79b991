"""Continuous batching for the server: a scheduler thread that owns the engine.

Requests are queued from any thread; between steps the scheduler hands new ones to the engine
(`infer.engine.Engine`), drops cancelled ones (their rows are free before the next step) and
steps. Every step decodes all rows at once while prompts enter in chunks beside them, so a long
prompt does not stall the running streams; sampling, stops and logprobs are the engine's, so
greedy output equals `LLM.generate`.

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
from llamaworks.infer.engine import Engine
from llamaworks.infer.llm import LLM, Prompt
from llamaworks.infer.sampling import SamplingParams
from llamaworks.infer.sequence import RequestOutput
from llamaworks.infer.sequence import Sequence as Seq

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
    """A submitted prompt: its sequences, its sink, and a cancel flag checked between steps."""

    _ids = itertools.count()

    def __init__(self, prompt: RequestOutput, params: SamplingParams, sink: Sink,
                 seqs: list[Seq]):
        self.id = next(self._ids)
        self.result, self.params, self.sink, self.seqs = prompt, params, sink, seqs
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.first_token: float | None = None

    def cancel(self) -> None:
        """Stop generating; the rows are freed before the next step."""
        self.cancelled.set()


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
    `submit` raises QueueFullError. context: tokens per row (default min(model context, 4096)).
    cache_mb: prefix-cache budget. chunk: most prompt tokens per step; max_gap: while rows
    decode, a step admitting a prompt chunk takes about this many plain decode steps (None: always
    `chunk`). drafter: speculative decoding (`infer.speculative`). reserve: allocate the KV
    cache of every row at the full context now (the server does: growing it later stalls a step
    for as long as copying it takes). make_engine: the Engine class, or a factory taking its
    arguments (tensor parallelism: `infer.tensor_parallel.LockstepEngine`)."""

    def __init__(self, llm: LLM, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, cache_mb: float = 256,
                 max_gap: float | None = 2.0, chunk: int = 512, drafter: object = None,
                 reserve: bool = False, make_engine: Callable[..., Engine] = Engine):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.max_queue = max_queue
        self.engine = make_engine(llm.model, llm.tokenizer, max_batch=max_batch,
                                  context=min(context or 4096, llm.model.config.max_seq_len),
                                  step=llm.step, cache_mb=cache_mb, max_gap=max_gap,
                                  chunk=chunk, drafter=drafter)
        self.context = self.engine.context
        if reserve:
            self.engine.pool.reserve()
        self.stats = Stats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # sequence id -> request
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

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
        return len(self.engine.pool.free)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row (a cancelled one no longer counts, though the scheduler
        drops it only before its next step)."""
        waiting = list(self._waiting) + self._engine_waiting()
        return sum(not r.cancelled.is_set() for r in waiting)

    def _engine_waiting(self) -> list[Request]:
        reqs = []
        for group in list(self.engine.waiting):
            req = self._running.get(group[0].id)
            if req is not None:
                reqs.append(req)
        return reqs

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt ids as `LLM` makes them; ValueError if empty or too long for a row."""
        ids = self.llm.encode(prompt)
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
            reqs.append(Request(res, params, sink, self.engine.sequences(ids, params)))
        with self._cv:
            waiting = self.queue_depth
            if waiting + len(reqs) > self.max_queue:
                raise QueueFullError(f"the queue is full ({waiting} requests wait for a batch "
                                     "row, the --max-queue limit); retry shortly")
            self._waiting.extend(reqs)
            self.stats.queue_depth = waiting + len(reqs)
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
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self.engine.has_work:
                    self._cv.wait()
                if self._stop:
                    self._fail_all("the server is shutting down")
                    return
                new = list(self._waiting)
                self._waiting.clear()
            try:
                for req in new:
                    self.engine.add(req.seqs)
                    for s in req.seqs:
                        self._running[s.id] = req
                self._drop_cancelled()
                if self.engine.has_work:
                    with torch.inference_mode():
                        touched = self.engine.step()
                    self._report(touched)
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("scheduler step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _report(self, touched: list[Seq]) -> None:
        """Send each touched sequence's new tokens and text; finish requests that are done."""
        st = self.stats
        st.steps = self.engine.steps
        st.batch_size = len(self.engine.running)
        st.queue_depth = self.queue_depth
        for s in touched:
            req = self._running.get(s.id)
            if req is None:
                continue
            new = s.ids[s.sent:]
            if s.sent == 0 and new:
                st.requests += s.index == 0
                st.prompt_tokens += len(s.prompt_ids) if s.index == 0 else 0
                if req.first_token is None:
                    req.first_token = time.monotonic()
            lps = s.logprobs[s.sent:] if s.logprobs is not None else None
            st.generation_tokens += len(new)
            s.sent = len(s.ids)
            self._send(req, Event(s.index, s.releasable(), new, lps, s.finish))
        for req in {id(r): r for r in (self._running.get(s.id) for s in touched) if r}.values():
            if all(s.finish for s in req.seqs):
                self._finish(req)

    def _finish(self, req: Request, error: str | None = None) -> None:
        for s in req.seqs:
            self._running.pop(s.id, None)
        req.result.outputs = [s.output() for s in req.seqs]
        req.result.num_cached_tokens = req.seqs[0].cached_prefix
        self._send(req, Event(done=True, result=req.result, error=error))

    def _drop_cancelled(self) -> None:
        gone = {id(r): r for r in self._running.values() if r.cancelled.is_set()}
        for req in gone.values():
            self.stats.cancelled += 1
            self.engine.abort(req.seqs)
            self._finish(req)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            reqs = list(self._waiting)
            self._waiting.clear()
        reqs += list({id(r): r for r in self._running.values()}.values())
        self.engine.abort([s for r in reqs for s in r.seqs], "error")
        for req in reqs:
            self._finish(req, message)

    @staticmethod
    def _send(req: Request, ev: Event) -> None:
        try:
            req.sink(ev)
        except Exception:  # noqa: BLE001 - a closed client loop must not stop the scheduler
            log.debug("dropping an event for request %d", req.id, exc_info=True)
            req.cancel()

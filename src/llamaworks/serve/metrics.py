"""Prometheus text exposition (format 0.0.4) written by hand: counters, gauges and histograms for
requests, tokens, queue depth, batch size and latencies. No client library needed."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from llamaworks.infer.continuous import ContinuousEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    """What the server counts; `render(engine)` adds the engine's live gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram()
        self.ttft = Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def generation_done(self, seconds: float, ttft: float | None) -> None:
        """A generation request's end-to-end latency and time to first token."""
        with self._lock:
            self.latency.observe(seconds)
            if ttft is not None:
                self.ttft.observe(ttft)

    def render(self, engine: ContinuousEngine) -> str:
        s = engine.stats
        lines = ["# HELP llamaworks_requests_total HTTP requests by endpoint and status.",
                 "# TYPE llamaworks_requests_total counter"]
        with self._lock:
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'llamaworks_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            hist = [("request_latency_seconds", "End-to-end generation latency.", self.latency),
                    ("time_to_first_token_seconds", "Submission to first token.", self.ttft)]
            for name, help_, h in hist:
                lines += [f"# HELP llamaworks_{name} {help_}",
                          f"# TYPE llamaworks_{name} histogram", *h.lines(f"llamaworks_{name}")]
        for name, kind, help_, value in [
            ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens),
            ("generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens),
            ("engine_requests_total", "counter", "Requests admitted to the batch.", s.requests),
            ("cancelled_requests_total", "counter", "Requests cancelled (e.g. disconnects).",
             s.cancelled),
            ("decode_steps_total", "counter", "Batched decode steps.", s.steps),
            ("queue_depth", "gauge", "Requests waiting for a batch row.", engine.queue_depth),
            ("batch_size", "gauge", "Rows decoding now.", engine.max_batch - engine.free_slots),
            ("batch_size_last_step", "gauge", "Rows in the last decode step.", s.batch_size),
            ("max_batch", "gauge", "Cache rows (sequences decoded together).", engine.max_batch),
        ]:
            lines += [f"# HELP llamaworks_{name} {help_}", f"# TYPE llamaworks_{name} {kind}",
                      f"llamaworks_{name} {value}"]
        return "\n".join(lines) + "\n"

"""From the scheduler thread to asyncio: submit requests and iterate over their events.

The engine calls each request's sink on its own thread; the sink hands the event to the event
loop with `call_soon_threadsafe`, so handlers simply `await` a queue. Leaving the iteration early
(the client went away, the time limit passed, an exception) cancels every request still running,
which frees its cache rows before the next decode step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from llamaworks.infer.continuous import ContinuousEngine, Event, Request
from llamaworks.infer.engine import Prompt
from llamaworks.infer.sampling import SamplingParams


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


class RequestTimeout(Exception):
    """The request ran past the server's time limit."""


class Submission:
    """Several prompts (e.g. a /v1/completions list) submitted together, all or none (a full
    queue leaves nothing behind); events are tagged with the prompt's position."""

    def __init__(self, engine: ContinuousEngine, prompts: Sequence[Prompt],
                 params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests: list[Request] = engine.submit_all(
            prompts, params, [self._sink(loop, j) for j in range(len(prompts))])
        self.open = len(self.requests)

    def _sink(self, loop: asyncio.AbstractEventLoop, j: int) -> Callable[[Event], None]:
        return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (j, ev))

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self, timeout: float, is_disconnected: Callable | None = None,
                     poll: float = 0.5) -> AsyncIterator[tuple[int, Event]]:
        """Yield (prompt index, event) until every request is done. `is_disconnected` (an async
        callable) is polled while waiting, for handlers that are not cancelled on disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while self.open:
                left = deadline - loop.time()
                if left <= 0:
                    raise RequestTimeout(f"the request ran past the server's limit of "
                                         f"{timeout:g} s")
                try:
                    j, ev = await asyncio.wait_for(self.queue.get(), min(poll, left))
                except TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        raise ClientGone() from None
                    continue
                if ev.done:
                    self.open -= 1
                yield j, ev
        finally:
            if self.open:
                self.cancel()

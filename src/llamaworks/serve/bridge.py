"""From the scheduler thread to asyncio: submit requests and iterate over their events.

The engine calls each request's sink on its own thread; the sink hands the event to the event
loop with `call_soon_threadsafe`, so handlers simply `await` a queue. Leaving the iteration early
(the client went away, the time limit passed, an exception) cancels every request still running,
which frees its cache rows before the next decode step; `watch` notices a disconnect the moment
the connection closes, not at the end of the generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from llamaworks.infer.continuous import ContinuousEngine, Event, Request
from llamaworks.infer.llm import Prompt
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
        self.queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        self.requests: list[Request] = engine.submit_all(
            prompts, params, [self._sink(loop, j) for j in range(len(prompts))])
        self.open = len(self.requests)

    def _sink(self, loop: asyncio.AbstractEventLoop, j: int) -> Callable[[Event], None]:
        return lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, (j, ev))

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    def hang_up(self) -> None:
        """The client is gone: cancel now (the rows are free before the next decode step) and
        make `events` raise ClientGone."""
        self.cancel()
        self.queue.put_nowait((-1, None))

    async def watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Wait for the client to disconnect (its body is read, so the next ASGI message is
        `http.disconnect`), then `hang_up`: run it as a task beside a handler that is not
        cancelled on disconnect, as a non-streaming one is not."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hang_up()

    async def events(self, timeout: float) -> AsyncIterator[tuple[int, Event]]:
        """Yield (prompt index, event) until every request is done; RequestTimeout past
        `timeout` seconds, ClientGone after `hang_up`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while self.open:
                left = deadline - loop.time()
                try:
                    j, ev = await asyncio.wait_for(self.queue.get(), max(left, 0))
                except TimeoutError:
                    raise RequestTimeout(f"the request ran past the server's limit of "
                                         f"{timeout:g} s") from None
                if ev is None:
                    raise ClientGone()
                if ev.done:
                    self.open -= 1
                yield j, ev
        finally:
            if self.open:
                self.cancel()

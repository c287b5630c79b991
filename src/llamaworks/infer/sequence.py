"""The engine's public sequence state and the results it hands back.

A `Sequence` is one output stream: its prompt, every token after it (sampled or forced), its
sampling parameters and stop rules, logprobs, the tool hook that can force tokens in, and how
much of it the KV cache holds. The engine (`infer.engine.Engine`) moves sequences from waiting to
a cache row to finished; every caller (`LLM`, the continuous scheduler, GRPO rollouts, the CLI)
reads the same fields.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaworks.infer.sampling import SamplingParams

# Given the assistant text of the turn that just ended (a sampled stop token), return text to
# force in after it (tool results up to the next assistant header), or None: the sequence ends.
TurnHook = Callable[[str], str | None]


@dataclass
class CompletionOutput:
    """One generated sequence. `logprobs[i]` maps token id -> log-probability for output token i
    (the sampled one plus the requested top alternatives)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    """All sequences for one prompt; `text`, `token_ids`, `finish_reason` are the first one's.
    `num_cached_tokens`: prompt tokens whose keys/values came from the prefix cache."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


class Sequence:
    """One output stream through the engine.

    tokens: prompt + output; `cached` of them have keys/values in the sequence's cache row (the
    rest are fed next step: a prompt chunk, forced tokens, or the last sampled token). `sampled`
    marks each output token: 1 = chosen by the model, 0 = forced in by `on_turn_end`."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 index: int = 0, generator: torch.Generator | None = None,
                 on_turn_end: TurnHook | None = None, max_turn_hooks: int = 1 << 30,
                 decode: Callable[[list[int]], str] | None = None):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.tokens = list(prompt_ids)
        self.params, self.stop_ids, self.index, self.gen = params, stop_ids, index, generator
        self.on_turn_end, self.max_turn_hooks = on_turn_end, max_turn_hooks
        self.ids: list[int] = []  # output tokens (sampled and forced)
        self.sampled: list[int] = []
        self.turns: list[str] = []  # assistant text of each ended turn (tool hook rollouts)
        self.turn_hooks = 0
        self.turn_start = 0  # index into `ids` where the current assistant turn began
        self.decode = decode or (lambda ids: "")
        self._text, self._text_of = "", 0  # decoded text and how many ids it covers
        self.cut: str | None = None  # the text up to a stop string, once one appeared
        self.emitted = 0  # characters of `text` already streamed
        self.sent = 0  # output tokens already reported as events
        self.finish: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cum = 0.0
        self.cached = 0
        self.cached_prefix = 0  # prompt tokens taken from the prefix cache
        self.row: int | None = None
        self.leader: Sequence | None = None  # n > 1: the sibling whose prefill this one copies
        self.proposed = self.accepted = 0  # speculative draft tokens
        self.constraint: Any = None  # grammar state (infer.grammar.Constraint), if constrained
        self.lazy_from = 0  # where in `text` to look for the lazy grammar's next trigger

    @property
    def text(self) -> str:
        """The output decoded (special tokens skipped), cut before a stop string; decoded when
        read, so a caller that only wants ids pays nothing."""
        if self.cut is not None:
            return self.cut
        if self._text_of != len(self.ids):
            self._text, self._text_of = self.decode(self.ids), len(self.ids)
        return self._text

    @property
    def pending(self) -> int:
        """Tokens to feed before the next sampling (0 once finished)."""
        return 0 if self.finish else len(self.tokens) - self.cached

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, self.ids, self.finish, self.logprobs,
                                self.cum if self.logprobs is not None else None,
                                self.stop_reason)

    def releasable(self) -> str:
        """Text that can be streamed now (not a possible stop-string prefix, no partial UTF-8);
        marks it emitted."""
        end = len(self.text)
        if not self.finish:
            end -= max((len(s) - 1 for s in self.params.stop), default=0)
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

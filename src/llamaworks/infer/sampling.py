"""Next-token selection: penalties, temperature, top-k, top-p, min-p, each row from its own
explicit generator.

Definitions follow transformers' logits processors (repetition penalty, top-k, top-p, min-p) and
the OpenAI/vLLM frequency and presence penalties, in this order: repetition -> frequency/presence
-> temperature -> top-k -> top-p -> min-p -> sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's field names).

    temperature 0 = greedy (the default here). top_k 0 or -1 = off. `seed` makes sampling
    reproducible (same seed -> same text). `penalty_last_n`: how many of the latest prompt + output
    tokens the repetition penalty looks at (llama.cpp's `--repeat-last-n`; -1 = all of them, as in
    transformers; 0 = none). `logprobs`: None = none; k >= 0 = the sampled token's
    log-probability plus the k most likely alternatives, from the model's raw distribution.
    `json_schema` (a dict or JSON text) or `grammar` (Lark, llguidance's dialect): the output is
    constrained to it token by token (`infer.grammar`) and ends when it is complete;
    `grammar_prefix`: text of it already in the prompt (a forced opening the output continues).
    `lazy_grammar` (trigger, grammar): free text until the output contains `trigger`, then the
    grammar for what follows it, then free again (tool calls with tool_choice "auto")."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = -1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    json_schema: dict | str | None = None
    grammar: str | None = None
    grammar_prefix: str = ""
    lazy_grammar: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (or -1 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.penalty_last_n < -1:
            raise ValueError(f"penalty_last_n must be >= 0 (or -1 = all), got "
                             f"{self.penalty_last_n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]

    def token_only(self, max_tokens: int, stop_ids: Sequence[int] = ()) -> SamplingParams:
        """These settings for one sequence of exactly `max_tokens` unless a `stop_ids` token
        comes first (no stop strings, no EOS of its own): what a token iterator asks for."""
        return dataclasses.replace(self, max_tokens=max_tokens, stop=None,
                                   stop_token_ids=list(stop_ids), ignore_eos=True, n=1)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 and self.penalty_last_n != 0
                or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def apply_penalties(logits: Tensor, p: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> Tensor:
    """Penalize one row of logits [vocab]. Repetition (HF/CTRL, llama.cpp's repeat penalty): every
    token among the last `penalty_last_n` of prompt + output (all: -1) has its logit divided by r
    if positive, multiplied by r if negative. Frequency and presence (OpenAI): logit -= f *
    count_in_output + p * (count_in_output > 0)."""
    if not p.penalized:
        return logits
    logits = logits.clone()
    if p.repetition_penalty != 1.0 and p.penalty_last_n != 0:
        recent = [*prompt_ids, *output_ids]
        if p.penalty_last_n > 0:
            recent = recent[-p.penalty_last_n:]
        seen = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
        if seen.numel():
            s = logits[seen]
            logits[seen] = torch.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        out = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature, then top-k, top-p and min-p filtering ([..., vocab]; removed = -inf)."""
    logits = logits.float() / max(p.temperature, 1e-5)
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above this one
        drop = before >= p.top_p  # keep the smallest set reaching top_p (at least one token)
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), NEG_INF)
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), NEG_INF)
    return logits


def probs_for(logits: Tensor, p: SamplingParams) -> Tensor:
    """The distribution a non-greedy request samples from (after warping)."""
    return warp(logits, p).softmax(-1)


def sample_row(logits: Tensor, p: SamplingParams, generator: torch.Generator | None = None,
               prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()) -> int:
    """One token id from one row of logits [vocab]."""
    logits = apply_penalties(logits.float(), p, prompt_ids, output_ids)
    if p.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probs_for(logits, p), 1, generator=generator))

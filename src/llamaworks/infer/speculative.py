"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) inside the engine.

A drafter proposes up to `k` tokens for each decoding row; the engine scores the row's last
token plus the drafts in one forward and keeps them while they are what the target would have
produced (`Engine._verify`). Greedy: the output is exactly the target's greedy output. Sampling:
draft x is kept with probability min(1, p(x) / q(x)), at the first rejection a token is drawn
from norm(max(p - q, 0)), so the output follows the target's (warped, penalized) distribution.

Two drafters:
- `NgramDrafter`: prompt lookup decoding (no second model): the tokens that followed the latest
  earlier occurrence of the row's last n tokens (q is a point mass on them). Strong when the
  answer copies from the prompt (code edits, extraction, summaries with quotes).
- `ModelDrafter`: a small model sharing the target's vocabulary, with its own cache rows, run
  through its own `Step` (fused where it can be).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llamaworks.infer.kv import KVPool
from llamaworks.infer.sampling import SamplingParams, apply_penalties, probs_for
from llamaworks.infer.sequence import Sequence as Seq
from llamaworks.infer.step import Step
from llamaworks.model import Llama

Proposals = dict[int, tuple[list[int], list[Tensor] | None]]


def _room(engine: Any, s: Seq, k: int) -> int:
    """Drafts row `s` may take: within its token budget and the context."""
    left = s.params.max_tokens - len(s.ids) - 1
    return max(0, min(k, left, engine.context - len(s.tokens) - 1))


def _eligible(engine: Any, seqs: Sequence[Seq], max_rows: int) -> list[Seq]:
    """Rows worth speculating on: few enough decoding rows (a big batch already amortizes the
    weights, drafts would only add work), no turn hook (forced tokens end a turn mid-draft), no
    grammar (its mask is per position of the sequence)."""
    if len(seqs) > max_rows:
        return []
    return [s for s in seqs if s.on_turn_end is None and s.constraint is None
            and s.params.lazy_grammar is None]


class NgramDrafter:
    """Prompt lookup: match the last `n` tokens (n from `max_n` down to `min_n`) earlier in the
    sequence and propose the `k` tokens that followed."""

    def __init__(self, k: int = 4, max_n: int = 3, min_n: int = 1, max_rows: int = 4):
        self.k, self.max_n, self.min_n, self.max_rows = k, max_n, min_n, max_rows

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        t = len(tokens)
        for n in range(min(self.max_n, t - 1), self.min_n - 1, -1):
            tail = list(tokens[t - n:])
            for i in range(t - n - 1, -1, -1):  # latest earlier occurrence first
                if list(tokens[i:i + n]) == tail:
                    return list(tokens[i + n:i + n + k])
        return []

    def propose(self, engine: Any, seqs: Sequence[Seq]) -> Proposals:
        out: Proposals = {}
        for s in _eligible(engine, seqs, self.max_rows):
            drafts = self.lookup(s.tokens, _room(engine, s, self.k))
            if drafts:
                out[s.id] = (drafts, None)
        return out

    def accepted(self, s: Seq, before: int) -> None:
        pass

    def release(self, s: Seq) -> None:
        pass


class ModelDrafter:
    """Drafts from a smaller model with the target's vocabulary (its own cache pool)."""

    def __init__(self, draft: Llama, k: int = 4, max_rows: int = 4):
        self.draft, self.k, self.max_rows = draft.eval(), k, max_rows
        self.step = Step(draft)
        self.pool: KVPool | None = None
        self.cached: dict[int, int] = {}  # sequence id -> tokens the draft's row holds

    def check(self, target: Llama) -> None:
        if target.config.vocab_size != self.draft.config.vocab_size:
            raise ValueError("the draft must share the target's vocabulary "
                             f"({self.draft.config.vocab_size} != {target.config.vocab_size})")

    def _pool(self, engine: Any) -> KVPool:
        if self.pool is None:
            self.check(engine.model)
            ctx = min(engine.context, self.draft.config.max_seq_len)
            self.pool = KVPool(self.draft, engine.max_batch, ctx)
        return self.pool

    @torch.inference_mode()
    def propose(self, engine: Any, seqs: Sequence[Seq]) -> Proposals:
        seqs = [s for s in _eligible(engine, seqs, self.max_rows) if _room(engine, s, self.k)]
        if not seqs:
            return {}
        pool = self._pool(engine)
        k = min(_room(engine, s, self.k) for s in seqs)
        # catch up on what the draft has not seen (the prompt, accepted tokens), then k - 1
        # one-token steps for all rows at once
        logits = []
        for s in seqs:
            start = self.cached.get(s.id, 0)
            pool.ensure(len(s.tokens) + k + 1)
            (lg,) = self.step.extend(pool, [s.row], [s.tokens[start:]], [start])
            self.cached[s.id] = len(s.tokens)
            logits.append(lg[-1])
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[Tensor]] = [[] for _ in seqs]
        for j in range(k):
            for i, s in enumerate(seqs):
                d, q = self._pick(s, logits[i], drafts[i])
                drafts[i].append(d)
                if q is not None:
                    qs[i].append(q)
            if j == k - 1:
                break
            pool.ensure_rows(max(s.row for s in engine.running) + 1)
            rows = pool.allocated
            tokens, pos = [0] * rows, [0] * rows
            for s in engine.running:  # other rows write their next slot (harmless)
                pos[s.row] = min(self.cached.get(s.id, 0), pool.context - 1)
            for i, s in enumerate(seqs):
                tokens[s.row] = drafts[i][-1]
                pos[s.row] = self.cached[s.id]
                self.cached[s.id] += 1
            pool.ensure(max(pos) + 1)
            out = self.step.decode(pool, torch.tensor(tokens), torch.tensor(pos),
                                   max(s.row for s in seqs) + 1)
            logits = [out[s.row] for s in seqs]
        return {s.id: (drafts[i], qs[i] if not s.params.greedy else None)
                for i, s in enumerate(seqs)}

    def _pick(self, s: Seq, logits: Tensor, drafts: list[int]) -> tuple[int, Tensor | None]:
        p: SamplingParams = s.params
        logits = apply_penalties(logits.float(), p, s.prompt_ids, [*s.ids, *drafts])
        if p.greedy:
            return int(logits.argmax()), None
        q = probs_for(logits, p)
        return int(torch.multinomial(q, 1, generator=s.gen)), q

    def accepted(self, s: Seq, before: int) -> None:
        """After verification: the draft's row stays valid up to what both now agree on."""
        self.cached[s.id] = min(self.cached.get(s.id, 0), len(s.tokens) - 1)

    def release(self, s: Seq) -> None:
        self.cached.pop(s.id, None)


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    proposed: int  # draft tokens proposed
    accepted: int  # draft tokens the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def speculative_generate(target: Llama, draft: Llama | None, prompt_ids: Sequence[int],
                         max_tokens: int, params: SamplingParams | None = None, k: int = 4,
                         stop_ids: Sequence[int] = (), tokenizer: Any = None
                         ) -> SpeculativeResult:
    """Generate up to `max_tokens` tokens from `target` on the engine, drafting `k` at a time
    with `draft` (or by prompt lookup when `draft` is None)."""
    from llamaworks.infer.engine import Engine

    if not prompt_ids:
        raise ValueError("the prompt is empty")
    params = params or SamplingParams()
    drafter = NgramDrafter(k) if draft is None else ModelDrafter(draft, k)
    if draft is not None:
        drafter.check(target)
    engine = Engine(target, tokenizer or _NoText(), max_batch=1, drafter=drafter, cache_mb=0)
    p = params.token_only(max_tokens, stop_ids)
    (seq,) = group = engine.sequences(list(prompt_ids), p)
    engine.run([group])
    return SpeculativeResult(seq.ids, seq.proposed, seq.accepted)


class _NoText:
    """A tokenizer stand-in for token-only generation (no text, no stop ids)."""

    stop_ids: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        raise ValueError("token-only generation cannot encode text")

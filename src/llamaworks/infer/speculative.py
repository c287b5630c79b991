"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a draft model that shares
the target's tokenizer.

Each round the draft proposes `k` tokens one at a time; the target scores all of them in one
forward pass. Greedy: proposals are kept while they equal the target's argmax, then the target's
own token is appended, so the output is exactly the target's greedy output. Sampling: proposal x
is kept with probability min(1, p(x) / q(x)); at the first rejection a token is drawn from
norm(max(p - q, 0)); if all k are kept, one more is drawn from p. The output then follows the
target's (warped) distribution p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llamaworks.infer.sampling import SamplingParams, probs_for
from llamaworks.model import KVCache, Llama


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    proposed: int  # draft tokens proposed
    accepted: int  # draft tokens the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class _Seq:
    """One model's view of the sequence: its cache and how many tokens it holds."""

    def __init__(self, model: Llama, size: int):
        self.model = model
        self.cache = KVCache(model.config, 1, size, model.dtype, model.device)
        self.n = 0

    def feed(self, ids: Sequence[int]) -> Tensor:
        """Append `ids`; logits [len(ids), vocab] for the positions after each of them."""
        device = self.cache.k.device
        x = torch.tensor([list(ids)], device=device)
        pos = torch.arange(self.n, self.n + len(ids), device=device)
        logits = self.model(x, pos, self.cache)[0].float()
        self.n += len(ids)
        return logits


@torch.inference_mode()
def speculative_generate(target: Llama, draft: Llama, prompt_ids: Sequence[int], max_tokens: int,
                         params: SamplingParams | None = None, k: int = 4,
                         stop_ids: Sequence[int] = ()) -> SpeculativeResult:
    """Generate up to `max_tokens` tokens from `target`, drafting `k` at a time with `draft`."""
    params = params or SamplingParams()
    if params.penalized:
        raise ValueError("speculative decoding does not support repetition/frequency/presence "
                         "penalties; use LLM.generate")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError("the draft must share the target's vocabulary "
                         f"({draft.config.vocab_size} != {target.config.vocab_size})")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    ctx = min(target.config.max_seq_len, draft.config.max_seq_len)
    max_tokens = min(max_tokens, ctx - len(prompt_ids) - k - 1)
    size = len(prompt_ids) + max_tokens + k + 1
    tgt, drf = _Seq(target, size), _Seq(draft, size)
    seq = list(prompt_ids)
    stops = set(stop_ids)
    out: list[int] = []
    proposed = accepted = 0

    def pick(probs: Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=gen))

    if len(seq) > 1:
        tgt.feed(seq[:-1])  # the target lags one token: each round it scores seq[-1] + drafts
    while len(out) < max_tokens:
        # Draft k tokens (first catching up on the tokens it has not seen).
        drafts: list[int] = []
        q: list[Tensor] = []
        logits = drf.feed(seq[drf.n:])[-1]
        for j in range(k):
            if params.greedy:
                d = int(logits.argmax())
            else:
                qj = probs_for(logits.cpu(), params)
                q.append(qj)
                d = pick(qj)
            drafts.append(d)
            if j < k - 1:
                logits = drf.feed([d])[-1]
        # The target scores the unseen tail plus the drafts in one pass.
        tail = seq[tgt.n:]
        t_logits = tgt.feed(tail + drafts)[len(tail) - 1:].cpu()  # [k + 1, vocab]
        proposed += k
        new: list[int] = []
        for j, d in enumerate(drafts):
            if params.greedy:
                ok = int(t_logits[j].argmax()) == d
            else:
                pj = probs_for(t_logits[j], params)
                ok = bool(torch.rand((), generator=gen) < pj[d] / q[j][d])
            if not ok:
                if params.greedy:
                    new.append(int(t_logits[j].argmax()))
                else:
                    residual = (pj - q[j]).clamp(min=0)
                    new.append(pick(residual / residual.sum()) if residual.sum() > 0
                               else pick(pj))
                break
            accepted += 1
            new.append(d)
        else:
            last = t_logits[k]
            new.append(int(last.argmax()) if params.greedy else pick(probs_for(last, params)))
        # Roll both caches back to what the sequence now holds (later slots get overwritten).
        n_before = len(seq)
        tgt.n = min(tgt.n, n_before + len(new) - 1)
        drf.n = min(drf.n, n_before + len(new) - 1)
        for t in new:
            out.append(t)
            seq.append(t)
            if t in stops or len(out) >= max_tokens:
                return SpeculativeResult(out, proposed, accepted)
    return SpeculativeResult(out, proposed, accepted)

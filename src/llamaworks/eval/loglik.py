"""Log-likelihoods: the one scorer behind bits-per-byte, multiple choice and the lm-eval adapter.

Everything reduces to *spans*: an input token list and the targets predicted by its last
positions. Spans sharing their unscored prefix (the choices of one multiple-choice item) run the
prefix once, short groups are packed side by side into one row under a block mask, rows are
right-padded into batches (a causal model never attends to tokens after its own position), and
the output projection runs only on the positions that are scored. Batched, packed and one-by-one
scoring give the same numbers (to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamaworks.model import Llama


@dataclass(frozen=True)
class Span:
    """`input_ids` run through the model; `targets` are predicted by its last len(targets)
    positions (target k by position len(input_ids) - len(targets) + k)."""

    input_ids: list[int]
    targets: list[int]


@dataclass(frozen=True)
class SpanScore:
    """Per-target log-probabilities (nats, <= 0) and whether every target was the argmax."""

    logprobs: list[float]
    greedy: bool

    @property
    def total(self) -> float:
        return sum(self.logprobs)


def _check(model: Llama, s: Span) -> None:
    if not s.targets or len(s.targets) > len(s.input_ids):
        raise ValueError(f"a span needs 1..{len(s.input_ids)} targets, got {len(s.targets)}")
    if len(s.input_ids) > model.config.max_seq_len:
        raise ValueError(f"a span has {len(s.input_ids)} tokens; the model's context is "
                         f"{model.config.max_seq_len}")


@dataclass
class _Row:
    """Spans sharing the unscored prefix, packed into one sequence: prefix, then each span's
    scored part (its own positions continue after the prefix; it sees the prefix and itself)."""

    prefix: list[int]
    members: list[int]  # span indices

    def length(self, spans: Sequence[Span]) -> int:
        return len(self.prefix) + sum(len(spans[i].targets) for i in self.members)


def _rows(spans: Sequence[Span], share_prefix: bool) -> list[_Row]:
    rows: dict[tuple[int, ...], _Row] = {}
    out: list[_Row] = []
    for i, s in enumerate(spans):
        prefix = s.input_ids[:len(s.input_ids) - len(s.targets)]
        key = tuple(prefix)
        if share_prefix and key in rows:
            rows[key].members.append(i)
            continue
        row = _Row(prefix, [i])
        out.append(row)
        if share_prefix:
            rows[key] = row
    return out


def _lines(rows: list[_Row], spans: Sequence[Span], pack_tokens: int) -> list[list[_Row]]:
    """First-fit decreasing: rows (longest first) share a line while it stays within
    max(pack_tokens, the longest row) tokens; pack_tokens 0 keeps one row per line."""
    if not rows:
        return []
    cap = max(pack_tokens, rows[0].length(spans))
    lines: list[list[_Row]] = []
    room: list[int] = []
    for row in rows:
        n = row.length(spans)
        for j in range(len(lines) if pack_tokens > 0 else 0):
            if room[j] >= n:
                lines[j].append(row)
                room[j] -= n
                break
        else:
            lines.append([row])
            room.append(cap - n)
    return lines


@torch.inference_mode()
def score_spans(model: Llama, spans: Sequence[Span], batch_size: int = 16,
                share_prefix: bool = True, pack_tokens: int = 128) -> list[SpanScore]:
    """Score every span; results in input order.

    Spans with the same unscored prefix (the choices of one multiple-choice item) form one
    group, so the prefix runs once; short groups are packed side by side into lines of up to
    `pack_tokens` tokens (a block mask keeps them apart, positions restart per group), and
    lines are batched longest first, `batch_size` lines per forward pass. batch_size=1,
    share_prefix=False, pack_tokens=0 is the plain one-span-per-pass reference."""
    for s in spans:
        _check(model, s)
    rows = sorted(_rows(spans, share_prefix), key=lambda r: -r.length(spans))
    lines = sorted(_lines(rows, spans, pack_tokens),
                   key=lambda ln: -sum(r.length(spans) for r in ln))
    out: list[SpanScore | None] = [None] * len(spans)
    device = model.device
    step = max(1, batch_size)
    for b in range(0, len(lines), step):
        batch = lines[b:b + step]
        width = max(sum(r.length(spans) for r in ln) for ln in batch)
        plain = all(len(ln) == 1 and len(ln[0].members) == 1 for ln in batch)
        x = torch.zeros((len(batch), width), dtype=torch.long)  # right padding, never attended
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        # True = attend; padding attends to itself only (a query needs at least one key)
        mask = None if plain else torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)
        r_idx: list[int] = []
        c_idx: list[int] = []
        tgt: list[int] = []
        order: list[int] = []
        for r, line in enumerate(batch):
            at = 0
            for row in line:
                o, p = at, len(row.prefix)
                x[r, o:o + p] = torch.tensor(row.prefix, dtype=torch.long)
                pos[r, o:o + p] = torch.arange(p)
                if mask is not None:
                    mask[r, o:o + p, o:o + p] = torch.ones(p, p, dtype=torch.bool).tril()
                at = o + p
                for i in row.members:
                    suffix = spans[i].input_ids[p:]
                    k = len(suffix)
                    x[r, at:at + k] = torch.tensor(suffix, dtype=torch.long)
                    pos[r, at:at + k] = torch.arange(p, p + k)
                    if mask is not None:  # the group's prefix, then itself causally
                        mask[r, at:at + k, o:o + p] = True
                        mask[r, at:at + k, at:at + k] = torch.ones(k, k, dtype=torch.bool).tril()
                    r_idx += [r] * k
                    c_idx += range(at, at + k)
                    tgt += spans[i].targets
                    order.append(i)
                    at += k
        if mask is None:
            hidden = model(x.to(device), hidden_only=True)
        else:
            hidden = model(x.to(device), input_pos=pos.to(device),
                           attn_mask=mask[:, None].to(device), hidden_only=True)
        logits = model.lm_head(hidden[torch.tensor(r_idx), torch.tensor(c_idx)]).float()
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(tgt, device=device)
        picked = logp.gather(1, target[:, None])[:, 0].tolist()
        hits = (logp.argmax(-1) == target).tolist()
        at = 0
        for i in order:
            k = len(spans[i].targets)
            out[i] = SpanScore(picked[at:at + k], all(hits[at:at + k]))
            at += k
    return out  # type: ignore[return-value]


def continuation_span(context: list[int], continuation: list[int], max_len: int) -> Span:
    """lm-eval's causal request layout: the last max_len + 1 tokens of context + continuation,
    minus the final one, predicting the continuation (the context is cut from the left)."""
    if not continuation:
        raise ValueError("the continuation encodes to no tokens")
    whole = (context + continuation)[-(max_len + 1):]
    return Span(whole[:-1], continuation[-(len(whole) - 1):])


def rolling_spans(ids: Sequence[int], window: int, stride: int | None = None,
                  prefix_id: int | None = None) -> list[Span]:
    """Sliding windows scoring every token of `ids` once, each forward pass at most `window`
    tokens long.

    Without `prefix_id` the first token is context only (as `llamaworks score` does); with it,
    `prefix_id` (BOS/EOS) conditions the first token and all tokens are scored. After the first
    window, each window scores the next `stride` tokens (default `window`) given up to
    `window - stride` earlier tokens of context; stride == window is lm-eval's
    `loglikelihood_rolling` (disjoint windows, one token of overlap)."""
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    seq = ([prefix_id] if prefix_id is not None else []) + list(ids)
    spans: list[Span] = []
    a = 1  # first target index in seq
    b = min(len(seq), 1 + window)
    while a < len(seq):
        start = max(0, b - 1 - window)
        spans.append(Span(seq[start:b - 1], seq[a:b]))
        a, b = b, min(len(seq), b + stride)
    return spans


def rolling_nll(model: Llama, ids: Sequence[int], window: int | None = None,
                stride: int | None = None, prefix_id: int | None = None,
                batch_size: int = 8) -> list[float]:
    """Negative log-likelihood (nats) of each scored token of `ids`, in order (see
    `rolling_spans` for which tokens and with what context)."""
    spans = rolling_spans(ids, window or model.config.max_seq_len, stride, prefix_id)
    return [-lp for s in score_spans(model, spans, batch_size) for lp in s.logprobs]


"""Multiple-choice accuracy with lm-eval's exact semantics.

Each choice's log-likelihood is summed over its continuation tokens, where (lm-eval's
`_encode_pair`) trailing whitespace of the context moves to the continuation, context +
continuation is encoded whole and the continuation tokens are those after the encoded context.
`acc` = argmax of the sums; `acc_norm` = argmax of sum / len(choice) in characters (what lm-eval
computes under that name); `acc_bytes` = argmax of sum / UTF-8 bytes of the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llamaworks.eval.loglik import continuation_span, score_spans
from llamaworks.eval.tasks import MCItem, mc_contexts
from llamaworks.model import Llama


def prefix_token_id(tok: Any) -> int:
    """The token an empty context stands for: BOS, else EOS (as lm-eval's `hf` backend)."""
    return tok.bos_id if tok.bos_id is not None else tok.eos_id


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal backends split them. BOS is
    added only if the model's own flag says so."""
    if not context:
        cont = tok.encode(continuation, bos=False)
        pre = prefix_token_id(tok)
        return ([pre], cont) if cont and cont[0] != pre else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, bos=None)
    ctx = tok.encode(context, bos=None)
    return ctx, whole[len(ctx):]


def loglikelihoods(model: Llama, tok: Any, pairs: list[tuple[str, str]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy?) for each (context, continuation) pair."""
    max_len = model.config.max_seq_len
    spans = [continuation_span(*encode_pair(tok, c, x), max_len) for c, x in pairs]
    return [(s.total, s.greedy) for s in score_spans(model, spans, batch_size)]


@dataclass
class MCResult:
    metrics: dict[str, float]
    loglikelihoods: list[list[float]]  # per item, per choice
    predictions: list[int]


def _stderr(xs: list[float]) -> float:
    """Standard error of the mean with the sample deviation (lm-eval's `mean_stderr`)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like numpy


def evaluate_mc(model: Llama, tok: Any, items: list[MCItem], num_fewshot: int = 0,
                seed: int = 1234, batch_size: int = 16, limit: int | None = None) -> MCResult:
    """acc, acc_norm, acc_bytes (and their standard errors) over the first `limit` items
    (few-shot examples are drawn from all of them)."""
    contexts = mc_contexts(items, num_fewshot, seed)[:limit]
    items = items[:limit]
    pairs = [(ctx, ch) for ctx, it in zip(contexts, items, strict=True) for ch in it.choices]
    flat = [ll for ll, _ in loglikelihoods(model, tok, pairs, batch_size)]
    lls, preds, acc, norm, byt = [], [], [], [], []
    pos = 0
    for it in items:
        ll = flat[pos:pos + len(it.choices)]
        pos += len(it.choices)
        lls.append(ll)
        p = _argmax(ll)
        preds.append(p)
        acc.append(float(p == it.gold))
        norm.append(float(_argmax([v / len(c) for v, c in zip(ll, it.choices,
                                                             strict=True)]) == it.gold))
        byt.append(float(_argmax([v / len(c.encode("utf-8")) for v, c in zip(
            ll, it.choices, strict=True)]) == it.gold))
    metrics = {"n": len(items)}
    for name, xs in (("acc", acc), ("acc_norm", norm), ("acc_bytes", byt)):
        metrics[name] = sum(xs) / max(1, len(xs))
        metrics[f"{name}_stderr"] = _stderr(xs)
    return MCResult(metrics, lls, preds)

"""Bits per byte and perplexity of a text, scored with sliding windows.

Tokens are scored exactly as `llamaworks score` scores them (no BOS unless the model's flag adds
one; the first token is context only), so bpb = sum of `score`'s NLLs / ln 2 / the UTF-8 bytes of
the scored tokens. Texts longer than the window are scored window by window: each window scores
the next `stride` tokens given up to `window - stride` earlier tokens (`loglik.rolling_spans`).
"""

from __future__ import annotations

import math
from typing import Any

from llamaworks.eval.loglik import rolling_nll
from llamaworks.model import Llama


def text_bpb(model: Llama, tok: Any, text: str, window: int | None = None,
             stride: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """{"tokens", "scored", "bytes", "nll", "bpb", "perplexity"} of `text`: bits per byte over
    the bytes of the scored tokens, token perplexity over the same tokens."""
    from llamaworks.train.metrics import nats_to_bpb, token_byte_lengths

    ids = tok.encode(text, bos=None)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, the text has {len(ids)}")
    window = window or model.config.max_seq_len
    if window > model.config.max_seq_len:
        raise ValueError(f"--window {window} exceeds the model's context "
                         f"({model.config.max_seq_len})")
    nll = rolling_nll(model, ids, window, stride, batch_size=batch_size)
    byte_len = token_byte_lengths(tok)
    n_bytes = int(sum(int(byte_len[i]) for i in ids[1:]))
    total = float(sum(nll))
    return {"tokens": len(ids), "scored": len(nll), "bytes": n_bytes, "nll": total,
            "bpb": nats_to_bpb(total, n_bytes), "perplexity": math.exp(total / len(nll))}

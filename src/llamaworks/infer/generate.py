"""Token-by-token generation with the KV cache: prefill the prompt once, then one token a step.

The small reference loop the CLI uses; the batched engine of the inference stage builds on the same
model calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llamaworks.infer.sampling import SamplingParams, sample
from llamaworks.model import Llama


@torch.inference_mode()
def generate_tokens(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int,
                    params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                    ) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens`, a stop id (yielded last), or the context end."""
    params = params or SamplingParams()
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
    ctx = model.config.max_seq_len
    n = len(prompt_ids)
    if n >= ctx:
        raise ValueError(f"the prompt has {n} tokens; the model's context is {ctx}")
    max_new_tokens = min(max_new_tokens, ctx - n)
    if max_new_tokens <= 0:
        return
    device = model.lm_head.weight.device
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache(1, n + max_new_tokens)
    tokens = torch.tensor([list(prompt_ids)], device=device)
    logits = model(tokens, torch.arange(n, device=device), cache)[:, -1]
    stops = set(stop_ids)
    pos = n
    for i in range(max_new_tokens):
        nxt = sample(logits, params, gen)
        tok = int(nxt[0])
        yield tok
        if tok in stops or i == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], torch.tensor([pos], device=device), cache)[:, -1]
        pos += 1

"""Single-sequence generation as a token iterator (the CLI's loop), on the batch engine's
prefill/decode steps, so quantized and compiled models work here too."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llamaworks.infer.batch import DecodeStep, decode_batch
from llamaworks.infer.sampling import SamplingParams, sample, sample_row
from llamaworks.model import Llama


@torch.inference_mode()
def generate_tokens(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int,
                    params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                    step: DecodeStep | None = None) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens`, a stop id (yielded last), or the context end.

    `step`: a (possibly compiled) `DecodeStep` to reuse across calls; default an eager one."""
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
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    steps = decode_batch(model, [list(prompt_ids)], max_new_tokens, step or DecodeStep(model))
    logits = next(steps)
    stops = set(stop_ids)
    out: list[int] = []
    for i in range(max_new_tokens):
        if params.penalized:  # penalties look at the prompt and what came out so far
            nxt = torch.tensor([sample_row(logits[0].float().cpu(), params, gen, prompt_ids, out)])
        else:
            nxt = sample(logits.float().cpu(), params, gen)
        tok = int(nxt[0])
        out.append(tok)
        yield tok
        if tok in stops or i == max_new_tokens - 1:
            break
        logits = steps.send(nxt)
    steps.close()

"""Single-sequence generation as a token iterator (the CLI's loop), on the engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llamaworks.infer.engine import Engine
from llamaworks.infer.sampling import SamplingParams


def generate_tokens(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int,
                    params: SamplingParams | None = None, stop_ids: Sequence[int] = ()
                    ) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens`, a stop id (yielded last), or the context end.
    Stopping the iteration early frees the sequence's row."""
    params = params or SamplingParams()
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
    n, ctx = len(prompt_ids), engine.context
    if n >= ctx:
        raise ValueError(f"the prompt has {n} tokens; the model's context is {ctx}")
    max_new_tokens = min(max_new_tokens, ctx - n)
    if max_new_tokens <= 0:
        return
    p = params.token_only(max_new_tokens, stop_ids)
    (seq,) = group = engine.sequences(list(prompt_ids), p)
    engine.add(group)
    sent = 0
    try:
        while sent < len(seq.ids) or not seq.finish:
            if sent == len(seq.ids):
                engine.step()
            while sent < len(seq.ids):
                sent += 1
                yield seq.ids[sent - 1]
    finally:
        engine.abort(group)

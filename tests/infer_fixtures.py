"""Tiny random models and a byte-level tokenizer for the inference tests (no checkpoint needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from llamaworks.config import get_preset
from llamaworks.model import Llama


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 3); 0 pad, 1 BOS, 2 EOS."""

    bos_id, eos_id, stop_ids, vocab_size = 1, 2, [2], 259

    def encode(self, text: str, bos: bool | None = False, **_: Any) -> list[int]:
        return ([1] if bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        data = bytes(i - 3 for i in ids if i >= 3)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def tiny_model(seed: int = 0, std: float = 0.3, **overrides: Any) -> Llama:
    """A 2-layer GQA model over the byte vocabulary with sharp (large-std) random weights."""
    cfg = get_preset("tiny", **{"vocab_size": 259, "eos_token_id": 2, **overrides})
    m = Llama(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return m.eval()


ROW_PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33]]


def decode_logits(model: Llama, fused: bool, steps: int = 6,
                  prompts: Sequence[Sequence[int]] = ROW_PROMPTS) -> torch.Tensor:
    """Logits [steps, B, vocab] of engine decode steps after each prompt was fed to its own cache
    row (so the rows sit at different positions), feeding back [3 + i, 40 + i, 70 + i] at step i:
    through the fused C++ step (which must build for the model) or, with fused=False, the per-op
    forward."""
    from llamaworks.infer.kv import KVPool
    from llamaworks.infer.step import Step

    step = Step(model)
    if fused:
        assert step.fused is not None, "the fused decode step did not build for this model"
    else:
        step.fused = None
    pool = KVPool(model, len(prompts), model.config.max_seq_len)
    for r, p in enumerate(prompts):
        step.extend(pool, [r], [list(p)], [0])
    pos = torch.tensor([len(p) for p in prompts])
    out = []
    for i in range(steps):
        pool.ensure(int(pos.max()) + 1)
        out.append(step.decode(pool, torch.tensor([3 + i, 40 + i, 70 + i]), pos))
        pos = pos + 1
    return torch.stack(out)


def record_prompts(monkeypatch: Any) -> list[list[int]]:
    """Record every prompt (token ids) that reaches `infer.generate.generate_tokens`, which
    still runs: what a chat or voice turn really sent the model."""
    import llamaworks.infer.generate as gen

    prompts: list[list[int]] = []
    real = gen.generate_tokens

    def recording(engine: Any, prompt_ids: Sequence[int], *a: Any, **kw: Any) -> Any:
        prompts.append(list(prompt_ids))
        return real(engine, prompt_ids, *a, **kw)

    monkeypatch.setattr(gen, "generate_tokens", recording)
    return prompts

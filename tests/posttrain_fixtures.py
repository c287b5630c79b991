"""A tiny ChatML model for the post-training tests, no checkpoint needed: a byte-level BPE trained
on suite text (a real `tokenizers` vocabulary with `<|im_start|>`/`<|im_end|>`, so the
llguidance call grammar compiles for it and `save_native` can store it) and a tiny Llama over
it, random or trained for a few steps to open tool calls."""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from llamaworks.config import get_preset
from llamaworks.model import Llama


@functools.cache
def suite_tokenizer() -> Any:
    """A ~1100-token byte-level BPE over suite conversations and the suite's tool schemas, with
    the ChatML template (`train_bpe`'s): tool calls render Hermes-style."""
    from llamaworks.posttrain import tasks as T
    from llamaworks.tokenizer.train import train_bpe

    ps = T.suite(24, "train", kinds=["arithmetic"], seed=0)
    texts = [json.dumps(T.think_conversation(p)) for p in ps] + [json.dumps(T.suite_schemas())] * 4
    return train_bpe(texts * 3, 2000)


def tiny_chat_model(tok: Any, seed: int = 0, std: float = 0.02, max_seq_len: int = 2048) -> Llama:
    """A 2-layer random model over `tok`'s vocabulary, with room for the suite's prompts."""
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                     max_seq_len=max_seq_len)
    m = Llama(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def train_to_open_calls(model: Llama, tok: Any, steps: int = 60, lr: float = 1e-2,
                        n: int = 4) -> Llama:
    """Train `model` for `steps` on n suite prompts followed by their first canonical call and
    `<|im_end|>`: it learns to open a call, but writes the call's JSON only roughly (sampled at
    temperature 1, many of its calls are broken)."""
    from llamaworks.chat.formats import hermes_call_text
    from llamaworks.posttrain import tasks as T
    from llamaworks.posttrain.evaluate import prompt_ids

    torch.manual_seed(0)
    end = tok.backend.token_to_id("<|im_end|>")
    seqs = []
    for p in T.suite(n, "train", kinds=["arithmetic"], seed=0):
        c = p.calls[0]
        seqs.append((prompt_ids(tok, p, True),
                     tok.encode(hermes_call_text(c.tool, c.arguments), bos=False) + [end]))
    length = max(len(a) + len(b) for a, b in seqs)
    x = torch.zeros(len(seqs), length, dtype=torch.long)
    y = torch.full((len(seqs), length), -100)
    for i, (a, b) in enumerate(seqs):
        x[i, :len(a) + len(b)] = torch.tensor(a + b)
        y[i, len(a) - 1:len(a) + len(b) - 1] = torch.tensor(b)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class TemplateBytes:
    """A chat template (`chat_template`, set by subclasses) over a byte encoding: what rendering
    a conversation and encoding it need, without loading a real tokenizer."""

    chat_template: str = ""

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None,
                            chat_template=None, **kwargs):
        from llamaworks.tokenizer.chat import render_chat

        return render_chat(chat_template or self.chat_template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt, **kwargs)

    def encode(self, text, bos=False, **_):
        return list(text.encode())

"""Batched tool-using rollouts for GRPO and for scoring the arithmetic task.

All rows share a prompt prefix (system prompt + tool schemas), computed once and copied into
every row of one static KV cache; each row's own prompt is left-padded after it. Rows then decode
in lockstep, each with a small state machine (nanochat's engine idea): when a row ends its turn
(EOS) with a complete tool call, the tool runs and its result, rendered in the chat format up to
the next assistant header, is forced back into the row token by token. Forced tokens are marked
0 in `mask`, so training never learns to predict tool output.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaworks.infer.sampling import SamplingParams, sample_row
from llamaworks.model import KVCache, Llama
from llamaworks.posttrain.prefix import common_prefix_len, prefix_kv

# Given a prompt's index and the assistant text of its turn, return the text to force in (tool
# results + the next assistant header), or None when the turn holds no tool call: the row is done.
ToolStep = Callable[[int, str], str | None]


@dataclass
class Rollout:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = forced
    turns: list[str] = field(default_factory=list)  # assistant text of each turn
    tool_calls: int = 0
    finished: bool = False  # ended its last turn with EOS (not cut by max_new)

    @property
    def final_text(self) -> str:
        return self.turns[-1] if self.turns else ""


@torch.inference_mode()
def rollout(model: Llama, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
            max_new: int = 96, temperature: float = 0.0, seed: int | None = None,
            tool_step: ToolStep | None = None, max_tool_calls: int = 2,
            eos_ids: Sequence[int] | None = None) -> list[Rollout]:
    """Generate one rollout per prompt (use repeated prompts for groups)."""
    device = model.lm_head.weight.device
    eos = set(eos_ids if eos_ids is not None else tokenizer.stop_ids or [])
    eos |= set(model.config.eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = [Rollout(list(prompts[i])) for i in order]
    p = common_prefix_len([r.prompt_ids for r in rows])
    b, longest = len(rows), len(rows[0].prompt_ids)
    size = min(longest + max_new, model.config.max_seq_len)
    max_new = size - longest
    if max_new < 1:
        raise ValueError(f"a prompt has {longest} tokens; the context is {size}")
    cache = KVCache(model.config, b, size, model.lm_head.weight.dtype, device)
    for layer, (k, v) in enumerate(prefix_kv(model, rows[0].prompt_ids[:p])):
        cache.k[layer, :, :, :p] = k
        cache.v[layer, :, :, :p] = v
    # Each row's own prompt tokens, left-padded to the longest, start at slot p.
    tail = longest - p
    pad = torch.tensor([longest - len(r.prompt_ids) for r in rows], device=device)
    tokens = torch.tensor([[0] * int(pad[i]) + r.prompt_ids[p:] for i, r in enumerate(rows)],
                          device=device)
    slots = torch.arange(size, device=device)
    q = p + torch.arange(tail, device=device)
    key_ok = (slots[None, :] < p) | (slots[None, :] >= p + pad[:, None])  # [B, S]
    mask = (key_ok[:, None, :] & (slots[None, None, :] <= q[None, :, None])) | (
        slots[None, None, :] == q[None, :, None])
    positions = q[None, :] - pad[:, None]
    logits = model(tokens, positions, cache, mask[:, None], size, last_only=True)[:, -1]

    params = SamplingParams(temperature=temperature, max_tokens=max_new)
    gens = [None] * b
    if temperature > 0:
        base = seed if seed is not None else int(torch.randint(2**31, ()))
        gens = [torch.Generator().manual_seed(base + i) for i in order]
    forced: list[deque[int]] = [deque() for _ in rows]
    turn_start = [0] * b
    done = [False] * b
    for i in range(max_new):
        nxt = []
        for r, row in enumerate(rows):
            if done[r]:
                nxt.append(0)
                continue
            if forced[r]:
                tok, sampled = forced[r].popleft(), 0
            else:
                tok, sampled = sample_row(logits[r], params, gens[r], row.prompt_ids, row.ids), 1
            row.ids.append(tok)
            row.mask.append(sampled)
            if sampled and tok in eos:
                text = tokenizer.decode(row.ids[turn_start[r]:], skip_special_tokens=True)
                row.turns.append(text)
                extra = tool_step(order[r], text) \
                    if tool_step and row.tool_calls < max_tool_calls else None
                if extra is None:
                    row.finished = done[r] = True
                else:
                    row.tool_calls += 1
                    forced[r].extend(tokenizer.encode(extra, bos=False))
                    turn_start[r] = len(row.ids) + len(forced[r])
            nxt.append(tok)
        if all(done) or i == max_new - 1:
            break
        slot = longest + i
        positions = (slot - pad)[:, None]
        step_mask = (key_ok & (slots[None, :] <= slot))[:, None, None, :]
        logits = model(torch.tensor(nxt, device=device)[:, None], positions, cache, step_mask,
                       size)[:, -1]
    for r, row in enumerate(rows):  # cut by max_new: keep the partial turn's text
        if not done[r] and len(row.turns) <= row.tool_calls:
            row.turns.append(tokenizer.decode(row.ids[turn_start[r]:], skip_special_tokens=True))
    out: list[Rollout | None] = [None] * b
    for r, i in enumerate(order):
        out[i] = rows[r]
    return out  # type: ignore[return-value]


def conversation_step(tokenizer: Any, messages: list[dict], tools: list[dict],
                      run_tool: Callable[[str, dict], str], fmt: str = "chatml"
                      ) -> Callable[[str], str | None]:
    """The tool step of one conversation: parse the turn's tool calls, run them, and return the
    rendered tool results up to the next assistant header (in the model's chat format)."""
    from llamaworks.tools.formats import render
    from llamaworks.tools.parse import parse_tool_calls

    history = list(messages)

    def step(text: str) -> str | None:
        parsed = parse_tool_calls(text, fmt)
        if not parsed.calls:
            return None
        calls = [c.to_openai() for c in parsed.calls]
        history.append({"role": "assistant", "content": parsed.content, "tool_calls": calls})
        before = render(tokenizer, history, tools)
        for c in parsed.calls:
            history.append({"role": "tool", "tool_call_id": c.id, "name": c.name,
                            "content": run_tool(c.name, c.arguments)})
        after = render(tokenizer, history, tools, add_generation_prompt=True)
        # The model's own turn ended at its EOS token; everything the template adds after that
        # marker (a newline, the tool turn, the next assistant header) is forced in.
        end = before.rstrip()
        if not after.startswith(end):
            raise ValueError("the chat template rewrites earlier turns; cannot continue a rollout")
        return after[len(end):]

    return step


def per_prompt(steps: Sequence[Callable[[str], str | None]]) -> ToolStep:
    """One ToolStep dispatching to each prompt's own conversation step."""
    return lambda i, text: steps[i](text)


def calculator_runner(name: str, arguments: dict) -> str:
    """Run a tool of the arithmetic task (just the calculator); errors come back as text."""
    from llamaworks.tools.registry import default_registry

    return default_registry(["calculator"]).call(name, arguments)

"""Rollouts over a shared prompt prefix decode exactly like the inference engine, and tokens forced
in after a tool call are attended to as if they had been part of the prompt."""

from __future__ import annotations

import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.posttrain.rollout import rollout

SYSTEM = "<system>You are a calculator.\n"


def _prompts(tok: ByteTokenizer) -> list[list[int]]:
    return [tok.encode(SYSTEM + q) for q in ("<user>2+2\n", "<user>what is 17*23?\n", "<u>x\n")]


def test_greedy_rollouts_equal_the_engine_one_prompt_at_a_time():
    model, tok = tiny_model(), ByteTokenizer()
    llm = LLM(model, tok)
    prompts = _prompts(tok)
    outs = rollout(model, tok, prompts, max_new=24)
    for p, r in zip(prompts, outs, strict=True):
        want = llm.generate([p], SamplingParams(max_tokens=24))[0].token_ids
        assert r.ids == want
        assert all(m == 1 for m in r.mask)


def test_forced_tool_tokens_continue_like_a_prompt_that_contained_them():
    model, tok = tiny_model(), ByteTokenizer()
    llm = LLM(model, tok)
    prompts = _prompts(tok)
    first = llm.generate(prompts, SamplingParams(max_tokens=6))
    # Pretend the 4th generated token of each row ends its turn, then force a tool result in.
    ends = [f.token_ids[3] for f in first]
    seen: list[tuple[int, str]] = []

    def tool_step(i: int, text: str) -> str | None:
        seen.append((i, text))
        return "=42\n" if len([s for s in seen if s[0] == i]) == 1 else None

    outs = []
    for p, end in zip(prompts, ends, strict=True):  # one eos id per row: run rows separately
        seen.clear()
        outs.append(rollout(model, tok, [p], max_new=20, eos_ids=[end], tool_step=tool_step,
                            max_tool_calls=1)[0])
    for p, r, f in zip(prompts, outs, first, strict=True):
        k = r.ids.index(f.token_ids[3]) + 1
        forced = tok.encode("=42\n")
        assert r.ids[:k] == f.token_ids[:k] and r.mask[:k] == [1] * k
        assert r.ids[k:k + len(forced)] == forced and r.mask[k:k + len(forced)] == [0] * 4
        assert r.tool_calls == 1
        rest = r.ids[k + len(forced):]
        want = llm.generate([p + r.ids[:k + len(forced)]],
                            SamplingParams(max_tokens=len(rest), ignore_eos=True))[0].token_ids
        assert rest == want[:len(rest)] and rest


def test_sampled_rollouts_are_reproducible_with_a_seed():
    model, tok = tiny_model(), ByteTokenizer()
    prompts = _prompts(tok) * 2
    a = rollout(model, tok, prompts, max_new=12, temperature=1.0, seed=7)
    b = rollout(model, tok, prompts, max_new=12, temperature=1.0, seed=7)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert len({tuple(r.ids) for r in a}) > 1
    assert torch.is_inference_mode_enabled() is False

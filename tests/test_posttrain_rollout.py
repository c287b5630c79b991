"""Rollouts over a shared prompt prefix decode exactly like the inference engine, and tokens forced
in after a tool call are attended to as if they had been part of the prompt; the tool step of a
conversation follows the agent loop's rule for broken calls (none of the turn's calls runs, the
parse errors come back as the tool result, counted)."""

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


# -- the tool step of one conversation: the agent loop's rule for broken calls ------------------
GOOD = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "calculator", "arguments": {"expression": 17*23}}\n</tool_call>'
UNCLOSED = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}'


def _step():
    from posttrain_fixtures import suite_tokenizer

    from llamaworks.posttrain.rollout import ConversationStep
    from llamaworks.posttrain.tasks import suite_schemas
    from llamaworks.tools.registry import default_registry

    ran: list[tuple[str, dict]] = []
    calc = default_registry("calculator")

    def run(name: str, arguments: dict) -> str:
        ran.append((name, arguments))
        return calc.call(name, arguments)

    return ConversationStep(suite_tokenizer(), [{"role": "user", "content": "17*23?"}],
                            suite_schemas(), run), ran


def test_a_turn_with_any_broken_call_runs_none_and_the_error_is_the_tool_result():
    step, ran = _step()
    forced = step("Let me compute. " + GOOD + "\n" + BAD)
    assert ran == [] and (step.calls, step.malformed) == (0, 1)
    assert "your tool call could not be parsed" in forced and "not valid JSON" in forced
    assert "No call of this turn was run" in forced
    assert forced.startswith("\n<|im_start|>user") and forced.endswith("<|im_start|>assistant\n")
    assert step.history[-2] == {"role": "assistant", "content": "Let me compute. " + GOOD +
                                "\n" + BAD}  # the turn as the model wrote it
    assert "<tool_response>" in forced  # shown as the tool's answer, as the agent loop does
    # the model writes the call again: it runs, and its result is forced in
    forced = step(GOOD)
    assert ran == [("calculator", {"expression": "17*23"})] and step.calls == 1
    assert "391" in forced and step.malformed == 1
    assert step("The answer is 391.") is None  # no call: the row is done


def test_an_unclosed_call_is_not_run_even_with_complete_json():
    step, ran = _step()
    forced = step(UNCLOSED)
    assert ran == [] and step.malformed == 1 and "not closed" in forced


def test_parsed_calls_to_unknown_tools_or_with_bad_arguments_run_and_count_invalid():
    step, ran = _step()
    step('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>\n' +
         '<tool_call>\n{"name": "calculator", "arguments": {"expr": "1"}}\n</tool_call>')
    assert [n for n, _ in ran] == ["search", "calculator"]  # the runner answers with its error
    assert (step.calls, step.invalid, step.malformed) == (2, 2, 0)
    assert all(m["content"].startswith("error") for m in step.history[-2:])

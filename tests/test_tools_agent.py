"""The agent loop: generate -> parse calls -> run tools -> append results -> continue, up to a step
limit. Driven through the model-agnostic `complete(messages, tools)` interface, and on the real
SmolLM2 (slow) where the model itself writes the tool's argument and reads the tool's result."""

from __future__ import annotations

import json

import pytest

from llamaworks.chat.formats import hermes_call_text, render
from llamaworks.tools.agent import run_agent
from llamaworks.tools.registry import default_registry


def _scripted(replies: list[str], seen: list[list[dict]]):
    def complete(messages: list[dict], tools: list[dict]) -> str:
        seen.append([dict(m) for m in messages])
        assert [t["function"]["name"] for t in tools] == ["calculator"]
        return replies[len(seen) - 1]
    return complete


def test_tool_call_result_is_fed_back_and_answer_returned():
    seen: list[list[dict]] = []
    replies = ["Let me compute.\n" + hermes_call_text("calculator", {"expression": "17*23"}),
               "17*23 = 391."]
    events: list[dict] = []
    res = run_agent(_scripted(replies, seen), [{"role": "user", "content": "17*23?"}],
                    default_registry("calculator"), on_event=events.append)
    assert res.answer == "17*23 = 391." and res.finish_reason == "stop"
    assert res.steps == [{"tool": "calculator", "arguments": {"expression": "17*23"},
                          "result": "391"}]
    call = res.messages[1]["tool_calls"][0]
    assert res.messages[1]["content"] == "Let me compute."
    assert json.loads(call["function"]["arguments"]) == {"expression": "17*23"}
    assert res.messages[2] == {"role": "tool", "tool_call_id": call["id"], "name": "calculator",
                               "content": "391"}
    assert seen[1] == res.messages[:3]  # the second turn saw the tool result
    assert [e["type"] for e in events] == ["assistant", "tool", "assistant", "final"]


def test_loop_stops_at_the_step_limit():
    seen: list[list[dict]] = []
    call = hermes_call_text("calculator", {"expression": "1+1"})
    res = run_agent(_scripted([call] * 10, seen), [{"role": "user", "content": "loop"}],
                    default_registry("calculator"), max_steps=3)
    assert res.finish_reason == "max_steps"
    assert len(seen) == 3 and len(res.steps) == 3
    assert all(s["result"] == "2" for s in res.steps)


def test_unparseable_call_is_reported_back_to_the_model():
    seen: list[list[dict]] = []
    replies = ['<tool_call>{"name": "calculator", "arguments": {expression}}</tool_call>',
               "Sorry."]
    res = run_agent(_scripted(replies, seen), [{"role": "user", "content": "1+1?"}],
                    default_registry("calculator"))
    assert res.answer == "Sorry." and res.steps[0]["tool"] is None
    assert seen[1][-1]["role"] == "tool"
    assert seen[1][-1]["content"].startswith("error: your tool call could not be parsed")


def test_multiple_calls_in_one_turn_all_run_in_order():
    seen: list[list[dict]] = []
    two = "\n".join(hermes_call_text("calculator", {"expression": e}) for e in ("2*3", "2**8"))
    res = run_agent(_scripted([two, "6 and 256"], seen), [{"role": "user", "content": "?"}],
                    default_registry("calculator"))
    assert [s["result"] for s in res.steps] == ["6", "256"]
    assert [m["role"] for m in res.messages] == ["user", "assistant", "tool", "tool",
                                                 "assistant"]


@pytest.mark.slow
def test_real_smollm2_tool_round_trip_and_step_limit(smollm, smollm_tokenizer):
    """SmolLM2 writes the calculator's argument itself (the call's JSON frame is forced, the
    expression is the model's), the real calculator runs, and the model is always made to call
    again, so the loop ends at its step limit. Then the LLM path answers from the tool result."""
    from llamaworks import LLM, SamplingParams

    llm = LLM(smollm, tokenizer=smollm_tokenizer)
    prefix = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "'
    written: list[str] = []

    def forced(messages: list[dict], tools: list[dict]) -> str:
        prompt = render(smollm_tokenizer, messages, tools, add_generation_prompt=True) + prefix
        ids = smollm_tokenizer.encode(prompt, bos=False)
        out = llm.generate(ids, SamplingParams(max_tokens=12, stop=['"', "}"]))[0].outputs[0]
        written.append(out.text)
        return prefix + out.text + '"}}\n</tool_call>'

    question = [{"role": "user", "content": "What is 17*23?"}]
    res = run_agent(forced, question, default_registry("calculator"), max_steps=2)
    assert res.finish_reason == "max_steps" and len(res.steps) == 2
    first = res.steps[0]
    assert first["arguments"] == {"expression": written[0]}
    assert "17" in written[0] and "23" in written[0]
    from llamaworks.tools.calculator import calculator

    assert first["result"] == calculator(written[0])

    after_tool = res.messages[:3]
    answer = run_agent(llm, after_tool, default_registry("calculator"), max_steps=1,
                       params=SamplingParams(max_tokens=12))
    assert answer.finish_reason in ("stop", "max_steps")
    assert answer.messages[:3] == after_tool and len(answer.messages) >= 4

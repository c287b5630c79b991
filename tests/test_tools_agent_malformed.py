"""The agent loop and broken tool calls: a call that does not parse is shown to the model as an
error in a tool message and counted, the turn stays exactly as the model wrote it, and nothing
of it runs (nothing is repaired silently); calls that parse but name no tool or break the
tool's schema are answered by the registry's error and counted as invalid. With an LLM,
`grammar=True` builds the lazy tool-call grammar of the registry's tools and passes it to its
sampling."""

from __future__ import annotations

import pytest
from posttrain_fixtures import TemplateBytes

from llamaworks.chat.formats import hermes_call_text
from llamaworks.tools.agent import registry_functions, run_agent
from llamaworks.tools.registry import default_registry

BAD_JSON = '<tool_call>\n{"name": "calculator", "arguments": {"expression": 17*23}}\n</tool_call>'
GOOD = hermes_call_text("calculator", {"expression": "17*23"})
UNCLOSED = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}'


def _scripted(replies: list[str], seen: list[list[dict]]):
    def complete(messages: list[dict], tools: list[dict]) -> str:
        seen.append([dict(m) for m in messages])
        return replies[len(seen) - 1]
    return complete


def _run(replies: list[str], **kw):
    seen: list[list[dict]] = []
    events: list[dict] = []
    res = run_agent(_scripted(replies, seen), [{"role": "user", "content": "17*23?"}],
                    default_registry("calculator"), on_event=events.append, **kw)
    return res, seen, events


def test_broken_json_is_shown_to_the_model_as_a_tool_error_and_counted():
    res, seen, events = _run([BAD_JSON, GOOD, "The answer is 391."])
    assert res.malformed_calls == 1 and res.invalid_calls == 0
    assert res.answer == "The answer is 391." and res.finish_reason == "stop"
    broken_turn, error = seen[1][1], seen[1][2]
    assert broken_turn == {"role": "assistant", "content": BAD_JSON}  # verbatim, not rewritten
    assert error["role"] == "tool" and error["content"].startswith(
        "error: your tool call could not be parsed") and "not valid JSON" in error["content"]
    assert [s["tool"] for s in res.steps] == [None, "calculator"]
    assert res.tool_calls == 1 and res.call_validity == 0.5
    final = events[-1]
    assert final == {"type": "final", "answer": "The answer is 391.", "finish_reason": "stop",
                     "tool_calls": 1, "malformed_calls": 1, "invalid_calls": 0}


def test_an_unclosed_call_is_not_run_even_when_its_json_is_complete():
    """The parser can read the call, but the model did not close it: the loop does not close it
    for the model, run it, or rewrite the turn into a well-formed one."""
    res, seen, _ = _run([UNCLOSED, "Sorry."])
    assert res.malformed_calls == 1 and res.tool_calls == 0
    assert seen[1][1] == {"role": "assistant", "content": UNCLOSED}
    assert "not closed" in seen[1][2]["content"] and "No call of this turn was run" in \
        seen[1][2]["content"]
    assert all(s["tool"] is None for s in res.steps)


def test_a_turn_with_one_good_and_one_broken_call_runs_neither():
    both = GOOD + "\n" + BAD_JSON
    res, seen, _ = _run([both, GOOD, "391"])
    assert res.malformed_calls == 1
    assert seen[1][1] == {"role": "assistant", "content": both}  # the good call is not kept
    assert [s["tool"] for s in res.steps] == [None, "calculator"]  # it ran only when rewritten
    assert res.steps[1]["result"] == "391"


def test_every_broken_call_of_a_turn_is_counted():
    res, _, _ = _run([BAD_JSON + "\n" + BAD_JSON + "\n<tool_call>\n{}\n</tool_call>", "?"])
    assert res.malformed_calls == 3 and res.call_validity == 0.0


def test_unknown_tools_and_bad_arguments_are_counted_invalid_and_answered_by_the_registry():
    unknown = hermes_call_text("weather", {"city": "Oslo"})
    bad_args = hermes_call_text("calculator", {"expr": "1+1"})
    res, seen, _ = _run([unknown, bad_args, GOOD, "391"])
    assert res.invalid_calls == 2 and res.malformed_calls == 0 and res.tool_calls == 3
    assert res.steps[0]["result"].startswith("error: unknown tool 'weather'")
    assert res.steps[1]["result"].startswith("error: invalid arguments for calculator")
    assert seen[1][2]["content"] == res.steps[0]["result"]  # shown to the model


def test_well_formed_calls_count_nothing():
    res, _, events = _run([GOOD, "391"])
    assert (res.malformed_calls, res.invalid_calls, res.tool_calls) == (0, 0, 1)
    assert res.call_validity == 1.0 and events[-1]["malformed_calls"] == 0


def test_grammar_needs_an_llm():
    with pytest.raises(ValueError, match="grammar=True constrains an LLM"):
        _run(["391"], grammar=True)


class _ChatMLBytes(TemplateBytes):
    """A ChatML template over a byte encoding: what the agent's render + encode need."""

    chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                     "assistant\n{% endif %}")


class _FakeLLM:
    """Enough of an LLM for the agent's LLM path: records the sampling params of each turn."""

    def __init__(self, replies: list[str], tokenizer=None):
        from types import SimpleNamespace

        self.tokenizer = tokenizer or _ChatMLBytes()
        self.model = SimpleNamespace(config=SimpleNamespace(max_seq_len=8192))
        self.replies, self.params = list(replies), []

    def stream(self, ids, params):
        self.params.append(params)
        yield self.replies.pop(0)


def test_grammar_sets_the_llm_sampling_lazy_grammar_of_the_registry_tools():
    from llamaworks.chat.calls import lazy_call_grammar

    reg = default_registry("calculator")
    grammar = lazy_call_grammar("chatml", registry_functions(reg))
    assert grammar is not None and grammar[0] == "<tool_call>"
    assert "calculator" in grammar[1] and "expression" in grammar[1]  # its tool and schema
    llm = _FakeLLM([GOOD, "The answer is 391."])
    res = run_agent(llm, [{"role": "user", "content": "17*23?"}], reg, grammar=True)
    assert res.answer == "The answer is 391." and res.tool_calls == 1
    assert [p.lazy_grammar for p in llm.params] == [grammar, grammar]
    plain = _FakeLLM(["391"])
    run_agent(plain, [{"role": "user", "content": "?"}], reg)
    assert plain.params[0].lazy_grammar is None


def test_grammar_is_refused_for_a_format_without_a_call_grammar():
    class _GemmaBytes(_ChatMLBytes):
        chat_template = "<start_of_turn>user\n{{ messages[0]['content'] }}<end_of_turn>\n"

    llm = _FakeLLM(["391"], tokenizer=_GemmaBytes())
    with pytest.raises(ValueError, match="'gemma' has no tool-call grammar"):
        run_agent(llm, [{"role": "user", "content": "?"}], default_registry("calculator"),
                  grammar=True)
    assert llm.params == []  # refused before generating

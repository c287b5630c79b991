"""Reasoning output through the server, driven by the official `openai` client on the real
SmolLM2: replies whose `<think>` block is forced by a grammar (vLLM's `guided_grammar`) come back
split into `message.reasoning_content` and the answer, streamed as `delta.reasoning_content`,
counted in `usage.completion_tokens_details.reasoning_tokens`, with tool calls after the block
parsed; `--reasoning-format none` leaves the block in the content."""

from __future__ import annotations

import json
import re

import pytest

from llamaworks import LLM
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
MODEL = "smollm2"
THINK = (r'start: "<think>" /[a-z]{3,8}( [a-z]{2,8}){2,5}/ "</think>" '
         r'/[A-Z][a-z]{2,8}( [a-z]{2,8}){1,4}\./')
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
THEN_CALL = (r'start: "<think>" /[a-z]{3,8}( [a-z]{2,8}){2,5}/ "</think>" "<tool_call>\n'
             r'{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" /[A-Z][a-z]{2,9}/ '
             r'"\"}}\n</tool_call>"')


@pytest.fixture(scope="module")
def clients(smollm, smollm_tokenizer):
    llm = LLM(smollm, smollm_tokenizer)
    engine = ContinuousEngine(llm, max_batch=4, context=1024)
    apps = [create_app(engine, MODEL, reasoning_format=f) for f in ("deepseek", "none")]
    with BackgroundServer(apps[0]) as split_url, BackgroundServer(apps[1]) as raw_url:
        yield [openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=120)
               for u in (split_url, raw_url)]
    engine.shutdown()


def _ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def test_a_think_block_comes_back_as_reasoning_content_and_is_counted(clients):
    r = clients[0].chat.completions.create(
        model=MODEL, messages=_ask("Is the sky blue?"), temperature=0, max_tokens=60,
        extra_body={"guided_grammar": THINK})
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert re.fullmatch(r"[a-z]+( [a-z]+)+", reasoning), reasoning
    assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+)+\.", msg.content), msg.content
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens


def test_streamed_reasoning_and_answer_equal_the_whole_reply(clients):
    kw = {"model": MODEL, "messages": _ask("Is the sky blue?"), "temperature": 0,
          "max_tokens": 60, "extra_body": {"guided_grammar": THINK}}
    whole = clients[0].chat.completions.create(**kw).choices[0].message
    reasoning = content = ""
    for c in clients[0].chat.completions.create(stream=True, **kw):
        if c.choices:
            reasoning += (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            content += c.choices[0].delta.content or ""
    assert "<think>" not in reasoning + content and "</think>" not in reasoning + content
    assert reasoning.strip() == whole.model_extra["reasoning_content"]
    assert content.strip() == whole.content


def test_a_tool_call_after_the_think_block_is_parsed(clients):
    r = clients[0].chat.completions.create(
        model=MODEL, messages=_ask("What is the weather in Paris?"), tools=[WEATHER],
        temperature=0, max_tokens=60, extra_body={"guided_grammar": THEN_CALL})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) \
        == {"city"}
    assert choice.message.model_extra["reasoning_content"]


def test_reasoning_format_none_leaves_the_block_in_the_content(clients):
    r = clients[1].chat.completions.create(
        model=MODEL, messages=_ask("Is the sky blue?"), temperature=0, max_tokens=60,
        extra_body={"guided_grammar": THINK})
    msg = r.choices[0].message
    assert msg.content.startswith("<think>") and "reasoning_content" not in (msg.model_extra
                                                                             or {})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_a_bad_grammar_is_a_400(clients):
    with pytest.raises(openai.BadRequestError) as e:
        clients[0].chat.completions.create(model=MODEL, messages=_ask("x"),
                                           extra_body={"guided_grammar": "start: ("})
    assert e.value.param == "guided_grammar"

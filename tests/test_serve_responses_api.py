"""OpenAI's Responses API (`POST /v1/responses`) driven by the official `openai` client's
`client.responses.create` on the real SmolLM2: text equal to the engine's greedy chat,
instructions, `previous_response_id` continuing a conversation kept in memory, function calls and
their outputs (whole and streamed), structured output through `text.format`, the event sequence
of a stream, and errors."""

from __future__ import annotations

import json

import pytest

from llamaworks import LLM, SamplingParams
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
MODEL = "smollm2"
WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@pytest.fixture(scope="module")
def llm(smollm, smollm_tokenizer) -> LLM:
    return LLM(smollm, smollm_tokenizer)


@pytest.fixture(scope="module")
def client(llm):
    engine = ContinuousEngine(llm, max_batch=4, context=1024)
    with BackgroundServer(create_app(engine, MODEL)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    engine.shutdown()


def test_text_equals_the_engines_greedy_chat(client, llm):
    r = client.responses.create(model=MODEL, input="What is the capital of France?",
                                instructions="Answer in one sentence.", temperature=0,
                                max_output_tokens=20)
    ref = llm.chat([{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=20))[0]
    assert r.object == "response" and r.id.startswith("resp")
    assert r.output_text == ref.text.strip()
    assert r.status == ("incomplete" if ref.finish_reason == "length" else "completed")
    assert r.usage.input_tokens == len(ref.prompt_token_ids)
    assert r.usage.output_tokens == len(ref.token_ids)


def test_previous_response_id_continues_the_conversation(client, llm):
    first = client.responses.create(model=MODEL, input="My name is Ada.", temperature=0,
                                    max_output_tokens=16)
    second = client.responses.create(model=MODEL, input="What is my name?", temperature=0,
                                     max_output_tokens=16, previous_response_id=first.id)
    ref = llm.chat([{"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "What is my name?"}],
                   SamplingParams(max_tokens=16))[0]
    assert second.output_text == ref.text.strip()
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's blocks
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")


def test_a_function_call_and_its_output_round_trip(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                tools=[WEATHER], temperature=0, max_output_tokens=60,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    final = client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=[WEATHER], temperature=0,
        max_output_tokens=24, input=[{"type": "function_call_output", "call_id": call.call_id,
                                      "output": '{"temperature_c": 21, "sky": "sunny"}'}])
    assert final.output_text and not [o for o in final.output if o.type == "function_call"]


def test_a_stream_has_the_responses_event_sequence(client):
    kw = {"model": MODEL, "input": "Name three colours.", "temperature": 0,
          "max_output_tokens": 24}
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == whole.output_text


def test_a_streamed_function_call_arrives_with_its_arguments(client):
    events = list(client.responses.create(
        model=MODEL, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
        temperature=0, max_output_tokens=60, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and set(json.loads(done[0].arguments)) == {"city"}
    final = events[-1].response
    assert [o.type for o in final.output] == ["function_call"]


def test_text_format_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    r = client.responses.create(
        model=MODEL, input="What is the capital of France? Answer in JSON.", temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                         "strict": True}})
    assert json.loads(r.output_text) == {"capital": "Paris"}


def test_bad_input_is_a_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=[{"type": "input_image", "url": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).output


def test_32_clients_mixing_schemas_tools_reasoning_and_three_apis_get_no_errors(llm):
    """One server, 32 concurrent clients: JSON-schema chats, required tool calls, grammar-forced
    reasoning, Responses API, Anthropic Messages API and plain streams: no request fails."""
    import threading

    anthropic = pytest.importorskip("anthropic")
    think = r'start: "<think>" /[a-z]{3,8}( [a-z]{2,8}){1,4}/ "</think>" /[A-Z][a-z]{2,8}\./'
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in
                                                  ("name", "description", "parameters")}}
    engine = ContinuousEngine(llm, max_batch=8, context=1024)
    errors: list[BaseException] = []
    with BackgroundServer(create_app(engine, MODEL, reasoning_format="deepseek")) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        an = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=600)

        def run(i: int) -> None:
            ask = [{"role": "user", "content": f"Question {i}: how many legs has a cat?"}]
            kind = i % 6
            try:
                if kind == 0:
                    r = oa.chat.completions.create(model=MODEL, messages=ask, max_tokens=20,
                                                   response_format={"type": "json_schema",
                                                                    "json_schema": {
                                                                        "name": "n",
                                                                        "schema": schema}})
                    assert r.choices[0].finish_reason in ("stop", "length")
                elif kind == 1:
                    r = oa.chat.completions.create(model=MODEL, messages=ask, max_tokens=40,
                                                   tools=[chat_tool], tool_choice="required")
                    assert r.choices[0].finish_reason in ("tool_calls", "length")  # (sampled)
                elif kind == 2:
                    r = oa.chat.completions.create(model=MODEL, messages=ask, max_tokens=40,
                                                   extra_body={"guided_grammar": think})
                    assert r.choices[0].message.model_extra["reasoning_content"]
                elif kind == 3:
                    r = oa.responses.create(model=MODEL, input=ask[0]["content"],
                                            max_output_tokens=12)
                    assert r.status in ("completed", "incomplete")
                elif kind == 4:
                    r = an.messages.create(model=MODEL, max_tokens=12, messages=ask)
                    assert r.stop_reason in ("end_turn", "max_tokens")
                else:
                    stream = oa.chat.completions.create(model=MODEL, messages=ask,
                                                        max_tokens=12, stream=True)
                    assert [c for c in stream if c.choices]
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    engine.shutdown()
    assert errors == []

"""Anthropic's Messages API (`POST /v1/messages`) driven by the official `anthropic` client on the
real SmolLM2: plain and streamed replies equal the engine's greedy chat, system prompts, stop
sequences, a tool_use / tool_result round trip (whole and streamed), x-api-key auth, and errors in
Anthropic's own shape."""

from __future__ import annotations

import pytest

from llamaworks import LLM, SamplingParams
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

anthropic = pytest.importorskip("anthropic")
pytestmark = pytest.mark.slow
MODEL = "smollm2"
KEY = "sk-test-key"
GREEDY = {"temperature": 0}  # (this client version no longer has sampling arguments)
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def llm(smollm, smollm_tokenizer) -> LLM:
    return LLM(smollm, smollm_tokenizer)


@pytest.fixture(scope="module")
def client(llm):
    engine = ContinuousEngine(llm, max_batch=4, context=1024)
    with BackgroundServer(create_app(engine, MODEL, api_key=KEY)) as url:
        yield anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    engine.shutdown()


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def test_a_reply_equals_the_engines_greedy_chat(client, llm):
    r = client.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY,
                               system="Answer in one sentence.",
                               messages=_user("What is the capital of France?"))
    ref = llm.chat([{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=20))[0]
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == ref.text.strip()
    assert r.stop_reason == ("max_tokens" if ref.finish_reason == "length" else "end_turn")
    assert r.usage.input_tokens == len(ref.prompt_token_ids)
    assert r.usage.output_tokens == len(ref.token_ids)


def test_a_stop_sequence_is_reported(client, llm):
    full = client.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY,
                                  messages=_user("What is the capital of France?"))
    text = full.content[0].text
    word = " is"
    assert word in text
    r = client.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY, stop_sequences=[word],
                               messages=_user("What is the capital of France?"))
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert r.content[0].text == text[:text.index(word)]


def test_the_stream_carries_the_same_reply_as_events(client):
    kw = {"model": MODEL, "max_tokens": 24, "extra_body": GREEDY,
          "messages": _user("Name three colours.")}
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == \
        whole.usage.output_tokens


def test_tool_use_and_tool_result_round_trip(client):
    msgs = _user("What is the weather in Paris?")
    r = client.messages.create(model=MODEL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               messages=msgs)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                           "content": '{"temperature_c": 21, "sky": "sunny"}'}]}]
    final = client.messages.create(model=MODEL, max_tokens=24, extra_body=GREEDY, tools=[WEATHER],
                                   messages=msgs)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"] and final.content[0].text


def test_a_streamed_tool_use_arrives_as_input_json_deltas(client):
    with client.messages.stream(model=MODEL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "any"},
                                messages=_user("Weather in Rome?")) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"}
    assert final.stop_reason == "tool_use"


def test_errors_come_in_anthropics_shape_and_the_key_is_checked(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="other", max_tokens=5, messages=_user("x"))
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "other" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image", "source": {}}]}])
    wrong = anthropic.Anthropic(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=MODEL, max_tokens=5, messages=_user("x"))
    assert e.value.body["error"]["type"] == "authentication_error"
    r = client.messages.create(model=MODEL, max_tokens=2, messages=_user("Hi"))
    assert r.content  # still serving

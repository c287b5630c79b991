"""The OpenAI-compatible server driven by the official `openai` client, on the real SmolLM2:
plain, streamed, n > 1, stop strings, logprobs (checked against transformers), the legacy
completions endpoint, a tools round trip, usage counts, 32 concurrent streaming clients equal to
one-at-a-time greedy decoding, a client disconnect (streaming or not) that frees its row, and
/metrics."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request

import pytest
import torch

from llamaworks import LLM, SamplingParams
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MODEL = "smollm2"
MAX_BATCH = 8
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def llm(smollm, smollm_tokenizer) -> LLM:
    return LLM(smollm, smollm_tokenizer)


@pytest.fixture(scope="module")
def server(llm):
    engine = ContinuousEngine(llm, max_batch=MAX_BATCH, max_queue=64, context=1024)
    app = create_app(engine, MODEL)
    with BackgroundServer(app) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _reference(llm: LLM, messages: list[dict], max_tokens: int):
    return llm.chat(messages, SamplingParams(max_tokens=max_tokens))[0]


def test_plain_chat_equals_llm_greedy_with_exact_usage(client, llm):
    msgs = _ask("What is the capital of France?")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20)
    ref = _reference(llm, msgs, 20)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == MODEL


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client, llm):
    msgs = _ask("Name three colors.")
    stream = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    ref = _reference(llm, msgs, 24)
    assert text == ref.text and finishes[-1] == ref.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_n_choices_are_seeded_and_counted(client):
    kw = dict(model=MODEL, messages=_ask("Tell me a word."), temperature=1.0, max_tokens=8, n=3,
              seed=11)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens <= 3 * 8 and a.usage.completion_tokens >= 3


def test_repetition_penalty_in_a_request_is_applied_as_llm_applies_it(client, llm):
    msgs = _ask("Repeat the word 'ha' twenty times.")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30,
                                       extra_body={"repetition_penalty": 1.5})
    ref = llm.chat(msgs, SamplingParams(max_tokens=30, repetition_penalty=1.5))[0]
    assert r.choices[0].message.content == ref.text
    assert ref.text != _reference(llm, msgs, 30).text  # the penalty changed the answer


def test_stop_string_cuts_the_answer(client, llm):
    msgs = _ask("What is the capital of France?")
    full = _reference(llm, msgs, 20).text  # "The capital of France is Paris."
    stop = " is"
    assert stop in full
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20,
                                       stop=[stop, "zzz"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_match_transformers(client, llm, hf_smollm):
    msgs = _ask("What is 2+2?")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    ref = _reference(llm, msgs, 6)
    ids = ref.prompt_token_ids + ref.token_ids
    with torch.inference_mode():
        lp = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), -1)
    n = len(ref.prompt_token_ids)
    for i, (tok, entry) in enumerate(zip(ref.token_ids, content, strict=False)):
        assert entry.logprob == pytest.approx(float(lp[n - 1 + i, tok]), abs=2e-3)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(float(lp[n - 1 + i].max()), abs=2e-3)  # greedy = top


def test_legacy_completions_with_logprobs_and_echo(client, llm):
    r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  temperature=0, max_tokens=5, logprobs=2, echo=True)
    ref = llm.generate("The capital of France is", SamplingParams(max_tokens=5))[0]
    assert r.choices[0].text == "The capital of France is" + ref.text
    assert r.choices[0].logprobs.tokens == [llm.tokenizer.decode([t]) for t in ref.token_ids]
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    two = client.completions.create(model=MODEL, prompt=["Hello", "One, two,"], temperature=0,
                                    max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_tools_round_trip_model_calls_then_answers(client):
    msgs = _ask("What is the weather in Paris?")
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                       tool_choice=forced, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args == {"city": "Paris"}
    result = {"city": args["city"], "temperature_c": 21, "sky": "sunny"}  # the client's tool
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                           temperature=0, max_tokens=16)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_streamed_forced_tool_call_arrives_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=_ask("Weather in Rome?"), tools=[WEATHER], temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40,
        stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _clients(n: int, run, timeout: float = 600) -> list[BaseException]:
    """Run `run(i)` for i < n in n threads at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            run(i)
        except BaseException as e:  # noqa: BLE001 - collected and returned
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors


def test_32_concurrent_streaming_clients_equal_one_at_a_time(client, llm, server):
    # Short raw prompts keep the test about batching, not prefill (chat is checked above).
    prompts = [f"Fact {i}:" for i in range(32)]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=prompts[i], temperature=0,
                                           max_tokens=8, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    assert _clients(32, run) == []
    one_at_a_time = [llm.generate(p, SamplingParams(max_tokens=8))[0].text for p in prompts]
    assert [got[i] for i in range(32)] == one_at_a_time
    assert server[1].free_slots == MAX_BATCH


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 15},
                  "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


def test_response_format_json_schema_is_enforced_while_sampling(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    msgs = _ask("Describe a fictional programmer.")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, n=3,
                                       seed=11, max_tokens=120, response_format=fmt)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
        assert c.finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0,
                                            max_tokens=120, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    ask = _ask('What is the capital of France? Answer as a JSON object with a "capital" key.')
    obj = client.chat.completions.create(model=MODEL, messages=ask, temperature=0,
                                         max_tokens=60, response_format={"type": "json_object"})
    assert json.loads(obj.choices[0].message.content) == {"capital": "Paris"}


CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                   "required": ["zone"], "additionalProperties": False}}}


def test_required_tool_choice_calls_one_declared_tool_with_schema_valid_arguments(client):
    """Sampling at temperature 1.0, the call is always one of the tools, its arguments valid
    against that tool's own parameters (a grammar over the declared schemas)."""
    jsonschema = pytest.importorskip("jsonschema")
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=_ask("What time is it in Berlin, and is it sunny?"),
            tools=[WEATHER, CLOCK], tool_choice="required", temperature=1.0, seed=seed,
            max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_keyword(client):
    bad = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_ask("x"), response_format=bad)
    assert e.value.param == "response_format" and "uniqueItems" in e.value.message
    r = client.chat.completions.create(model=MODEL, messages=_ask("Hi"), max_tokens=2)
    assert r.choices[0].message.content is not None  # still serving


LONG_SYSTEM = ("You are a helpful assistant for a weather service. Answer in one short "
               "sentence, name the city, and never invent numbers you were not given. ") * 12


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(client, llm):
    """The second request sharing a long system prompt reports the cached prompt tokens, and
    its answer is the one computed from scratch."""
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": LONG_SYSTEM}, *_ask("Hi!")],
        temperature=0, max_tokens=8)
    msgs = [{"role": "system", "content": LONG_SYSTEM}, *_ask("Is it raining in Oslo?")]
    second = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                            max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 200
    assert cached >= first.usage.prompt_tokens - 64 and cached < second.usage.prompt_tokens
    assert second.choices[0].message.content == _reference(llm, msgs, 8).text


def test_32_clients_mixing_streams_tool_calls_and_long_prompts_get_no_errors(client, server):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    done: list[str] = []

    def run(i: int) -> None:
        kind = ("stream", "tool", "long", "plain")[i % 4]
        if kind == "stream":
            stream = client.chat.completions.create(
                model=MODEL, messages=_ask(f"Count to {i}."), max_tokens=12, stream=True)
            assert [c for c in stream if c.choices]
        elif kind == "tool":
            r = client.chat.completions.create(
                model=MODEL, messages=_ask(f"Weather in city number {i}?"), tools=[WEATHER],
                tool_choice=forced, max_tokens=40)  # (sampled: the call may not parse)
            assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")
        elif kind == "long":
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": LONG_SYSTEM * 2},
                                       *_ask(f"Weather {i}?")], max_tokens=8)
            assert r.usage.prompt_tokens > 500
        else:
            r = client.completions.create(model=MODEL, prompt=f"Item {i}:", max_tokens=8)
            assert r.choices[0].text is not None
        done.append(kind)

    errors = _clients(32, run)
    assert errors == [] and len(done) == 32
    assert server[1].free_slots == MAX_BATCH


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_client_disconnect_mid_stream_frees_its_row(server, client):
    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": MODEL, "messages": _ask("Write a long story about a dragon."),
            "max_tokens": 900, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while '"content": ""' in (line := resp.readline().decode()) or not line.strip():
        pass  # skip the role chunk: after the first content chunk, generation is running
    assert _health(url)["free_slots"] == MAX_BATCH - 1
    cancelled = engine.stats.cancelled
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while _health(url)["free_slots"] != MAX_BATCH and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(url)["free_slots"] == MAX_BATCH
    assert engine.stats.cancelled == cancelled + 1
    r = client.chat.completions.create(model=MODEL, messages=_ask("Hi"), max_tokens=2)
    assert r.choices[0].message.content is not None  # still serving


def test_client_disconnect_without_streaming_frees_its_row_within_a_second(server, client):
    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": MODEL, "messages": _ask("Write a long story about a dragon."),
            "max_tokens": 900, "temperature": 0}
    tokens, cancelled = engine.stats.generation_tokens, engine.stats.cancelled
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while engine.stats.generation_tokens < tokens + 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the answer is being generated
    assert engine.free_slots == MAX_BATCH - 1
    conn.sock.close()  # the client goes away, no byte of the answer sent yet
    conn.close()
    gone = time.monotonic()
    while engine.free_slots != MAX_BATCH and time.monotonic() < gone + 5:
        time.sleep(0.01)
    freed = time.monotonic() - gone
    assert engine.free_slots == MAX_BATCH and engine.stats.cancelled == cancelled + 1
    assert freed < 1.0, f"the row was freed {freed:.2f} s after the disconnect"
    assert engine.stats.generation_tokens - tokens < 900  # cancelled, not finished


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model=MODEL, messages=_ask("Hi"), max_tokens=2)
    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert 'llamaworks_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
              if ln and not ln.startswith("#")}
    assert values["llamaworks_generation_tokens_total"] >= 2
    assert values["llamaworks_queue_depth"] == 0
    assert values['llamaworks_request_latency_seconds_bucket{le="+Inf"}'] >= 1
    assert values["llamaworks_max_batch"] == MAX_BATCH

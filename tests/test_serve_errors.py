"""Every bad request gets an OpenAI-shaped error (`{"error": {message, type, param, code}}`) with
the right status, seen through the official `openai` client where it can send the request, and
the server keeps serving afterwards (on the same keep-alive connection). Real SmolLM2, small
context and queue."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import pytest

from llamaworks import LLM, SamplingParams
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
KEY, MODEL, CONTEXT = "sekret", "smollm2", 256
MSGS = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(smollm, smollm_tokenizer):
    engine = ContinuousEngine(LLM(smollm, smollm_tokenizer), max_batch=1, max_queue=2,
                              context=CONTEXT)
    app = create_app(engine, MODEL, api_key=KEY, max_body_bytes=16384, retry_after=3)
    with BackgroundServer(app) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _raw(url: str, path: str, data: bytes | None, headers: dict | None = None
         ) -> tuple[int, dict, dict]:
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, headers=h,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _shape(body: dict) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.fixture(autouse=True)
def still_serving(client):
    yield
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_missing_or_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    body = json.dumps({"model": MODEL, "messages": MSGS}).encode()
    for path, data in [("/v1/chat/completions", body), ("/v1/models", None)]:
        status, _, err = _raw(server[0], path, data, {"Authorization": ""})  # no key at all
        assert status == 401 and _shape(err)["type"] == "authentication_error"


def test_malformed_json_is_400(server):
    status, _, body = _raw(server[0], "/v1/chat/completions", b'{"model": "smollm2", "mess')
    assert status == 400 and _shape(body)["code"] == "invalid_json"
    status, _, body = _raw(server[0], "/v1/chat/completions", b'[1, 2]')
    assert status == 400


@pytest.mark.parametrize("extra, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),  # more sequences than the server's batch rows (1)
])
def test_wrong_types_and_values_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": MSGS, **extra})
    assert e.value.status_code == 400 and e.value.param.startswith(param)


def test_unknown_model_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-9", messages=MSGS)
    assert e.value.code == "model_not_found" and "smollm2" in e.value.message


def test_prompt_longer_than_the_context_is_400(client):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and str(CONTEXT) in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=5)


@pytest.mark.parametrize("max_tokens", [0, -3, CONTEXT, 10**9])
def test_max_tokens_out_of_range_is_400(client, max_tokens):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=max_tokens)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("tool", [
    {"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}},
    {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 1}}}},
    {"type": "retrieval", "function": {"name": "f"}},
    {"type": "function"},
])
def test_invalid_tool_schema_is_400(client, tool):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, tools=[tool])
    assert e.value.param.startswith("tools.0")


def test_tool_choice_naming_an_absent_tool_is_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, tools=[tool],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "g"}})
    assert e.value.param == "tool_choice"


def test_oversized_body_is_413(server):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 20000}]})
    status, _, body = _raw(server[0], "/v1/chat/completions", big.encode())
    assert status == 413 and _shape(body)["code"] == "request_too_large"


LONG = SamplingParams(max_tokens=CONTEXT - 10, ignore_eos=True)


class _Busy:
    """`with _Busy(engine, waiting=k):` one request holds the only row and k more wait."""

    def __init__(self, engine: ContinuousEngine, waiting: int):
        self.engine, self.waiting, self.reqs = engine, waiting, []

    def __enter__(self) -> _Busy:
        self.deadline = time.monotonic() + 30
        self.reqs.append(self.engine.submit("Count forever:", LONG, lambda ev: None))
        while self.engine.free_slots and time.monotonic() < self.deadline:
            time.sleep(0.01)
        self.reqs += [self.engine.submit("Count forever:", LONG, lambda ev: None)
                      for _ in range(self.waiting)]
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.reqs:
            r.cancel()
        while ((self.engine.free_slots == 0 or self.engine._waiting or self.engine.engine.waiting)
               and time.monotonic() < self.deadline):
            time.sleep(0.01)


def test_full_queue_is_429_with_retry_after(server, client):
    with _Busy(server[1], waiting=2):  # the queue (2) is full
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "3"
        assert e.value.code == "queue_full"


def test_a_request_refused_with_429_leaves_nothing_queued(server, client, monkeypatch):
    _, engine = server
    step = engine.engine.step

    def slow_step() -> list:  # steps as long as a bigger model's: the scheduler's own
        time.sleep(1.0)       # clean-up between steps comes too late to hide a leftover
        return step()

    monkeypatch.setattr(engine.engine, "step", slow_step)
    with _Busy(engine, waiting=1):  # one of the two queue places is free
        with pytest.raises(openai.RateLimitError):  # two prompts do not fit
            client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=1)
        assert engine.queue_depth == 1
        stream = client.completions.create(model=MODEL, prompt="a", max_tokens=1, stream=True)
        stream.close()  # accepted (no spurious 429): the free place is still free


def test_more_prompts_than_the_queue_holds_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=1)
    assert e.value.param == "prompt" and "--max-queue" in e.value.message


def test_unknown_path_is_an_openai_shaped_404(server):
    status, _, body = _raw(server[0], "/v1/nope", None)
    assert status == 404 and _shape(body)["type"] == "not_found_error"


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _send(conn: http.client.HTTPConnection, path: str, body: bytes | None,
          headers: dict | None = None) -> tuple[int, dict]:
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request("POST" if body is not None else "GET", path, body, h)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 1, **fields}).encode()


DEEP = b'{"model": "smollm2", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
SURROGATE = '"\\ud800"'  # a JSON escape of half a UTF-16 pair: no Unicode character


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", DEEP),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x"}]).replace(
        b'"x"', SURROGATE.encode())),
    ("/v1/chat/completions", _chat(stop="x").replace(b'"x"', SURROGATE.encode())),
    ("/v1/completions", _chat(prompt="x").replace(b'"x"', SURROGATE.encode())),
    ("/v1/chat/completions", _chat().replace(b'"max_tokens": 1', b'"temperature": NaN')),
    ("/v1/chat/completions", _chat().replace(b'"max_tokens": 1', b'"top_p": Infinity')),
], ids=["5000-levels", "surrogate-content", "surrogate-stop",
        "surrogate-prompt", "nan", "infinity"])
def test_hostile_json_is_400_and_the_connection_stays_usable(server, path, body):
    conn = _conn(server[0])
    status, err = _send(conn, path, body)
    sock = conn.sock
    assert status == 400 and _shape(err)["code"] == "invalid_json"
    assert _send(conn, "/v1/models", None)[0] == 200 and conn.sock is sock  # same connection


@pytest.mark.parametrize("extra, param", [
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": True}, "temperature"),
    ({"logprobs": "true"}, "logprobs"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"seed": 10**30}, "seed"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}]},
     "messages.1"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_values_openai_rejects_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1,
                                       extra_body=extra)
    assert e.value.status_code == 400 and e.value.param.startswith(param)


@pytest.mark.parametrize("extra, param", [
    ({"echo": "no"}, "echo"),
    ({"logprobs": True}, "logprobs"),
])
def test_completion_values_openai_rejects_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=extra)
    assert e.value.status_code == 400 and e.value.param.startswith(param)

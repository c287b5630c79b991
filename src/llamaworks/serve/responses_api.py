"""OpenAI's Responses API (`POST /v1/responses`) over the same chat job as /v1/chat/completions.

`input` (a string or items: messages, `function_call`, `function_call_output`), `instructions`,
function `tools`, `tool_choice`, `text.format` (structured outputs), `reasoning.effort` and
`previous_response_id` become a `ChatRequest`; the answer is a `response` object whose `output`
holds reasoning, message and function_call items, or the stream of its events
(`response.created` .. `response.completed`). Responses are kept in memory (the last
`ResponseStore.size`) so that `previous_response_id` continues a conversation, as the hosted API
keeps them server-side.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Literal

from pydantic import Field, ValidationError

from llamaworks.serve import responses as R
from llamaworks.serve.chat import ChatJob
from llamaworks.serve.schemas import APIError, ChatRequest, _Body


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "required", "none"] | dict[str, Any] | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, Any] | None = None


class ResponseStore:
    """The conversations of recent responses (id -> messages, ending with the reply)."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: collections.OrderedDict[str, list[dict[str, Any]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, rid: str) -> list[dict[str, Any]]:
        with self._lock:
            if rid not in self._items:
                raise APIError(404, f"no stored response {rid!r} (responses live in this "
                               f"server's memory: the last {self.size})",
                               param="previous_response_id", code="not_found")
            self._items.move_to_end(rid)
            return list(self._items[rid])

    def put(self, rid: str, messages: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[rid] = messages
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _parts_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts")
    out = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise APIError(400, f"{where}: unsupported content part {kind!r} (text only)")
        out.append(str(p.get("text", "")))
    return "".join(out)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages (function calls join the assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"input.{i}: unknown role {role!r}", param="input")
            out.append({"role": role, "content": _parts_text(it.get("content", ""),
                                                              f"input.{i}")})
        elif kind == "function_call":
            call = {"id": str(it.get("call_id") or it.get("id")), "type": "function",
                    "function": {"name": str(it.get("name")),
                                 "arguments": str(it.get("arguments") or "{}")}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": str(it.get("call_id")),
                        "content": _parts_text(it.get("output", ""), f"input.{i}")})
        elif kind == "reasoning":
            continue  # earlier reasoning is not fed back
        else:
            raise APIError(400, f"input.{i}: unsupported item type {kind!r}", param="input")
    return out


def to_chat(body: ResponsesRequest, history: list[dict[str, Any]]) -> ChatRequest:
    # earlier instructions are not carried over: only this request's apply
    msgs = [m for m in history if m["role"] not in ("system", "developer")]
    if body.instructions:
        msgs.insert(0, {"role": "system", "content": body.instructions})
    msgs += input_messages(body.input)
    chat: dict[str, Any] = {"model": body.model, "messages": msgs, "stream": body.stream,
                            "temperature": 1.0 if body.temperature is None else body.temperature}
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.tools:
        tools = []
        for t in body.tools:
            if t.get("type") != "function":
                raise APIError(400, f"tool type {t.get('type')!r} is not available here "
                               "(function tools only)", param="tools")
            tools.append({"type": "function", "function": {
                "name": t.get("name"), "description": t.get("description") or "",
                "parameters": t.get("parameters") or {"type": "object", "properties": {}}}})
        chat["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name") or "output", "schema": fmt.get("schema") or {},
            "strict": fmt.get("strict")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    try:
        return ChatRequest.model_validate(chat)
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"invalid request: {'.'.join(map(str, err.get('loc', ())))}: "
                       f"{err.get('msg')}") from None


class ResponseJob:
    """One /v1/responses request, answered from a ChatJob's results."""

    def __init__(self, chat: ChatJob, body: ResponsesRequest, store: ResponseStore,
                 messages: list[dict[str, Any]]):
        self.chat, self.body, self.store, self.messages = chat, body, store, messages
        self.prompts, self.params, self.stream = chat.prompts, chat.params, body.stream
        self.id, self.created = R.new_id("resp"), R.now()
        self.seq = 0
        self.text = ""
        self.msg_id = R.new_id("msg")
        self.message_open = False
        self.items = 0  # output items announced so far

    # -- the response object ------------------------------------------------------------------
    def _shell(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "model": self.chat.model, "output": output,
                "instructions": b.instructions, "tools": b.tools or [],
                "tool_choice": b.tool_choice or "auto", "parallel_tool_calls":
                b.parallel_tool_calls, "previous_response_id": b.previous_response_id,
                "temperature": b.temperature, "top_p": b.top_p,
                "max_output_tokens": b.max_output_tokens, "text": b.text or
                {"format": {"type": "text"}}, "reasoning": b.reasoning, "store": b.store,
                "metadata": b.metadata or {}, "error": None, "incomplete_details": None,
                "usage": None}

    def response(self) -> dict[str, Any]:
        chat = self.chat.response()
        (choice,) = chat["choices"]
        msg = choice["message"]
        output: list[dict[str, Any]] = []
        if msg.get("reasoning_content"):
            output.append({"type": "reasoning", "id": R.new_id("rs"), "summary": [],
                           "content": [{"type": "reasoning_text",
                                        "text": msg["reasoning_content"]}]})
        if msg.get("content"):
            output.append(self._message_item(msg["content"]))
        for c in msg.get("tool_calls") or []:
            output.append({"type": "function_call", "id": "fc_" + c["id"], "call_id": c["id"],
                           "name": c["function"]["name"],
                           "arguments": c["function"]["arguments"], "status": "completed"})
        cut = choice["finish_reason"] == "length"
        out = self._shell("incomplete" if cut else "completed", output)
        if cut:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        u = chat["usage"]
        out["usage"] = {"input_tokens": u["prompt_tokens"],
                        "input_tokens_details": {"cached_tokens": (
                            u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)},
                        "output_tokens": u["completion_tokens"],
                        "output_tokens_details": {"reasoning_tokens": (
                            u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)},
                        "total_tokens": u["total_tokens"]}
        if self.body.store:
            reply = {"role": "assistant", "content": msg.get("content") or ""}
            if msg.get("tool_calls"):
                reply["tool_calls"] = msg["tool_calls"]
            self.store.put(self.id, [*self.messages, reply])
        return out

    def _message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    # -- streaming ----------------------------------------------------------------------------
    def _ev(self, kind: str, **data: Any) -> str:
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': self.seq - 1, **data})}\n\n"  # noqa: E501

    def timeout_event(self, message: str) -> str:
        return self._ev("error", message=message, code="timeout", param=None)

    def first_events(self) -> list[str]:
        shell = self._shell("in_progress", [])
        return [self._ev("response.created", response=shell),
                self._ev("response.in_progress", response=shell)]

    def _open_message(self) -> list[str]:
        if self.message_open:
            return []
        self.message_open, self.msg_index = True, self.items
        self.items += 1
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self._ev("response.output_item.added", output_index=self.msg_index,
                         item={**self._message_item("", "in_progress"), "content": []}),
                self._ev("response.content_part.added", item_id=self.msg_id,
                         output_index=self.msg_index, content_index=0, part=part)]

    def on_event(self, j: int, ev: Any) -> list[str]:
        chunks = self.chat.on_event(j, ev)
        if not self.stream:
            return []
        out: list[str] = []
        for c in chunks:
            if "error" in c:
                out.append(self._ev("error", message=c["error"]["message"], code=None,
                                    param=None))
                continue
            for choice in c.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content"):
                    out += self._open_message()
                    self.text += delta["content"]
                    out.append(self._ev("response.output_text.delta", item_id=self.msg_id,
                                        output_index=self.msg_index, content_index=0,
                                        delta=delta["content"], logprobs=[]))
                if choice.get("finish_reason") and self.message_open:
                    part = {"type": "output_text", "text": self.text, "annotations": []}
                    out += [self._ev("response.output_text.done", item_id=self.msg_id,
                                     output_index=self.msg_index, content_index=0,
                                     text=self.text, logprobs=[]),
                            self._ev("response.content_part.done", item_id=self.msg_id,
                                     output_index=self.msg_index, content_index=0, part=part),
                            self._ev("response.output_item.done", output_index=self.msg_index,
                                     item=self._message_item(self.text))]
                for call in delta.get("tool_calls") or []:
                    item = {"type": "function_call", "id": "fc_" + call["id"],
                            "call_id": call["id"], "name": call["function"]["name"],
                            "arguments": "", "status": "in_progress"}
                    args, k = call["function"]["arguments"], self.items
                    self.items += 1
                    out += [self._ev("response.output_item.added", output_index=k, item=item),
                            self._ev("response.function_call_arguments.delta",
                                     item_id=item["id"], output_index=k, delta=args),
                            self._ev("response.function_call_arguments.done",
                                     item_id=item["id"], output_index=k, arguments=args),
                            self._ev("response.output_item.done", output_index=k,
                                     item={**item, "arguments": args, "status": "completed"})]
        if ev.done and not ev.error and ev.result is not None:
            final = self.response()
            kind = "response.completed" if final["status"] == "completed" else \
                "response.incomplete"
            out.append(self._ev(kind, response=final))
        return out

"""Anthropic's Messages API (`POST /v1/messages`) over the same chat job as /v1/chat/completions.

The request (system, messages of text / tool_use / tool_result blocks, tools with `input_schema`,
tool_choice auto / any / tool / none, stop_sequences) becomes an OpenAI-shaped `ChatRequest`, so
rendering, tool-call parsing, grammars and reasoning are the chat endpoint's own; the answer comes
back as a `message` (content blocks: thinking, text, tool_use; `stop_reason` end_turn /
max_tokens / stop_sequence / tool_use; usage), or streamed as Anthropic's events (message_start,
content_block_start / _delta / _stop, message_delta, message_stop). Errors use Anthropic's shape:
`{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from llamaworks.serve import responses as R
from llamaworks.serve.chat import ChatJob
from llamaworks.serve.schemas import APIError, ChatRequest, _Body

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 504: "api_error", 529: "overloaded_error"}


def error_body(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"),
                                       "message": e.message}}


class ToolIn(_Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoiceIn(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessageIn(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _text(blocks: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or of text blocks (anything else is a 400)."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for b in blocks:
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise APIError(400, f"{where}: only text blocks are supported here, got "
                           f"{b.get('type')!r}")
        parts.append(b["text"])
    return "".join(parts)


def _messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """Anthropic's turns as OpenAI messages: tool_use blocks become the assistant's tool_calls,
    tool_result blocks become tool messages (before the user's own text of that turn)."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) \
            else m.content
        text, calls, results = [], [], []
        for b in blocks:
            kind = b.get("type")
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise APIError(400, f"messages.{i}: a tool_use block needs an id and a name")
                calls.append({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise APIError(400, f"messages.{i}: a tool_result block needs tool_use_id")
                content = b.get("content") or ""
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                                "content": _text(content, f"messages.{i}.tool_result")})
            elif kind == "thinking" and m.role == "assistant":
                continue  # earlier reasoning is not fed back (as DeepSeek and Qwen advise)
            else:
                raise APIError(400, f"messages.{i}: unsupported content block {kind!r} in a "
                               f"{m.role} turn")
        out += results
        if text or calls or not results:
            msg: dict[str, Any] = {"role": m.role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def to_chat(body: MessagesRequest) -> ChatRequest:
    """The equivalent /v1/chat/completions request."""
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body),
                            "max_tokens": body.max_tokens, "stream": body.stream,
                            "temperature": 1.0 if body.temperature is None else body.temperature}
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    if body.stop_sequences:
        chat["stop"] = body.stop_sequences
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description or "", "parameters": t.input_schema}}
            for t in body.tools]
    choice = body.tool_choice
    if choice is not None and body.tools:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice of type 'tool' needs a name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    try:
        return ChatRequest.model_validate(chat)
    except ValidationError as e:
        raise APIError(400, f"invalid request: {e.errors()[0].get('msg')}") from None


def _stop_reason(finish: str | None, called: bool, stop: str | int | None,
                 body: MessagesRequest) -> tuple[str, str | None]:
    if called:
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str) and stop in (body.stop_sequences or []):
        return "stop_sequence", stop
    return "end_turn", None


class MessagesJob:
    """One /v1/messages request, answered from a ChatJob's results."""

    def __init__(self, chat: ChatJob, body: MessagesRequest):
        if chat.body.n != 1:
            raise APIError(400, "one message per request")
        self.chat, self.body = chat, body
        self.prompts, self.params, self.stream = chat.prompts, chat.params, body.stream
        self.id = R.new_id("msg")
        self.blocks: list[str] = []  # the kinds of the content blocks opened so far
        self.open = False

    # -- whole answers ------------------------------------------------------------------------
    def on_event(self, j: int, ev: Any) -> list[str]:
        chunks = self.chat.on_event(j, ev)
        return self._events(chunks, ev) if self.stream else []

    def response(self) -> dict[str, Any]:
        chat = self.chat.response()
        (choice,) = chat["choices"]
        msg = choice["message"]
        content: list[dict[str, Any]] = []
        if msg.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": msg["reasoning_content"],
                            "signature": ""})
        if msg.get("content"):
            content.append({"type": "text", "text": msg["content"]})
        for c in msg.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                            "input": json.loads(c["function"]["arguments"])})
        out = self.chat.result.outputs[0]  # type: ignore[union-attr]
        reason, seq = _stop_reason(out.finish_reason, bool(msg.get("tool_calls")),
                                   out.stop_reason, self.body)
        return {"id": self.id, "type": "message", "role": "assistant", "model": chat["model"],
                "content": content, "stop_reason": reason, "stop_sequence": seq,
                "usage": self._usage(chat["usage"])}

    @staticmethod
    def _usage(u: dict[str, Any]) -> dict[str, int]:
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}

    # -- streaming ----------------------------------------------------------------------------
    @staticmethod
    def sse(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    def timeout_event(self, message: str) -> str:
        return self.sse("error", {"error": {"type": "api_error", "message": message}})

    def first_events(self) -> list[str]:
        n = len(self.prompts[0])
        return [self.sse("message_start", {"message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.chat.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": n, "output_tokens": 0}}})]

    def _block(self, kind: str, start: dict[str, Any]) -> list[str]:
        """Close the open block if it is of another kind, open one of `kind`."""
        out = []
        if self.open and self.blocks[-1] == kind and kind != "tool_use":
            return out
        if self.open:
            out.append(self.sse("content_block_stop", {"index": len(self.blocks) - 1}))
        self.blocks.append(kind)
        self.open = True
        out.append(self.sse("content_block_start", {"index": len(self.blocks) - 1,
                                                    "content_block": start}))
        return out

    def _events(self, chunks: list[dict[str, Any]], ev: Any) -> list[str]:
        out: list[str] = []
        for c in chunks:
            if "error" in c:
                out.append(self.sse("error", {"error": {"type": "api_error",
                                                        "message": c["error"]["message"]}}))
                continue
            for choice in c.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("reasoning_content"):
                    out += self._block("thinking", {"type": "thinking", "thinking": ""})
                    out.append(self.sse("content_block_delta", {
                        "index": len(self.blocks) - 1,
                        "delta": {"type": "thinking_delta",
                                  "thinking": delta["reasoning_content"]}}))
                if delta.get("content"):
                    out += self._block("text", {"type": "text", "text": ""})
                    out.append(self.sse("content_block_delta", {
                        "index": len(self.blocks) - 1,
                        "delta": {"type": "text_delta", "text": delta["content"]}}))
                for call in delta.get("tool_calls") or []:
                    out += self._block("tool_use", {"type": "tool_use", "id": call["id"],
                                                    "name": call["function"]["name"],
                                                    "input": {}})
                    out.append(self.sse("content_block_delta", {
                        "index": len(self.blocks) - 1,
                        "delta": {"type": "input_json_delta",
                                  "partial_json": call["function"]["arguments"]}}))
                if choice.get("finish_reason"):
                    if self.open:
                        out.append(self.sse("content_block_stop",
                                            {"index": len(self.blocks) - 1}))
                        self.open = False
                    self.finish = choice["finish_reason"]
        if ev.done and not ev.error and ev.result is not None:
            o = ev.result.outputs[0]
            reason, seq = _stop_reason(o.finish_reason, getattr(self, "finish", "") ==
                                       "tool_calls", o.stop_reason, self.body)
            out.append(self.sse("message_delta", {
                "delta": {"stop_reason": reason, "stop_sequence": seq},
                "usage": {"output_tokens": len(o.token_ids)}}))
            out.append(self.sse("message_stop", {}))
        return out

"""Request bodies of the OpenAI API (the subset we serve), as pydantic models, and OpenAI-shaped
errors. Unknown fields are ignored (clients send many we do not use); wrong types (strictly: no
`"yes"` for a boolean, no `"5"` for an integer) and values out of range are rejected with the
offending field named in `param`. `parse_json` turns a raw body into a JSON object or a 400."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DEPTH = 64  # JSON nesting a body may have; real tool schemas stay far below it
INT64 = 2**63


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad_json(message: str) -> APIError:
    return APIError(400, f"the body is not valid JSON: {message}", code="invalid_json")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(obj: Any, max_depth: int) -> None:
    """Walk the parsed body (iteratively: a deep body must not exhaust the stack) and reject
    nesting deeper than `max_depth` and strings that are not Unicode text (lone surrogates such
    as "\\ud800", which no tokenizer or UTF-8 encoder takes)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad_json("a string holds a lone surrogate escape (such as \\ud800), "
                                "which is not a Unicode character") from None
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > max_depth:
            raise _bad_json(f"it is nested deeper than {max_depth} levels")
        items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        stack += [(k, depth) for k, _ in items if k is not None]
        stack += [(v, depth + 1) for _, v in items]


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (`invalid_json`) naming what is wrong: not UTF-8,
    not JSON (NaN and Infinity are not JSON), nested deeper than `max_depth`, a lone
    surrogate, or not an object."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise _bad_json(str(e)) from None
    except RecursionError:
        raise _bad_json(f"it is nested deeper than {max_depth} levels") from None
    _check_tree(obj, max_depth)
    if not isinstance(obj, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return obj


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic problem as a 400, naming the field (`messages.0.role`)."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                    code="invalid_value")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def to_render(self) -> dict[str, Any]:
        """The plain dict `chat.formats.render` takes (content as text)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name and role == "tool":
            out["name"] = self.name
        return out

    @model_validator(mode="after")
    def _tool_reply(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a function name is 1-64 letters, digits, '_' or '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if v.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON Schema with \"type\": \"object\"")
        props = v.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
            raise ValueError("parameters.properties must map names to JSON Schema objects")
        req = v.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise ValueError("parameters.required must be a list of property names")
        return v


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's `response_format`: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> dict[str, Any] | None:
        """The JSON schema to enforce (None for plain text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format of type json_schema needs `json_schema`")
            return self.json_schema.schema_ or {}
        return None


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extra field (HF's definition)
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens whatever the model says
    response_format: ResponseFormat | None = None
    guided_grammar: str | None = None  # vLLM's extra field: a grammar (Lark, llguidance's dialect)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (enable_thinking)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

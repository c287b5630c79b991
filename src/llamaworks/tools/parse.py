"""Tool calls out of generated text, whole (`parse_tool_calls`) or streamed (`ToolCallStreamer`).

Formats (see `tools.formats`):
- "chatml" and "llama2": Hermes/Qwen2.5 blocks `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`, any number, anywhere in the text; the text outside the blocks is the content.
- "llama3": Llama-3.1 JSON calls, the whole reply being `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`; several calls separated by `;` or newlines). Hermes blocks
  are recognised too.

Never raises on model output: malformed JSON, a missing name, non-object arguments and an
unterminated block (a generation cut off mid-call) are reported in `ParseResult.errors`. An
unterminated block whose JSON is complete still yields its call (small models often stop right
after the JSON), with an error noting the missing `</tool_call>`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id ("call_" + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """One parsed call: `arguments` is the decoded JSON object."""

    id: str
    name: str
    arguments: dict

    def to_openai(self) -> dict:
        """`{"id", "type": "function", "function": {"name", "arguments": JSON string}}`."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ParseResult:
    """Content (text outside tool calls, stripped), the calls, and problems found."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _call_from_obj(obj: Any, errors: list[str], raw: str) -> ToolCall | None:
    if not isinstance(obj, dict):
        errors.append(f"a tool call must be a JSON object, got {type(obj).__name__}: "
                      f"{_short(raw)!r}")
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI-shaped call written by the model
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        errors.append(f"a tool call has no \"name\" string: {_short(raw)!r}")
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments as a JSON string (OpenAI wire style)
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            errors.append(f"tool call {name!r}: arguments string is not JSON ({e.msg})")
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        errors.append(f"tool call {name!r}: arguments must be a JSON object, got "
                      f"{type(args).__name__}")
        return None
    return ToolCall(new_call_id(), name, args)


def _parse_json_call(body: str, errors: list[str]) -> ToolCall | None:
    body = body.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        errors.append(f"tool call is not valid JSON ({e.msg} at char {e.pos}): {_short(body)!r}")
        return None
    return _call_from_obj(obj, errors, body)


def _parse_hermes(text: str) -> ParseResult:
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body_start = start + len(OPEN)
        end = text.find(CLOSE, body_start)
        nxt = text.find(OPEN, body_start)
        if end < 0 or (0 <= nxt < end):  # unterminated: runs to the next block or the end
            stop = nxt if nxt >= 0 else len(text)
            body = text[body_start:stop]
            n_err = len(errors)
            call = _parse_json_call(body, errors) if body.strip() else None
            del errors[n_err:]
            if call is not None:
                calls.append(call)
                errors.append(f"tool call {call.name!r} is not closed with {CLOSE} (accepted: its "
                              "JSON is complete)")
            else:
                errors.append(f"unterminated tool call (generation cut off?): "
                              f"{_short(text[start:stop])!r}")
            pos = stop
            continue
        call = _parse_json_call(text[body_start:end], errors)
        if call is not None:
            calls.append(call)
        pos = end + len(CLOSE)
    return ParseResult("".join(content).strip(), calls, errors)


def _parse_llama3(text: str) -> ParseResult:
    if OPEN in text:
        return _parse_hermes(text)
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return ParseResult(text.strip())
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            rest = body[pos:]
            kind = "unterminated" if _is_truncated(rest) else "not valid JSON"
            errors.append(f"tool call is {kind} ({e.msg}): {_short(rest)!r}")
            break
        if not (isinstance(obj, dict) and "name" in obj):
            if not calls and not errors:  # a JSON answer, not a call
                return ParseResult(text.strip())
        call = _call_from_obj(obj, errors, body[pos:end])
        if call is not None:
            calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return ParseResult("", calls, errors)


def _is_truncated(text: str) -> bool:
    """True when JSON text ends inside a string or with brackets still open (cut off)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_str or depth > 0


def parse_tool_calls(text: str, fmt: str = "chatml") -> ParseResult:
    """Split generated text into content and tool calls for chat format `fmt`; never raises."""
    if fmt == "llama3":
        return _parse_llama3(text)
    if fmt not in ("chatml", "llama2"):
        raise ValueError(f"unknown chat format {fmt!r}; use chatml, llama3 or llama2")
    return _parse_hermes(text)


class ToolCallStreamer:
    """Incremental parsing for streaming: `feed(delta)` returns the text that is safe to show as
    content now (it holds back anything that may be the start of a tool call), `finish()` parses
    everything fed. After a call starts nothing more is released; `finish().content` then holds
    the whole content, of which `emitted` (what `feed` released) is a prefix once both are
    stripped, so a server sends `remaining_content(result)` as a last content delta."""

    def __init__(self, fmt: str = "chatml") -> None:
        if fmt not in ("chatml", "llama3", "llama2"):
            raise ValueError(f"unknown chat format {fmt!r}; use chatml, llama3 or llama2")
        self.fmt = fmt
        self.text = ""
        self.emitted = ""
        self.in_call = False

    def _held_from(self) -> int:
        """Index into self.text from which output is held back."""
        text = self.text
        if self.fmt == "llama3" and not self.emitted:
            head = text.lstrip()
            if head.startswith("{") or head.startswith(PYTHON_TAG):
                self.in_call = True
                return 0
            if not head or PYTHON_TAG.startswith(head):
                return 0  # only whitespace, or maybe the start of <|python_tag|>
        i = text.find(OPEN, len(self.emitted))
        if i >= 0:
            self.in_call = True
            return i
        # hold back a suffix that is a proper prefix of "<tool_call>"
        for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if OPEN.startswith(text[-k:]):
                return len(text) - k
        return len(text)

    def feed(self, delta: str) -> str:
        """Add generated text; return the newly releasable content."""
        self.text += delta
        if self.in_call:
            return ""
        cut = self._held_from()
        out = self.text[len(self.emitted):cut] if cut > len(self.emitted) else ""
        self.emitted += out
        return out

    def finish(self) -> ParseResult:
        """Parse all text fed so far."""
        return parse_tool_calls(self.text, self.fmt)

    def remaining_content(self, result: ParseResult) -> str:
        """The part of `result.content` not yet released by `feed` (send it as a final delta)."""
        shown = self.emitted.strip()
        if shown and result.content.startswith(shown):
            return result.content[len(shown):]
        return "" if shown else result.content

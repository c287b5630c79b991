"""Tool calls out of generated text, whole (`parse_tool_calls`) or streamed (`ToolCallStreamer`).

Formats (see `chat.formats`):
- "chatml" and "llama2": Hermes/Qwen2.5 blocks `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`, any number, anywhere in the text; the text outside the blocks is the content.
  A block whose JSON object is whole ends at the `</tool_call>` after it, so a string argument
  may itself contain `</tool_call>` or `<tool_call>`.
- "llama3": Llama-3.1 JSON calls, the whole reply being `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`; several calls separated by `;` or newlines). Hermes blocks
  are recognised too.
- "mistral": everything from the first `[TOOL_CALLS]` on is calls, in either of Mistral's forms:
  Nemo's (and Mistral-7B-v0.3's) JSON list `[TOOL_CALLS][{"name": ..., "arguments": {...},
  "id": "abcDEF123"}, ...]`, or the newer `[TOOL_CALLS]name[ARGS]{...}` per call (Devstral,
  Ministral 3), with `[CALL_ID]id` before `[ARGS]` in Mistral Small 3.2's template. A call keeps
  the id the model wrote (so rendering it back through the template gives the same text); a call
  without one gets a fresh 9-character id, the only kind Mistral's templates accept.
- "gemma": Google's Gemma 3 convention, fenced blocks of Python calls with keyword arguments,
  ```` ```tool_code\nget_weather(city="Paris")\n``` ````, any number, one call per line; the text
  outside them is the content. The code is read with `ast` and never run: only calls of a plain
  function name with keyword arguments whose values are literals (strings, numbers, True/False/
  None, lists, tuples, dicts with string keys) become `ToolCall`s; anything else (positional
  arguments, names, expressions, f-strings) is refused in `errors`.

Never raises on model output: malformed JSON, a missing name, non-object arguments and an
unterminated block (a generation cut off mid-call) are reported in `ParseResult.errors`. An
unterminated block whose JSON is complete still yields its call (small models often stop right
after the JSON), with an error noting the missing `</tool_call>`.
"""

from __future__ import annotations

import ast
import json
import math
import textwrap
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS, CALL_ID, ARGS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"
GEMMA_CALL, GEMMA_RESULT, FENCE = "```tool_code", "```tool_output", "```"
FORMATS = ("chatml", "llama3", "llama2", "mistral", "gemma")  # as chat.formats.FORMATS


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


def _closed_json_end(text: str, at: int) -> int:
    """Where `</tool_call>` starts when a whole JSON object follows `at` and then (after
    whitespace) the closing tag, else -1: a JSON string may itself hold `</tool_call>` (a call
    sampled under the call grammar can write one), so the first closing tag is not the end."""
    body = text[at:]
    lead = len(body) - len(body.lstrip())
    if not body[lead:].startswith("{"):
        return -1
    try:
        _, stop = json.JSONDecoder().raw_decode(body, lead)
    except json.JSONDecodeError:
        return -1
    rest = body[stop:]
    close = stop + len(rest) - len(rest.lstrip())
    return at + close if body.startswith(CLOSE, close) else -1


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
        whole = _closed_json_end(text, body_start)  # its strings may hold either tag
        end = whole if whole >= 0 else text.find(CLOSE, body_start)
        nxt = text.find(OPEN, body_start)
        if end < 0 or (whole < 0 and 0 <= nxt < end):  # unterminated: to the next block or end
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


def _mistral_id(obj: Any) -> str:
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and cid else uuid.uuid4().hex[:9]


def _mistral_list(text: str, pos: int, calls: list[ToolCall], errors: list[str]) -> int:
    """Nemo's `[{"name", "arguments", "id"}, ...]` at `pos`; returns where it ends."""
    try:
        items, end = json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as e:
        kind = "unterminated" if _is_truncated(text[pos:]) else "not valid JSON"
        errors.append(f"tool call list is {kind} ({e.msg}): {_short(text[pos:])!r}")
        return len(text)
    for obj in items if isinstance(items, list) else [items]:
        call = _call_from_obj(obj, errors, json.dumps(obj, ensure_ascii=False))
        if call is not None:
            call.id = _mistral_id(obj)
            calls.append(call)
    return end


def _mistral_named(text: str, pos: int, calls: list[ToolCall], errors: list[str]) -> int:
    """`name[CALL_ID]id[ARGS]{...}` (the `[CALL_ID]` part optional) at `pos`; returns its end."""
    at = text.find(ARGS, pos)
    if at < 0:
        errors.append(f"unterminated tool call (no {ARGS}; generation cut off?): "
                      f"{_short(text[pos:])!r}")
        return len(text)
    name, _, cid = text[pos:at].partition(CALL_ID)
    start = at + len(ARGS)
    while start < len(text) and text[start] in " \t\r\n":
        start += 1
    try:
        args, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        kind = "unterminated" if _is_truncated(text[start:]) else "not valid JSON"
        errors.append(f"tool call {name.strip()!r}: arguments are {kind} ({e.msg}): "
                      f"{_short(text[start:])!r}")
        return len(text)
    obj = {"name": name.strip(), "arguments": args, "id": cid.strip()}
    call = _call_from_obj(obj, errors, text[pos:end])
    if call is not None:
        call.id = _mistral_id(obj)
        calls.append(call)
    return end


def _parse_mistral(text: str) -> ParseResult:
    first = text.find(TOOL_CALLS)
    if first < 0:
        return ParseResult(text.strip())
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = first
    while text.startswith(TOOL_CALLS, pos):
        pos += len(TOOL_CALLS)
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            errors.append(f"unterminated tool call: nothing after {TOOL_CALLS}")
        elif text[pos] == "[":
            pos = _mistral_list(text, pos, calls, errors)
        else:
            pos = _mistral_named(text, pos, calls, errors)
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
    return ParseResult((text[:first] + text[pos:]).strip(), calls, errors)


def _literal(node: ast.expr) -> Any:
    """The JSON value of a Python literal node; ValueError (a phrase) for anything else."""
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError("is not a finite number")
            return v
        raise ValueError(f"is a {type(v).__name__} literal, which JSON has no value for")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
        v = _literal(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise ValueError("is a dict whose keys are not all string literals")
            out[k.value] = _literal(v)
        return out
    raise ValueError(f"is not a literal (a {type(node).__name__} expression)")


def _python_calls(code: str, errors: list[str]) -> list[ToolCall] | None:
    """The calls in one tool_code block (None when it is not Python at all); problems with
    single calls go to `errors` and the others are kept."""
    src = textwrap.dedent(code).strip()
    if not src:
        errors.append("empty tool_code block")
        return []
    try:
        tree = ast.parse(src, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        msg = getattr(e, "msg", None) or type(e).__name__
        errors.append(f"tool_code is not valid Python ({msg}): {_short(src)!r}")
        return None
    calls: list[ToolCall] = []
    for stmt in tree.body:
        seg = ast.get_source_segment(src, stmt) or ""
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if not isinstance(call, ast.Call):
            errors.append(f"tool_code must be function calls, one per line: {_short(seg)!r}")
            continue
        if not isinstance(call.func, ast.Name):
            errors.append(f"a tool call must call a function by its name: {_short(seg)!r}")
            continue
        name = call.func.id
        if call.args:
            errors.append(f"tool call {name!r}: positional arguments are not supported, only "
                          f"keyword ones (name=value): {_short(seg)!r}")
            continue
        args: dict[str, Any] = {}
        for kw in call.keywords:
            if kw.arg is None:
                errors.append(f"tool call {name!r}: **arguments are not supported: "
                              f"{_short(seg)!r}")
                break
            try:
                args[kw.arg] = _literal(kw.value)
            except ValueError as e:
                errors.append(f"tool call {name!r}: argument {kw.arg!r} {e}: {_short(seg)!r}")
                break
        else:
            calls.append(ToolCall(new_call_id(), name, args))
    return calls


def _parse_gemma(text: str) -> ParseResult:
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    while True:
        start = text.find(GEMMA_CALL, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body = start + len(GEMMA_CALL)
        # the block ends at the first fence after which its code is Python (a string argument
        # may hold a fence), else at the first fence
        fences, at = [], text.find(FENCE, body)
        while at >= 0:
            fences.append(at)
            at = text.find(FENCE, at + len(FENCE))
        end = next((f for f in fences if _parses(text[body:f])), fences[0] if fences else -1)
        if end < 0:  # unterminated: a generation cut off, or one that stopped after the code
            n_err = len(errors)
            got = _python_calls(text[body:], errors)
            if got and len(errors) == n_err:
                calls += got
                errors.append(f"tool call {got[-1].name!r} is not closed with {FENCE} (accepted: "
                              "its code is complete)")
            else:
                del errors[n_err:]
                errors.append(f"unterminated tool_code block (generation cut off?): "
                              f"{_short(text[start:])!r}")
            break
        calls += _python_calls(text[body:end], errors) or []
        pos = end + len(FENCE)
    return ParseResult("".join(content).strip(), calls, errors)


def _parses(code: str) -> bool:
    try:
        ast.parse(textwrap.dedent(code).strip(), mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


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
    if fmt == "mistral":
        return _parse_mistral(text)
    if fmt == "gemma":
        return _parse_gemma(text)
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; use one of {', '.join(FORMATS)}")
    return _parse_hermes(text)


class ToolCallStreamer:
    """Incremental parsing for streaming: `feed(delta)` returns the text that is safe to show as
    content now (it holds back anything that may be the start of a tool call: `<tool_call>`,
    `[TOOL_CALLS]` for mistral, ```` ```tool_code ```` for gemma), `finish()` parses everything
    fed. After a call starts nothing more is released; `finish().content` then holds the whole
    content, of which `emitted` (what `feed` released) is a prefix once both are stripped, so a
    server sends `remaining_content(result)` as a last content delta."""

    def __init__(self, fmt: str = "chatml") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown chat format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.marker = {"mistral": TOOL_CALLS, "gemma": GEMMA_CALL}.get(fmt, OPEN)
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
        marker = self.marker
        i = text.find(marker, len(self.emitted))
        if i >= 0:
            self.in_call = True
            return i
        # hold back a suffix that is a proper prefix of the marker ("<tool_call>", "[TOOL_CALLS]")
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
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

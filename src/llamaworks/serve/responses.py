"""OpenAI response bodies: chat completions and completions, whole or as SSE chunks, with
logprobs and tool calls. Pure functions over engine results, so the handlers stay short."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from llamaworks.chat.formats import hermes_call_text
from llamaworks.chat.parse import CLOSE, OPEN, ParseResult, parse_tool_calls


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
          ) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens served from
    the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# -- logprobs -----------------------------------------------------------------------------------
def _token_text(tokenizer: Any, tid: int) -> str:
    return tokenizer.decode([tid])


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]],
                  top: int) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content`: per token its text, logprob, bytes and the top `top`."""
    out = []
    for tid, entry in zip(token_ids, entries, strict=False):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        text = _token_text(tokenizer, tid)
        out.append({"token": text, "logprob": entry[tid], "bytes": list(text.encode()),
                    "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": lp,
                                      "bytes": list(t.encode())} for i, lp in best]})
    return out


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]],
                        top: int, offset: int = 0) -> dict[str, Any]:
    """Legacy `/v1/completions` logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [_token_text(tokenizer, t) for t in token_ids]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    tops = [{_token_text(tokenizer, i): lp
             for i, lp in sorted(e.items(), key=lambda kv: -kv[1])[:top]} for e in entries]
    return {"tokens": texts, "token_logprobs": [e[t] for t, e in zip(token_ids, entries,
                                                                      strict=False)],
            "top_logprobs": tops, "text_offset": offsets}


# -- tool calls ---------------------------------------------------------------------------------
def forced_call_prefix(fmt: str, name: str | None, args_marker: bool = False) -> str:
    """The start of the assistant turn that commits the model to calling `name` (or, with None,
    to calling some tool): the tool-call syntax up to the arguments object. Mistral: Nemo's
    `[TOOL_CALLS][{"name": ..., "arguments": `, or with `args_marker` (a vocabulary that has
    `[ARGS]`, as Small 3.2's) `[TOOL_CALLS]name[ARGS]`. Only for `FORCED_CALL_FORMATS`."""
    if fmt not in FORCED_CALL_FORMATS:
        raise ValueError(f"a tool call cannot be forced in chat format {fmt!r}")
    if fmt == "llama3":
        return f'{{"name": "{name}", "parameters": ' if name else '{"name": "'
    if fmt == "mistral":
        if args_marker:
            return f"[TOOL_CALLS]{name}[ARGS]" if name else "[TOOL_CALLS]"
        return f'[TOOL_CALLS][{{"name": "{name}", "arguments": ' if name else \
            '[TOOL_CALLS][{"name": "'
    head = hermes_call_text("NAME", {}).split('"NAME"')[0]  # '<tool_call>\n{"name": '
    assert head.startswith(OPEN)
    return f'{head}"{name}", "arguments": ' if name else f'{head}"'


# Where a call begins in each format's text: a tool-call grammar is switched on there (lazily,
# as llama.cpp's lazy grammars), so text before a call stays free. gemma has none: its calls are
# Python code (```tool_code blocks), which the JSON-schema call grammar does not cover, so they
# are parsed after generation only, and a call cannot be forced (`FORCED_CALL_FORMATS`).
CALL_TRIGGERS = {"chatml": OPEN, "mistral": "[TOOL_CALLS]", "llama3": '{"name"'}
FORCED_CALL_FORMATS = ("chatml", "llama2", "llama3", "mistral")


def lazy_call_grammar(fmt: str, functions: list[tuple[str, dict[str, Any]]],
                      args_marker: bool = False) -> tuple[str, str] | None:
    """(trigger, grammar of what follows it) for tool_choice "auto": once the model writes the
    trigger, the rest of the call must name a declared tool and follow its schema."""
    trigger = CALL_TRIGGERS.get(fmt)
    if trigger is None:
        return None
    lead = forced_call_prefix(fmt, None, args_marker)
    if not lead.startswith(trigger):
        return None
    grammar = forced_call_grammar(fmt, functions, args_marker, lead[len(trigger):])
    return None if grammar is None else (trigger, grammar)


def forced_call_grammar(fmt: str, functions: list[tuple[str, dict[str, Any]]],
                        args_marker: bool = False, lead: str = "") -> str | None:
    """The Lark grammar (llguidance) of what follows `forced_call_prefix(fmt, None)` (after
    `lead`): one of the functions' names, then its arguments under its own parameters schema,
    then the call's end; None for Mistral's `[ARGS]` syntax (a special token, not text)."""
    from llamaworks.infer.grammar import JSON_LAYOUT

    if fmt == "mistral" and args_marker:
        return None
    key = "parameters" if fmt == "llama3" else "arguments"
    tail = json.dumps({"llama3": "}", "mistral": "}]"}.get(fmt, "}\n" + CLOSE))
    alts, rules = [], []
    for i, (name, params) in enumerate(functions):
        schema = {**(params or {"type": "object"}), "x-guidance": JSON_LAYOUT}
        head = json.dumps(f'{name}", "{key}": ')  # a Lark string literal (JSON escapes)
        alts.append(f"{head} a{i} {tail}")
        rules.append(f"a{i}: %json {json.dumps(schema)}")
    head = f"{json.dumps(lead)} " if lead else ""
    return f"start: {head}call\ncall: " + " | ".join(alts) + "\n" + "\n".join(rules) + "\n"


def arguments_head(parameters: dict[str, Any] | None) -> str:
    """The opening of a forced call's arguments: `{"first_property": ` (and the opening quote of
    a string value), so small models fill in a value instead of echoing the schema; "" when the
    function takes no properties."""
    props = (parameters or {}).get("properties") or {}
    required = [r for r in (parameters or {}).get("required") or [] if r in props]
    first = (required or list(props) or [None])[0]
    if first is None:
        return ""
    quote = '"' if props[first].get("type") == "string" else ""
    return f"{{{json.dumps(first)}: {quote}"


def forced_arguments(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (a forced call's arguments), or None."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def forced_call_stop(fmt: str) -> list[str]:
    """Stop strings that end a forced call (the model need not say more)."""
    return [] if fmt in ("llama3", "mistral") else [CLOSE]


def parse_calls(text: str, fmt: str) -> ParseResult:
    return parse_tool_calls(text, fmt)


def chat_message(content: str | None, result: ParseResult | None) -> tuple[dict[str, Any], bool]:
    """The assistant message; True when it carries tool calls."""
    if result is not None and result.calls:
        return ({"role": "assistant", "content": result.content or None,
                 "tool_calls": [c.to_openai() for c in result.calls]}, True)
    return {"role": "assistant", "content": content}, False


def tool_call_deltas(result: ParseResult) -> list[dict[str, Any]]:
    """Streamed `delta.tool_calls`: each call whole, with its index."""
    return [{"index": i, **c.to_openai()} for i, c in enumerate(result.calls)]


def chunk(cid: str, model: str, created: int, choices: list[dict[str, Any]],
          obj: str = "chat.completion.chunk", **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, **extra}


def now() -> int:
    return int(time.time())

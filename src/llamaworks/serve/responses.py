"""OpenAI response bodies: chat completions and completions, whole or as SSE chunks, with
logprobs and tool calls. Pure functions over engine results, so the handlers stay short."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from llamaworks.chat.parse import CLOSE, ParseResult, parse_tool_calls


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


# -- tool calls (the call grammars themselves: chat.calls) ------------------------------------
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

"""The agent loop: generate -> parse tool calls -> run them -> append results -> continue.

`run_agent(llm, messages, registry)` drives either an `LLM` (the prompt is `formats.render` of the
conversation plus the registry's tool schemas, encoded and completed with `llm.stream`) or any
callable `complete(messages, tools) -> str` returning the assistant's raw text (another backend,
or a scripted model in tests). Each model turn is one step; after `max_steps` turns that still
call tools the loop stops with `finish_reason == "max_steps"`. A turn whose tool calls cannot be
parsed gets the parse errors back as a tool result so the model can retry. `on_event` receives
every step as it happens: {"type": "delta", "text"} while generating, then {"type": "assistant",
"step", "content", "tool_calls", "errors"}, {"type": "tool", "step", "tool", "arguments",
"result"} per call and finally {"type": "final", "answer", "finish_reason"}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaworks.chat.formats import detect_format, render
from llamaworks.chat.parse import GEMMA_RESULT, ToolCallStreamer, parse_tool_calls
from llamaworks.tools.registry import ToolRegistry

Event = dict[str, Any]
Complete = Callable[[list[dict], list[dict]], str]

# Stop generating when a Hermes-format (or Gemma) model starts writing the tool's answer itself.
HERMES_STOPS = ("<tool_response>",)
GEMMA_STOPS = (GEMMA_RESULT,)


@dataclass
class AgentResult:
    """The final answer, the tool calls made ({"tool", "arguments", "result"} each), the whole
    conversation in OpenAI format, and why the loop ended: "stop" (the model answered),
    "max_steps" (the step limit was hit) or "context" (the conversation outgrew the model)."""

    answer: str
    steps: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"


def _llm_complete(llm: Any, params: Any, fmt: str, on_event: Callable[[Event], None] | None
                  ) -> Complete:
    from llamaworks.infer.sampling import SamplingParams

    tok = llm.tokenizer
    ctx = llm.model.config.max_seq_len
    base = params or SamplingParams(temperature=0.0, max_tokens=512)
    stops = {"chatml": HERMES_STOPS, "llama2": HERMES_STOPS, "gemma": GEMMA_STOPS}.get(fmt, ())
    if stops:
        base = dataclasses.replace(base, stop=list(dict.fromkeys([*base.stop, *stops])))

    def complete(messages: list[dict], tools: list[dict]) -> str:
        prompt = render(tok, messages, tools or None, add_generation_prompt=True, fmt=fmt)
        ids = tok.encode(prompt, bos=False)
        room = ctx - len(ids)
        if room < 1:
            raise _ContextFull(f"the conversation ({len(ids)} tokens) fills the model's "
                               f"context ({ctx})")
        p = dataclasses.replace(base, max_tokens=min(base.max_tokens, room))
        parts = []
        streamer = ToolCallStreamer(fmt)
        for delta in llm.stream(ids, p):
            parts.append(delta)
            shown = streamer.feed(delta)
            if shown and on_event is not None:
                on_event({"type": "delta", "text": shown})
        return "".join(parts)

    return complete


class _ContextFull(Exception):
    pass


def run_agent(llm: Any, messages: Sequence[Mapping[str, Any]], registry: ToolRegistry, *,
              max_steps: int = 5, params: Any = None, fmt: str | None = None,
              on_event: Callable[[Event], None] | None = None) -> AgentResult:
    """Run the tool loop on `messages` (OpenAI format) with the tools in `registry`; returns the
    final answer, the tool steps and the extended conversation. `llm` is an `LLM` or a callable
    `complete(messages, tools) -> str`; `fmt` defaults to the LLM tokenizer's format ("chatml"
    for a callable)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    emit = on_event or (lambda e: None)
    if callable(llm) and not hasattr(llm, "tokenizer"):
        fmt = fmt or "chatml"
        complete: Complete = llm
    else:
        fmt = fmt or detect_format(llm.tokenizer)
        complete = _llm_complete(llm, params, fmt, on_event)
    tools = registry.schemas()
    convo = [dict(m) for m in messages]
    steps: list[dict] = []
    answer, finish = "", "max_steps"
    for step in range(max_steps):
        try:
            raw = complete(convo, tools)
        except _ContextFull:
            finish = "context"
            break
        res = parse_tool_calls(raw, fmt)
        emit({"type": "assistant", "step": step, "content": res.content,
              "tool_calls": [c.to_openai() for c in res.calls], "errors": res.errors})
        if not res.calls and not res.errors:
            answer, finish = res.content, "stop"
            convo.append({"role": "assistant", "content": res.content})
            break
        answer = res.content
        convo.append({"role": "assistant", "content": res.content or None,
                      "tool_calls": [c.to_openai() for c in res.calls]} if res.calls
                     else {"role": "assistant", "content": raw})
        for call in res.calls:
            result = registry.call(call.name, call.arguments)
            steps.append({"tool": call.name, "arguments": call.arguments, "result": result})
            convo.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                          "content": result})
            emit({"type": "tool", "step": step, "tool": call.name, "arguments": call.arguments,
                  "result": result})
        if res.errors:
            text = "error: your tool call could not be parsed: " + "; ".join(res.errors)
            steps.append({"tool": None, "arguments": None, "result": text})
            convo.append({"role": "tool", "tool_call_id": "", "content": text})
            emit({"type": "tool", "step": step, "tool": None, "arguments": None,
                  "result": text})
    emit({"type": "final", "answer": answer, "finish_reason": finish})
    return AgentResult(answer, steps, convo, finish)

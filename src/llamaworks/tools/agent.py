"""The agent loop: generate -> parse tool calls -> run them -> append results -> continue.

`run_agent(llm, messages, registry)` drives either an `LLM` (the prompt is `formats.render` of the
conversation plus the registry's tool schemas, encoded and completed with `llm.stream`) or any
callable `complete(messages, tools) -> str` returning the assistant's raw text (another backend,
or a scripted model in tests). Each model turn is one step; after `max_steps` turns that still
call tools the loop stops with `finish_reason == "max_steps"`.

A broken call is shown to the model as an error and counted; the loop repairs nothing silently.
A turn with any call that does not parse (bad JSON, no name, non-object arguments, a block cut
off or left unclosed, even one whose JSON is complete) runs none of its calls: the turn stays in
the conversation exactly as the model wrote it, followed by one tool message with the parse
errors, and `AgentResult.malformed_calls` counts one per error. A call that parses but names no
registered tool or whose arguments fail the tool's schema is run through the registry, which
answers with its error text, and is counted in `invalid_calls`.

With an LLM, `grammar=True` holds every call to the registry's tools: the lazy tool-call grammar
of the chat format (`chat.calls.lazy_call_grammar` over `registry_functions(registry)`, the one
the server uses for tool_choice "auto") is set as the sampling's `lazy_grammar`. Text stays free
until the model opens a call; then the call must name a registered tool with schema-valid
arguments, so every call it finishes parses. A format without such a grammar (gemma's Python
calls) and a `complete()` callable (it writes its own text) are refused with a ValueError.

`on_event` receives every step as it happens: {"type": "delta", "text"} while generating, then
{"type": "assistant", "step", "content", "tool_calls", "errors"}, {"type": "tool", "step",
"tool", "arguments", "result"} per call and finally {"type": "final", "answer",
"finish_reason", "tool_calls", "malformed_calls", "invalid_calls"}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaworks.chat.calls import tool_call_grammar
from llamaworks.chat.formats import detect_format, render
from llamaworks.chat.parse import GEMMA_RESULT, ToolCallStreamer, parse_tool_calls
from llamaworks.tools.registry import ToolRegistry, validate

Event = dict[str, Any]
Complete = Callable[[list[dict], list[dict]], str]

# Stop generating when a Hermes-format (or Gemma) model starts writing the tool's answer itself.
HERMES_STOPS = ("<tool_response>",)
GEMMA_STOPS = (GEMMA_RESULT,)


@dataclass
class AgentResult:
    """The final answer, the tool steps ({"tool", "arguments", "result"} each; `tool` None for
    the error shown after a turn whose calls did not parse), the whole conversation in OpenAI
    format, why the loop ended: "stop" (the model answered), "max_steps" (the step limit was hit)
    or "context" (the conversation outgrew the model), and the broken calls: `malformed_calls`
    (calls that did not parse, one per parse error) and `invalid_calls` (parsed calls naming an
    unknown tool or with arguments the tool's schema refuses)."""

    answer: str
    steps: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    malformed_calls: int = 0
    invalid_calls: int = 0

    @property
    def tool_calls(self) -> int:
        """How many calls were run (well-formed calls, valid or not)."""
        return sum(s["tool"] is not None for s in self.steps)

    @property
    def call_validity(self) -> float:
        """The fraction of attempted calls that parsed: run / (run + malformed); 1.0 when the
        model attempted none."""
        tried = self.tool_calls + self.malformed_calls
        return self.tool_calls / tried if tried else 1.0


def registry_functions(registry: ToolRegistry) -> list[tuple[str, dict]]:
    """(name, parameters schema) of each registered tool: the `functions` argument of
    `chat.calls.lazy_call_grammar`."""
    return [(t.name, t.parameters) for t in registry.tools.values()]


def _invalid(registry: ToolRegistry, name: str, arguments: dict) -> bool:
    tool = registry.tools.get(name)
    return tool is None or bool(validate(arguments, tool.parameters))


def _llm_complete(llm: Any, params: Any, fmt: str, on_event: Callable[[Event], None] | None,
                  lazy: tuple[str, str] | None = None) -> Complete:
    from llamaworks.infer.sampling import SamplingParams

    tok = llm.tokenizer
    ctx = llm.model.config.max_seq_len
    base = params or SamplingParams(temperature=0.0, max_tokens=512)
    if lazy is not None:
        base = dataclasses.replace(base, lazy_grammar=lazy)
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


def parse_error_result(errors: Sequence[str]) -> str:
    """The tool message that answers a turn whose calls did not parse (none of them ran)."""
    return ("error: your tool call could not be parsed: " + "; ".join(errors) +
            ". No call of this turn was run; write the call again.")


def run_agent(llm: Any, messages: Sequence[Mapping[str, Any]], registry: ToolRegistry, *,
              max_steps: int = 5, params: Any = None, fmt: str | None = None,
              on_event: Callable[[Event], None] | None = None,
              grammar: bool = False) -> AgentResult:
    """Run the tool loop on `messages` (OpenAI format) with the tools in `registry`; returns the
    final answer, the tool steps, the extended conversation and the count of broken calls.
    `llm` is an `LLM` or a callable `complete(messages, tools) -> str`; `fmt` defaults to the LLM
    tokenizer's format ("chatml" for a callable). `grammar`: sample under the lazy tool-call
    grammar of the registry's tools (LLM only; see the module docstring)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    emit = on_event or (lambda e: None)
    if callable(llm) and not hasattr(llm, "tokenizer"):
        if grammar:
            raise ValueError("grammar=True constrains an LLM's sampling; a complete() callable "
                             "writes its own text, so there is nothing to constrain")
        fmt = fmt or "chatml"
        complete: Complete = llm
    else:
        fmt = fmt or detect_format(llm.tokenizer)
        lazy = tool_call_grammar(llm.tokenizer, registry_functions(registry), fmt) \
            if grammar else None
        complete = _llm_complete(llm, params, fmt, on_event, lazy)
    tools = registry.schemas()
    convo = [dict(m) for m in messages]
    steps: list[dict] = []
    answer, finish = "", "max_steps"
    malformed = invalid = 0
    for step in range(max_steps):
        try:
            raw = complete(convo, tools)
        except _ContextFull:
            finish = "context"
            break
        res = parse_tool_calls(raw, fmt)
        emit({"type": "assistant", "step": step, "content": res.content,
              "tool_calls": [c.to_openai() for c in res.calls], "errors": res.errors})
        answer = res.content
        if res.errors:  # nothing of this turn runs; the model sees what it wrote and why
            malformed += len(res.errors)
            convo.append({"role": "assistant", "content": raw})
            text = parse_error_result(res.errors)
            steps.append({"tool": None, "arguments": None, "result": text})
            convo.append({"role": "tool", "tool_call_id": "", "content": text})
            emit({"type": "tool", "step": step, "tool": None, "arguments": None,
                  "result": text})
            continue
        if not res.calls:
            finish = "stop"
            convo.append({"role": "assistant", "content": res.content})
            break
        convo.append({"role": "assistant", "content": res.content or None,
                      "tool_calls": [c.to_openai() for c in res.calls]})
        for call in res.calls:
            invalid += _invalid(registry, call.name, call.arguments)
            result = registry.call(call.name, call.arguments)
            steps.append({"tool": call.name, "arguments": call.arguments, "result": result})
            convo.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                          "content": result})
            emit({"type": "tool", "step": step, "tool": call.name, "arguments": call.arguments,
                  "result": result})
    out = AgentResult(answer, steps, convo, finish, malformed, invalid)
    emit({"type": "final", "answer": answer, "finish_reason": finish,
          "tool_calls": out.tool_calls, "malformed_calls": malformed, "invalid_calls": invalid})
    return out

"""Tool-call grammars: the text that opens a call in each chat format and the Lark grammar
(llguidance's dialect) of what follows it, so sampling can be held to the declared tools.

- `lazy_call_grammar(fmt, functions)`: `(trigger, grammar)` for `SamplingParams.lazy_grammar`
  (tool_choice "auto"): text stays free until the model writes the trigger (`CALL_TRIGGERS`),
  then the call must name one of `functions` with arguments valid under its schema.
- `forced_call_prefix` / `forced_call_grammar`: a call the reply must make (tool_choice
  "required" or a named function): the opening written for the model, then the grammar.

Pure text builders over (name, parameters schema) pairs: the server (`serve.chat`), the agent
loop (`tools.agent`) and GRPO rollouts (`posttrain.rollout`) all build their call grammars
here. They need nothing of the engine: the grammar is a string the engine compiles.
"""

from __future__ import annotations

import json
from typing import Any

from llamaworks.chat.formats import hermes_call_text
from llamaworks.chat.parse import CLOSE, OPEN

# JSON as OpenAI's structured outputs, and every chat format's call text, write it
# ({"a": 1, "b": [2, 3]}): no free whitespace, so a model cannot spend its tokens on blanks.
# `infer.grammar` compiles JSON schemas with these defaults; a schema's "x-guidance" overrides.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Where a call begins in each format's text: a tool-call grammar is switched on there (lazily,
# as llama.cpp's lazy grammars), so text before a call stays free. gemma has none: its calls are
# Python code (```tool_code blocks), which the JSON-schema call grammar does not cover, so they
# are parsed after generation only, and a call cannot be forced (`FORCED_CALL_FORMATS`).
CALL_TRIGGERS = {"chatml": OPEN, "mistral": "[TOOL_CALLS]", "llama3": '{"name"'}
FORCED_CALL_FORMATS = ("chatml", "llama2", "llama3", "mistral")

Functions = list[tuple[str, dict[str, Any] | None]]


def has_args_marker(tokenizer: Any) -> bool:
    """Whether the vocabulary spells calls as Mistral Small 3.2 does (`[ARGS]`, a special
    token): the `args_marker` argument of the builders below."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    return token_to_id is not None and token_to_id("[ARGS]") is not None


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


def lazy_call_grammar(fmt: str, functions: Functions, args_marker: bool = False
                      ) -> tuple[str, str] | None:
    """(trigger, grammar of what follows it) for tool_choice "auto": once the model writes the
    trigger, the rest of the call must name a declared tool and follow its schema. None where
    the format has no such grammar (gemma's Python calls, Mistral's `[ARGS]` syntax)."""
    trigger = CALL_TRIGGERS.get(fmt)
    if trigger is None:
        return None
    lead = forced_call_prefix(fmt, None, args_marker)
    if not lead.startswith(trigger):
        return None
    grammar = forced_call_grammar(fmt, functions, args_marker, lead[len(trigger):])
    return None if grammar is None else (trigger, grammar)


def forced_call_grammar(fmt: str, functions: Functions, args_marker: bool = False,
                        lead: str = "") -> str | None:
    """The Lark grammar (llguidance) of what follows `forced_call_prefix(fmt, None)` (after
    `lead`): one of the functions' names, then its arguments under its own parameters schema,
    then the call's end; None for Mistral's `[ARGS]` syntax (a special token, not text)."""
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


def tool_call_grammar(tokenizer: Any, functions: Functions, fmt: str | None = None
                      ) -> tuple[str, str]:
    """`lazy_call_grammar` for a tokenizer's chat format (`fmt`, default `detect_format`) and
    vocabulary; a ValueError naming the format where it has none (gemma)."""
    from llamaworks.chat.formats import detect_format

    fmt = fmt or detect_format(tokenizer)
    grammar = lazy_call_grammar(fmt, functions, has_args_marker(tokenizer))
    if grammar is None:
        raise ValueError(f"chat format {fmt!r} has no tool-call grammar (its calls are not the "
                         "JSON the grammar covers); sample without the grammar")
    return grammar


def schema_functions(tools: list[dict] | None) -> Functions:
    """(name, parameters) of each entry of an OpenAI `tools` list: the builders' `functions`."""
    out: Functions = []
    for t in tools or []:
        fn = t.get("function", t)
        out.append((fn["name"], fn.get("parameters")))
    return out


__all__ = ["CALL_TRIGGERS", "FORCED_CALL_FORMATS", "JSON_LAYOUT", "forced_call_grammar",
           "forced_call_prefix", "has_args_marker", "lazy_call_grammar", "schema_functions",
           "tool_call_grammar"]

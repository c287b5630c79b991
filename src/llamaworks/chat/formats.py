"""Chat formats with tools: ChatML (Hermes/Qwen2.5 tool calls), Llama-3.1 JSON calls, Llama-2,
Mistral (`[TOOL_CALLS]`), Gemma (```` ```tool_code ```` blocks of Python calls).

`render` turns OpenAI-format messages (roles system/user/assistant/tool; assistant `tool_calls`;
tool `tool_call_id` + `content`) into the prompt text a model expects:

- When the model's own jinja template handles tools (it references `tools` or `tool_calls`), that
  template renders everything (through `Tokenizer.apply_chat_template`, which matches
  transformers exactly). Tool-call `arguments` given as JSON strings (OpenAI wire format) are
  parsed into dicts first, because public templates (Qwen2.5, Llama-3.1) `tojson` them.
- Otherwise (e.g. SmolLM2: plain ChatML) the tool parts are rewritten into plain messages in the
  format's canonical convention and the model's own template renders the result, so a conversation
  without tools renders byte-identical to the model's template:
  * chatml: Qwen2.5's convention. Tool schemas go into the system message inside
    `<tools></tools>`; assistant calls become `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
    </tool_call>`; consecutive tool results merge into one user turn of `<tool_response>` blocks.
    The system text is the conversation's system message, else the template's default system
    prompt (SmolLM2's "You are a helpful AI assistant named SmolLM..."), exactly where Qwen2.5
    puts "You are Qwen...".
  * llama3: Llama-3.1's JSON calls. Tool schemas go into the first user message (Llama-3.1's
    default `tools_in_user_message`); a call is `{"name": ..., "parameters": {...}}` as the whole
    assistant turn; results are `ipython` turns holding the JSON-encoded result.
  * llama2: no official convention exists, so Hermes tags inside `[INST]`: schemas appended to the
    `<<SYS>>` system prompt, calls as `<tool_call>` blocks, results as a user turn of
    `<tool_response>` blocks.
- mistral: the model's own template always renders the tools (Mistral's templates all handle
  them: `[AVAILABLE_TOOLS]` before the last user turn, calls after `[TOOL_CALLS]`, results in
  `[TOOL_RESULTS]`). Those templates refuse call ids that are not 9 alphanumeric characters, so
  other ids (OpenAI's `call_...`, ours) are mapped to 9-character ones (`mistral_call_id`), the
  same in the assistant's `tool_calls` and the tool result's `tool_call_id`.
- gemma: Google's Gemma 3 function-calling convention (prompt-only: Gemma's template knows the
  roles user and model only). The tool schemas go into the first user turn, after instructions (in
  our words) to call them as Python code in a ```` ```tool_code ```` block; an assistant's calls
  are that block, one `name(argument=literal, ...)` per line (`gemma_call_text`); consecutive tool
  results merge into one user turn of ```` ```tool_output ```` blocks (with the user message that
  follows them, if any, so that turns still alternate).
- A tokenizer without a template uses the format's canonical template (`CANONICAL_TEMPLATES`;
  for mistral that is Mistral-Nemo-Instruct-2407's own, verbatim; for gemma Gemma 3's, as
  llamaworks ships it for Gemma GGUFs).

`assistant_spans` gives the character spans the assistant produces (for assistant-only SFT loss).
"""

from __future__ import annotations

import copy
import hashlib
import json
import keyword
import math
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

from llamaworks.chat.parse import FENCE, GEMMA_CALL, GEMMA_RESULT
from llamaworks.errors import LlamaworksError
from llamaworks.tokenizer.train import CHATML_TEMPLATE  # the one our trained tokenizers ship

FORMATS = ("chatml", "llama3", "llama2", "mistral", "gemma")

# Meta's Llama-2 chat template (as shipped in meta-llama/Llama-2-7b-chat-hf).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# Llama-3 header format without tool support (Meta-Llama-3-8B-Instruct's template).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

# Mistral-Nemo-Instruct-2407's chat template, verbatim (Apache-2.0): `[TOOL_CALLS]` + a JSON list
# of {"name", "arguments", "id"}; results as `[TOOL_RESULTS]{"content": ..., "call_id": ...}`.
MISTRAL_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 - verbatim

# Gemma 3's chat template (its tokenizer_config.json's; the one Gemma GGUFs get).
GEMMA_TEMPLATE = files("llamaworks.tokenizer").joinpath("templates/gemma3.jinja").read_text()

CANONICAL_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE,
                       "llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE,
                       "gemma": GEMMA_TEMPLATE}

# End-of-turn markers an assistant span ends with (the model generates them; loss includes them).
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|end_of_text|>",
               "<|endoftext|>", "<end_of_turn>")

QWEN_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call>")
LLAMA31_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\nRespond in the format {\"name\": "
    "function name, \"parameters\": dictionary of argument name and its value}.Do not use "
    "variables.\n\n")

# Gemma: instructions in our words for Google's convention (calls as Python code in a tool_code
# block, results in a tool_output block), then the functions' JSON schemas.
GEMMA_TOOLS_PREAMBLE = (
    "You can call the functions described below. To call one or more of them, write a "
    + GEMMA_CALL + " block holding the calls as Python code, one per line, with keyword "
    "arguments whose values are literals:\n" + GEMMA_CALL + "\nfunction_name(argument_name="
    "value)\n" + FENCE + "\nThe results come back in " + GEMMA_RESULT + " blocks; use them to "
    "call more functions or to answer.\n\nThe functions, as JSON schemas:\n```json")
GEMMA_TOOLS_POSTAMBLE = "\n" + FENCE

_SENTINEL = "\u2063llamaworks-sentinel\u2063"


class ChatFormatError(LlamaworksError):
    """Messages that cannot be rendered in the requested chat format."""


# -- helpers ------------------------------------------------------------------------------------
def _tojson(x: Any, indent: int | None = None) -> str:
    """transformers' `tojson` filter (ensure_ascii=False, default separators)."""
    return json.dumps(x, ensure_ascii=False, indent=indent)


def tool_schemas(tools: Any) -> list[dict] | None:
    """Normalize `tools` (None, a list of OpenAI tool dicts, or anything with `.schemas()` such as
    a ToolRegistry) to a list of OpenAI tool dicts, or None when there are none."""
    if tools is None:
        return None
    if hasattr(tools, "schemas"):
        tools = tools.schemas()
    out = [dict(t) for t in tools]
    for t in out:
        if not isinstance(t, Mapping):
            raise ChatFormatError(f"tools must be OpenAI tool dicts, got {type(t).__name__}")
    return out or None


def template_handles_tools(template: str | None) -> bool:
    """True when a jinja chat template references `tools` or `tool_calls`."""
    return bool(template) and re.search(r"\btools\b|\btool_calls\b", template) is not None


def detect_format(tokenizer: Any) -> str:
    """"chatml", "llama3", "llama2", "mistral" or "gemma", from the chat template text, else the
    special tokens. Mistral's templates are `[INST]` ones that also write `[TOOL_CALLS]` or
    `[AVAILABLE_TOOLS]` (Mistral-7B-v0.3, Nemo, Small 3.x); older `[INST]` ones are llama2.
    Gemma's (2 and 3) write `<start_of_turn>`."""
    t = getattr(tokenizer, "chat_template", None) or ""
    if "<|start_header_id|>" in t or "<|eot_id|>" in t:
        return "llama3"
    if "<|im_start|>" in t:
        return "chatml"
    if "<start_of_turn>" in t:
        return "gemma"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "[INST]" in t:
        return "llama2"
    to_id = getattr(tokenizer, "token_to_id", None)
    if to_id is not None:
        if to_id("<|start_header_id|>") is not None:
            return "llama3"
        if to_id("<|im_start|>") is not None:
            return "chatml"
        if to_id("<start_of_turn>") is not None:
            return "gemma"
        if to_id("[TOOL_CALLS]") is not None:
            return "mistral"
        bos_id = getattr(tokenizer, "bos_id", None)
        if bos_id is not None and tokenizer.id_to_token(bos_id) == "<s>":
            return "llama2"
    return "chatml"


def _arguments_dict(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Deep-copied messages with tool-call arguments as dicts (what public templates expect)."""
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatFormatError(f"chat messages must be dicts with a 'role', got {m!r}")
        m = copy.deepcopy(dict(m))
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                if "function" in c:
                    c["function"] = dict(c["function"])
                    c["function"]["arguments"] = _arguments_dict(c["function"].get("arguments"))
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def _uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] in ("tool", "ipython")
                              for m in messages)


def _call_parts(call: Mapping[str, Any]) -> tuple[str, Any]:
    fn = call.get("function", call)
    name = fn.get("name")
    if not isinstance(name, str):
        raise ChatFormatError(f"a tool call has no function name: {call!r}")
    args = fn.get("arguments")
    return name, {} if args is None else args


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         for p in content):
        return "".join(p.get("text", "") for p in content)
    return _tojson(content)


def hermes_call_text(name: str, arguments: Any) -> str:
    """One Hermes/Qwen2.5 tool call: `<tool_call>` + JSON name/arguments + `</tool_call>`."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {_tojson(arguments)}}}\n</tool_call>'


def llama3_call_text(name: str, arguments: Any) -> str:
    """One Llama-3.1 JSON tool call: `{"name": ..., "parameters": {...}}`."""
    return f'{{"name": "{name}", "parameters": {_tojson(arguments)}}}'


def python_literal(value: Any) -> str:
    """A JSON value as Python source: strings in double quotes with JSON's escapes (valid Python
    escapes meaning the same), True/False/None, lists, dicts."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChatFormatError(f"a tool call argument is {value}, which has no literal")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ChatFormatError(f"a tool call argument has non-string keys: {value!r}")
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {python_literal(v)}"
                               for k, v in value.items()) + "}"
    raise ChatFormatError(f"a tool call argument is a {type(value).__name__}, not a JSON value")


def _identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def gemma_call_text(name: str, arguments: Any) -> str:
    """One Gemma tool call as Python: `name(argument=literal, ...)`."""
    if not _identifier(name):
        raise ChatFormatError(f"gemma writes tool calls as Python calls, and {name!r} is not a "
                              "Python identifier")
    if not isinstance(arguments, Mapping):
        raise ChatFormatError(f"tool call {name!r}: arguments must be an object, got "
                              f"{arguments!r}")
    for k in arguments:
        if not _identifier(k):
            raise ChatFormatError(f"tool call {name!r}: argument name {k!r} is not a Python "
                                  "identifier, so it cannot be a keyword argument")
    args = ", ".join(f"{k}={python_literal(v)}" for k, v in arguments.items())
    return f"{name}({args})"


def gemma_calls_block(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant's tool calls as one ```` ```tool_code ```` block, a call per line."""
    return GEMMA_CALL + "\n" + "\n".join(gemma_call_text(*_call_parts(c)) for c in calls) + \
        "\n" + FENCE


def _default_system(tokenizer: Any, template: str) -> str:
    """The system prompt a ChatML template inserts when the conversation has none ("" if none)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}],
                                         add_generation_prompt=False, chat_template=template)
    head = text.split(_SENTINEL, 1)[0]
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", head, re.S)
    return m.group(1) if m else ""


# -- composition into plain messages -------------------------------------------------------------
def _hermes_assistant(m: dict) -> dict:
    calls = "".join("\n" + hermes_call_text(*_call_parts(c)) for c in m["tool_calls"])
    content = _content_text(m.get("content"))
    return {"role": "assistant", "content": content + calls if content else calls[1:]}


def _merge_tool_results(messages: list[dict], role: str) -> list[dict]:
    """Consecutive tool messages -> one `role` turn of `<tool_response>` blocks (Qwen2.5)."""
    out: list[dict] = []
    for m in messages:
        if m["role"] in ("tool", "ipython"):
            block = "\n<tool_response>\n" + _content_text(m.get("content")) + "\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += block
            else:
                out.append({"role": role, "content": block, "_tool_turn": True})
        else:
            out.append(m)
    for m in out:
        if m.pop("_tool_turn", False):
            m["content"] = m["content"][1:]  # the template's own "\n" after the role
    return out


def _compose_chatml(messages: list[dict], tools: list[dict] | None, default_system: str
                    ) -> list[dict]:
    msgs = [_hermes_assistant(m) if m["role"] == "assistant" and m.get("tool_calls")
            else m for m in messages]
    msgs = _merge_tool_results(msgs, "user")
    if tools:
        block = QWEN_TOOLS_PREAMBLE + "".join("\n" + _tojson(t) for t in tools) + \
            QWEN_TOOLS_POSTAMBLE
        if msgs and msgs[0]["role"] == "system":
            system = _content_text(msgs[0].get("content"))
            msgs = msgs[1:]
        else:
            system = default_system
        msgs = [{"role": "system", "content": f"{system}\n\n{block}" if system else block}] + msgs
    return msgs


def _compose_llama2(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    msgs = _compose_chatml(messages, None, "")
    if tools:
        block = QWEN_TOOLS_PREAMBLE + "".join("\n" + _tojson(t) for t in tools) + \
            QWEN_TOOLS_POSTAMBLE
        if msgs and msgs[0]["role"] == "system":
            system = _content_text(msgs[0].get("content"))
            msgs = [{"role": "system", "content": f"{system}\n\n{block}" if system else block}] \
                + msgs[1:]
        else:
            msgs = [{"role": "system", "content": block}] + msgs
    return msgs


def _compose_llama3(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    msgs: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [llama3_call_text(*_call_parts(c)) for c in m["tool_calls"]]
            msgs.append({"role": "assistant", "content": "\n".join(calls)})
        elif m["role"] in ("tool", "ipython"):
            content = m.get("content")
            msgs.append({"role": "ipython", "content": _tojson(content)})
        else:
            msgs.append(m)
    if tools:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if first >= len(msgs) or msgs[first]["role"] != "user":
            raise ChatFormatError("Llama-3.1 puts tool schemas in the first user message, and "
                                  "this conversation has none: start it with a user message")
        schemas = "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
        user = _content_text(msgs[first].get("content")).strip()
        msgs[first] = {**msgs[first], "content": LLAMA31_TOOLS_PREAMBLE + schemas + user}
    return msgs


def _compose_gemma(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    msgs: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            content = _content_text(m.get("content")).strip()
            block = gemma_calls_block(m["tool_calls"])
            msgs.append({"role": "assistant", "content": f"{content}\n{block}" if content
                         else block})
        elif m["role"] in ("tool", "ipython"):
            block = f"{GEMMA_RESULT}\n{_content_text(m.get('content'))}\n{FENCE}"
            if msgs and msgs[-1].get("_tool_turn"):
                msgs[-1]["content"] += "\n" + block
            else:
                msgs.append({"role": "user", "content": block, "_tool_turn": True})
        elif m["role"] == "user" and msgs and msgs[-1].get("_tool_turn"):
            msgs[-1] = {**m, "content": msgs[-1]["content"] + "\n\n" +
                        _content_text(m.get("content"))}
        else:
            msgs.append(m)
    for m in msgs:
        m.pop("_tool_turn", None)
    if tools:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if first >= len(msgs) or msgs[first]["role"] != "user":
            raise ChatFormatError("gemma puts the tool schemas in the first user turn, and this "
                                  "conversation has none: start it with a user message")
        block = GEMMA_TOOLS_PREAMBLE + "".join("\n" + _tojson(t) for t in tools) + \
            GEMMA_TOOLS_POSTAMBLE
        user = _content_text(msgs[first].get("content"))
        msgs[first] = {**msgs[first], "content": f"{block}\n\n{user}"}
    return msgs


_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def mistral_call_id(call_id: Any) -> str:
    """A call id Mistral's templates accept (9 alphanumeric characters): `call_id` itself when it
    is one, else the first 9 hex digits of its SHA-256 (stable, so a call and its result agree)."""
    if isinstance(call_id, str) and _MISTRAL_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256(str(call_id).encode()).hexdigest()[:9]


def _mistral_ids(messages: list[dict]) -> list[dict]:
    """Call ids (assistant `tool_calls[].id`, tool `tool_call_id`) mapped by `mistral_call_id`.
    Missing ones stay missing: the template refuses them with its own message."""
    for m in messages:
        for c in m.get("tool_calls") or []:
            if c.get("id") is not None:
                c["id"] = mistral_call_id(c["id"])
        if m.get("tool_call_id") is not None:
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
    return messages


# -- public API ---------------------------------------------------------------------------------
def _template_for(tokenizer: Any, fmt: str | None) -> tuple[str, str]:
    detected = detect_format(tokenizer)
    fmt = fmt or detected
    if fmt not in FORMATS:
        raise ChatFormatError(f"unknown chat format {fmt!r}; use one of {', '.join(FORMATS)}")
    template = getattr(tokenizer, "chat_template", None)
    if not template or fmt != detected:
        template = CANONICAL_TEMPLATES[fmt]
    return fmt, template


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Any = None,
           add_generation_prompt: bool = False, fmt: str | None = None,
           template_kwargs: Mapping[str, Any] | None = None) -> str:
    """Render OpenAI-format `messages` (and OpenAI `tools` schemas) to prompt text: with the
    model's own template when it handles tools, else in `fmt`'s canonical tool convention on top
    of the model's template (see the module docstring). `fmt` defaults to `detect_format`.
    `template_kwargs`: extra template variables (`enable_thinking`, `reasoning_effort`)."""
    extra = dict(template_kwargs or {})
    fmt, template = _template_for(tokenizer, fmt)
    schemas = tool_schemas(tools)
    msgs = _normalize(messages)
    if fmt == "mistral" and _uses_tools(msgs, schemas):
        msgs = _mistral_ids(msgs)
        if not template_handles_tools(template):
            template = MISTRAL_TEMPLATE
    if not _uses_tools(msgs, schemas) or template_handles_tools(template):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                             tools=schemas, chat_template=template, **extra)
    if fmt == "chatml":
        plain = _compose_chatml(msgs, schemas, _default_system(tokenizer, template))
    elif fmt == "llama3":
        plain = _compose_llama3(msgs, schemas)
    elif fmt == "gemma":
        plain = _compose_gemma(msgs, schemas)
    else:
        plain = _compose_llama2(msgs, schemas)
    return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt,
                                         chat_template=template, **extra)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Any = None,
                    fmt: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character spans of every assistant turn's
    generated part: its content, its tool calls and its end-of-turn marker (e.g. `<|im_end|>`),
    not the role header and not the newline after the marker. For assistant-only SFT loss.

    A turn is located by prefix: the rendering up to it with the generation prompt, then with it.
    Templates whose earlier turns render differently as the conversation grows (Mistral's put the
    tool schemas before the last user turn, and Nemo's the system prompt into it only when it is
    the last message) fall back to `_turn_in_context`: the turn's text as the template renders it
    right after the same history, found in the full text after the previous turn."""
    messages = list(messages)
    full = render(tokenizer, messages, tools, add_generation_prompt=False, fmt=fmt)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise ChatFormatError("the conversation starts with an assistant message; start it "
                                  "with a system or user message")
        prefix = render(tokenizer, messages[:i], tools, add_generation_prompt=True, fmt=fmt)
        upto = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False, fmt=fmt)
        if upto.startswith(prefix) and full.startswith(upto):
            start, piece = len(prefix), upto[len(prefix):]
            piece = piece[:_turn_end(piece)]
        else:
            after = spans[-1][1] if spans else 0
            start, piece = _turn_in_context(tokenizer, messages, i, upto, full, after, tools, fmt)
        spans.append((start, start + len(piece)))
    return full, spans


def _turn_end(piece: str) -> int:
    """Where an assistant turn's rendering ends: after its last end-of-turn marker, else at its
    last non-space character."""
    ends = [piece.rfind(e) + len(e) for e in END_MARKERS if e in piece]
    return max(ends) if ends else len(piece.rstrip())


def _turn_in_context(tokenizer: Any, messages: list[Mapping[str, Any]], i: int, upto: str,
                     full: str, after: int, tools: Any, fmt: str | None) -> tuple[int, str]:
    """(start in `full`, text) of assistant turn `i` for history-dependent templates: the
    history rendered with a placeholder assistant turn (so the template lays it out as it does
    when the conversation does not end on a user turn) is where `upto` (the conversation through
    turn i) has the turn's text; that text is then the first match in `full` after `after`."""
    probe = render(tokenizer, [*messages[:i], {"role": "assistant", "content": _SENTINEL}],
                   tools, add_generation_prompt=False, fmt=fmt)
    before = probe.split(_SENTINEL)[0]
    start = -1
    if probe.count(_SENTINEL) == 1 and upto.startswith(before):
        piece = upto[len(before):]
        piece = piece[:_turn_end(piece)]
        start = full.find(piece, after) if piece else -1
    if start < 0:
        raise ChatFormatError(
            "this chat template renders earlier turns differently as the conversation grows, "
            "so assistant spans cannot be located by prefix; use a template without "
            "history-dependent rewriting")
    return start, piece

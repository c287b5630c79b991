# ruff: noqa: E501
"""Chat formats with tools render exactly as public reference templates do in transformers.

Test data: Qwen2.5-Instruct's chat template (Hermes-style tool calls; Apache-2.0), Meta's
Llama-3.1-Instruct and Meta-Llama-3-Instruct templates, and SmolLM2's own (from its GGUF); and the
models' own templates that llama.cpp ships (Qwen2.5, Qwen3, Llama 3.1/3.2, Mistral Nemo and Small
3.2; extracted by `make test` into .cache/templates)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from llamaworks.chat.formats import assistant_spans, detect_format, mistral_call_id, render
from llamaworks.chat.parse import ToolCallStreamer, parse_tool_calls

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen2.5's template when no tools are given: what a plain-ChatML model with Qwen's default
# system prompt ships (the "model without tool support" our fallback builds on).
QWEN25_PLAIN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen2.5's template with transformers' {% generation %} markers around what the assistant
# generates (content, tool calls, <|im_end|>): the reference for assistant spans.
QWEN25_GENERATION_TEMPLATE = QWEN25_TEMPLATE.replace(
    """        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}""",
    """        {%- if message.role == "assistant" %}
            {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
        {%- endif %}
    {%- elif message.role == "assistant" %}""").replace(
    """        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}""",
    """        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}""").replace(
    """            {{- '\\n<tool_call>\\n{"name": "' }}""",
    """            {%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
            {{- '<tool_call>\\n{"name": "' }}""").replace(
    """            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}""",
    """            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}""")

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")


# -- tests ----------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression — exactly.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. 2**10 / 4"}},
            "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Température à Zürich (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]


def _call(cid: str, name: str, args: dict) -> dict:
    """An OpenAI-format tool call (arguments as a JSON string, as on the wire)."""
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


TOOL_CHAT = [
    {"role": "user", "content": "What is 17*23, and the weather in Zürich?"},
    {"role": "assistant", "content": "Let me check both.", "tool_calls": [
        _call("c1", "calculator", {"expression": "17*23"}),
        _call("c2", "get_weather", {"city": "Zürich"})]},
    {"role": "tool", "tool_call_id": "c1", "content": "391"},
    {"role": "tool", "tool_call_id": "c2", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "17*23 = 391; it is 21 °C in Zürich."},
    {"role": "user", "content": "And 2**10?"},
    {"role": "assistant", "content": None, "tool_calls": [
        _call("c3", "calculator", {"expression": "2**10"})]},
    {"role": "tool", "tool_call_id": "c3", "content": "1024"},
]
SINGLE_CALL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 17*23?"},
    {"role": "assistant", "content": None, "tool_calls": [
        _call("c1", "calculator", {"expression": "17*23"})]},
    {"role": "tool", "tool_call_id": "c1", "content": "391"},
    {"role": "assistant", "content": "391."},
]
PLAIN_CHAT = [
    {"role": "system", "content": "You are terse. Ünïcødé: 日本語 🦙"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "  And <b>3*3</b>?  \n"},
]


def _dict_args(messages: list[dict]) -> list[dict]:
    """The same conversation with arguments as dicts: what public templates expect."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return [{k: v for k, v in m.items() if v is not None} for m in out]


def _hf(template: str, tok, messages, tools=None, add_generation_prompt=False) -> str:
    """transformers' own rendering (what apply_chat_template(tokenize=False) returns)."""
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        **tok.special_token_strings())
    return rendered[0]


def _with_template(tok, template: str):
    t = copy.copy(tok)
    t.chat_template = template
    return t


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("messages", [PLAIN_CHAT, PLAIN_CHAT[1:], PLAIN_CHAT[1:2]])
def test_chat_without_tools_renders_exactly_as_smollm2_template(smollm_tokenizer, messages, gen):
    want = _hf(smollm_tokenizer.chat_template, smollm_tokenizer, messages,
               add_generation_prompt=gen)
    assert render(smollm_tokenizer, messages, add_generation_prompt=gen) == want


def test_smollm2_is_chatml_without_tool_support(smollm_tokenizer):
    assert detect_format(smollm_tokenizer) == "chatml"
    assert "tool" not in smollm_tokenizer.chat_template


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("messages", [TOOL_CHAT, SINGLE_CALL_CHAT, TOOL_CHAT[:1]])
def test_plain_chatml_model_renders_tools_exactly_as_qwen25_template(smollm_tokenizer,
                                                                    messages, gen):
    """A ChatML model without tool support (Qwen2.5's template minus its tool branches) renders
    tools, calls and results exactly as Qwen2.5's full template does in transformers."""
    plain = _with_template(smollm_tokenizer, QWEN25_PLAIN_TEMPLATE)
    want = _hf(QWEN25_TEMPLATE, smollm_tokenizer, _dict_args(messages), TOOLS, gen)
    assert render(plain, messages, TOOLS, add_generation_prompt=gen) == want


def test_smollm2_tool_prompt_keeps_its_default_system_prompt(smollm_tokenizer):
    text = render(smollm_tokenizer, TOOL_CHAT[:1], TOOLS, add_generation_prompt=True)
    qwen = _hf(QWEN25_TEMPLATE, smollm_tokenizer, TOOL_CHAT[:1], TOOLS, True)
    assert text == qwen.replace("You are Qwen, created by Alibaba Cloud. You are a helpful "
                                "assistant.", "You are a helpful AI assistant named SmolLM, "
                                "trained by Hugging Face")


@pytest.mark.parametrize("template,messages", [
    (QWEN25_TEMPLATE, TOOL_CHAT), (QWEN25_TEMPLATE, PLAIN_CHAT),
    (LLAMA31_TEMPLATE, SINGLE_CALL_CHAT), (LLAMA31_TEMPLATE, PLAIN_CHAT)])
def test_tool_aware_template_is_used_as_is(smollm_tokenizer, template, messages):
    """Templates that handle tools render through transformers' semantics; OpenAI's JSON-string
    arguments are handed to them as objects."""
    tok = _with_template(smollm_tokenizer, template)
    for gen in (False, True):
        want = _hf(template, tok, _dict_args(messages), TOOLS, gen)
        assert render(tok, messages, TOOLS, add_generation_prompt=gen) == want


def test_llama3_template_without_tools_renders_tool_turns_as_llama31(smollm_tokenizer):
    """Meta-Llama-3's template has no tool support; from the first user turn on, the tool
    schemas, the JSON call and the ipython result render exactly as Llama-3.1's template."""
    tok = _with_template(smollm_tokenizer, LLAMA3_TEMPLATE)
    assert detect_format(tok) == "llama3"
    ours = render(tok, SINGLE_CALL_CHAT, TOOLS, add_generation_prompt=True)
    ref = _hf(LLAMA31_TEMPLATE, tok, _dict_args(SINGLE_CALL_CHAT), TOOLS, True)
    marker = "<|start_header_id|>user<|end_header_id|>"
    assert ours[ours.index(marker):] == ref[ref.index(marker):]
    assert render(tok, PLAIN_CHAT) == _hf(LLAMA3_TEMPLATE, tok, PLAIN_CHAT)


def test_llama2_renders_plain_chat_exactly_and_tool_calls_round_trip(smollm_tokenizer):
    from llamaworks.chat.formats import LLAMA2_TEMPLATE

    tok = _with_template(smollm_tokenizer, LLAMA2_TEMPLATE)
    assert detect_format(tok) == "llama2"
    assert render(tok, PLAIN_CHAT) == _hf(LLAMA2_TEMPLATE, tok, PLAIN_CHAT)
    text = render(tok, SINGLE_CALL_CHAT, TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in text
    reply = text.split("[/INST]")[1].split(tok.special_token_strings()["eos_token"])[0]
    (call,) = parse_tool_calls(reply, "llama2").calls
    assert (call.name, call.arguments) == ("calculator", {"expression": "17*23"})
    assert "[INST] <tool_response>\n391\n</tool_response> [/INST] 391." in text


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "llama2"])
def test_rendered_tool_call_parses_back_to_the_same_call(smollm_tokenizer, fmt):
    msgs = SINGLE_CALL_CHAT[:2]
    prompt = render(smollm_tokenizer, msgs, TOOLS, add_generation_prompt=True, fmt=fmt)
    full = render(smollm_tokenizer, SINGLE_CALL_CHAT[:3], TOOLS, fmt=fmt)
    assert full.startswith(prompt)
    res = parse_tool_calls(full[len(prompt):].split("<|im_end|>")[0].split("<|eot_id|>")[0],
                           fmt)
    assert [(c.name, c.arguments) for c in res.calls] == [("calculator",
                                                           {"expression": "17*23"})]
    assert res.errors == []


def test_assistant_spans_match_transformers_generation_mask(smollm_tokenizer):
    """Spans equal transformers' {% generation %} indices on Qwen2.5's template."""
    tok = _with_template(smollm_tokenizer, QWEN25_GENERATION_TEMPLATE)
    msgs = _dict_args(TOOL_CHAT) + [{"role": "assistant", "content": "1024."}]
    plain = _hf(QWEN25_TEMPLATE, tok, msgs, TOOLS)
    rendered, indices = render_jinja_template([msgs], tools=TOOLS,
                                              chat_template=QWEN25_GENERATION_TEMPLATE,
                                              return_assistant_tokens_mask=True,
                                              **tok.special_token_strings())
    assert rendered[0] == plain  # the markers change nothing in the text
    text, spans = assistant_spans(tok, TOOL_CHAT + [msgs[-1]], TOOLS)
    assert text == plain
    assert spans == [tuple(s) for s in indices[0]]


def test_assistant_spans_on_smollm2_cover_calls_and_end_of_turn(smollm_tokenizer):
    text, spans = assistant_spans(smollm_tokenizer, SINGLE_CALL_CHAT, TOOLS)
    assert text == render(smollm_tokenizer, SINGLE_CALL_CHAT, TOOLS)
    assert [text[a:b] for a, b in spans] == [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n'
        '</tool_call><|im_end|>', "391.<|im_end|>"]


def test_assistant_spans_on_llama31_cover_the_json_call_and_eot(smollm_tokenizer):
    tok = _with_template(smollm_tokenizer, LLAMA31_TEMPLATE)
    text, spans = assistant_spans(tok, SINGLE_CALL_CHAT, TOOLS)
    assert text == _hf(LLAMA31_TEMPLATE, tok, _dict_args(SINGLE_CALL_CHAT), TOOLS)
    assert [text[a:b] for a, b in spans] == [
        '{"name": "calculator", "parameters": {"expression": "17*23"}}<|eot_id|>',
        "391.<|eot_id|>"]


# -- the models' own templates (llama.cpp ships them: models/templates/*.jinja) -------------------
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / ".cache" / "templates"
NEMO, SMALL32 = "mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506"


def real_template(name: str) -> str:
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test` (it extracts llama.cpp's "
                    "models/templates/ from the llama-cpp-python source distribution)")
    return path.read_text()


@pytest.fixture(scope="module")
def spm_tokenizer(vocab_dir):
    """Llama's SentencePiece vocabulary (Mistral-7B's too): `<s>` and `</s>` as Mistral's."""
    from llamaworks.tokenizer import Tokenizer

    return Tokenizer.from_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")


@pytest.mark.parametrize("name,fmt", [
    ("Qwen-Qwen2.5-7B-Instruct", "chatml"), ("Qwen-Qwen3-0.6B", "chatml"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3"), ("meta-llama-Llama-3.2-3B-Instruct", "llama3"),
    (NEMO, "mistral"), (SMALL32, "mistral")])
def test_detect_format_on_the_models_own_templates(smollm_tokenizer, name, fmt):
    assert detect_format(_with_template(smollm_tokenizer, real_template(name))) == fmt


# OpenAI wire format: call ids of any shape, arguments as JSON strings, content None on calls.
PARALLEL_CHAT = [
    {"role": "user", "content": "What is 17*23, and the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        _call("call_9f8e7d6c5b4a39281706f5e4", "calculator", {"expression": "17*23"}),
        _call("c2", "get_weather", {"city": "Zürich"})]},
    {"role": "tool", "tool_call_id": "call_9f8e7d6c5b4a39281706f5e4", "content": "391"},
    {"role": "tool", "tool_call_id": "c2", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "391, and 21 °C."},
    {"role": "user", "content": "And 2**10?"},
]


def _emitted(template: str, tok, messages: list[dict], i: int, eos: str) -> str:
    """What the model generates for assistant turn `i`, by the template itself (transformers):
    the rendering up to turn i minus the prompt before it, without the end-of-turn token."""
    prompt = _hf(template, tok, messages[:i], TOOLS, add_generation_prompt=True)
    full = _hf(template, tok, messages[:i + 1], TOOLS)
    assert full.startswith(prompt)
    return full[len(prompt):].removesuffix(eos)


def _with_calls(messages: list[dict], i: int, calls) -> list[dict]:
    """Turn i replaced by an assistant message carrying the parsed calls (as a server returns
    them), tool results answering them in order."""
    out = copy.deepcopy(messages)
    out[i] = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}
    results = [m for m in out[i + 1:] if m["role"] == "tool"]
    for m, c in zip(results, calls, strict=False):
        m["tool_call_id"] = c.id
    return out


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B"])
def test_qwen_templates_use_hermes_calls_that_round_trip(smollm_tokenizer, name):
    """Qwen2.5/Qwen3 render tools through their own template (as transformers does); the calls
    they render parse as chatml and render back to the same text, whole and streamed."""
    template = real_template(name)
    tok = _with_template(smollm_tokenizer, template)
    chat = [dict(m, content=m["content"] or "") for m in PARALLEL_CHAT]  # Qwen3 reads .content
    for gen in (False, True):
        assert render(tok, chat, TOOLS, add_generation_prompt=gen) == \
            _hf(template, tok, _dict_args(chat), TOOLS, gen)
    emitted = _emitted(template, tok, _dict_args(chat), 1, "<|im_end|>\n")
    res = parse_tool_calls(emitted, "chatml")
    assert ([(c.name, c.arguments) for c in res.calls], res.errors) == (
        [("calculator", {"expression": "17*23"}), ("get_weather", {"city": "Zürich"})], [])
    back = _with_calls(chat, 1, res.calls)
    back[1]["content"] = ""
    assert render(tok, back, TOOLS) == _hf(template, tok, _dict_args(chat), TOOLS)
    streamer = ToolCallStreamer("chatml")  # Qwen3's reply opens with an empty think block
    assert "".join(streamer.feed(ch) for ch in emitted).strip() == res.content == (
        "<think>\n\n</think>" if "Qwen3" in name else "")
    assert [(c.name, c.arguments) for c in streamer.finish().calls] == \
        [(c.name, c.arguments) for c in res.calls]


@pytest.mark.parametrize("name", [NEMO, SMALL32])
def test_mistral_templates_render_openai_conversations(spm_tokenizer, name):
    """Mistral's templates refuse call ids that are not 9 alphanumeric characters; render maps
    OpenAI's ids so that a call and its result agree, and is otherwise the template's own
    rendering in transformers (tools, calls, results, generation prompt)."""
    template = real_template(name)
    tok = _with_template(spm_tokenizer, template)
    with pytest.raises(Exception, match="length 9"):
        _hf(template, tok, _dict_args(PARALLEL_CHAT), TOOLS)
    want = _dict_args(PARALLEL_CHAT)
    for m in want:
        for c in m.get("tool_calls") or []:
            c["id"] = mistral_call_id(c["id"])
        if m["role"] == "tool":
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
    assert [c["id"] for c in want[1]["tool_calls"]] == [want[2]["tool_call_id"],
                                                      want[3]["tool_call_id"]]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in want[1]["tool_calls"])
    for gen in (False, True):
        text = render(tok, PARALLEL_CHAT, TOOLS, add_generation_prompt=gen)
        assert text == _hf(template, tok, want, TOOLS, gen)
        assert "[AVAILABLE_TOOLS]" in text and "[TOOL_CALLS]" in text and "[TOOL_RESULTS]" in text


@pytest.mark.parametrize("name", [NEMO, SMALL32])
def test_mistral_tool_calls_round_trip_through_the_template(spm_tokenizer, name):
    """What the template renders for an assistant's calls (Nemo: `[TOOL_CALLS][{...}, {...}]`,
    Small 3.2: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` per call) parses as mistral, whole and
    streamed, and the parsed calls (with their ids) render back to the same text, results too."""
    template = real_template(name)
    tok = _with_template(spm_tokenizer, template)
    chat = copy.deepcopy(PARALLEL_CHAT)
    for m in chat:  # ids the templates accept, as a Mistral model writes them
        for c in m.get("tool_calls") or []:
            c["id"] = mistral_call_id(c["id"])
        if m["role"] == "tool":
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
    emitted = _emitted(template, tok, _dict_args(chat), 1, "</s>")
    assert emitted.startswith("[TOOL_CALLS]")
    res = parse_tool_calls(emitted, "mistral")
    assert ([(c.id, c.name, c.arguments) for c in res.calls], res.content, res.errors) == (
        [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
         for c in chat[1]["tool_calls"]], "", [])
    assert render(tok, _with_calls(chat, 1, res.calls), TOOLS) == \
        _hf(template, tok, _dict_args(chat), TOOLS)
    streamer = ToolCallStreamer("mistral")
    assert "".join(streamer.feed(ch) for ch in "On it. " + emitted) == "On it. "
    final = streamer.finish()
    assert [(c.id, c.name, c.arguments) for c in final.calls] == \
        [(c.id, c.name, c.arguments) for c in res.calls]
    assert final.content == "On it." and streamer.remaining_content(final) == ""


def test_canonical_mistral_template_is_nemos_own(smollm_tokenizer, spm_tokenizer):
    """fmt="mistral" on a model without a Mistral template renders with Nemo's, verbatim."""
    from llamaworks.chat.formats import MISTRAL_TEMPLATE

    assert MISTRAL_TEMPLATE == real_template(NEMO)
    chat = SINGLE_CALL_CHAT[1:]
    want = _dict_args(chat)
    want[1]["tool_calls"][0]["id"] = want[2]["tool_call_id"] = mistral_call_id("c1")
    assert render(spm_tokenizer, chat, TOOLS, fmt="mistral") == \
        _hf(real_template(NEMO), spm_tokenizer, want, TOOLS)


def _generation_marked(template: str, branches: list[tuple[str, str]]) -> str:
    """`template` with transformers' {% generation %} markers around each assistant branch: the
    text between `open_line` (the branch's `elif`) and `next_line` (the following one)."""
    for open_line, next_line in branches:
        assert template.count(open_line) == 1 and template.count(next_line) == 1
        template = template.replace(open_line, open_line + "\n        {%- generation %}")
        template = template.replace(next_line, "{%- endgeneration %}\n    " + next_line)
    return template


NEMO_ASSISTANT_BRANCHES = [
    ('{%- elif (message.tool_calls is defined and message.tool_calls is not none) %}',
     '{%- elif message["role"] == "assistant" %}'),
    ('{%- elif message["role"] == "assistant" %}',
     '{%- elif message["role"] == "tool_results" or message["role"] == "tool" %}')]
SMALL32_ASSISTANT_BRANCHES = [
    ("{%- elif message['role'] == 'assistant' %}",
     "{%- elif message['role'] == 'tool_results' or message['role'] == 'tool' %}")]
MISTRAL_SFT_CHATS = {
    "system, call, result, answer": SINGLE_CALL_CHAT,
    "parallel calls, two user turns": PARALLEL_CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            _call("call_0a1b2c3d4e5f60718293a4b5", "calculator", {"expression": "2**10"})]},
        {"role": "tool", "tool_call_id": "call_0a1b2c3d4e5f60718293a4b5", "content": "1024"},
        {"role": "assistant", "content": "1024."}],
}


def _mistral_ids_mapped(messages: list[dict]) -> list[dict]:
    out = _dict_args(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["id"] = mistral_call_id(c["id"])
        if m["role"] == "tool":
            m["tool_call_id"] = mistral_call_id(m["tool_call_id"])
    return out


@pytest.mark.parametrize("chat", MISTRAL_SFT_CHATS.values(), ids=MISTRAL_SFT_CHATS.keys())
@pytest.mark.parametrize("name,branches", [(NEMO, NEMO_ASSISTANT_BRANCHES),
                                           (SMALL32, SMALL32_ASSISTANT_BRANCHES)],
                         ids=["nemo", "small3.2"])
def test_assistant_spans_on_mistral_match_transformers_generation_mask(spm_tokenizer, name,
                                                                       branches, chat):
    """Mistral's templates put the tool schemas before the last user turn (and Nemo's the system
    prompt into it only when it ends the conversation), so the spans cannot come from prefix
    renderings; they still equal transformers' {% generation %} indices on the template with its
    assistant branches marked: `[TOOL_CALLS]...` and the answers, each with its `</s>`."""
    template = real_template(name)
    marked = _generation_marked(template, branches)
    tok = _with_template(spm_tokenizer, template)
    want = _mistral_ids_mapped(chat)
    rendered, indices = render_jinja_template([want], tools=TOOLS, chat_template=marked,
                                              return_assistant_tokens_mask=True,
                                              **tok.special_token_strings())
    assert rendered[0] == _hf(template, tok, want, TOOLS)  # the markers change nothing
    text, spans = assistant_spans(tok, chat, TOOLS)
    assert text == rendered[0]
    assert spans == [tuple(s) for s in indices[0]]
    pieces = [text[a:b] for a, b in spans]
    n_assistant = sum(m["role"] == "assistant" for m in chat)
    assert len(pieces) == n_assistant and all(p.endswith("</s>") for p in pieces)
    assert pieces[0].startswith("[TOOL_CALLS]")
    assert not any("[TOOL_RESULTS]" in p or "[INST]" in p for p in pieces)


def test_assistant_spans_with_fmt_mistral_use_nemos_template(spm_tokenizer):
    """fmt="mistral" on a tokenizer without a Mistral template (the canonical template is Nemo's
    own): the same spans as on the model's own Nemo template."""
    chat = MISTRAL_SFT_CHATS["parallel calls, two user turns"]
    ours = assistant_spans(spm_tokenizer, chat, TOOLS, fmt="mistral")
    assert ours == assistant_spans(_with_template(spm_tokenizer, real_template(NEMO)), chat,
                                   TOOLS)
    text, spans = ours
    assert [text[a:b] for a, b in spans][1:] == ["391, and 21 °C.</s>",
                                                 '[TOOL_CALLS][{"name": "calculator", '
                                                 '"arguments": {"expression": "2**10"}, "id": "'
                                                 + mistral_call_id("call_0a1b2c3d4e5f60718293a4b5")
                                                 + '"}]</s>', "1024.</s>"]

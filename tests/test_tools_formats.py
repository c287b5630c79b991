# ruff: noqa: E501
"""Chat formats with tools render exactly as public reference templates do in transformers.

Test data: Qwen2.5-Instruct's chat template (Hermes-style tool calls; Apache-2.0), Meta's
Llama-3.1-Instruct and Meta-Llama-3-Instruct templates, and SmolLM2's own (from its GGUF)."""

from __future__ import annotations

import copy
import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from llamaworks.tools.formats import assistant_spans, detect_format, render
from llamaworks.tools.parse import parse_tool_calls

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
    from llamaworks.tools.formats import LLAMA2_TEMPLATE

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

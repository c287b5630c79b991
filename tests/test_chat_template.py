"""Chat rendering equals transformers' `apply_chat_template(tokenize=False)`, for the SmolLM2 GGUF's
own template and for Llama-3 and Llama-2 style templates (test data below), loaded in transformers
from the files `Tokenizer.save` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaworks.errors import TokenizerError
from llamaworks.tokenizer import Tokenizer

# Llama 3.1-style template: tools as JSON (tojson indent=4), tool calls, ipython role,
# strftime_now for the date, raise_exception, bos_token.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. " }}
    {{- "To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, ' }}
    {{- '"parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no "
                            ~ "first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, ' }}
    {{- '"parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
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

# Llama 2 chat template ([INST] / <<SYS>>), as in Llama-2-chat's tokenizer_config.json.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température actuelle à un endroit (°C) — “quoted”",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Ville, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]},
    },
}]

MULTI_TURN = [
    {"role": "system", "content": "You are terse. Ünïcødé is fine: 日本語 🦙"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "tool_calls": None},
    {"role": "user", "content": "  And <b>3*3</b>?  \n"},
]
USER_FIRST = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]},
    {"role": "tool", "content": {"temperature": 21.5, "sky": "clear"}},
    {"role": "assistant", "content": "21.5 °C and clear."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return Tokenizer.from_gguf(smollm_gguf)


@pytest.fixture(scope="module")
def llama3(vocab_dir):
    return Tokenizer.from_gguf(vocab_dir / "ggml-vocab-llama-bpe.gguf")


@pytest.fixture(scope="module")
def llama2(vocab_dir):
    return Tokenizer.from_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")


def _hf(tok: Tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    tok.save(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def smollm_hf(smollm, tmp_path_factory):
    return _hf(smollm, tmp_path_factory)


@pytest.fixture(scope="module")
def llama3_hf(llama3, tmp_path_factory):
    return _hf(llama3, tmp_path_factory)


@pytest.fixture(scope="module")
def llama2_hf(llama2, tmp_path_factory):
    return _hf(llama2, tmp_path_factory)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [MULTI_TURN, USER_FIRST], ids=["system", "no_system"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_smollm2_gguf_template_renders_like_transformers(smollm, smollm_hf, messages,
                                                         add_generation_prompt, tools):
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template
    ours = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tools=tools)
    theirs = smollm_hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tools=tools, tokenize=False)
    assert ours == theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [MULTI_TURN, USER_FIRST, TOOL_CONVERSATION],
                         ids=["system", "no_system", "tool_calls"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
@pytest.mark.parametrize("extra", [{"date_string": "01 Feb 2025"},
                                   {"date_string": "01 Feb 2025", "tools_in_user_message": False}],
                         ids=["tools_in_user", "tools_in_system"])
@pytest.mark.slow
def test_llama3_template_renders_like_transformers(llama3, llama3_hf, messages,
                                                   add_generation_prompt, tools, extra):
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools,
                  chat_template=LLAMA3_TEMPLATE, **extra)
    ours = llama3.apply_chat_template(messages, **kwargs)
    theirs = llama3_hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system")


def test_llama3_template_strftime_now_gives_todays_date_like_transformers(llama3, llama3_hf):
    ours = llama3.apply_chat_template(USER_FIRST, chat_template=LLAMA3_TEMPLATE)
    theirs = llama3_hf.apply_chat_template(USER_FIRST, chat_template=LLAMA3_TEMPLATE,
                                           tokenize=False, add_generation_prompt=True)
    assert ours == theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [MULTI_TURN, USER_FIRST], ids=["system", "no_system"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_llama2_inst_template_renders_like_transformers(llama2, llama2_hf, messages,
                                                        add_generation_prompt, tools):
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools,
                  chat_template=LLAMA2_TEMPLATE)
    ours = llama2.apply_chat_template(messages, **kwargs)
    theirs = llama2_hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == theirs
    assert ours.startswith("<s>[INST] ")


def test_llama2_template_raise_exception_becomes_tokenizer_error(llama2, llama2_hf):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        llama2.apply_chat_template(bad, chat_template=LLAMA2_TEMPLATE)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        llama2_hf.apply_chat_template(bad, chat_template=LLAMA2_TEMPLATE, tokenize=False)


@pytest.mark.parametrize("template", [
    "{{ messages | tojson }}",
    "{{ messages | tojson(indent=2) }}|{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }} {{ dict(a=1) | tojson }} {{ bos_token }}{{ eos_token }}{{ pad_token }}",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}{{ custom_var }}",
])
def test_jinja_environment_features_render_like_transformers(smollm, smollm_hf, template):
    kwargs = dict(chat_template=template, tools=TOOLS, custom_var="x<y")
    ours = smollm.apply_chat_template(MULTI_TURN, **kwargs)
    theirs = smollm_hf.apply_chat_template(MULTI_TURN, tokenize=False, **kwargs)
    assert ours == theirs


# -- the models' own templates (llama.cpp ships them: models/templates/*.jinja) ------------------
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / ".cache" / "templates"
# The special-token strings each model's tokenizer_config.json gives its template.
REAL_TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": {"eos_token": "<|im_end|>"},
    "Qwen-Qwen3-0.6B": {"eos_token": "<|im_end|>"},
    "mistralai-Mistral-Nemo-Instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
    "Mistral-Small-3.2-24B-Instruct-2506": {"bos_token": "<s>", "eos_token": "</s>"},
    "meta-llama-Llama-3.1-8B-Instruct": {"bos_token": "<|begin_of_text|>",
                                         "eos_token": "<|eot_id|>"},
    "meta-llama-Llama-3.2-3B-Instruct": {"bos_token": "<|begin_of_text|>",
                                         "eos_token": "<|eot_id|>"},
    "google-gemma-2-2b-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": {"bos_token": "<｜begin▁of▁sentence｜>",
                                                 "eos_token": "<｜end▁of▁sentence｜>"},
}


def real_template(name: str) -> str:
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test` (it extracts llama.cpp's "
                    "models/templates/ from the llama-cpp-python source distribution)")
    return path.read_text()


def _tool_call(cid: str, name: str, args: dict) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


# Mistral's templates want 9-character alphanumeric call ids; Qwen3's wants assistant content.
TOOL_ROUND_TRIP = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        _tool_call("aB3dE6gH9", "get_weather", {"city": "Zürich", "unit": "celsius"})]},
    {"role": "tool", "tool_call_id": "aB3dE6gH9", "content": '{"temperature": 21.5}'},
    {"role": "assistant", "content": "21.5 °C."},
    {"role": "user", "content": "And in Paris and Oslo?"},
]
PARALLEL_CALLS = [
    {"role": "user", "content": "Paris and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        _tool_call("call00001", "get_weather", {"city": "Paris"}),
        _tool_call("call00002", "get_weather", {"city": "Oslo"})]},
    {"role": "tool", "tool_call_id": "call00001", "content": "18"},
    {"role": "tool", "tool_call_id": "call00002", "content": "9"},
]
REAL_CHATS = {"system": MULTI_TURN[:2] + [{"role": "assistant", "content": "4"}] + MULTI_TURN[3:],
              "no_system": USER_FIRST, "tool_calls": TOOL_ROUND_TRIP, "parallel": PARALLEL_CALLS}
# What the templates themselves refuse (raise_exception): transformers and we must both refuse.
REFUSED = {("google-gemma-2-2b-it", c) for c in ("system", "tool_calls", "parallel")} | {
    (f"meta-llama-Llama-3.{v}", "parallel") for v in ("1-8B-Instruct", "2-3B-Instruct")}


@pytest.fixture(scope="module")
def hf_tokenizer_file(smollm, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("real_templates")
    smollm.save(folder)
    return str(folder / "tokenizer.json")


def _outcome(fn) -> tuple[str, str]:
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError / our TokenizerError
        return "refused", str(e).removeprefix("the chat template refused these messages: ")


@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {"enable_thinking": True},
                                    {"reasoning_effort": "low"}])
def test_template_variables_reach_qwen3_as_in_transformers(hf_tokenizer_file, kwargs):
    """chat_template_kwargs (Qwen3's enable_thinking) render as transformers renders them."""
    from transformers import PreTrainedTokenizerFast

    from llamaworks.tokenizer.chat import render_chat

    name = "Qwen-Qwen3-0.6B"
    hf = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_file, **REAL_TEMPLATES[name])
    hf.chat_template = real_template(name)
    theirs = hf.apply_chat_template(MULTI_TURN, add_generation_prompt=True, tokenize=False,
                                    **kwargs)
    assert render_chat(hf.chat_template, MULTI_TURN, add_generation_prompt=True,
                       special_tokens=hf.special_tokens_map, **kwargs) == theirs
    assert ("</think>" in theirs[-20:]) == (kwargs.get("enable_thinking") is False)


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(REAL_CHATS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_real_model_templates_render_like_transformers(hf_tokenizer_file, name, tools, chat,
                                                       add_generation_prompt):
    """The models' own templates (Qwen2.5, Qwen3, Mistral Nemo, Mistral Small 3.2, Llama 3.1 and
    3.2, Gemma 2) render system prompts, multi-turn chats, tool schemas, assistant tool calls and
    tool results exactly as transformers' apply_chat_template(tokenize=False); conversations a
    template refuses are refused by both with the template's message."""
    from transformers import PreTrainedTokenizerFast

    from llamaworks.tokenizer.chat import render_chat

    template, special = real_template(name), REAL_TEMPLATES[name]
    hf = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_file, **special)
    hf.chat_template = template
    messages = REAL_CHATS[chat]
    theirs = _outcome(lambda: hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False))
    ours = _outcome(lambda: render_chat(template, messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        special_tokens=hf.special_tokens_map))
    assert theirs[0] == ("refused" if (name, chat) in REFUSED else "ok"), theirs
    assert ours == theirs

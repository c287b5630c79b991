"""The gemma chat format: Google's Gemma 3 function-calling convention (calls as Python code in
```tool_code blocks, results in ```tool_output blocks, tools described in the first user turn) on
top of Gemma's own chat template, which knows the roles user and model only.

References: transformers rendering Gemma 3's template (the one llamaworks ships for Gemma GGUFs,
from its tokenizer_config.json) and Gemma 2's (llama.cpp's models/templates, in .cache/templates),
transformers' {% generation %} mask for the assistant spans, and the real Gemma-3-270M tokenizer
(`make test` installs it) for detection. Parsing reads the code with `ast` and never runs it."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
from test_chat_formats import PARALLEL_CHAT, PLAIN_CHAT, SINGLE_CALL_CHAT, TOOL_CHAT, TOOLS
from transformers.utils.chat_template_utils import render_jinja_template

from llamaworks.chat import formats, parse
from llamaworks.chat.formats import (
    GEMMA_TEMPLATE,
    GEMMA_TOOLS_POSTAMBLE,
    GEMMA_TOOLS_PREAMBLE,
    ChatFormatError,
    assistant_spans,
    detect_format,
    gemma_call_text,
    render,
)
from llamaworks.chat.parse import ToolCallStreamer, parse_tool_calls

GEMMA2 = Path(__file__).resolve().parents[1] / ".cache" / "templates" / "google-gemma-2-2b-it.jinja"


@pytest.fixture(scope="module")
def gemma_tok():
    """The real Gemma-3-270M tokenizer (its GGUF has no template: Gemma 3's is used)."""
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import model_path

    try:
        path = model_path("gemma3-270m")
    except Exception as e:  # noqa: BLE001 - make test installs it: missing is a setup error
        pytest.fail(f"gemma3-270m is not available: {e}")
    return load_tokenizer(path)


def _hf(template: str, tok, messages, add_generation_prompt=False, **kw) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        **tok.special_token_strings(), **kw)
    return rendered[0]


def _calls(res) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in res.calls]


def _with_template(tok, template):
    t = copy.copy(tok)
    t.chat_template = template
    return t


# -- detection ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_detect_format_picks_gemma_for_gemma_tokenizers(gemma_tok):
    assert gemma_tok.chat_template == GEMMA_TEMPLATE
    assert detect_format(gemma_tok) == "gemma"
    assert detect_format(_with_template(gemma_tok, GEMMA2.read_text())) == "gemma"
    assert detect_format(_with_template(gemma_tok, None)) == "gemma"  # by <start_of_turn>
    assert formats.CANONICAL_TEMPLATES["gemma"] == GEMMA_TEMPLATE


def test_the_two_format_lists_agree():
    assert formats.FORMATS == parse.FORMATS and "gemma" in formats.FORMATS


# -- rendering ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("messages", [PLAIN_CHAT, PLAIN_CHAT[1:], PLAIN_CHAT[1:2]])
def test_chat_without_tools_renders_exactly_as_gemmas_template(gemma_tok, messages, gen):
    for template in (GEMMA_TEMPLATE, GEMMA2.read_text()):
        tok = _with_template(gemma_tok, template)
        if template != GEMMA_TEMPLATE and messages[0]["role"] == "system":
            for fmt in (None, "gemma"):  # Gemma 2's template refuses system messages
                with pytest.raises(Exception, match="System role not supported"):
                    render(tok, messages, add_generation_prompt=gen, fmt=fmt)
            continue
        want = _hf(template, tok, messages, gen)
        assert render(tok, messages, add_generation_prompt=gen) == want
        assert render(tok, messages, add_generation_prompt=gen, fmt="gemma") == want


def _tools_block() -> str:
    return GEMMA_TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False)
                                          for t in TOOLS) + GEMMA_TOOLS_POSTAMBLE


@pytest.mark.slow
@pytest.mark.parametrize("gen", [False, True])
def test_tool_conversation_is_gemmas_template_over_user_and_model_turns(gemma_tok, gen):
    """Tools in the first user turn, calls as one tool_code block (a call per line, after the
    content), consecutive results as one user turn of tool_output blocks: exactly what Gemma's
    template renders for those plain user/model turns in transformers."""
    plain = [
        {"role": "user", "content": _tools_block() + "\n\n" + TOOL_CHAT[0]["content"]},
        {"role": "assistant", "content": 'Let me check both.\n```tool_code\ncalculator('
         'expression="17*23")\nget_weather(city="Zürich")\n```'},
        {"role": "user", "content": '```tool_output\n391\n```\n```tool_output\n{"temp_c": 21}'
         "\n```"},
        TOOL_CHAT[4], TOOL_CHAT[5],
        {"role": "assistant", "content": '```tool_code\ncalculator(expression="2**10")\n```'},
        {"role": "user", "content": "```tool_output\n1024\n```"}]
    assert render(gemma_tok, TOOL_CHAT, TOOLS, add_generation_prompt=gen) == \
        _hf(GEMMA_TEMPLATE, gemma_tok, plain, gen)
    # a system message stays where Gemma's template puts it: before the first user turn's text
    text = render(gemma_tok, SINGLE_CALL_CHAT, TOOLS)
    assert text.startswith("<bos><start_of_turn>user\nYou are terse.\n\n" + _tools_block()
                           + "\n\nWhat is 17*23?<end_of_turn>\n")


@pytest.mark.slow
def test_a_user_turn_after_tool_results_joins_them_so_turns_alternate(gemma_tok):
    chat = [*SINGLE_CALL_CHAT[1:4], {"role": "user", "content": "Thanks. And 2+2?"}]
    text = render(gemma_tok, chat, TOOLS, add_generation_prompt=True)
    assert text.endswith("<start_of_turn>user\n```tool_output\n391\n```\n\nThanks. And 2+2?"
                         "<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.slow
def test_tools_need_a_first_user_turn_and_python_names(gemma_tok):
    with pytest.raises(ChatFormatError, match="first user turn"):
        render(gemma_tok, [{"role": "system", "content": "Hi"}], TOOLS)
    with pytest.raises(ChatFormatError, match="not a Python identifier"):
        gemma_call_text("get-weather", {})
    with pytest.raises(ChatFormatError, match="cannot be a keyword argument"):
        gemma_call_text("f", {"first name": "Ada"})
    with pytest.raises(ChatFormatError, match="no literal"):
        gemma_call_text("f", {"x": float("nan")})


def test_call_text_is_python_that_parses_back_to_the_same_arguments():
    args = {"s": 'quote " backslash \\ newline \n tab \t ünï 🦙 \u2028 ```', "i": -3,
            "f": 2.5e-300, "big": 10**30, "b": True, "n": None, "l": [1, [2, {"k": False}]],
            "d": {"nested key": {"x": "y"}}, "e": {}, "el": []}
    text = "```tool_code\n" + gemma_call_text("fn", args) + "\n```"
    res = parse_tool_calls(text, "gemma")
    assert (_calls(res), res.errors, res.content) == ([("fn", args)], [], "")


# -- round trip through the template ------------------------------------------------------------
def _emitted(tok, messages, i) -> str:
    prompt = render(tok, messages[:i], TOOLS, add_generation_prompt=True)
    full = render(tok, messages[:i + 1], TOOLS)
    assert full.startswith(prompt)
    return full[len(prompt):].removesuffix("<end_of_turn>\n")


@pytest.mark.slow
@pytest.mark.parametrize("chat", [TOOL_CHAT, PARALLEL_CHAT], ids=["content+calls", "parallel"])
def test_rendered_calls_parse_back_and_render_back_the_same(gemma_tok, chat):
    emitted = _emitted(gemma_tok, chat, 1)
    res = parse_tool_calls(emitted, "gemma")
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in chat[1]["tool_calls"]]
    assert (_calls(res), res.errors, res.content) == (want, [], chat[1]["content"] or "")
    back = copy.deepcopy(chat)
    back[1] = {"role": "assistant", "content": res.content or None,
               "tool_calls": [c.to_openai() for c in res.calls]}
    assert render(gemma_tok, back, TOOLS) == render(gemma_tok, chat, TOOLS)
    streamer = ToolCallStreamer("gemma")
    shown = "".join(streamer.feed(ch) for ch in emitted)
    final = streamer.finish()
    assert shown.strip() == res.content and _calls(final) == want
    assert streamer.remaining_content(final) == ""


# -- assistant spans (SFT) ----------------------------------------------------------------------
def _generation_marked(template: str) -> str:
    """Gemma's template with {% generation %} around a model turn's content and <end_of_turn>."""
    content = "{%- if message['content'] is string -%}"
    end = "{{ '<end_of_turn>\\n' }}"
    assert template.count(content) == 1 and template.count(end) == 1
    return template.replace(content, (
        "{%- if role == 'model' -%}{% generation %}{{ message['content'] | trim }}"
        "{{ '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}\n    {%- elif message['content'] "
        "is string -%}")).replace(end, "{%- if role != 'model' -%}" + end + "{%- endif -%}")


@pytest.mark.slow
@pytest.mark.parametrize("chat", [SINGLE_CALL_CHAT, TOOL_CHAT + [
    {"role": "assistant", "content": "1024."}]], ids=["system+call", "two user turns"])
def test_assistant_spans_match_transformers_generation_mask(gemma_tok, chat):
    text, spans = assistant_spans(gemma_tok, chat, TOOLS)
    assert text == render(gemma_tok, chat, TOOLS)
    marked = _generation_marked(GEMMA_TEMPLATE)
    plain = formats._compose_gemma(formats._normalize(chat), TOOLS)
    rendered, indices = render_jinja_template([plain], chat_template=marked,
                                              return_assistant_tokens_mask=True,
                                              **gemma_tok.special_token_strings())
    assert rendered[0] == text  # the markers change nothing
    assert spans == [tuple(s) for s in indices[0]]
    pieces = [text[a:b] for a, b in spans]
    assert pieces[0].startswith("```tool_code\n") or pieces[0].startswith("Let me check")
    assert all(p.endswith("```<end_of_turn>") or p.endswith(".<end_of_turn>") for p in pieces)
    assert not any("tool_output" in p or "<start_of_turn>" in p for p in pieces)


@pytest.mark.slow
def test_sft_trains_on_the_tool_code_and_the_answer_only(gemma_tok):
    from llamaworks.posttrain.sft import encode_conversation

    ids, mask = encode_conversation(gemma_tok, {"messages": SINGLE_CALL_CHAT, "tools": TOOLS})
    assert ids == gemma_tok.encode(render(gemma_tok, SINGLE_CALL_CHAT, TOOLS), bos=False)
    trained = gemma_tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == '```tool_code\ncalculator(expression="17*23")\n```<end_of_turn>' \
        "391.<end_of_turn>"


# -- parsing ------------------------------------------------------------------------------------
def test_calls_and_content_around_them():
    text = ('Checking.\n```tool_code\ncalculator(expression="17*23")\n```\nand\n```tool_code\n'
            'get_weather(city="Zürich", days=3, metric=True, hours=[1, 2], opts={"a": None})\n```'
            " done")
    res = parse_tool_calls(text, "gemma")
    assert _calls(res) == [("calculator", {"expression": "17*23"}),
                           ("get_weather", {"city": "Zürich", "days": 3, "metric": True,
                                            "hours": [1, 2], "opts": {"a": None}})]
    assert res.content == "Checking.\n\nand\n done" and res.errors == []
    assert len({c.id for c in res.calls}) == 2
    assert json.loads(res.calls[1].to_openai()["function"]["arguments"])["days"] == 3


def test_text_without_calls_and_other_code_blocks_are_content():
    text = "Use this:\n```python\nprint(1)\n```\n`tool_code` is not a block."
    assert (parse_tool_calls(text, "gemma").content, parse_tool_calls(text, "gemma").calls) == \
        (text, [])


def test_a_fence_inside_a_string_argument_does_not_end_the_block():
    res = parse_tool_calls('```tool_code\nshow(md="```py\\nx```")\n```', "gemma")
    assert (_calls(res), res.errors) == ([("show", {"md": "```py\nx```"})], [])


@pytest.mark.parametrize("code,why", [
    ('calculator("17*23")', "positional arguments"),
    ('print(calculator(expression="1"))', "positional arguments"),
    ('os.system(command="rm -rf /")', "by its name"),
    ('__import__("os").system(x="y")', "by its name"),
    ("f(x=y)", "not a literal"),
    ("f(x=1 + 2)", "not a literal"),
    ('f(x=f"{y}")', "not a literal"),
    ("f(x=lambda: 0)", "not a literal"),
    ("f(x={1, 2})", "not a literal"),
    ('f(x=b"raw")', "bytes literal"),
    ("f(x=1j)", "complex literal"),
    ("f(x=1e999)", "not a finite number"),
    ("f(x={1: 2})", "keys are not all string"),
    ("f(**{'x': 1})", "**arguments"),
    ("import os", "function calls, one per line"),
    ('x = f(a="b")', "function calls, one per line"),
    ("f(x=1", "not valid Python"),
    ("", "empty tool_code block"),
])
def test_malformed_code_is_refused_with_an_error(code, why):
    res = parse_tool_calls(f"```tool_code\n{code}\n```", "gemma")
    assert res.calls == [] and len(res.errors) == 1 and why in res.errors[0], res.errors


def test_a_bad_call_does_not_take_the_good_ones_with_it():
    res = parse_tool_calls('```tool_code\nf(x=1)\ng(2)\nh(y="z")\n```', "gemma")
    assert _calls(res) == [("f", {"x": 1}), ("h", {"y": "z"})]
    assert len(res.errors) == 1 and "'g'" in res.errors[0]


def test_unterminated_blocks():
    done = parse_tool_calls('```tool_code\nf(x="a")\n', "gemma")  # stopped after the code
    assert _calls(done) == [("f", {"x": "a"})]
    assert len(done.errors) == 1 and "not closed" in done.errors[0]
    cut = parse_tool_calls('Sure.\n```tool_code\nf(x="a', "gemma")  # cut off mid-call
    assert (cut.calls, cut.content) == ([], "Sure.")
    assert len(cut.errors) == 1 and "unterminated" in cut.errors[0]


# -- streaming ----------------------------------------------------------------------------------
def test_streamer_holds_back_a_partial_tool_code_opener():
    s = ToolCallStreamer("gemma")
    assert s.feed("Let me see.\n``") == "Let me see.\n"
    assert s.feed("`tool_") == ""
    assert s.feed('code\ncalculator(expression="2+2")\n```') == ""
    res = s.finish()
    assert _calls(res) == [("calculator", {"expression": "2+2"})] and res.errors == []
    assert res.content == "Let me see." and s.remaining_content(res) == ""


def test_streamer_releases_other_code_blocks():
    s, text = ToolCallStreamer("gemma"), "Here:\n```python\nprint(1)\n```\nDone."
    shown = "".join(s.feed(ch) for ch in text)
    assert shown == text and s.remaining_content(s.finish()) == ""
    s = ToolCallStreamer("gemma")
    shown = "".join(s.feed(ch) for ch in "Ends with a fence ```")
    res = s.finish()  # the held fence comes as the last delta (after the stripped content)
    assert shown == "Ends with a fence " and res.content == "Ends with a fence ```"
    assert shown.strip() + s.remaining_content(res) == res.content


# -- the server and the agent -------------------------------------------------------------------
def _job(tok, **body):
    from llamaworks.serve.chat import ChatJob
    from llamaworks.serve.schemas import ChatRequest

    engine = types.SimpleNamespace(tokenizer=tok, max_batch=4, context=4096)
    req = ChatRequest(model="gemma", messages=[{"role": "user", "content": "Weather in Paris?"}],
                      tools=[TOOLS[1]], **body)
    return ChatJob(engine, req, "gemma", 64)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_server_refuses_forced_calls_for_gemma_with_a_400(gemma_tok, choice):
    from llamaworks.serve.schemas import APIError

    with pytest.raises(APIError) as e:
        _job(gemma_tok, tool_choice=choice)
    assert (e.value.status, e.value.param) == (400, "tool_choice")
    assert "gemma" in e.value.message and "'auto'" in e.value.message


@pytest.mark.slow
def test_server_renders_gemma_tools_and_parses_calls_with_tool_choice_auto(gemma_tok):
    from llamaworks.chat import calls as C

    job = _job(gemma_tok, tool_choice="auto")
    assert (job.fmt, job.prefix, job.lazy) == ("gemma", "", None)  # free text, parsed after
    prompt = gemma_tok.decode(job.prompts[0])
    assert "```tool_code" in prompt and '"name": "get_weather"' in prompt
    res = job._parse('```tool_code\nget_weather(city="Paris")\n```')
    assert _calls(res) == [("get_weather", {"city": "Paris"})]
    assert C.lazy_call_grammar("gemma", [("get_weather", TOOLS[1]["function"]["parameters"])]) \
        is None
    with pytest.raises(ValueError, match="cannot be forced"):
        C.forced_call_prefix("gemma", "get_weather")


@pytest.mark.slow
def test_agent_stops_a_gemma_model_writing_its_own_tool_output(gemma_tok):
    from llamaworks.infer.sampling import SamplingParams
    from llamaworks.tools.agent import _llm_complete

    seen = []

    def stream(ids, params):
        seen.append(params.stop)
        yield '```tool_code\nget_weather(city="Paris")\n```'

    llm = types.SimpleNamespace(tokenizer=gemma_tok, stream=stream, model=types.SimpleNamespace(
        config=types.SimpleNamespace(max_seq_len=4096)))
    complete = _llm_complete(llm, SamplingParams(max_tokens=8), "gemma", None)
    assert complete([{"role": "user", "content": "Weather?"}], [TOOLS[1]]).startswith("```")
    assert seen == [["```tool_output"]]

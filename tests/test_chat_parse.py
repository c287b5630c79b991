"""Tool-call parsing from generated text: multiple, malformed, partial calls; streaming."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletionMessageToolCall

from llamaworks.chat.parse import ToolCall, ToolCallStreamer, parse_tool_calls

CALC = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'


def _calls(res):
    return [(c.name, c.arguments) for c in res.calls]


def test_text_without_calls_is_all_content():
    res = parse_tool_calls("  The answer is 4.\n")
    assert (res.content, res.calls, res.errors) == ("The answer is 4.", [], [])


def test_multiple_calls_and_surrounding_content():
    res = parse_tool_calls("Let me check.\n" + CALC + "\n" + WEATHER)
    assert res.content == "Let me check."
    assert _calls(res) == [("calculator", {"expression": "17*23"}),
                           ("get_weather", {"city": "Zürich"})]
    assert res.errors == []
    assert len({c.id for c in res.calls}) == 2


def test_malformed_json_is_reported_and_other_calls_survive():
    bad = '<tool_call>\n{"name": "calculator", "arguments": {expression: 2}}\n</tool_call>'
    res = parse_tool_calls(bad + CALC)
    assert _calls(res) == [("calculator", {"expression": "17*23"})]
    assert len(res.errors) == 1 and "not valid JSON" in res.errors[0]


@pytest.mark.parametrize("body,why", [
    ('{"arguments": {"x": 1}}', "no \"name\""),
    ('{"name": "f", "arguments": [1, 2]}', "must be a JSON object"),
    ('[1, 2]', "must be a JSON object"),
    ('{"name": "f", "arguments": "{not json"}', "not JSON"),
])
def test_calls_of_the_wrong_shape_are_errors(body, why):
    res = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert res.calls == [] and len(res.errors) == 1 and why in res.errors[0]


def test_arguments_as_json_string_and_parameters_key_are_accepted():
    res = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
                           '<tool_call>{"name": "g", "parameters": {"b": 2}}</tool_call>')
    assert _calls(res) == [("f", {"a": 1}), ("g", {"b": 2})] and res.errors == []


def test_partial_call_at_end_of_truncated_generation_is_an_error():
    res = parse_tool_calls("Sure. " + CALC + '\n<tool_call>\n{"name": "get_weather", "argu')
    assert _calls(res) == [("calculator", {"expression": "17*23"})]
    assert res.content == "Sure."
    assert len(res.errors) == 1 and "unterminated" in res.errors[0]


def test_unclosed_call_with_complete_json_is_kept_with_an_error():
    res = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n')
    assert _calls(res) == [("f", {})]
    assert len(res.errors) == 1 and "not closed" in res.errors[0]


def test_a_closing_tag_inside_a_json_string_does_not_end_the_call():
    """A call sampled under the call grammar may write `</tool_call>` inside a string: the call
    ends at the tag after its JSON object, not at the first one."""
    inner = '<tool_call>\n{"name": "python", "arguments": {"code": "print(\'</tool_call>\')"}}'
    res = parse_tool_calls("Run it. " + inner + "\n</tool_call> then " + CALC)
    assert _calls(res) == [("python", {"code": "print('</tool_call>')"}),
                           ("calculator", {"expression": "17*23"})]
    assert res.errors == [] and res.content == "Run it.  then"
    cut = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>b')
    assert cut.calls == [] and len(cut.errors) == 1  # still broken when the JSON never ends


def test_an_opening_tag_inside_a_json_string_does_not_start_another_call():
    """A sampled string argument may hold `<tool_call>` too (seen under the call grammar): the
    call whose JSON is whole still ends at the closing tag after it."""
    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 - <tool_call>2"}}' \
           "\n</tool_call>"
    res = parse_tool_calls(text + " and " + CALC)
    assert _calls(res) == [("calculator", {"expression": "1 - <tool_call>2"}),
                           ("calculator", {"expression": "17*23"})]
    assert res.errors == [] and res.content == "and"


def test_to_openai_is_a_valid_openai_tool_call():
    call = ToolCall("call_1", "calculator", {"expression": "√2 ≈ 1.41"})
    wire = ChatCompletionMessageToolCall.model_validate(call.to_openai())
    assert wire.function.name == "calculator"
    assert json.loads(wire.function.arguments) == {"expression": "√2 ≈ 1.41"}


@pytest.mark.parametrize("text,calls,content", [
    ('{"name": "calculator", "parameters": {"expression": "1+1"}}',
     [("calculator", {"expression": "1+1"})], ""),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": 1}}',
     [("f", {}), ("g", {"x": 1})], ""),
    ("The answer is 2.", [], "The answer is 2."),
    ('{"answer": 2}', [], '{"answer": 2}'),
])
def test_llama3_json_calls(text, calls, content):
    res = parse_tool_calls(text, "llama3")
    assert (_calls(res), res.content, res.errors) == (calls, content, [])


def test_llama3_truncated_call_is_an_error():
    res = parse_tool_calls('{"name": "calculator", "parameters": {"expr', "llama3")
    assert res.calls == [] and "unterminated" in res.errors[0]


@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_streamer_char_by_char_never_leaks_a_call(fmt):
    text = "I will compute it. " + CALC + " done"
    s = ToolCallStreamer(fmt)
    shown = "".join(s.feed(ch) for ch in text)
    assert shown == "I will compute it. "
    res = s.finish()
    assert _calls(res) == [("calculator", {"expression": "17*23"})]
    assert shown.strip() + s.remaining_content(res) == res.content == "I will compute it.  done"


def test_streamer_holds_back_only_a_possible_tag_prefix():
    s = ToolCallStreamer()
    assert s.feed("a < b and <tool") == "a < b and "
    assert s.feed("box> is not a call") == "<toolbox> is not a call"
    res = s.finish()
    assert res.calls == [] and s.remaining_content(res) == ""


def test_llama3_streamer_holds_a_json_reply():
    s = ToolCallStreamer("llama3")
    assert s.feed("  ") == ""
    assert s.feed('{"name": "f", ') == ""
    assert s.feed('"parameters": {}}') == ""
    res = s.finish()
    assert _calls(res) == [("f", {})] and s.remaining_content(res) == ""
    plain = ToolCallStreamer("llama3")
    assert plain.feed("Hello") == "Hello"


# Mistral's calls as the models' own templates render them (llama.cpp's models/templates/):
# Nemo's JSON list with 9-character ids, Small 3.2's name[CALL_ID]id[ARGS]{...}, and the
# [ARGS]-only form of Devstral / Ministral 3.
NEMO_CALLS = ('[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "17*23"}, "id": '
              '"aB3dE6gH9"}, {"name": "get_weather", "arguments": {"city": "Zürich"}, "id": '
              '"Zz0Yy1Xx2"}]')
SMALL32_CALLS = ('[TOOL_CALLS]calculator[CALL_ID]aB3dE6gH9[ARGS]{"expression": "17*23"}'
                 '[TOOL_CALLS]get_weather[CALL_ID]Zz0Yy1Xx2[ARGS]{"city": "Zürich"}')
BOTH = [("calculator", {"expression": "17*23"}), ("get_weather", {"city": "Zürich"})]


@pytest.mark.parametrize("text", [NEMO_CALLS, SMALL32_CALLS])
def test_mistral_calls_keep_the_ids_the_model_wrote(text):
    res = parse_tool_calls(text, "mistral")
    assert (_calls(res), res.content, res.errors) == (BOTH, "", [])
    assert [c.id for c in res.calls] == ["aB3dE6gH9", "Zz0Yy1Xx2"]


def test_mistral_args_only_calls_get_nine_character_ids():
    res = parse_tool_calls('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}',
                           "mistral")
    assert (_calls(res), res.content, res.errors) == ([BOTH[1]], "Checking.", [])
    assert len(res.calls[0].id) == 9 and res.calls[0].id.isalnum()
    assert parse_tool_calls("[TOOL_CALLS]", "mistral").errors  # nothing after the marker


@pytest.mark.parametrize("text,why,n_calls", [
    (NEMO_CALLS[:60], "unterminated", 0),
    (SMALL32_CALLS[:-8], "unterminated", 1),
    ("[TOOL_CALLS]get_weath", "unterminated", 0),
    ('[TOOL_CALLS][{"arguments": {}}]', "no \"name\"", 0),
    ("[TOOL_CALLS]f[ARGS]{nope}", "not valid JSON", 0),
])
def test_mistral_bad_calls_are_errors(text, why, n_calls):
    res = parse_tool_calls(text, "mistral")
    assert len(res.calls) == n_calls and why in res.errors[0]


@pytest.mark.parametrize("text", [NEMO_CALLS, SMALL32_CALLS])
def test_mistral_streamer_char_by_char_never_leaks_a_call(text):
    s = ToolCallStreamer("mistral")
    shown = "".join(s.feed(ch) for ch in "Let me see. " + text)
    assert shown == "Let me see. "
    res = s.finish()
    assert _calls(res) == BOTH and s.remaining_content(res) == ""


def test_mistral_streamer_holds_back_only_a_possible_marker_prefix():
    s = ToolCallStreamer("mistral")
    assert s.feed("a [b] and [TOOL") == "a [b] and "
    assert s.feed("S] is not a call <tool_call>") == "[TOOLS] is not a call <tool_call>"
    res = s.finish()
    assert res.calls == [] and s.remaining_content(res) == ""


@pytest.mark.parametrize("args_marker", [False, True], ids=["nemo", "small-3.2"])
def test_forced_mistral_call_prefix_parses_as_the_named_call(args_marker):
    """The server's tool_choice prefix for Mistral vocabularies, followed by what a model writes
    next (the arguments), is the call in that variant's syntax."""
    from llamaworks.chat.calls import forced_call_prefix
    from llamaworks.serve.responses import forced_call_stop

    prefix = forced_call_prefix("mistral", "get_weather", args_marker)
    rest = '{"city": "Paris"}' + ("" if args_marker else "}]")
    result = parse_tool_calls(prefix + rest, "mistral")
    assert [(c.name, c.arguments) for c in result.calls] == [("get_weather", {"city": "Paris"})]
    assert not result.errors and forced_call_stop("mistral") == []
    assert forced_call_prefix("mistral", None, args_marker).startswith("[TOOL_CALLS]")

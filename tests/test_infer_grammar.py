"""Structured outputs: sampled output (temperature 1.0) always valid against its JSON schema,
checked by the `jsonschema` reference validator; schemas llguidance cannot enforce refused with the
keyword named; Lark grammars; the constraint ends the sequence when the grammar is complete. A
random tiny model over SmolLM2's real vocabulary: the grammar, not the model, makes it valid."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llamaworks import LLM, SamplingParams
from llamaworks.config import get_preset
from llamaworks.infer.grammar import GrammarError
from llamaworks.model import Llama

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"],
        "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
              "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"const": "L"}},
             "required": ["color", "size"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                   "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
        "required": ["point", "tags"], "additionalProperties": False},
    "number": {"type": "number", "minimum": 0, "maximum": 1},
    "anyof": {"anyOf": [{"type": "boolean"}, {"type": "null"},
                        {"type": "string", "pattern": "^[a-z]{3}$"}]},
}


@pytest.fixture(scope="module")
def llm(smollm_tokenizer) -> LLM:
    cfg = get_preset("tiny", vocab_size=49152, eos_token_id=2)
    model = Llama(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    return LLM(model.eval(), smollm_tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_output_is_valid_against_its_schema(llm, name):
    schema = SCHEMAS[name]
    p = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=120, json_schema=schema)
    (out,) = llm.generate(["Answer in JSON:"], p)
    for o in out.outputs:
        assert o.finish_reason == "stop", (name, o.text)  # ended by the completed grammar
        jsonschema.validate(json.loads(o.text), schema)
    if name != "number":  # ("0" is a whole answer there, and a likely one)
        assert len({o.text for o in out.outputs}) > 1  # really sampled


def test_without_the_schema_the_same_sampling_is_not_json(llm):
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(llm.generate(["Answer in JSON:"], p)[0].text)


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
])
@pytest.mark.slow
def test_a_schema_it_cannot_enforce_is_refused_naming_the_keyword(llm, schema, keyword):
    with pytest.raises(GrammarError, match=keyword):
        llm.generate(["x"], SamplingParams(json_schema=schema))
    assert not llm.engine.has_work and len(llm.engine.pool.free) == llm.max_batch_size


@pytest.mark.slow
def test_a_lark_grammar_constrains_the_text(llm):
    grammar = r'start: /[0-9]{3}-[a-z]{2}/'
    outs = llm.generate(["Code:"] * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                                                       grammar=grammar) for s in range(3)])
    for o in outs:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", o.text), o.text
        assert o.finish_reason == "stop"


def test_constrained_and_free_rows_decode_side_by_side(llm):
    """A constrained row in a batch does not change its neighbours' tokens."""
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The cat"], free)[0].token_ids
    both = llm.generate(["The cat", "JSON:"], [free, SamplingParams(
        max_tokens=60, json_schema=SCHEMAS["enum"])])
    assert both[0].token_ids == alone
    jsonschema.validate(json.loads(both[1].text), SCHEMAS["enum"])


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "mistral"])
def test_the_forced_call_grammar_accepts_each_formats_own_call_text(llm, fmt):
    """What follows `forced_call_prefix(fmt, None)` in the format's real call syntax (as
    chat.formats writes a call) is a complete sentence of the grammar over the declared tools."""
    from llamaworks.chat import calls as C
    from llamaworks.chat.formats import hermes_call_text, llama3_call_text

    weather = {"type": "object", "properties": {"city": {"type": "string"}},
               "required": ["city"], "additionalProperties": False}
    grammar = C.forced_call_grammar(fmt, [("get_weather", weather), ("noop", None)])
    full = {"chatml": hermes_call_text("get_weather", {"city": "Oslo"}),
            "llama3": llama3_call_text("get_weather", {"city": "Oslo"}),
            "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'}
    prefix = C.forced_call_prefix(fmt, None)
    assert full[fmt].startswith(prefix)
    c = llm.engine.grammars.constraint(grammar=grammar)
    for t in llm.tokenizer.encode(full[fmt][len(prefix):], bos=False):
        c.advance(t)
    assert c.done or c.matcher.is_accepting()
    bad = llm.engine.grammars.constraint(grammar=grammar)
    with pytest.raises(GrammarError):
        for t in llm.tokenizer.encode('get_time", "arguments": {}}', bos=False):
            bad.advance(t)  # not a declared tool


@pytest.mark.slow
def test_a_lazy_grammar_switches_on_at_the_trigger_and_off_after_the_call(llm):
    """tool_choice "auto": text is free until the output opens a call, then the call must name a
    declared tool with schema-valid arguments, then text is free again. The random model is
    placed just after it wrote `<tool_call>` and half a key (mid-token, as models do)."""
    from llamaworks.chat import calls as C
    from llamaworks.chat.parse import parse_tool_calls

    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
               "required": ["city"], "additionalProperties": False}
    lazy = C.lazy_call_grammar("chatml", [("get_weather", weather)])
    assert lazy is not None and lazy[0] == "<tool_call>"
    for seed in range(4):
        p = SamplingParams(temperature=1.0, seed=seed, max_tokens=60, ignore_eos=True,
                           lazy_grammar=lazy)
        (seq,) = group = llm.engine.sequences(llm.tokenizer.encode("Weather?", bos=False), p)
        written = llm.tokenizer.encode('Let me check. <tool_call>\n{"na', bos=False)
        seq.tokens += written
        seq.ids += written
        seq.sampled += [1] * len(written)
        llm.engine._trigger(seq)
        assert seq.constraint is not None
        llm.engine.run([group])
        calls = parse_tool_calls(seq.text, "chatml").calls
        assert [c.name for c in calls][:1] == ["get_weather"], seq.text
        jsonschema.validate(calls[0].arguments, weather)
        assert seq.constraint is None or seq.lazy_from > 0  # free again after the call


@pytest.mark.slow
def test_text_without_the_trigger_stays_free(llm):
    from llamaworks.chat import calls as C

    lazy = C.lazy_call_grammar("chatml", [("noop", None)])
    free = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    lazy_p = SamplingParams(**{**free.__dict__, "lazy_grammar": lazy})
    a, b = llm.generate(["Hello", "Hello"], [free, lazy_p])
    if "<tool_call>" not in a.text:  # (a random model that never opens a call)
        assert a.token_ids == b.token_ids


def test_a_trigger_in_forced_text_does_not_switch_the_lazy_grammar_on(llm):
    """Tokens forced into a row (a tool's result in a GRPO rollout) may contain the trigger; only
    text the model writes opens a call. Without that rule the model would have to continue the
    call the tool result began (`me": "noop", ...`)."""
    from llamaworks.chat import calls as C

    lazy = C.lazy_call_grammar("chatml", [("noop", None)])
    tok = llm.tokenizer
    for seed in range(3):
        p = SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True,
                           lazy_grammar=lazy)
        (seq,) = group = llm.engine.sequences(tok.encode("Result?", bos=False), p)
        forced = 'the tool printed <tool_call>\n{"na'
        llm.engine._force(seq, tok.encode(forced, bos=False))
        llm.engine._trigger(seq)
        assert seq.constraint is None
        llm.engine.run([group])
        after = seq.text[len(forced):]
        assert after and not after.startswith('me": "noop"'), after

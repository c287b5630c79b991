"""The generalization suite: template families split by family and by question hash, canonical
tool calls that the real tools answer, think-then-act SFT conversations that render and mask in
SmolLM2's ChatML, checkers per kind, per-family reports, and the evaluation through the agent
loop (scripted here; on the shipped adapter in the slow test)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import pytest
from posttrain_fixtures import TemplateBytes

from llamaworks.chat.reasoning import split_reasoning
from llamaworks.posttrain import tasks as T
from llamaworks.posttrain.tasks.base import FAMILIES, PEOPLE
from llamaworks.tools.calculator import calculator

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


class SmolChat(TemplateBytes):
    """SmolLM2-135M-Instruct's chat template (as its GGUF stores it) on a byte-level encoding:
    renders as the real tokenizer does, without loading it."""

    chat_template = SMOLLM2_TEMPLATE


def _all(n: int = 20, seed: int = 0) -> list[T.SuiteProblem]:
    """`n` problems of every family, drawn directly (no split filter)."""
    out = []
    for f in FAMILIES.values():
        r = random.Random(f"test:{seed}:{f.name}")
        out += [f.problem(r) for _ in range(n)]
    return out


def _sentences(question: str) -> set[str]:
    """The question's sentences with numbers, names and quoted text masked: its wording."""
    q = re.sub(r"'[^']*'", "'Q'", question)
    q = re.sub(r"\d+", "#", q)
    for name in PEOPLE:
        q = re.sub(rf"\b{name}\b", "NAME", q)
    return {s.strip() for s in re.split(r"(?<=[.?!])\s+", q) if s.strip()}


def _wording(split: str, n: int = 60) -> dict[str, set[str]]:
    return {f.name: set().union(*(_sentences(p.question)
                                  for p in T.suite(n, split, names=[f.name], seed=3)))
            for f in T.families(split)}


# -- families and splits --------------------------------------------------------------------------
def test_the_suite_has_enough_families_of_each_kind_and_holds_out_about_a_quarter():
    kinds = Counter(f.kind for f in T.families())
    assert kinds["arithmetic"] >= 40 and kinds["python"] >= 10 and kinds["multi_call"] >= 8
    assert kinds["no_tool"] >= 3
    for kind, names in T.HELDOUT.items():
        assert 0.2 <= len(names) / kinds[kind] <= 0.31, kind
    assert {f.name for f in T.families("heldout")} == T.HELDOUT_FAMILIES
    assert not {f.name for f in T.families("train")} & T.HELDOUT_FAMILIES
    assert {f.name for f in T.families("train")} == {f.name for f in T.families("test")}


@pytest.mark.slow
def test_family_split_is_disjoint_in_families_and_in_wording():
    """No family, and no sentence of a question (numbers, names and quoted text masked), is in
    both the training families and the held-out ones; no word 6-gram either, apart from runs of
    listed numbers."""
    train, held = _wording("train"), _wording("heldout")
    assert not set(train) & set(held)
    seen_train = set().union(*train.values())
    for name, sentences in held.items():
        assert not sentences & seen_train, (name, sentences & seen_train)

    def grams(split: str) -> set[tuple[str, ...]]:
        out = set()
        for p in T.suite(400, split, seed=5):
            words = " ".join(sorted(_sentences(p.question))).lower().split()
            out |= {tuple(words[i:i + 6]) for i in range(len(words) - 5)}
        return {g for g in out if not all(w in ("#", "#,", "and") for w in g)}

    assert not grams("train") & grams("heldout")


@pytest.mark.slow
def test_no_two_families_share_a_sentence():
    """Distinct families differ in wording, not only in the nouns they draw."""
    wording = {f.name: set().union(*(_sentences(p.question) for p in
                                     (f.problem(random.Random(i)) for i in range(60))))
               for f in T.families()}
    owner: dict[str, str] = {}
    for name, sentences in wording.items():
        for s in sentences:
            assert owner.setdefault(s, name) == name, (s, owner[s], name)


def test_train_and_test_share_families_but_no_question():
    train, test = T.suite(600, "train", seed=1), T.suite(300, "test", seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert {p.family for p in train} == {p.family for p in test} == \
        {f.name for f in T.families("train")}
    held = T.suite(100, "heldout", seed=1)
    assert {p.family for p in held} == T.HELDOUT_FAMILIES


def test_suite_is_deterministic_in_the_seed_and_balanced_over_families():
    a, b, c = (T.suite(212, "train", seed=s) for s in (4, 4, 5))
    assert a == b and a != c
    counts = Counter(p.family for p in a)
    assert len(counts) == len(T.families("train")) and max(counts.values()) - \
        min(counts.values()) <= 1
    prefix = Counter(p.family for p in a[:len(counts)])  # interleaved: a prefix is balanced
    assert set(prefix.values()) == {1}
    by_kind = Counter(p.kind for p in T.suite(200, "test", seed=2, balance="kind"))
    assert set(by_kind.values()) == {50}
    only = T.suite(30, "train", kinds=["python", "no_tool"])
    assert {p.kind for p in only} == {"python", "no_tool"}
    with pytest.raises(ValueError, match="no train families named"):
        T.suite(3, "train", names=["chair_rows"])  # a held-out family


def test_every_family_has_the_shape_of_its_kind():
    for p in _all(10):
        tools = [c.tool for c in p.calls]
        if p.kind == "arithmetic":
            assert tools == ["calculator"] and p.expression == p.calls[0].arguments["expression"]
        elif p.kind == "python":
            assert tools == ["python"]
        elif p.kind == "multi_call":
            assert len(tools) >= 2
            for before, after in zip(p.calls, p.calls[1:], strict=False):  # each uses the last
                assert before.result in json.dumps(after.arguments), p.family
                assert after.note and before.result in after.note
        else:
            assert tools == []
        assert p.plan and p.question.endswith(("?", ".")) and p.template == p.family
        if p.kind in ("arithmetic", "multi_call"):  # beyond mental arithmetic
            sizes = [len(x) for x in re.findall(r"\d+", p.question)]
            assert max(sizes) >= 3 or sum(n >= 2 for n in sizes) >= 2, p.question


def test_canonical_calculator_calls_give_the_answer_on_the_real_calculator():
    for p in _all(20) + T.legacy_suite(40, "test"):
        for c in p.calls:
            if c.tool == "calculator":
                assert calculator(c.arguments["expression"]) == c.result, (p.family, c)
        if p.calls and p.calls[-1].tool == "calculator":
            assert p.calls[-1].result == str(p.answer)


@pytest.mark.slow
def test_canonical_python_calls_print_the_answer_in_the_sandbox():
    from llamaworks.tools.sandbox import SandboxUnavailableError

    try:
        from llamaworks.tools.registry import default_registry

        python = default_registry("python")
    except SandboxUnavailableError as e:
        pytest.skip(f"the python sandbox cannot run here: {e}")
    checked = set()
    for p in _all(2, seed=9):
        for c in p.calls:
            if c.tool == "python":
                assert python.call("python", c.arguments) == c.result, (p.family, c.arguments)
                checked.add(p.family)
        if p.kind == "python":
            assert p.calls[0].result == str(p.answer)
    assert checked == {f.name for f in FAMILIES.values() if f.kind == "python"} | {
        f.name for f in FAMILIES.values()
        if f.kind == "multi_call" and f.problem(random.Random(0)).calls[0].tool == "python"}


def test_legacy_problems_are_unchanged_and_available_as_the_legacy_group():
    qs = "\n".join(p.question for p in T.problems(200, "test", seed=0))
    assert hashlib.sha256(qs.encode()).hexdigest() == \
        "c421cfc9e1f0155ea770c2f8715144f5bf7c0914b45e58441495cc0364c99bf1"
    old, new = T.problems(30, "test", seed=2), T.legacy_suite(30, "test", seed=2)
    assert [(p.question, p.answer) for p in old] == [(p.question, p.answer) for p in new]
    assert {p.family for p in new} <= set(T.LEGACY_FAMILIES) and len(T.LEGACY_FAMILIES) == 7
    assert T.tool_conversation(old[0]) == T.legacy.tool_conversation(old[0])  # one-call form


# -- checkers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", T.KINDS)
def test_each_kind_checker_accepts_the_right_answer_and_rejects_wrong_ones(kind):
    for p in T.suite(12, "train", kinds=kind, seed=8):
        a = p.answer
        assert T.check(p, f"The answer is {a}.")
        assert T.check(p, f"<think>{p.plan}</think>\nThe answer is {a}.")
        assert not T.check(p, f"<think>the answer is {a}</think>\nThe answer is 7777777.")
        assert not T.check(p, "I do not know.")
        if isinstance(a, int):
            assert T.check(p, f"The answer is {a:,}.") and T.check(p, f"So it is {a}.")
            assert not T.check(p, f"The answer is {a + 1}.")
            assert not T.check(p, f"The answer is {a}5.")
        else:
            assert T.check(p, f"The answer is {a.lower()}.")
            wrong = "Monday" if a != "Monday" else "Friday"
            assert not T.check(p, f"The answer is {wrong}.")
            assert T.is_correct(f"It was a {a}.", a) and not T.is_correct(wrong, a)


def test_negative_answers_and_the_legacy_checker_still_work():
    p = T.suite(1, "heldout", names=["overdraft"])[0]
    assert p.answer < 0 and T.check(p, f"The answer is {p.answer}.")
    assert not T.check(p, f"The answer is {-p.answer}.")
    assert T.is_correct("so 391 in all", 391) and not T.is_correct("391.5", 391)


# -- conversations --------------------------------------------------------------------------------
def test_conversations_think_then_act_and_end_with_the_answer():
    for p in T.suite(73, "train", seed=2) + T.suite(20, "heldout", seed=2):
        msgs = T.think_conversation(p)
        assert msgs[0] == {"role": "user", "content": p.question}
        assert msgs[-1]["content"].endswith(f"The answer is {p.answer}.")
        first = msgs[1]
        reasoning, rest = split_reasoning(first["content"])
        assert reasoning == p.plan
        if not p.calls:
            assert len(msgs) == 2 and rest == f"The answer is {p.answer}."
            continue
        assert msgs[-1] == {"role": "assistant", "content": f"The answer is {p.answer}."}
        assert rest == "" and len(msgs) == 2 + 2 * len(p.calls)
        for i, c in enumerate(p.calls):
            call, result = msgs[1 + 2 * i], msgs[2 + 2 * i]
            fn = call["tool_calls"][0]["function"]
            assert (fn["name"], json.loads(fn["arguments"])) == (c.tool, c.arguments)
            assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                              "name": c.tool, "content": c.result}
            if i:
                assert split_reasoning(call["content"])[0] == c.note


def _spans_cover_exactly_the_assistant_parts(tok, conv):
    from llamaworks.chat.formats import assistant_spans, render

    text, spans = assistant_spans(tok, conv["messages"], conv["tools"])
    assert text == render(tok, conv["messages"], conv["tools"])
    trained = [text[a:b] for a, b in spans]
    assistants = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert len(trained) == len(assistants)
    for piece, m in zip(trained, assistants, strict=True):
        assert piece.endswith("<|im_end|>") and "<|im_start|>" not in piece
        assert piece.startswith(m["content"] or "<tool_call>")
        for c in m.get("tool_calls", []):
            args = json.loads(c["function"]["arguments"])
            assert f'"arguments": {json.dumps(args)}' in piece
    untrained = text[:spans[0][0]] + "".join(
        text[b:a] for (_, b), (a, _) in zip(spans, spans[1:], strict=False)) + text[spans[-1][1]:]
    assert all("<tool_response>" not in piece for piece in trained)
    for m in conv["messages"]:
        if m["role"] == "tool":
            assert f"<tool_response>\n{m['content']}\n</tool_response>" in untrained
        if m["role"] == "user":
            assert m["content"] in untrained and all(m["content"] not in t for t in trained)
    return text, trained


def test_multi_call_conversations_render_in_chatml_and_mask_only_the_assistant_parts():
    """SmolLM2's template: every assistant turn (its <think> plan or note and its call, or the
    answer) is a trained span ending at <|im_end|>; the question and tool results are not."""
    tok = SmolChat()
    for p in T.suite(20, "train", kinds="multi_call", seed=4):
        conv = {"messages": T.think_conversation(p), "tools": T.suite_schemas()}
        text, trained = _spans_cover_exactly_the_assistant_parts(tok, conv)
        assert len(trained) == len(p.calls) + 1
        assert trained[0].startswith(f"<think>{p.plan}</think>\n<tool_call>\n")
        assert trained[-1] == f"The answer is {p.answer}.<|im_end|>"
        assert sum(t.count("<tool_call>") for t in trained) == len(p.calls)
        assert "<tool_response>" not in "".join(trained)
        assert text.count('"name": "python"') >= 1  # the tools block offers python too


@pytest.mark.slow
def test_multi_call_conversation_token_mask_on_the_real_tokenizer(smollm_tokenizer):
    from llamaworks.posttrain.sft import encode_conversation

    p = T.suite(1, "train", kinds="multi_call", names=["digit_sum_times"], seed=1)[0]
    conv = {"messages": T.think_conversation(p), "tools": T.suite_schemas()}
    _spans_cover_exactly_the_assistant_parts(smollm_tokenizer, conv)
    ids, mask = encode_conversation(smollm_tokenizer, conv)
    trained = smollm_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained.startswith(f"<think>{p.plan}</think>")
    assert trained.count("<tool_call>") == 2 and trained.count("<|im_end|>") == 3
    assert "<tool_response>" not in trained and p.question not in trained
    assert trained.endswith(f"The answer is {p.answer}.<|im_end|>")


def test_written_suite_is_sft_data_and_problem_jsonl(tmp_path):
    from llamaworks.posttrain.sft import load_conversations

    path = T.write_suite(tmp_path / "s.jsonl", 40, "train", seed=3)
    convs = load_conversations(path)
    assert len(convs) == 40 and all(c["tools"] == T.suite_schemas() for c in convs)
    assert convs[0]["messages"] == T.think_conversation(T.suite(40, "train", seed=3)[0])
    rows = [json.loads(x) for x in T.write_suite(tmp_path / "p.jsonl", 10, "heldout",
                                                 conversations=False).read_text().splitlines()]
    assert {r["family"] for r in rows} <= T.HELDOUT_FAMILIES and "calls" in rows[0]


def test_suite_schemas_are_what_the_registry_offers():
    from llamaworks.tools.registry import default_registry
    from llamaworks.tools.sandbox import SandboxUnavailableError

    try:
        assert T.suite_schemas() == default_registry("calculator,python").schemas()
    except SandboxUnavailableError as e:
        pytest.skip(f"the python sandbox cannot run here: {e}")


def test_suite_prompts_offer_both_tools_and_legacy_prompts_the_calculator():
    from llamaworks.posttrain.evaluate import prompt_ids

    tok = SmolChat()
    suite_p, legacy_p = T.suite(1, "test")[0], T.problems(1, "test")[0]
    suite_text = bytes(prompt_ids(tok, suite_p, True)).decode()
    legacy_text = bytes(prompt_ids(tok, legacy_p, True)).decode()
    assert '"name": "python"' in suite_text and '"name": "python"' not in legacy_text
    assert suite_text.endswith("<|im_start|>assistant\n")


def test_batched_accuracy_takes_suite_problems_and_reports_per_family():
    """`accuracy` (the rollout path GRPO's `solve` shares) on a tiny random model: suite problems
    are prompted with both tools, checked per kind and reported per family."""
    from infer_fixtures import ByteTokenizer, tiny_model

    from llamaworks.posttrain.evaluate import accuracy

    class Tok(ByteTokenizer):
        chat_template = SMOLLM2_TEMPLATE
        apply_chat_template = SmolChat.apply_chat_template

    ps = T.suite(4, "test", seed=1, balance="kind")
    out = accuracy(tiny_model(max_seq_len=4096), Tok(), ps, tools=True, progress=False,
                   max_new=6)
    assert out["n"] == 4 and out["report"]["n"] == 4
    assert set(out["report"]["per_family"]) == {p.family for p in ps}
    assert set(out["report"]["per_kind"]) == set(T.KINDS)


# -- reports and evaluation -----------------------------------------------------------------------
def test_report_gives_accuracy_per_family_kind_and_split():
    ps = T.suite(20, "heldout", seed=1) + T.suite(40, "test", seed=1) + T.legacy_suite(7)
    ok = [p.kind != "python" for p in ps]
    rep = T.report(ps, ok, used_tools=[bool(p.calls) for p in ps])
    assert rep["n"] == len(ps) and rep["correct"] == sum(ok)
    assert rep["per_kind"]["python"]["accuracy"] == 0.0
    assert rep["per_kind"]["no_tool"]["tool_use"] == 0.0
    assert rep["per_family"]["chair_rows"] == {"n": 1, "correct": 1, "accuracy": 1.0,
                                                    "kind": "arithmetic", "split": "heldout",
                                                    "tool_use": 1.0}
    assert set(rep["per_split"]) == {"train families", "heldout families", "legacy families"}
    table = T.format_report(rep)
    assert "chair_rows" in table and "heldout" in table and table.splitlines()[-1].startswith("all")


def _canonical_model(problems, broken_every: int = 0):
    """A scripted model replaying each problem's canonical conversation in Hermes text; with
    `broken_every`, every so many calls it first writes a broken call, and after the error the
    good one."""
    from llamaworks.chat.formats import hermes_call_text

    by_question = {p.question: p for p in problems}
    count = [0]

    def complete(messages, tools):
        p = by_question[messages[0]["content"]]
        ran = [m for m in messages if m["role"] == "tool" and not m["content"].startswith("error")]
        if len(ran) == len(p.calls):
            return f"The answer is {p.answer}."
        after_error = messages[-1]["role"] == "tool" and messages[-1]["content"].startswith("error")
        count[0] += 1
        if broken_every and not after_error and count[0] % broken_every == 0:
            return '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>'
        c = p.calls[len(ran)]
        return f"<think>{p.plan if not ran else c.note}</think>\n" + \
            hermes_call_text(c.tool, c.arguments)

    return complete


def test_suite_accuracy_through_the_agent_loop_counts_accuracy_and_call_validity():
    from llamaworks.posttrain.evaluate import suite_accuracy
    from llamaworks.tools.registry import default_registry

    ps = T.suite(24, "test", kinds=["arithmetic", "multi_call", "no_tool"], seed=6)
    ps = [p for p in ps if all(c.tool == "calculator" for c in p.calls)]  # no sandbox needed
    calc = default_registry("calculator")
    rep = suite_accuracy(_canonical_model(ps), ps, registry=calc)
    assert rep["accuracy"] == 1.0 and rep["call_validity"] == 1.0 and rep["malformed_calls"] == 0
    assert rep["calls"] == sum(len(p.calls) for p in ps)
    assert rep["per_kind"]["no_tool"]["tool_use"] == 0.0
    assert rep["per_kind"]["multi_call"]["calls"] >= 2 * rep["per_kind"]["multi_call"]["n"]

    rep = suite_accuracy(_canonical_model(ps, broken_every=2), ps, registry=calc, max_steps=8)
    assert rep["malformed_calls"] > 0 and rep["call_validity"] < 1.0
    assert rep["calls"] == sum(len(p.calls) for p in ps)  # every good call still ran, once
    assert rep["accuracy"] == 1.0  # the model saw each error and wrote the call again


@pytest.mark.slow
def test_shipped_adapter_smoke_run_through_the_suite_with_and_without_the_grammar():
    """A couple of suite problems through the agent loop on SmolLM2 + the shipped adapter: the
    evaluation runs end to end and, under the lazy grammar, every attempted call parses."""
    from llamaworks import LLM
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import default_model_path
    from llamaworks.infer.load import load_for_use
    from llamaworks.posttrain.evaluate import grammar_comparison
    from llamaworks.tools.chat import DEFAULT_TOOL_ADAPTER
    from llamaworks.tools.registry import default_registry

    path = default_model_path()
    llm = LLM(load_for_use(path, adapters=(DEFAULT_TOOL_ADAPTER,)), tokenizer=load_tokenizer(path))
    ps = T.suite(2, "heldout", kinds="arithmetic", seed=0)
    out = grammar_comparison(llm, ps, registry=default_registry("calculator"), max_steps=3)
    for side in ("free", "grammar"):
        assert out[side]["n"] == 2 and 0.0 <= out[side]["accuracy"] <= 1.0
    assert out["grammar"]["grammar"] and out["grammar"]["call_validity"] == 1.0

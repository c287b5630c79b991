"""`llamaworks tasks suite` (the generalization suite as SFT data or problems, read back),
`llamaworks tasks eval` (the suite through the agent loop, with and without the call grammar, as
a report or JSON) and `llamaworks rl --tasks suite`, on a tiny random checkpoint saved with a
real BPE tokenizer; the shipped adapter in the slow test."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from posttrain_fixtures import suite_tokenizer, tiny_chat_model

from llamaworks.cli import main
from llamaworks.posttrain import tasks as T


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny ChatML model with its tokenizer, as a native checkpoint folder."""
    from llamaworks.checkpoint import save_native

    tok = suite_tokenizer()
    model = tiny_chat_model(tok, std=0.1)
    return save_native(tmp_path_factory.mktemp("tiny") / "ckpt", model.config,
                       model.state_dict(), tokenizer=tok)


def test_tasks_suite_writes_conversations_that_read_back_as_sft_data(tmp_path, capsys):
    from llamaworks.posttrain.sft import load_conversations

    out = tmp_path / "heldout.jsonl"
    assert main(["tasks", "suite", "--split", "heldout", "--kinds", "python", "multi_call",
                 "-n", "6", "--conversations", "--out", str(out), "--seed", "3"]) == 0
    assert f"wrote 6 suite heldout conversations to {out}" in capsys.readouterr().out
    want = T.suite(6, "heldout", kinds=("python", "multi_call"), seed=3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["messages"] for x in lines] == [T.think_conversation(p) for p in want]
    assert all(x["tools"] == T.suite_schemas() for x in lines)
    convs = load_conversations(out)  # what `finetune --data` reads
    assert len(convs) == 6


def test_tasks_suite_writes_problems_that_read_back(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["tasks", "suite", "--kinds", "arithmetic,no_tool", "-n", "5",
                 "--out", str(out)]) == 0
    assert "wrote 5 suite train problems" in capsys.readouterr().out
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == [json.loads(json.dumps(asdict(p)))
                   for p in T.suite(5, "train", kinds=("arithmetic", "no_tool"))]
    assert {x["kind"] for x in got} <= {"arithmetic", "no_tool"}


@pytest.mark.parametrize(("argv", "message"), [
    (["tasks", "arithmetic", "--split", "heldout"], "the suite's"),
    (["tasks", "suite", "--kinds", "poetry", "--out", "x.jsonl"], "unknown kind 'poetry'"),
    (["tasks", "suite"], "--out FILE"),
    (["tasks", "eval", "--out", "x.jsonl"], "drop --solve / --out"),
    (["rl", "--out", "x", "--kinds", "python"], "add --tasks suite"),
])
def test_task_flags_that_do_not_fit_are_refused(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tasks_eval_reports_per_family_and_call_validity_with_and_without_grammar(
        tiny_checkpoint, capsys):
    assert main(["tasks", "eval", "--model", str(tiny_checkpoint), "--split", "heldout",
                 "--kinds", "arithmetic", "no_tool", "-n", "4", "--max-new", "8",
                 "--max-steps", "2", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "free sampling (no grammar)" in out and "lazy call grammar" in out
    for p in T.suite(4, "heldout", kinds=("arithmetic", "no_tool")):
        assert p.family in out
    assert "heldout families" in out and "validity" in out and "grammar vs free" in out


def test_tasks_eval_json_output(tiny_checkpoint, capsys):
    assert main(["tasks", "eval", "--model", str(tiny_checkpoint), "--kinds", "python",
                 "-n", "2", "--max-new", "6", "--max-steps", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["split"], res["n"], res["kinds"]) == ("heldout", 2, ["python"])
    assert list(res["runs"]) == ["grammar"]  # the default: under the grammar
    run = res["runs"]["grammar"]
    assert run["grammar"] is True and run["n"] == 2
    assert set(run["per_family"]) == {p.family for p in T.suite(2, "heldout", kinds="python")}
    assert {"calls", "malformed_calls", "invalid_calls", "call_validity"} <= set(run)
    assert main(["tasks", "eval", "--model", str(tiny_checkpoint), "--kinds", "python",
                 "-n", "2", "--max-new", "6", "--max-steps", "1", "--json",
                 "--no-grammar"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"]["free"]["grammar"] is False


@pytest.mark.slow
def test_rl_trains_on_the_suite_training_families(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["rl", "--model", str(tiny_checkpoint), "--tasks", "suite", "--kinds",
                 "arithmetic", "--out", str(out), "--steps", "2", "--group-size", "2",
                 "--prompts-per-step", "1", "--max-new", "24", "--problems", "10",
                 "--rank", "2"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["reward"] <= 1.1 and "malformed_calls" in r for r in rows)
    assert (out / "reward.png").stat().st_size > 1000
    assert (out / "adapter_model.safetensors").exists()
    summary = json.loads((out / "grpo_summary.json").read_text())
    cfg = summary["config"]
    assert cfg["grammar"] is True and cfg["max_new"] == 24 and cfg["max_tool_calls"] == 4
    assert "adapter written" in capsys.readouterr().out


@pytest.mark.slow
def test_tasks_eval_on_the_shipped_adapter_keeps_every_call_valid_under_the_grammar(capsys):
    from llamaworks.tools.chat import DEFAULT_TOOL_ADAPTER

    assert main(["tasks", "eval", "--split", "heldout", "--kinds", "arithmetic", "-n", "4",
                 "--adapter", str(DEFAULT_TOOL_ADAPTER), "--max-steps", "3", "--compare",
                 "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert runs["grammar"]["n"] == runs["free"]["n"] == 4
    assert runs["grammar"]["calls"] > 0 and runs["grammar"]["call_validity"] == 1.0

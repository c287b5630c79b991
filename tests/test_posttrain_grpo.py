"""GRPO pieces: rewards (the problem's checker, a format bonus only for well-formed calls on a
problem that needs a tool), group-normalized advantages, per-token log-probabilities over a
shared prefix (checked against a plain full forward), stacking two adapters (checked against
merging them one after the other), and rollouts under the lazy tool-call grammar: a tiny model
trained just enough to open calls, sampled at temperature 1, breaks calls without the grammar
and never with it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from infer_fixtures import tiny_model
from posttrain_fixtures import suite_tokenizer, tiny_chat_model, train_to_open_calls

from llamaworks.chat.parse import parse_tool_calls
from llamaworks.cli import main
from llamaworks.posttrain import tasks as T
from llamaworks.posttrain.grpo import (
    GRPOConfig,
    GRPOTrainer,
    group_advantages,
    reward,
    sequence_logprobs,
    stack_adapters,
)
from llamaworks.posttrain.lora import LoraConfig, LoRALinear, apply_lora, load_adapter, save_adapter
from llamaworks.posttrain.rollout import Rollout


def _ended(text: str, calls: int = 1, finished: bool = True, malformed: int = 0,
           invalid: int = 0) -> Rollout:
    """A rollout whose final turn is `text`, after `calls` calls run."""
    return Rollout([], turns=[text], tool_calls=calls, finished=finished,
                   malformed_calls=malformed, invalid_calls=invalid)


def test_reward_is_exact_answer_plus_a_small_format_bonus():
    p = T.Problem("q", "25071", 25071, "boxes")  # a legacy problem: the last number decides
    assert reward(p, _ended("The answer is 25,071."), 0.1) == pytest.approx(1.1)
    assert reward(p, _ended("The answer is 25071.", calls=0), 0.1) == 1.0
    assert reward(p, _ended("The answer is 25070."), 0.1) == pytest.approx(0.1)
    assert reward(p, _ended("I think 25071 is wrong", finished=False), 0.1) == 1.0


def test_suite_rewards_use_the_kinds_checker():
    arith = T.suite(1, "test", kinds="arithmetic", seed=2)[0]
    right = f"The answer is {arith.answer}."
    assert reward(arith, _ended(right), 0.1) == pytest.approx(1.1)
    assert reward(arith, _ended(f"The answer is {arith.answer + 1}."), 0.1) == pytest.approx(0.1)
    # the checker reads the number after "answer is", not the last number (is_correct's rule)
    after = f"The answer is {arith.answer}. (2 calls, 1 plan)"
    assert not T.is_correct(after, arith.answer)
    assert reward(arith, _ended(after), 0.1) == pytest.approx(1.1)
    assert reward(arith, _ended(f"<think>maybe {arith.answer}</think>The answer is 3."),
                  0.1) == pytest.approx(0.1)  # a number in the plan is not the answer
    word = next(p for p in T.suite(60, "train", kinds="python", seed=0)
                if not str(p.answer).lstrip("-").isdigit())  # a weekday or a word
    assert reward(word, _ended(f"The answer is {str(word.answer).upper()}."), 0.1) == \
        pytest.approx(1.1)


def test_the_format_bonus_needs_a_well_formed_call_on_a_problem_that_needs_a_tool():
    arith = T.suite(1, "test", kinds="arithmetic", seed=2)[0]
    right = f"The answer is {arith.answer}."
    assert reward(arith, _ended(right, calls=0), 0.1) == 1.0  # no call
    assert reward(arith, _ended(right, malformed=1), 0.1) == 1.0  # a broken call on the way
    assert reward(arith, _ended(right, invalid=1), 0.1) == 1.0  # a call the schema refused
    assert reward(arith, _ended(right, finished=False), 0.1) == 1.0  # cut off
    no_tool = T.suite(1, "test", kinds="no_tool", seed=2)[0]
    assert not no_tool.calls
    answer = f"The answer is {no_tool.answer}."
    assert reward(no_tool, _ended(answer, calls=0), 0.1) == 1.0
    assert reward(no_tool, _ended(answer, calls=1), 0.1) == 1.0  # calling a tool earns nothing
    assert reward(no_tool, _ended("The answer is -1.", calls=1), 0.1) == 0.0
    assert GRPOConfig().format_reward == 0.1  # the bonus kept its size


def test_advantages_are_normalized_within_each_group():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], 4)
    assert adv[:4] == pytest.approx([1, -1, -1, 1], abs=1e-3)
    assert adv[4:] == [0.0] * 4  # no signal when the whole group scores the same


def test_sequence_logprobs_match_a_full_forward_at_the_generated_tokens():
    model = tiny_model(std=0.1)
    prefix = list(range(10, 40))
    seqs = [prefix + [50, 51, 52, 53, 54], prefix + [60, 61, 62], prefix + [70, 71, 72, 73]]
    masks = [[0] * 30 + [1, 1, 0, 1, 1], [0] * 30 + [1, 1, 1], [0] * 31 + [1, 1, 1]]
    with torch.no_grad():
        got = sequence_logprobs(model, seqs, masks)
        for s, m, lp in zip(seqs, masks, got, strict=True):
            full = torch.log_softmax(model(torch.tensor([s]))[0], -1)
            want = [full[j, s[j + 1]] for j in range(len(s) - 1) if m[j + 1]]
            torch.testing.assert_close(lp, torch.stack(want), atol=1e-5, rtol=0)


def test_stacked_adapter_equals_merging_both_in_turn(tmp_path):
    x = torch.tensor([[1, 20, 30, 40, 50]])
    model = tiny_model(std=0.1)
    for i, (r, alpha) in enumerate(((4, 8.0), (2, 6.0))):
        cfg = LoraConfig(r=r, alpha=alpha, target_modules=["q_proj", "down_proj"] if i else
                         ["q_proj", "v_proj", "down_proj"])
        apply_lora(model, cfg)
        g = torch.Generator().manual_seed(i)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                with torch.no_grad():
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        save_adapter(model, cfg, tmp_path / f"a{i}")
        from llamaworks.posttrain.lora import merge_lora

        merge_lora(model)
    with torch.no_grad():
        want = model(x)
    stack_adapters(tmp_path / "a0", tmp_path / "a1", tmp_path / "both")
    assert json.loads((tmp_path / "both" / "adapter_config.json").read_text())["r"] == 6
    with torch.no_grad():
        got = load_adapter(tiny_model(std=0.1), tmp_path / "both")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_rl_cli_runs_grpo_steps_on_smollm_and_writes_adapter_metrics_and_plot(tmp_path,
                                                                               capsys):
    out = tmp_path / "rl"
    assert main(["rl", "--out", str(out), "--steps", "2", "--group-size", "2", "--save-every",
                 "1", "--keep-last", "2", "--prompts-per-step", "1", "--max-new", "40",
                 "--problems", "20"]) == 0
    # a checkpoint after every step (the default, 5, would have saved only the last)
    assert sorted(d.name for d in (out / "checkpoints").iterdir()
                  if d.is_dir()) == ["step_000001", "step_000002"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["reward"] <= 1.1 and r["length"] > 0 for r in rows)
    assert (out / "reward.png").stat().st_size > 1000
    assert (out / "adapter_model.safetensors").exists()
    assert "adapter written" in capsys.readouterr().out
    # --resume continues from the saved state: step 3 is appended, steps 1-2 are kept
    assert main(["rl", "--out", str(out), "--steps", "3", "--group-size", "2", "--resume",
                 "--prompts-per-step", "1", "--max-new", "40", "--problems", "20"]) == 0
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3] and again[:2] == rows


# -- rollouts under the lazy tool-call grammar ----------------------------------------------------
@pytest.fixture(scope="module")
def caller():
    """A tiny model trained for 60 steps to open a call after the suite prompt."""
    tok = suite_tokenizer()
    return train_to_open_calls(tiny_chat_model(tok), tok), tok


def _fake_tools(monkeypatch) -> list[tuple[str, dict]]:
    """The suite's tools replaced by a recorder (no sandbox needed); returns what was run."""
    from llamaworks.posttrain import evaluate

    ran: list[tuple[str, dict]] = []
    monkeypatch.setattr(evaluate, "suite_runner",
                        lambda name, arguments: ran.append((name, arguments)) or "42")
    return ran


@pytest.mark.slow
def test_rollouts_under_the_call_grammar_make_only_parsable_calls(caller, monkeypatch):
    """Temperature 1 from a model that opens calls but writes their JSON roughly: without the
    grammar some calls are broken (counted, not run); with it every call of a turn the model
    ended parses and names a suite tool with schema-valid arguments (a call may still be cut
    by max_new, which is not a finished turn)."""
    from llamaworks.posttrain.evaluate import solve
    from llamaworks.tools.registry import validate

    model, tok = caller
    batch = [p for p in T.suite(8, "test", kinds="arithmetic", seed=1) for _ in range(3)]
    ran = _fake_tools(monkeypatch)
    free = solve(model, tok, batch, tools=True, temperature=1.0, seed=3, max_new=200)
    assert sum(r.malformed_calls for r in free) > 0
    ran.clear()
    held = solve(model, tok, batch, tools=True, temperature=1.0, seed=3, max_new=200,
                 grammar=True)
    assert sum(r.malformed_calls for r in held) == 0 and sum(r.invalid_calls for r in held) == 0
    assert sum(r.tool_calls for r in held) == len(ran) > 0
    opened = 0
    for r in held:
        for turn in (r.turns if r.finished else r.turns[:-1]):
            parsed = parse_tool_calls(turn, "chatml")
            assert not parsed.errors, turn
            opened += len(parsed.calls)
        assert r.cut_call == (not r.finished and bool(parse_tool_calls(r.final_text).errors))
    assert opened == len(ran)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in T.suite_schemas()}
    for name, arguments in ran:
        assert name in params and not validate(arguments, params[name])


@pytest.mark.slow
def test_a_grpo_step_on_suite_problems_samples_under_the_grammar(caller, monkeypatch):
    model, tok = caller
    _fake_tools(monkeypatch)
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, steps=1, max_new=160, max_tool_calls=4,
                     lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    assert cfg.grammar  # the default
    tr = GRPOTrainer(copy.deepcopy(model), tok, T.suite(20, "train", kinds="arithmetic"), cfg)
    row = tr.step(0)
    assert row["step"] == 1 and 0.0 <= row["reward"] <= 1.1 and row["length"] > 0
    assert row["malformed_calls"] == 0.0 and {"accuracy", "calls", "tool_call_rate"} <= set(row)
    assert row["updated"] and row["kl"] >= 0.0  # log-probabilities, KL and an optimizer step

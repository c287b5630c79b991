"""GRPO pieces: rewards, group-normalized advantages, per-token log-probabilities over a shared
prefix (checked against a plain full forward), and stacking two adapters (checked against
merging them one after the other)."""

from __future__ import annotations

import json

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.cli import main
from llamaworks.posttrain.grpo import (
    group_advantages,
    reward,
    sequence_logprobs,
    stack_adapters,
)
from llamaworks.posttrain.lora import LoraConfig, LoRALinear, apply_lora, load_adapter, save_adapter


def test_reward_is_exact_answer_plus_a_small_format_bonus():
    assert reward("The answer is 25,071.", 25071, 1, True, 0.1) == pytest.approx(1.1)
    assert reward("The answer is 25071.", 25071, 0, True, 0.1) == 1.0
    assert reward("The answer is 25070.", 25071, 1, True, 0.1) == pytest.approx(0.1)
    assert reward("I think 25071 is wrong", 25071, 1, False, 0.1) == 1.0


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
    assert main(["rl", "--out", str(out), "--steps", "2", "--group-size", "2",
                 "--prompts-per-step", "1", "--max-new", "40", "--problems", "20"]) == 0
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

"""The paper's optimizer recipe: AdamW(0.9, 0.95), wd 0.1 on matrices only, warmup, cosine to
10% of the peak; SFT and GRPO build theirs with the same code and their own values (GRPO:
beta2 0.99, no decay, a constant LR)."""

from __future__ import annotations

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.config import get_preset
from llamaworks.model import Llama
from llamaworks.posttrain.grpo import GRPOConfig, GRPOTrainer
from llamaworks.posttrain.lora import LoraConfig
from llamaworks.posttrain.sft import Example, SFTConfig, SFTTrainer
from llamaworks.train.config import TrainConfig
from llamaworks.train.optim import adamw, build_optimizer, lr_lambda, schedule


def test_weight_decay_applies_to_matrices_but_not_norms_or_embeddings():
    model = Llama(get_preset("tiny"))
    opt = build_optimizer(model, TrainConfig())
    decay, none = opt.param_groups
    assert decay["weight_decay"] == 0.1 and none["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in none["params"]} >= {"model.norm.weight",
                                                        "model.embed_tokens.weight"}
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    tc = TrainConfig(max_steps=1000, warmup_steps=100)
    f = lr_lambda(tc)
    assert f(0) == pytest.approx(0.01) and f(49) == pytest.approx(0.5) and f(99) == 1.0
    assert f(100) == 1.0
    assert f(550) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert f(1000) == pytest.approx(0.1) and f(5000) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(100, 1000))


def test_warmup_is_the_papers_2000_steps_scaled_down_for_short_runs():
    assert TrainConfig(max_steps=1_000_000).warmup() == 2000
    assert TrainConfig(max_steps=400).warmup() == 20
    assert TrainConfig(max_steps=400, warmup_steps=7).warmup() == 7


def test_unknown_training_options_are_named():
    with pytest.raises(ValueError, match="unknown training option.*lr_peak"):
        TrainConfig().updated({"lr_peak": 1.0})


def _lrs(trainer, steps: int) -> list[float]:
    """The LR of each of `steps` optimizer steps, as the trainer's schedule sets it."""
    out = []
    for _ in range(steps):
        out.append(trainer.opt.param_groups[0]["lr"])
        trainer.opt.step()  # no gradients: nothing moves, the schedule advances
        trainer.sched.step()
    return out


def test_sft_uses_the_shared_schedule_with_its_warmup_fraction_and_floor():
    ex = [Example(list(range(3, 40)), [0] * 30 + [1] * 7) for _ in range(4)]
    cfg = SFTConfig(lr=2e-3, max_steps=100, warmup_frac=0.05, min_lr_ratio=0.1, pack=True,
                    lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    tr = SFTTrainer(tiny_model(), ex, [], cfg)
    f = schedule(5, 100, 0.1)
    assert _lrs(tr, 101) == [2e-3 * f(s) for s in range(101)]
    assert f(0) == pytest.approx(0.2) and f(4) == 1.0 and f(100) == pytest.approx(0.1)
    assert tr.opt.defaults["betas"] == (0.9, 0.95) and tr.opt.defaults["fused"]
    assert [g["weight_decay"] for g in tr.opt.param_groups] == [0.0]  # LoRA: matrices only


def test_grpo_uses_the_shared_builder_with_beta2_0_99_and_a_constant_lr():
    cfg = GRPOConfig(lr=5e-4, steps=20, lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    tr = GRPOTrainer(tiny_model(), None, [], cfg)
    assert tr.opt.defaults["betas"] == (0.9, 0.99)
    assert [g["weight_decay"] for g in tr.opt.param_groups] == [0.0]
    assert _lrs(tr, 25) == [5e-4] * 25
    trainable = {id(p) for p in tr.params}
    assert {id(p) for g in tr.opt.param_groups for p in g["params"]} == trainable


def test_the_builder_refuses_bad_values_and_a_model_with_nothing_to_train():
    model = tiny_model()
    for bad in (dict(lr=0.0), dict(lr=1e-3, betas=(0.9, 1.0)), dict(lr=1e-3, weight_decay=-1)):
        with pytest.raises(ValueError, match="AdamW needs"):
            adamw(model, **bad)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adamw(model.requires_grad_(False), 1e-3)
    with pytest.raises(ValueError, match="min_lr_ratio in"):
        schedule(0, 10, 1.5)
    assert isinstance(adamw(tiny_model(), 1e-3), torch.optim.AdamW)

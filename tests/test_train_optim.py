"""The paper's optimizer recipe: AdamW(0.9, 0.95), wd 0.1 on matrices only, warmup, cosine to
10% of the peak."""

from __future__ import annotations

import pytest

from llamaworks.config import get_preset
from llamaworks.model import Llama
from llamaworks.train.config import TrainConfig
from llamaworks.train.optim import build_optimizer, lr_lambda


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

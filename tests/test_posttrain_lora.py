"""LoRA: a fresh adapter changes nothing, merging equals the unmerged adapter, and what we save is
what PEFT (the reference implementation) loads onto the transformers model, with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.checkpoint import save_native
from llamaworks.errors import CheckpointError
from llamaworks.posttrain.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    set_lora_enabled,
)

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapter_leaves_outputs_unchanged_and_only_lora_is_trainable():
    base = tiny_model(std=0.1)
    with torch.no_grad():
        want = base(TOKENS)
    model = apply_lora(tiny_model(std=0.1), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(TOKENS), want)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7


def test_merged_model_equals_unmerged_adapter_within_1e_5():
    model = apply_lora(tiny_model(std=0.1), LoraConfig(r=4, alpha=8, dropout=0.1)).eval()
    _randomize(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        base_only = (set_lora_enabled(model, False), model(TOKENS))[1]
        set_lora_enabled(model, True)
        merged = merge_lora(model)(TOKENS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (unmerged - base_only).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_saved_adapter_reloads_merged_and_unmerged(tmp_path):
    cfg = LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = apply_lora(tiny_model(std=0.1), cfg).eval()
    _randomize(model, seed=1)
    with torch.no_grad():
        want = model(TOKENS)
    save_adapter(model, cfg, tmp_path / "ad", base_model="tiny")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 16
    with torch.no_grad():
        merged = load_adapter(tiny_model(std=0.1), tmp_path / "ad")(TOKENS)
        unmerged = load_adapter(tiny_model(std=0.1), tmp_path / "ad", merge=False)(TOKENS)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, want, atol=1e-6, rtol=0)


def test_adapter_that_does_not_fit_is_refused_and_the_model_is_untouched(tmp_path):
    cfg = LoraConfig(r=2, alpha=2)
    other = apply_lora(tiny_model(std=0.1, dim=32, hidden_dim=96), cfg)
    save_adapter(other, cfg, tmp_path / "ad")
    model = tiny_model(std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapter(model, tmp_path / "ad")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        load_adapter(model, tmp_path)


@pytest.mark.slow
def test_peft_loads_our_adapter_on_transformers_with_equal_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model(std=0.1)
    save_native(tmp_path / "base", base.config, base.state_dict())
    cfg = LoraConfig(r=8, alpha=16)
    model = apply_lora(tiny_model(std=0.1), cfg).eval()
    _randomize(model, seed=2)
    save_adapter(model, cfg, tmp_path / "ad", base_model=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        ref = peft(TOKENS).logits
        ours = model(TOKENS)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_merge_cli_folds_the_adapter_into_a_native_checkpoint(tmp_path, capsys):
    from llamaworks.checkpoint import load_model
    from llamaworks.cli import main

    base = tiny_model(std=0.1)
    save_native(tmp_path / "base", base.config, base.state_dict())
    cfg = LoraConfig(r=4, alpha=8)
    model = apply_lora(tiny_model(std=0.1), cfg).eval()
    _randomize(model, seed=3)
    save_adapter(model, cfg, tmp_path / "ad")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    merged = load_model(tmp_path / "merged").model
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), model(TOKENS), atol=1e-5, rtol=0)

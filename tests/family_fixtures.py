"""Random tiny checkpoints of any family, made by transformers itself, with weights drawn wide
(std 0.25; Llama-style norms around 1, Gemma's 1 + w norms around 0) so a wrong detail shows."""

from __future__ import annotations

from typing import Any

import torch


def widen(model: torch.nn.Module, gemma: bool, std: float = 0.25) -> torch.nn.Module:
    """Redraw every parameter of a transformers model N(0, std); norms get 1 added unless they
    are Gemma's (1 + w) norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name and not gemma:
                p.add_(1.0)
    return model


def hf_family_model(cls_name: str, config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """transformers' CausalLM for `transformers.<cls_name>(**config)`, SDPA attention, widened
    weights, float32, eval mode."""
    import transformers

    cfg = getattr(transformers, cls_name)(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return widen(model, cls_name.startswith("Gemma")).float().eval()

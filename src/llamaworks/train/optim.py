"""AdamW with weight decay on matrices only, and the warmup + cosine-to-10% schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llamaworks.train.config import TrainConfig


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW(β=(0.9, 0.95)); decay on 2-D weights except the token embedding, none on norms;
    the fused implementation unless the parameters are FSDP2 shards."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each parameter; 4.7x faster than foreach for the 135M
    # model on our 2-core CPU) takes plain tensors; FSDP2's DTensor shards use foreach.
    fused = not any(_is_dtensor(p) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=fused, foreach=None if fused else True)


def lr_lambda(tc: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warmup to 1, then
    cosine to `min_lr_ratio` at `max_steps`."""
    warm, total, floor = tc.warmup(), tc.max_steps, tc.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f

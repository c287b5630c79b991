"""The one optimizer builder and LR schedule of pretraining, SFT and GRPO: AdamW with weight
decay on matrices only, and linear warmup + cosine to a floor. Each trainer passes its own
hyper-parameters (pretraining: the paper's β=(0.9, 0.95), wd 0.1, cosine to 10%; GRPO:
β=(0.9, 0.99), no decay, a constant LR), never its own copy of the code."""

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


def adamw(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters: decay on 2-D (and stacked 3-D expert) weights
    except the token embedding, none on norms and biases; the fused implementation unless the
    parameters are FSDP2 / tensor-parallel shards. Empty groups (a LoRA model has no trainable
    norms) are left out."""
    if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"AdamW needs lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1); "
                         f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters to optimize")
    # The fused kernel (one pass over each parameter; 4.7x faster than foreach for the 135M
    # model on our 2-core CPU) takes plain tensors; FSDP2's DTensor shards use foreach.
    fused = not any(_is_dtensor(p) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused,
                             foreach=None if fused else True)


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """Pretraining's AdamW: `adamw` with the [train] section's lr, betas, eps, weight decay."""
    return adamw(model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)


def schedule(warmup: int, total: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warmup to 1 over
    `warmup` steps (0: none), then cosine to `min_lr_ratio` at `total` (1.0: constant)."""
    if warmup < 0 or total < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"schedule needs warmup >= 0, total >= 1 and min_lr_ratio in [0, 1]; "
                         f"got warmup={warmup}, total={total}, min_lr_ratio={min_lr_ratio}")

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def lr_lambda(tc: TrainConfig) -> Callable[[int], float]:
    """Pretraining's schedule: the paper's warmup (`tc.warmup()`), cosine to `min_lr_ratio` at
    `max_steps`."""
    return schedule(tc.warmup(), tc.max_steps, tc.min_lr_ratio)


def lr_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int,
                 min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`schedule` on `opt`: step it once per optimizer step; its state_dict is the schedule
    position a checkpoint keeps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule(warmup, total, min_lr_ratio))

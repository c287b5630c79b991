"""Mixture sampling: how many tokens each source contributes so the proportions match the
recipe's weights, given each source's available tokens and allowed epochs."""

from __future__ import annotations

import numpy as np


def mixture_targets(available: dict[str, int], weights: dict[str, float],
                    epochs: dict[str, float]) -> dict[str, int]:
    """Target tokens per source: the largest total T with target_i = w_i * T and
    target_i <= available_i * epochs_i for every source."""
    total_w = sum(weights.values())
    w = {k: v / total_w for k, v in weights.items()}
    t = min(available[k] * epochs[k] / w[k] for k in w if w[k] > 0)
    return {k: int(w[k] * t) for k in w}


def sample_documents(lengths: list[int], target: int, rng: np.random.Generator) -> list[int]:
    """Document indices (repeating whole shuffled passes as needed) whose lengths sum to the
    first total >= target. Each pass is a fresh permutation."""
    out: list[int] = []
    got = 0
    if not lengths or target <= 0:
        return out
    while got < target:
        for i in rng.permutation(len(lengths)):
            out.append(int(i))
            got += lengths[i]
            if got >= target:
                break
    return out

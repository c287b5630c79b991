"""A conversation prefix shared by many sequences (system prompt + tool schemas), computed once.

Both stand-ins duck-type `model.KVCache` (`update`, `per_row`), so the one model definition runs
unchanged: `CollectKV` records each layer's keys/values of the prefix, `PrefixedKV` makes every
row of a batch attend to them before its own tokens (no in-place writes, so autograd is happy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llamaworks.model import Llama


class CollectKV:
    """Records each layer's keys/values; attention sees exactly the new tokens."""

    per_row = False

    def __init__(self) -> None:
        self.kv: list[tuple[Tensor, Tensor]] = []

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        self.kv.append((k, v))
        return k, v


class PrefixedKV:
    """Every row attends to the (constant) prefix keys/values first, then to its own."""

    per_row = False

    def __init__(self, kv: list[tuple[Tensor, Tensor]], batch: int):
        self.kv, self.batch = kv, batch

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        pk, pv = self.kv[layer]
        shape = (self.batch, *pk.shape[1:])
        return torch.cat([pk.expand(shape), k], 2), torch.cat([pv.expand(shape), v], 2)


@torch.no_grad()
def prefix_kv(model: Llama, prefix: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Keys/values of `prefix` for every layer (batch 1, no gradient)."""
    collect = CollectKV()
    device = model.lm_head.weight.device
    model(torch.tensor([list(prefix)], device=device), cache=collect, hidden_only=True)
    return collect.kv


def prefixed_hidden(model: Llama, kv: list[tuple[Tensor, Tensor]], tokens: Tensor) -> Tensor:
    """Final hidden states [B, T, dim] of `tokens` (right-padded) continuing the shared prefix."""
    p = kv[0][0].shape[2]
    t = tokens.shape[1]
    pos = torch.arange(p, p + t, device=tokens.device)
    return model(tokens, pos, PrefixedKV(kv, tokens.shape[0]), hidden_only=True)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all sequences share (at most min length - 1)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def trainable_prefix_len(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> int:
    """The longest shared prefix that can be computed once without gradient: every scored token
    (mask 1) must be predicted from a position after it, so it stops before the first one's
    predictor."""
    first = min((list(m).index(1) for m in masks if 1 in m), default=len(seqs[0]))
    return max(0, min(common_prefix_len(seqs), first - 1))

"""Batched decoding of prompts of different lengths over one static KV cache.

Prompts are left-padded to the longest one, which is put in row 0 (the model writes the cache at
row 0's positions, so those are the cache slots). Each row has its own rotary positions (slot minus
its padding) and a boolean mask hiding its padding. Attention always spans the whole preallocated
cache (keys beyond the current slot are masked), so every decode step has the same shapes, which
is what lets `torch.compile` reuse one graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from llamaworks.model import KVCache, Llama

StepFn = Callable[[Tensor, Tensor, KVCache, Tensor], Tensor]


def forward_last(model: Llama, tokens: Tensor, positions: Tensor, cache: KVCache,
                 mask: Tensor) -> Tensor:
    """Logits [B, vocab] of the last position, attending over the whole cache."""
    return model(tokens, positions, cache, mask[:, None], cache.max_seq_len, last_only=True)[:, -1]


class DecodeStep:
    """The one-token decode step: compiled (`compile=True`; falls back to eager with a warning if
    compilation fails), else the fused C++ step (`infer.fused`) where the model allows it, else
    the model's eager forward."""

    def __init__(self, model: Llama, compile: bool = False):
        from llamaworks.infer.fused import FusedDecoder

        self.model = model
        self.compiled: StepFn | None = None
        self.fused = None if compile else FusedDecoder.build(model)
        self._caches: dict[tuple[int, int], KVCache] = {}
        if compile:
            cuda = model.device.type == "cuda"
            mode = "reduce-overhead" if cuda else "max-autotune-no-cudagraphs"
            try:
                self.compiled = torch.compile(self._eager, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
                self._give_up(e)

    def _eager(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
        return forward_last(self.model, tokens, positions, cache, mask)

    def _give_up(self, e: Exception) -> None:
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); decoding eagerly",
                      RuntimeWarning, stacklevel=3)
        self.compiled = None

    def cache(self, batch: int, length: int) -> KVCache:
        """A cache for `batch` rows of `length` tokens, reused across requests of the same shape
        (stale entries are always masked), so a compiled step sees the same buffers again."""
        c = new_cache(self.model, batch, length)
        key = (batch, c.max_seq_len)
        return self._caches.setdefault(key, c)

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
        """Logits [B, vocab] for tokens [B, 1] at positions [B, 1]; mask [B, 1, slots]."""
        if self.fused is not None and cache.k.dtype == torch.float32:
            pos = positions[:, 0]
            # a shared cache is written at row 0's position, as the model does
            write = pos if cache.per_row else pos[:1].expand_as(pos)
            return self.fused(tokens[:, 0], pos, write, cache.k, cache.v, mask[:, 0])
        if self.compiled is not None:
            try:
                return self.compiled(tokens, positions, cache, mask).clone()
            except Exception as e:  # noqa: BLE001
                self._give_up(e)
        return self._eager(tokens, positions, cache, mask)


def cache_dtype(model: Llama) -> torch.dtype:
    return model.dtype


def new_cache(model: Llama, batch: int, length: int, min_size: int = 256) -> KVCache:
    """A cache for `batch` rows of up to `length` tokens. Sizes are powers of two from
    `min_size` (few distinct shapes, so the compiled step rarely recompiles), capped at the
    model's context."""
    size = min_size
    while size < length:
        size *= 2
    size = min(size, model.config.max_seq_len)
    return KVCache(model.config, batch, size, cache_dtype(model), model.device)


@torch.inference_mode()
def decode_batch(model: Llama, prompts: Sequence[Sequence[int]], max_new: int,
                 step: DecodeStep, pad_id: int = 0) -> Iterator[Tensor]:
    """Prefill `prompts` (row 0 must be the longest) and yield logits [B, vocab] for each next
    position; the caller sends back the chosen tokens [B] with `.send`."""
    device = model.device
    b, length = len(prompts), len(prompts[0])
    if any(len(p) > length for p in prompts):
        raise ValueError("row 0 must hold the longest prompt")
    pad = torch.tensor([length - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts],
                          device=device)
    cache = step.cache(b, length + max_new)
    slots = torch.arange(cache.max_seq_len, device=device)
    q = torch.arange(length, device=device)
    positions = (q[None] - pad[:, None]).clamp(min=0)  # [B, T]
    # Query i of row r sees keys r's real tokens up to i; padding queries see themselves only
    # (a fully masked row would turn into NaNs).
    if not bool(pad.any()):  # no padding: causal attention over the prompt's own slots only
        logits = model(tokens, q, cache, None, length, last_only=True)[:, -1]
    else:
        valid = slots[None, None, :] >= pad[:, None, None]
        causal = slots[None, None, :] <= q[None, :, None]
        mask = (valid & causal) | (slots[None, None, :] == q[None, :, None])  # [B, T, S]
        logits = forward_last(model, tokens, positions, cache, mask)
    key_ok = slots[None, :] >= pad[:, None]  # [B, S]
    for i in range(max_new):
        nxt = yield logits
        if i == max_new - 1:
            return
        slot = length + i
        positions = (slot - pad)[:, None]
        mask = (key_ok & (slots[None, :] <= slot))[:, None, :]  # [B, 1, S]
        logits = step(nxt.view(b, 1).to(device), positions, cache, mask)

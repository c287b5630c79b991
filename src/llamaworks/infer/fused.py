"""The fused decode step: one C++ call (`llamaworks::decode_layers`, kernels/decode.cpp) runs every
transformer layer for one new token per row, around the model rather than inside it.

Why: at batch 1 on CPU, eager PyTorch spends ~20 ops per layer per token, and their dispatch costs
more than the weight matvecs (the profile in BENCHMARKS.md). Here the embedding lookup, the final
norm and the output head stay PyTorch modules (the head keeps its own re-check of the top logits);
everything between them is one op. The model's own tensors are passed by reference (no copies), so
the step sees in-place weight updates, but not modules swapped after it was built.

It takes float32 CPU models of every family of model.py (biases, q/k norms, sandwich norms,
GeGLU and sliding layers are passed per layer; Gemma's 1 + w norm multipliers are formed once when
the step is built, so later in-place edits of those norm weights are not seen) whose linear layers
are `nn.Linear` (float32 or bfloat16 weights) or our quantized `BF16Linear` / `Int8Linear` /
`Int4Linear` / `GGUFLinear` on the block kernels, with a float32 KV cache. Anything else (CUDA,
LoRA wrappers, PyTorch's packed int4, a bf16 residual stream) returns None from
`FusedDecoder.build`, and callers run the model eagerly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from llamaworks.infer import kernels
from llamaworks.model import KVCache, Llama, ring_mask

if TYPE_CHECKING:
    from llamaworks.infer.kv import RowView

F32, BF16, Q4_1, Q8_0 = 0, 1, 4, 8


def _matrix(mod: nn.Module) -> tuple[Tensor, int] | None:
    """(weight tensor, kind) of a linear layer the fused step can run, else None."""
    from llamaworks.infer.quantize import BF16Linear, GGUFLinear, Int4Linear, Int8Linear

    if type(mod) is nn.Linear:
        w = mod.weight
        kind = {torch.float32: F32, torch.bfloat16: BF16}.get(w.dtype)
        return None if kind is None else (w.detach(), kind)
    if isinstance(mod, BF16Linear):
        return mod.weight, BF16
    if isinstance(mod, (Int4Linear, Int8Linear)) and mod.blocks is not None:
        return mod.blocks, Q4_1 if isinstance(mod, Int4Linear) else Q8_0
    if isinstance(mod, GGUFLinear):
        return mod.blocks, mod.kind
    return None


def _norm(mod: nn.Module) -> Tensor | None:
    """An RMSNorm's multiplier as float32 (Gemma's 1 + w formed here), or None."""
    w = getattr(mod, "weight", None)
    if w is None or w.dtype != torch.float32:
        return None
    return (1.0 + w.detach()).contiguous() if getattr(mod, "plus_one", False) else w.detach()


def _bias(mod: nn.Module) -> Tensor | None:
    """A projection's bias as float32 (empty when it has none), or None if of another dtype."""
    b = getattr(mod, "bias", None)
    if b is None:
        return torch.empty(0)
    return b.detach().contiguous() if b.dtype == torch.float32 else None


class FusedDecoder:
    """Callable decode step over a model's own weights; build with `FusedDecoder.build(model)`."""

    def __init__(self, model: Llama, weights: list[Tensor], kinds: list[int]):
        self.model, self.weights, self.kinds = model, weights, kinds
        self.tier = kernels.tier()  # the kernel tier this step runs (fixed when built)
        self.sliding = [int(b.sliding) for b in model.model.layers]  # per layer, for the op

    @classmethod
    def build(cls, model: Llama) -> FusedDecoder | None:
        """The fused step for `model`, or None if some part of it is not supported (see module
        docstring) or the kernels are unavailable. LLAMAWORKS_NO_FUSED=1 also gives None."""
        if os.environ.get("LLAMAWORKS_NO_FUSED") or not isinstance(model, Llama):
            return None
        if model.device.type != "cpu" or model.dtype != torch.float32 or not kernels.preferred():
            return None
        if len(model.model.layers) != model.config.n_layers:  # a truncated draft: its cache
            return None  # keeps the config's layer count
        weights: list[Tensor] = []
        kinds: list[int] = []
        none = torch.empty(0)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = [_norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            mats = [_matrix(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                         mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if any(n is None for n in norms) or any(m is None or not m[0].is_contiguous()
                                                    for m in mats):
                return None
            ws = [m[0] for m in mats]  # type: ignore[index]
            extras = [_bias(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
            for owner, names in ((attn, ("q_norm", "k_norm")),
                                 (layer, ("pre_feedforward_layernorm",
                                          "post_feedforward_layernorm"))):
                extras += [_norm(getattr(owner, n)) if hasattr(owner, n) else none
                           for n in names]
            if any(e is None for e in extras):
                return None
            weights += [norms[0], *ws[:4], norms[1], *ws[4:], *extras]
            kinds += [m[1] for m in mats]  # type: ignore[index]
        return cls(model, weights, kinds)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, rope_pos: Tensor, write_pos: Tensor,
                 cache: KVCache | RowView | tuple[Tensor, Tensor], mask: Tensor,
                 cache_rows: Tensor | None = None, head_rows: Tensor | None = None) -> Tensor:
        """Logits (float32) for one new token per row: [B, vocab], or [len(head_rows), vocab]
        for just those rows (the output head is most of a small model's step).

        tokens, rope_pos, write_pos: [B]; cache: a `KVCache` (or a contiguous view of pool
        rows) whose sliding layers may be rings, or (k, v) float32 tensors [layers, rows, n_kv,
        slots, head_dim]; row b uses cache row cache_rows[b] (default b; rows sharing a cache
        row are the tokens of one prompt chunk, at most ring - window + 1 of them with rings)
        written at write_pos; mask: [B, kv_len] bool, the slots each row attends to on global
        layers (sliding layers narrow it to the window, or read their ring by position)."""
        m, cfg = self.model, self.model.config
        x = m.model.embed_tokens(tokens.reshape(-1))
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        write = write_pos.reshape(-1)
        if isinstance(cache, tuple):
            ks, vs = list(cache[0].unbind(0)), list(cache[1].unbind(0))
            ring = 0
        else:
            kv = [cache.layer_kv(i) for i in range(cfg.n_layers)]
            ks, vs = [k for k, _ in kv], [v for _, v in kv]
            ring = cache.ring
        local, local_write = mask, write
        if ring:  # each ring slot by the position it holds
            window = cfg.sliding_window
            if cache_rows is not None and len(cache_rows) > ring - window + 1:
                most = int(torch.bincount(cache_rows).max())
                if most > ring - window + 1:
                    raise ValueError(f"{most} tokens of one row overrun a ring of {ring} slots")
            local, local_write = ring_mask(write, ring, window), write % ring
        elif cfg.sliding_window:  # keys within the window of the row's write slot, as the model
            slots = torch.arange(mask.shape[1], device=mask.device)
            local = mask & (slots[None, :] > write[:, None] - cfg.sliding_window)
        rows = torch.empty(0, dtype=torch.long) if cache_rows is None else cache_rows
        x = kernels.ops(self.tier).decode_layers(
            x, self.weights, self.kinds, ks, vs, write, local_write, rope_pos.reshape(-1),
            m.inv_freq, mask, cfg.n_heads, float(cfg.norm_eps),
            getattr(m, "inv_freq_local", m.inv_freq), local, self.sliding,
            float(cfg.attn_scale or 0.0),
            int(cfg.activation == "gelu_tanh"), rows)
        if head_rows is not None:
            x = x[head_rows]
        return m.lm_head(m.model.norm(x)).float()

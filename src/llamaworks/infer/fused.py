"""The fused decode step: one C++ call (`llamaworks::decode_layers`, kernels/decode.cpp) runs every
transformer layer for one new token per row, around the model rather than inside it.

Why: at batch 1 on CPU, eager PyTorch spends ~20 ops per layer per token, and their dispatch costs
more than the weight matvecs (the profile in BENCHMARKS.md). Here the embedding lookup, the final
norm and the output head stay PyTorch modules (the head keeps its own re-check of the top logits);
everything between them is one op. The model's own tensors are passed by reference (no copies), so
the step sees in-place weight updates, but not modules swapped after it was built.

It takes float32 CPU models of plain Llama layers (`ModelConfig.llama_layers`: no biases, q/k
norms, sliding windows or Gemma norms) whose linear layers are `nn.Linear` (float32 or bfloat16
weights) or our quantized `BF16Linear` / `Int8Linear` / `Int4Linear` on the Q8_0 / Q4_1 block
kernels, with a float32 KV cache. Anything else (CUDA, LoRA wrappers, PyTorch's packed int4, a bf16
residual stream) returns None from `FusedDecoder.build`, and callers run the model eagerly.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from llamaworks.infer import kernels
from llamaworks.model import Llama

F32, BF16, Q4_1, Q8_0 = 0, 1, 4, 8


def _matrix(mod: nn.Module) -> tuple[Tensor, int] | None:
    """(weight tensor, kind) of a linear layer the fused step can run, else None."""
    from llamaworks.infer.quantize import BF16Linear, GGUFLinear, Int4Linear, Int8Linear

    if type(mod) is nn.Linear and mod.bias is None:
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


class FusedDecoder:
    """Callable decode step over a model's own weights; build with `FusedDecoder.build(model)`."""

    def __init__(self, model: Llama, weights: list[Tensor], kinds: list[int]):
        self.model, self.weights, self.kinds = model, weights, kinds
        self.tier = kernels.tier()  # the kernel tier this step runs (fixed when built)

    @classmethod
    def build(cls, model: Llama) -> FusedDecoder | None:
        """The fused step for `model`, or None if some part of it is not supported (see module
        docstring) or the kernels are unavailable. LLAMAWORKS_NO_FUSED=1 also gives None."""
        if os.environ.get("LLAMAWORKS_NO_FUSED") or not isinstance(model, Llama):
            return None
        if not model.config.llama_layers:  # biases, q/k norms, windows, Gemma's norms: eager
            return None
        if model.device.type != "cpu" or model.dtype != torch.float32 or not kernels.preferred():
            return None
        weights: list[Tensor] = []
        kinds: list[int] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(n.dtype != torch.float32 for n in norms):
                return None
            mats = [_matrix(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                         mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if any(m is None or not m[0].is_contiguous() for m in mats):
                return None
            ws = [m[0] for m in mats]  # type: ignore[index]
            weights += [norms[0].detach(), *ws[:4], norms[1].detach(), *ws[4:]]
            kinds += [m[1] for m in mats]  # type: ignore[index]
        return cls(model, weights, kinds)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, rope_pos: Tensor, write_pos: Tensor, k_cache: Tensor,
                 v_cache: Tensor, mask: Tensor) -> Tensor:
        """Logits [B, vocab] (float32) for one new token per row.

        tokens, rope_pos, write_pos: [B]; k_cache/v_cache: [layers, B, n_kv, slots, head_dim]
        float32 (written at write_pos); mask: [B, kv_len] bool, the slots each row attends to."""
        m, cfg = self.model, self.model.config
        x = m.model.embed_tokens(tokens.reshape(-1))
        x = kernels.ops(self.tier).decode_layers(
            x, self.weights, self.kinds, k_cache, v_cache, write_pos.reshape(-1),
            rope_pos.reshape(-1), m.inv_freq, mask, cfg.n_heads, float(cfg.norm_eps))
        return m.lm_head(m.model.norm(x)).float()

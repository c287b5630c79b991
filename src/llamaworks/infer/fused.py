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
`Int4Linear` / `GGUFLinear` on the block kernels, with a float32 KV cache. Mixture-of-experts
layers run inside the step too (router, top-k choice, only the chosen experts' matvecs) with
experts as `model.Experts` (float32 / bf16) or `infer.experts.GGUFExperts` (the file's blocks).
Anything else (CUDA, LoRA wrappers, PyTorch's packed int4, a bf16 residual stream, a shared
expert) returns None from `FusedDecoder.build`, and callers run the model eagerly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from llamaworks.infer import kernels
from llamaworks.model import (
    Attention,
    Experts,
    KVCache,
    Llama,
    MoE,
    ring_mask,
    rope_attention_factor,
)

if TYPE_CHECKING:
    from llamaworks.infer.kv import RowView

F32, BF16, Q4_1, Q8_0 = 0, 1, 4, 8
# The families whose every layer the C++ step knows (a new family runs eagerly until it does).
FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen3_moe")


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


def _moe_entries(mlp: MoE) -> tuple[list[Tensor], list[int]] | None:
    """A MoE layer's (router, gate, up, down, choice bias) for the op and the four kinds, or
    None if the step cannot run it (a shared expert, a LoRA-wrapped or non-float router,
    experts of another type)."""
    from llamaworks.infer.experts import GGUFExperts

    router = _matrix(mlp.gate)
    bias = getattr(mlp.gate, "e_score_correction_bias", None)
    if hasattr(mlp, "shared_expert") or router is None or not router[0].is_contiguous():
        return None
    bias = torch.empty(0) if bias is None else bias.detach()
    if bias.numel() and bias.dtype != torch.float32:
        return None
    ex = mlp.experts
    if isinstance(ex, GGUFExperts):
        if ex.gate_up is not None:
            gate, up = ex.gate_up[:, : ex.hidden], ex.gate_up[:, ex.hidden:]
        else:
            gate, up = ex.gate, ex.up
        return [router[0], gate, up, ex.down, bias], [router[1], *ex.kinds]
    if type(ex) is Experts:
        ws = [p.detach() for p in (ex.gate_proj, ex.up_proj, ex.down_proj)]
        kind = {torch.float32: F32, torch.bfloat16: BF16}.get(ws[0].dtype)
        if kind is None or any(w.dtype != ws[0].dtype or not w.is_contiguous() for w in ws):
            return None
        return [router[0], *ws, bias], [router[1], kind, kind, kind]
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

    def __init__(self, model: Llama, weights: list[Tensor], kinds: list[int],
                 experts: list[Tensor] | None = None, expert_kinds: list[int] | None = None,
                 moe: list[int] | None = None):
        self.model, self.weights, self.kinds = model, weights, kinds
        self.experts, self.expert_kinds = experts or [], expert_kinds or []
        self.moe = moe or [-1] * model.config.n_layers  # per layer: its MoE entries, or -1
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
        if model.config.family not in FUSED_FAMILIES:
            return None
        if any(hasattr(p, "device_mesh") for p in model.parameters()):
            return None  # tensor-parallel shards (DTensors): the eager forward's collectives
        if len(model.model.layers) != model.config.n_layers:  # a truncated draft: its cache
            return None  # keeps the config's layer count
        c = model.config  # attention the C++ step does not have (yet): eager
        if c.mla or c.rope_interleaved or c.nope_layers or c.attention_chunk or c.qk_l2_norm \
                or c.router_pre or c.router_groups > 1 or c.router_bias or c.shared_hidden_dim \
                or rope_attention_factor(c.rope_scaling) != 1.0:
            return None  # DeepSeek's latent attention and routing, Llama 4's iRoPE and experts,
            #              YaRN's scaled cos/sin
        weights: list[Tensor] = []
        kinds: list[int] = []
        experts: list[Tensor] = []
        expert_kinds: list[int] = []
        moe: list[int] = []
        none = torch.empty(0)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if type(attn) is not Attention:
                return None
            norms = [_norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            if isinstance(mlp, MoE):
                entry = _moe_entries(mlp)
                if entry is None:
                    return None
                moe.append(len(experts) // 5)
                experts += entry[0]
                expert_kinds += entry[1]
                ffn = [(none, F32)] * 3  # unused slots of a MoE layer
            else:
                moe.append(-1)
                ffn = [_matrix(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            mats = [_matrix(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
            mats += ffn
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
        return cls(model, weights, kinds, experts, expert_kinds, moe)

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
            int(cfg.activation == "gelu_tanh"), rows, self.experts, self.expert_kinds, self.moe,
            cfg.n_active_experts, int(cfg.router == "sigmoid"), int(cfg.router_norm),
            float(cfg.router_scale))
        if head_rows is not None:
            x = x[head_rows]
        return m.lm_head(m.model.norm(x)).float()

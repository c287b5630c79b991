"""The Llama transformer (Touvron et al., 2023) and the families built like it.

Pre-norm decoder: RMSNorm, rotary position embeddings (with Llama-3 or linear frequency scaling),
grouped-query attention on `F.scaled_dot_product_attention`, a gated MLP, tied or untied
embeddings, and an optional preallocated KV cache for incremental decoding. Llama 2/3, SmolLM2,
Mistral, Qwen2/2.5, Qwen3 and Gemma 3 differ only in switches of `ModelConfig`, read here in one
place each (litgpt's way: one model with flags, not a module per family): q/k/v biases (Qwen2),
per-head q/k norms (Qwen3, Gemma 3), sliding-window layers (Mistral, Gemma 3's 5 local : 1 global
with their own RoPE base), Gemma's (1 + w) norms, norms after attention and MLP, GeGLU, scaled
embeddings and its attention scale. Mixture-of-experts layers (Mixtral, Qwen3-MoE, Llama 4)
replace the MLP by a router and stacked experts (`MoE`, `route`: router variants are config data;
Llama 4 adds a shared expert and weighs the expert input). Llama 4's iRoPE attention: Meta's
interleaved RoPE pairs, layers without RoPE (global, temperature-tuned queries), the others
attending within fixed chunks with weightless q/k norms. Module and parameter names are
transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), so our state dict *is* the HF
checkpoint layout and needs no renaming (experts excepted: stacked here, one tensor each or fused
in HF files, see `checkpoint.experts`). No I/O, parallelism or quantization in here: those wrap
the model from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamaworks.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as the reference implementations do; Gemma's
    `plus_one` form is (x / rms(x) * (1 + weight)) in float32, then cast."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | str | None = None,
                 plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.full((dim,), 0.0 if plus_one else 1.0, device=device))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


# -- rotary embeddings -------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), optionally with Llama-3's long-context scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling or scaling.get("rope_type", "llama3") == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type") == "linear":  # positions divided by `factor`
        return inv_freq / factor
    if scaling.get("rope_type") == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> Tensor:
    """YaRN (Peng et al., 2023) as transformers computes it: frequencies that turn fewer than
    `beta_slow` times over the original context are interpolated (divided by `factor`), those
    turning more than `beta_fast` times kept, a linear ramp between."""
    factor = float(scaling["factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the feature index turning `rotations` times
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not scaled)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """What cos/sin are multiplied by: YaRN's `attention_factor` (given, or from factor,
    mscale and mscale_all_dim as transformers infers it); 1 for every other RoPE."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and all_dim:
        return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(all_dim))
    return yarn_mscale(factor)


def llama3_freq_factors(head_dim: int, theta: float, scaling: dict) -> Tensor:
    """The per-frequency divisors llama.cpp stores as the `rope_freqs` GGUF tensor."""
    return rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype, scale: float = 1.0
                 ) -> tuple[Tensor, Tensor]:
    """cos/sin tables for `positions` ([T] or [B, T]), shaped to broadcast over heads, times
    `scale` (YaRN's attention factor)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.to(dtype), sin.to(dtype)
    if positions.dim() == 1:
        return cos[None, None], sin[None, None]  # [1, 1, T, hd]
    return cos[:, None], sin[:, None]  # [B, 1, T, hd]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2): HF's layout (Meta's interleaved pairs, permuted)."""
    return x * cos + _rotate_half(x) * sin


def apply_rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (2i, 2i + 1): Meta's layout, which HF's Llama 4 keeps (its complex
    `freqs_cis`); cos/sin as for `apply_rope` (each frequency twice), computed in float32."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].float(), sin[..., :half].float()
    pairs = x.float().unflatten(-1, (half, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) without a weight, in float32 (Llama 4's q/k norm)."""
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scale(positions: Tensor, floor_scale: float, scale: float) -> Tensor:
    """Llama 4's attention temperature for no-RoPE layers (arXiv 2501.19399): queries at
    position p are multiplied by 1 + scale * log(1 + floor((p + 1) / floor_scale))."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * scale + 1.0


# -- KV cache ----------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys/values for every layer: [batch, n_kv_heads, max_seq_len, head_dim].

    `update` writes the new positions in place and returns the first `kv_len` positions.
    per_row: each batch row is written at its own positions (`input_pos` [B, T], as continuous
    batching needs); the model then takes those positions as given and needs `attn_mask` and
    `kv_len`. Otherwise all rows share one set of write positions.

    ring: slots of each sliding layer's cache (0: every layer holds max_seq_len). A sliding layer
    only ever attends to its last `sliding_window` positions, so its cache can be a ring: position
    p lives in slot p % ring, and the model masks those slots by the position they hold (see
    `ring_mask`). One forward may then write at most ring - sliding_window + 1 tokens per row
    (later tokens of a chunk overwrite slots that earlier ones still need otherwise), so a ring is
    sized window + the most tokens a caller feeds at once. Global layers keep `k`/`v`
    [n_global, ...]; ring layers `rk`/`rv` [n_ring, batch, n_kv, ring, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 per_row: bool = False, zero: bool = True, ring: int = 0):
        super().__init__()
        sliding = [cfg.is_sliding(i) for i in range(cfg.n_layers)]
        self.ring = ring if ring and any(sliding) else 0
        self.ringed = [bool(self.ring) and x for x in sliding]
        self.index = [sum(1 for j in range(i) if self.ringed[j] == self.ringed[i])
                      for i in range(cfg.n_layers)]  # each layer's place in its tensor
        n_ring = sum(self.ringed)
        new = torch.zeros if zero else torch.empty  # empty: every slot is written before use
        heads, k_dim, v_dim = cfg.kv_cache_shape  # MLA: one latent and one RoPE key
        for name, layers, slots in (("", cfg.n_layers - n_ring, max_seq_len),
                                    ("r", n_ring, self.ring)):
            for kv, dim in (("k", k_dim), ("v", v_dim)):
                shape = (layers, batch_size, heads, slots, dim)
                t = new(shape, dtype=dtype, device=device) if slots else None
                self.register_buffer(name + kv, t, persistent=False)
        self.max_seq_len = max_seq_len
        self.window = cfg.sliding_window or 0
        self.per_row = per_row

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s keys and values [batch, n_kv, slots, head_dim] (views)."""
        i = self.index[layer]
        if self.ringed[layer]:
            return self.rk[i], self.rv[i]
        return self.k[i], self.v[i]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        """Write k/v [B, n_kv, T, hd] at `input_pos` ([T], or [B, T] per row); a ring layer
        writes at input_pos % ring and returns its whole ring."""
        ck, cv = KVCache.layer_kv(self, layer)
        if self.ringed[layer]:
            input_pos, kv_len = input_pos % self.ring, self.ring
        if input_pos.dim() == 1:
            ck.index_copy_(2, input_pos, k.to(ck.dtype))
            cv.index_copy_(2, input_pos, v.to(cv.dtype))
        else:
            index = input_pos[:, None, :, None]  # keys and values may differ in size (MLA)
            ck.scatter_(2, index.expand_as(k), k.to(ck.dtype))
            cv.scatter_(2, index.expand_as(v), v.to(cv.dtype))
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


def ring_mask(query_pos: Tensor, ring: int, window: int) -> Tensor:
    """[..., ring] bool for queries at `query_pos` (any shape): ring slot s holds, of the
    positions p = s mod ring, the latest one not after the query (while a forward writes at most
    ring - window + 1 tokens per row), and the query sees it when it is within the window:
    (q - s) mod ring < window, and it exists: (q - s) mod ring <= q."""
    q = query_pos[..., None]
    back = (q - torch.arange(ring, device=query_pos.device)) % ring
    return (back < window) & (back <= q)


def _chunk_mask(mask: Tensor | None, query_pos: Tensor, kv_len: int, chunk: int) -> Tensor:
    """`mask` (causal if None) narrowed to keys in the query's chunk (Llama 4's chunked
    attention, as transformers' `chunked_overlay`): key k is seen from query q when
    k // chunk == q // chunk. query_pos as for `_window_mask`."""
    key = torch.arange(kv_len, device=query_pos.device)
    q = query_pos[..., None]
    near = torch.div(key, chunk, rounding_mode="floor") == torch.div(q, chunk,
                                                                      rounding_mode="floor")
    if mask is None:
        near = near & (key <= q)
    if query_pos.dim() == 2:
        near = near[:, None]
    return near if mask is None else mask & near


def _window_mask(mask: Tensor | None, query_pos: Tensor, kv_len: int, window: int) -> Tensor:
    """`mask` (causal if None) narrowed to keys within `window` of each query, as HF and llama.cpp
    do: key k is seen from query q when q - window < k <= q. query_pos: cache positions [T] or
    [B, T] (per-row writes)."""
    key = torch.arange(kv_len, device=query_pos.device)
    q = query_pos[..., None]
    near = key > q - window
    if mask is None:
        near = near & (key <= q)
    if query_pos.dim() == 2:
        near = near[:, None]  # [B, 1, T, kv_len]
    return near if mask is None else mask & near


# -- blocks ------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None):
        super().__init__()
        self.layer, self.n_heads, self.n_kv = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim, self.scale = cfg.head_dim, cfg.attn_scale
        q, kv, bias = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.dim, q, bias=bias, device=device)
        self.k_proj = nn.Linear(cfg.dim, kv, bias=bias, device=device)
        self.v_proj = nn.Linear(cfg.dim, kv, bias=bias, device=device)
        self.o_proj = nn.Linear(q, cfg.dim, bias=cfg.o_bias, device=device)
        if cfg.qk_norm:  # over each head's features, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, device, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, device, cfg.norm_plus_one)
        self.rope = cfg.uses_rope(layer)
        self.rotate = apply_rope_pairs if cfg.rope_interleaved else apply_rope
        self.l2_eps = cfg.norm_eps if cfg.qk_l2_norm and self.rope else None
        self.temperature = None if self.rope else cfg.attn_temperature

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, input_pos: Tensor | None, kv_len: int,
                rope_pos: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if self.l2_eps is not None:
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        if self.temperature is not None:  # positions: the rope positions ([T] or [B, T])
            pos = rope_pos if rope_pos is not None else input_pos
            t_scale = temperature_scale(pos, *self.temperature)
            q = (q * (t_scale[:, None, :, None] if t_scale.dim() == 2 else t_scale[:, None])
                 ).to(q.dtype)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v, kv_len)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Grouped-query attention: each K/V head serves n_heads / n_kv query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and t > 1,
                                           scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values of every head come from one
    normed latent c (kv_lora_rank) by `kv_b_proj`, plus one RoPE key shared by the heads; only c
    and that key are cached per token. Queries: q_proj, or a normed low-rank q_a -> q_b.
    Prefill expands c into per-head keys/values (transformers' way); decode (a few new tokens
    over a cache) absorbs kv_b into the query and the output instead, as llama.cpp and
    DeepSeek's inference code do: scores q_nope W_uk c + q_rope k_rope, outputs (p c) W_uv^T,
    so the cached latents are never expanded."""

    ABSORB_MAX_TOKENS = 8  # new tokens per forward up to which decode runs absorbed

    def __init__(self, cfg: ModelConfig, layer: int, device=None):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_dim, cfg.head_dim, cfg.v_head_dim
        self.rank, self.scale, self.eps = cfg.kv_lora_rank, cfg.attn_scale, cfg.norm_eps
        self.interleaved = cfg.rope_interleaved
        qk, bias = self.nope + self.rope_dim, cfg.qkv_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias, device=device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, device)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk, bias=False,
                                      device=device)
        else:
            self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * qk, bias=False, device=device)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.rank + self.rope_dim, bias=bias,
                                            device=device)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6, device)
        self.kv_b_proj = nn.Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False,
                                   device=device)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=cfg.o_bias,
                                device=device)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.interleaved:  # pairs (2i, 2i+1) -> (i, i + d/2), as transformers' DeepSeek
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, input_pos: Tensor | None, kv_len: int,
                rope_pos: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        h, nope = self.n_heads, self.nope
        q = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj")
             else self.q_proj(x))
        q = q.view(b, t, h, nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([nope, self.rope_dim], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c).view(b, 1, t, self.rank)
        k_rope = self._rotate(k_rope.view(b, 1, t, self.rope_dim), cos, sin)
        q_rope = self._rotate(q_rope, cos, sin)
        if cache is not None:
            c, k_rope = cache.update(self.layer, input_pos, c, k_rope, kv_len)
            c, k_rope = c.to(q.dtype), k_rope.to(q.dtype)
        w = getattr(self.kv_b_proj, "weight", None)
        if cache is not None and t <= self.ABSORB_MAX_TOKENS and isinstance(w, Tensor):
            y = self._absorbed(q_nope, q_rope, c, k_rope, w, mask, t)
        else:
            kv = self.kv_b_proj(c[:, 0]).view(b, -1, h, nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([nope, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_rope.expand(-1, h, -1, -1)), dim=-1)
            y = F.scaled_dot_product_attention(torch.cat((q_nope, q_rope), dim=-1), k, v,
                                               attn_mask=mask, is_causal=mask is None and t > 1,
                                               scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * self.v_dim))

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, c: Tensor, k_rope: Tensor, w: Tensor,
                  mask: Tensor | None, t: int) -> Tensor:
        """Attention in the latent space: [B, H, T, v_dim] without expanding c."""
        w = w.view(self.n_heads, self.nope + self.v_dim, self.rank).to(q_nope.dtype)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [H, nope, rank], [H, v, rank]
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        scores = (q_lat @ c.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) * self.scale
        if mask is None and t > 1:  # causal over the last t positions of the cache
            n = c.shape[2]
            mask = torch.ones(t, n, dtype=torch.bool, device=c.device).tril(n - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.float().softmax(-1).to(c.dtype)
        return torch.einsum("bhtr,hvr->bhtv", p @ c, w_uv)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with tanh-GELU (Gemma)."""

    def __init__(self, cfg: ModelConfig, device=None, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False, device=device)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False, device=device)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False, device=device)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


def route(logits: Tensor, cfg: ModelConfig, bias: Tensor | None = None
          ) -> tuple[Tensor, Tensor, Tensor]:
    """(weights [N, k] float32, expert indices [N, k], scores [N, E] float32) from router
    logits [N, E]. Scores are a softmax over all experts (Mixtral, Qwen3-MoE) or each expert's
    sigmoid (Llama 4, DeepSeek-V3); `bias` (DeepSeek's correction) moves only the choice, the
    weights stay the unbiased scores; with router groups the choice is limited to the
    `router_topk_groups` groups whose two best (biased) scores sum highest. The weights are
    renormalized over the k chosen when `router_norm`, then scaled by `router_scale`."""
    scores = logits.float().softmax(-1) if cfg.router == "softmax" else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if cfg.router_groups > 1:  # DeepSeek: only experts of the best groups (by top-2 sums)
        grouped = choice.unflatten(-1, (cfg.router_groups, -1))
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.router_topk_groups, -1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
    idx = choice.topk(cfg.n_active_experts, dim=-1).indices
    w = scores.gather(-1, idx)
    if cfg.router_norm:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if cfg.router == "sigmoid" else 0.0))
    return w * cfg.router_scale, idx, scores


def dispatch(x: Tensor, weights: Tensor, idx: Tensor, n_experts: int,
             run: Callable[[int, Tensor], Tensor], pre: bool = False) -> Tensor:
    """sum_j weights[:, j] * run(idx[:, j], x) for x [N, dim] (pre: run(e, weight * x)). Token
    copies are sorted by expert so each chosen expert runs once over all its tokens (one GEMM
    per projection; on CPU a loop of GEMMs measured as fast as torch._grouped_mm, see
    BENCHMARKS.md); experts no token chose are skipped. Every experts module (stacked, LoRA,
    quantized) runs through this."""
    k = idx.shape[-1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    w = weights.reshape(-1)[order, None]
    xs = (x[order // k] * w).to(x.dtype) if pre else x[order // k]
    outs, start = [x.new_zeros(0, x.shape[-1])], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(run(e, xs[start:start + n]).to(x.dtype))
            start += n
    ys = torch.cat(outs) if pre else torch.cat(outs) * w
    return torch.zeros_like(x).index_add_(0, order // k, ys.to(x.dtype))


def gated_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, gelu: bool) -> Tensor:
    """down(act(gate x) * up x) for one expert's weight matrices."""
    g = F.linear(x, gate)
    g = F.gelu(g, approximate="tanh") if gelu else F.silu(g)
    return F.linear(g * F.linear(x, up), down)


class Experts(nn.Module):
    """E gated MLPs stored stacked, as GGUF stores them and grouped kernels want them:
    gate_proj / up_proj [E, I, dim], down_proj [E, dim, I] (HF's per-expert tensors are stacked
    on load and split on save, see `checkpoint.experts`)."""

    def __init__(self, n: int, dim: int, hidden: int, activation: str, device=None):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, hidden, dim, device=device))
        self.up_proj = nn.Parameter(torch.empty(n, hidden, dim, device=device))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden, device=device))
        self.n_experts, self.gelu = n, activation == "gelu_tanh"

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor, pre: bool = False) -> Tensor:
        """sum_j weights[:, j] * expert_idx[:, j](x) for x [N, dim] (pre: expert(weight * x),
        Llama 4's order), through `dispatch`. The stacked weights are split once per forward
        (indexing them per expert would make backward add a full-size gradient per expert)."""
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), \
            self.down_proj.unbind(0)
        return dispatch(x, weights, idx, self.n_experts,
                        lambda e, t: gated_mlp(t, gates[e], ups[e], downs[e], self.gelu), pre)


class MoE(nn.Module):
    """Mixture-of-experts feed-forward: a linear router (`gate`) picks `n_active_experts` of
    `n_experts` per token (see `route`), their outputs are summed by the router's weights, plus
    an always-on `shared_expert` when the family has one. While training, `aux_loss` holds the
    Switch-Transformer load-balancing loss E * sum_e f_e * P_e of the last forward (f_e the share
    of token slots sent to e, P_e its mean score) and `load` the tokens each expert received."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False, device=device)
        if cfg.router_bias:  # moves the choice, not the weights (a buffer: not trained by SGD)
            self.gate.register_buffer("e_score_correction_bias",
                                      torch.zeros(cfg.n_experts, device=device))
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.moe_hidden_dim, cfg.activation, device)
        if cfg.shared_hidden_dim:
            self.shared_expert = MLP(cfg, device, cfg.shared_hidden_dim)
        self.aux_loss: Tensor | None = None
        self.load: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, scores = route(self.gate(x), self.cfg,
                                     getattr(self.gate, "e_score_correction_bias", None))
        y = (self.experts(x, weights, idx, True) if self.cfg.router_pre
             else self.experts(x, weights, idx))
        if hasattr(self, "shared_expert"):
            y = y + self.shared_expert(x)
        if self.training:
            n_exp = self.cfg.n_experts
            load = torch.bincount(idx.reshape(-1), minlength=n_exp)
            share = load.float() / idx.numel()
            probs = scores if self.cfg.router == "softmax" else scores / scores.sum(-1, True)
            self.aux_loss = n_exp * (share * probs.mean(0)).sum()
            self.load = load.detach()
        return y.reshape(shape)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)). With sandwich norms (Gemma 3) each branch's output
    is normed too: HF names them input / post_attention / pre_feedforward / post_feedforward, and
    `post_attention_layernorm` is then the attention output's norm, not the MLP input's."""

    def __init__(self, cfg: ModelConfig, layer: int, device=None):
        super().__init__()
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, device, cfg.norm_plus_one)
        self.sliding, self.chunked = cfg.is_sliding(layer), cfg.is_chunked(layer)
        self.input_layernorm = norm()
        self.self_attn = (LatentAttention if cfg.mla else Attention)(cfg, layer, device)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MoE(cfg, device) if cfg.is_moe(layer) else MLP(cfg, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, input_pos: Tensor | None, kv_len: int,
                rope_pos: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos, kv_len,
                           rope_pos)
        if not hasattr(self, "pre_feedforward_layernorm"):
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    """Embeddings, blocks, final norm (HF's `LlamaModel`, hence the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        # On meta, no initializer runs: the first `normal_` of a meta tensor imports torch's
        # Python decompositions (dynamo, sympy: ~830 modules, 2 s and 74 MB resident)
        meta = device is not None and torch.device(device).type == "meta"
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.dim, device=device,
            _weight=torch.empty(cfg.vocab_size, cfg.dim, device=device) if meta else None)
        self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device, cfg.norm_plus_one)


class Llama(nn.Module):
    """Causal language model. Build on `device="meta"` and call `init_weights` (or load a state
    dict with `assign=True`, then `tie_weights`) to avoid allocating twice."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, device)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, device=device)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2, device=device),
                             persistent=False)
        if cfg.rope_local_theta is not None:  # sliding layers' own base (Gemma 3)
            self.register_buffer("inv_freq_local", torch.empty(cfg.head_dim // 2, device=device),
                                 persistent=False)
        if device is None or torch.device(device).type != "meta":
            self.reset_rope()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the activations live (the final norm's weight: every model has one, whatever
        form its embedding and linear layers take)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual stream (and of the KV cache)."""
        return self.model.norm.weight.dtype

    def reset_rope(self) -> None:
        cfg = self.config
        device = self.device  # not the buffer's: it may be on meta
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        if cfg.rope_local_theta is not None:  # unscaled, as HF's local rotary embedding
            self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta).to(device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights: N(0, std) for matrices (output projections scaled by 1/sqrt(2L), as in
        GPT-2/torchtitan), neutral norms (ones; zeros in the 1 + w form), zero biases. Materialize
        from meta with `to_empty` first."""
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") or self.config.norm_plus_one else 1.0)
            else:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight",
                                              "experts.down_proj")) else std
                p.normal_(0.0, s, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self.reset_rope()
        self.tie_weights()

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_seq_len or self.config.max_seq_len,
                       dtype or p.dtype, p.device)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None,
                cache: KVCache | None = None, attn_mask: Tensor | None = None,
                kv_len: int | None = None, hidden_only: bool = False,
                last_only: bool = False) -> Tensor:
        """Logits [B, T, vocab] (float32) for `tokens` [B, T].

        input_pos: positions of these tokens ([T], or [B, T] for per-row positions, with a
        per-row cache or none); default 0..T-1. With `cache`, keys/values are written at
        `input_pos` and attention runs over the first `kv_len` cached positions (default: last
        position + 1) under a causal mask.
        attn_mask: optional boolean mask (True = attend) broadcastable to [B, 1, T, kv_len],
        e.g. to hide left padding; it replaces the default causal mask. last_only: logits of the
        last position only ([B, 1, vocab]), so a prompt does not pay the output head for every
        position (with a 262k vocabulary that is most of a prefill)."""
        b, t = tokens.shape
        default_pos = input_pos is None
        if default_pos:
            input_pos = torch.arange(t, device=tokens.device)
        x = self.model.embed_tokens(tokens)
        cfg = self.config
        if cfg.embed_scale is not None:  # in the activations' dtype, as HF does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, input_pos, x.dtype,
                                rope_attention_factor(cfg.rope_scaling))
        local = (rope_cos_sin(self.inv_freq_local, input_pos, x.dtype)
                 if cfg.rope_local_theta is not None else (cos, sin))
        mask = attn_mask
        per_row = cache is not None and cache.per_row
        if input_pos.dim() == 2 and cache is not None and not per_row:
            raise ValueError("per-row positions [B, T] need a per-row cache (KVCache(per_row="
                             "True)): a shared cache has one set of write slots")
        write_pos = input_pos if input_pos.dim() == 1 or per_row else input_pos[0]
        if cache is not None:
            if kv_len is None:
                kv_len = int(write_pos[-1]) + 1
            # one new token may see the whole cache: no mask; a prompt written at 0..T-1 and
            # attending to just those: plain causal attention (SDPA's fused causal kernel)
            if mask is None and t > 1 and not (kv_len == t and (default_pos or (
                    write_pos.dim() == 1 and int(write_pos[0]) == 0
                    and int(write_pos[-1]) == t - 1))):
                key_pos = torch.arange(kv_len, device=tokens.device)
                mask = key_pos[None, :] <= write_pos[:, None]  # [T, kv_len]
        kv_len = kv_len or t
        window = cfg.sliding_window
        ring = getattr(cache, "ring", 0)  # sliding layers' cache is a ring of slots
        if ring:
            if t > ring - window + 1:
                raise ValueError(f"{t} tokens in one forward overrun a ring of {ring} slots "
                                 f"for a window of {window}: feed at most "
                                 f"{ring - window + 1} at a time")
            near = ring_mask(write_pos, ring, window)
            near = near[:, None] if near.dim() == 3 else near  # [B, 1, T, ring] or [T, ring]
        elif window and kv_len > window and any(b.sliding for b in self.model.layers):
            near = _window_mask(mask, write_pos, kv_len, window)
        else:
            near = mask
        chunk = cfg.attention_chunk
        chunked = (_chunk_mask(mask, write_pos, kv_len, chunk)
                   if chunk and kv_len > chunk and any(b.chunked for b in self.model.layers)
                   else mask)
        for layer in self.model.layers:
            if layer.sliding:
                x = layer(x, *local, near, cache, write_pos, kv_len, input_pos)
            else:
                x = layer(x, cos, sin, chunked if layer.chunked else mask, cache, write_pos,
                          kv_len, input_pos)
        x = self.model.norm(x)
        if hidden_only:
            return x
        return self.lm_head(x[:, -1:] if last_only else x).float()

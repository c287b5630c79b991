"""The Llama transformer (Touvron et al., 2023) and the families built like it.

Pre-norm decoder: RMSNorm, rotary position embeddings (with Llama-3 or linear frequency scaling),
grouped-query attention on `F.scaled_dot_product_attention`, a gated MLP, tied or untied
embeddings, and an optional preallocated KV cache for incremental decoding. Llama 2/3, SmolLM2,
Mistral, Qwen2/2.5, Qwen3 and Gemma 3 differ only in switches of `ModelConfig`, read here in one
place each (litgpt's way: one model with flags, not a module per family): q/k/v biases (Qwen2),
per-head q/k norms (Qwen3, Gemma 3), sliding-window layers (Mistral, Gemma 3's 5 local : 1 global
with their own RoPE base), Gemma's (1 + w) norms, norms after attention and MLP, GeGLU, scaled
embeddings and its attention scale. Module and parameter names are transformers'
(`model.layers.0.self_attn.q_proj.weight`, ...), so our state dict *is* the HF checkpoint layout
and needs no renaming. No I/O, parallelism or quantization in here: those wrap the model from
outside.
"""

from __future__ import annotations

import math

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


def llama3_freq_factors(head_dim: int, theta: float, scaling: dict) -> Tensor:
    """The per-frequency divisors llama.cpp stores as the `rope_freqs` GGUF tensor."""
    return rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for `positions` ([T] or [B, T]), shaped to broadcast over heads."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if positions.dim() == 1:
        return cos[None, None], sin[None, None]  # [1, 1, T, hd]
    return cos[:, None], sin[:, None]  # [B, 1, T, hd]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2): HF's layout (Meta's interleaved pairs, permuted)."""
    return x * cos + _rotate_half(x) * sin


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
        for name, layers, slots in (("", cfg.n_layers - n_ring, max_seq_len),
                                    ("r", n_ring, self.ring)):
            shape = (layers, batch_size, cfg.n_kv_heads, slots, cfg.head_dim)
            for kv in "kv":
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
            index = input_pos[:, None, :, None].expand_as(k)
            ck.scatter_(2, index, k.to(ck.dtype))
            cv.scatter_(2, index, v.to(cv.dtype))
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


def ring_mask(query_pos: Tensor, ring: int, window: int) -> Tensor:
    """[..., ring] bool for queries at `query_pos` (any shape): ring slot s holds, of the
    positions p = s mod ring, the latest one not after the query (while a forward writes at most
    ring - window + 1 tokens per row), and the query sees it when it is within the window:
    (q - s) mod ring < window, and it exists: (q - s) mod ring <= q."""
    q = query_pos[..., None]
    back = (q - torch.arange(ring, device=query_pos.device)) % ring
    return (back < window) & (back <= q)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, input_pos: Tensor | None, kv_len: int) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v, kv_len)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Grouped-query attention: each K/V head serves n_heads / n_kv query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and t > 1,
                                           scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with tanh-GELU (Gemma)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False, device=device)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False, device=device)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False, device=device)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)). With sandwich norms (Gemma 3) each branch's output
    is normed too: HF names them input / post_attention / pre_feedforward / post_feedforward, and
    `post_attention_layernorm` is then the attention output's norm, not the MLP input's."""

    def __init__(self, cfg: ModelConfig, layer: int, device=None):
        super().__init__()
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, device, cfg.norm_plus_one)
        self.sliding = cfg.is_sliding(layer)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, device)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, input_pos: Tensor | None, kv_len: int) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos, kv_len)
        if not hasattr(self, "pre_feedforward_layernorm"):
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    """Embeddings, blocks, final norm (HF's `LlamaModel`, hence the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, device=device)
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
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.normal_(0.0, s, generator=generator)
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
        cos, sin = rope_cos_sin(self.inv_freq, input_pos, x.dtype)
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
        for layer in self.model.layers:
            if layer.sliding:
                x = layer(x, *local, near, cache, write_pos, kv_len)
            else:
                x = layer(x, cos, sin, mask, cache, write_pos, kv_len)
        x = self.model.norm(x)
        if hidden_only:
            return x
        return self.lm_head(x[:, -1:] if last_only else x).float()

"""Model shapes: the `ModelConfig` dataclass, named presets, and readers for HF/GGUF/Meta configs.

One source of truth for every stage. Field names are short; `to_hf_dict`/`from_hf_dict` map them to
and from transformers' `config.json` so our checkpoints open in HF tools unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llamaworks.errors import CheckpointError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text",  # HF model_type values
            "mixtral", "qwen3_moe", "llama4_text", "deepseek_v3")
MOE_FAMILIES = ("mixtral", "qwen3_moe", "llama4_text", "deepseek_v3")
ROUTERS = ("softmax", "sigmoid")  # how router logits become expert scores
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types values
CHUNKED = "chunked_attention"  # Llama 4: attend within fixed chunks of positions
# GGUF general.architecture -> family. llama.cpp writes Mistral as `llama` (without its window).
# Mixtral is `llama` with `llama.expert_count` (family mixtral, see from_gguf_metadata).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
              "qwen3moe": "qwen3_moe", "llama4": "llama4_text", "deepseek2": "deepseek_v3"}


@dataclass
class ModelConfig:
    """Shape and numerics of one decoder-only model: Llama and the families that differ from it
    only in the switches below (Mistral, Qwen2/2.5, Qwen3, Gemma 3 text); `family` is the HF
    model_type, which decides the config.json and GGUF spellings."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    hidden_dim: int | None = None  # None = Meta's rule: 2/3*4*dim * multiplier, round up
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int | None = None  # None = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    name: str = ""
    family: str = "llama"
    # -- where the families differ from Llama (defaults: Llama) --
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm as x_hat * (1 + w) in float32 (Gemma)
    sandwich_norm: bool = False  # norms after attention and MLP as well as before (Gemma 3)
    activation: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(dim))
    attn_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim)
    sliding_window: int | None = None  # keys closer than this to the query, on sliding layers
    layer_types: list[str] | None = None  # per layer SLIDING or FULL; None = all SLIDING if a
    #                                       window is set (Mistral), else all FULL
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None = same
    # -- mixture of experts (n_experts 0: every layer dense) --
    n_experts: int = 0  # routed experts per MoE layer
    n_active_experts: int = 0  # experts each token is sent to (top-k)
    moe_hidden_dim: int | None = None  # each expert's hidden size; None = hidden_dim
    shared_hidden_dim: int = 0  # an always-on shared expert of this hidden size (0: none)
    router: str = "softmax"  # scores: softmax over all experts (Mixtral, Qwen3) or sigmoid
    router_norm: bool = True  # renormalize the chosen k scores to sum to 1
    router_scale: float = 1.0  # chosen weights multiplied by this (DeepSeek's routed scale)
    router_bias: bool = False  # a per-expert bias added to scores for choosing only (DeepSeek-V3's
    #                            auxiliary-loss-free balancing; `gate.e_score_correction_bias`)
    moe_layers: list[int] | None = None  # which layers are MoE; None = all (when n_experts)
    router_pre: bool = False  # the router weight scales the expert's input, not its output
    #                           (Llama 4; the same for top-1 and bias-free experts up to SiLU)
    # -- Llama 4 attention (iRoPE) --
    rope_interleaved: bool = False  # RoPE on pairs (2i, 2i+1), Meta's layout (Llama 4 in HF)
    nope_layers: list[int] | None = None  # layers without RoPE (global attention there)
    attention_chunk: int | None = None  # CHUNKED layers attend within chunks of this size
    attn_temperature: list[float] | None = None  # [floor_scale, scale]: no-RoPE layers scale q
    #                         by 1 + scale * log(1 + floor((pos + 1) / floor_scale))
    qk_l2_norm: bool = False  # weightless RMS norm of q and k after RoPE, on RoPE layers
    router_groups: int = 1  # DeepSeek: experts in groups; a token's k come from its best
    router_topk_groups: int = 1  # `router_topk_groups` groups (scored by their top-2 sum)
    # -- multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0: ordinary attention) --
    kv_lora_rank: int = 0  # keys/values from a normed latent of this size (what is cached)
    q_lora_rank: int | None = None  # queries through a normed low-rank bottleneck (None: direct)
    qk_nope_dim: int = 0  # per-head query/key features without RoPE (from the latent)
    v_head_dim: int = 0  # per-head value size; head_dim is then the RoPE part, shared by heads
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # pass-through HF keys

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "llama3") not in (
            "llama3", "linear", "yarn", "default"
        ):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}; 'llama3', "
                             "'linear' and 'yarn' are implemented")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {FAMILIES}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            kinds = {SLIDING, FULL, CHUNKED}
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - kinds:
                raise ValueError(f"layer_types must list {SLIDING!r}, {CHUNKED!r} or {FULL!r} "
                                 f"for each of the {self.n_layers} layers")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise ValueError("sliding layers need a sliding_window")
            if CHUNKED in self.layer_types and not self.attention_chunk:
                raise ValueError("chunked layers need an attention_chunk")
        if self.nope_layers is not None:
            self.nope_layers = sorted({int(i) for i in self.nope_layers})
        if self.n_experts:
            if not 0 < self.n_active_experts <= self.n_experts:
                raise ValueError(f"n_active_experts must be in 1..n_experts ({self.n_experts}), "
                                 f"got {self.n_active_experts}")
            if self.moe_hidden_dim is None:
                self.moe_hidden_dim = self.hidden_dim
            if self.router not in ROUTERS:
                raise ValueError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
            if self.moe_layers is not None:
                self.moe_layers = sorted({int(i) for i in self.moe_layers})
                if any(not 0 <= i < self.n_layers for i in self.moe_layers):
                    raise ValueError(f"moe_layers {self.moe_layers} outside 0..{self.n_layers - 1}")
        elif self.family in MOE_FAMILIES:
            raise ValueError(f"family {self.family!r} needs n_experts > 0")
        if self.n_experts and self.family not in MOE_FAMILIES:
            raise ValueError(f"experts need a mixture-of-experts family ({MOE_FAMILIES}); "
                             f"{self.family!r} checkpoints have none")
        if self.family == "mixtral" and self.moe_layers is not None:
            raise ValueError("Mixtral has experts in every layer (moe_layers must be None)")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only to the last `sliding_window` positions."""
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek): q/k heads are qk_nope_dim + head_dim wide."""
        return self.kv_lora_rank > 0

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(heads, key size, value size) one layer caches per token: the K/V heads, or MLA's
        one latent (kv_lora_rank) and one shared RoPE key (head_dim)."""
        if self.mla:
            return 1, self.kv_lora_rank, self.head_dim
        return self.n_kv_heads, self.head_dim, self.head_dim

    def is_chunked(self, layer: int) -> bool:
        """Whether `layer` attends only within its `attention_chunk`-sized chunk (Llama 4)."""
        return self.layer_types is not None and self.layer_types[layer] == CHUNKED

    def uses_rope(self, layer: int) -> bool:
        """Whether `layer` rotates q and k (Llama 4's iRoPE leaves every 4th layer without)."""
        return self.nope_layers is None or layer not in self.nope_layers

    def is_moe(self, layer: int) -> bool:
        """Whether `layer`'s feed-forward is a mixture of experts."""
        return bool(self.n_experts) and (self.moe_layers is None or layer in self.moe_layers)

    # -- derived ---------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count, as papers report it (embeddings included, lm_head once if tied).
        active: the parameters one token uses (its k routed experts, not all of them), the
        figure MoE model cards give second ("46.7B total, 12.9B active")."""
        hd, d = self.head_dim, self.dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        attn += (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + d * self.o_bias
        attn += 2 * hd * self.qk_norm
        if self.mla:
            h, qk, rank = self.n_heads, self.qk_nope_dim + hd, self.kv_lora_rank
            qr = self.q_lora_rank
            attn = (d * qr + qr + qr * h * qk + qr * self.qkv_bias) if qr else d * h * qk
            attn += d * (rank + hd) + rank + rank * h * (self.qk_nope_dim + self.v_head_dim)
            attn += h * self.v_head_dim * d + (rank + hd) * self.qkv_bias + d * self.o_bias
        norms = (4 if self.sandwich_norm else 2) * d
        n = d
        for layer in range(self.n_layers):
            if self.is_moe(layer):
                experts = self.n_active_experts if active else self.n_experts
                mlp = (3 * d * self.moe_hidden_dim * experts + d * self.n_experts
                       + 3 * d * self.shared_hidden_dim)
            else:
                mlp = 3 * d * self.hidden_dim
            n += attn + mlp + norms
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            n += self.vocab_size * d  # the output projection is compute, not a lookup
        return n

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # -- HF config.json --------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The family's own config.json keys, as transformers writes them (legacy `rope_theta` /
        `rope_scaling` spelling, which transformers 4.x/5.x and llama.cpp's converter read)."""
        d: dict[str, Any] = dict(self.extra)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM",
                "llama4_text": "Llama4ForCausalLM",
                "deepseek_v3": "DeepseekV3ForCausalLM"}[self.family]
        d.update(
            architectures=[arch],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu" if self.activation == "silu" else "gelu_pytorch_tanh",
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.family in ("llama", "qwen3", "qwen3_moe", "llama4_text", "deepseek_v3"):
            d["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            d["mlp_bias"] = False
        if self.family in ("mistral", "mixtral"):
            d["sliding_window"] = self.sliding_window
        if self.family == "mixtral":
            d.update(num_local_experts=self.n_experts, num_experts_per_tok=self.n_active_experts,
                     intermediate_size=self.moe_hidden_dim)
        if self.router_bias and self.family in ("mixtral", "qwen3_moe"):
            # These families have no correction bias; ours say so in a key of their own (kept
            # by transformers, which does not use it: it would route without the bias).
            d["llamaworks_router_bias"] = True
        if self.family == "qwen3_moe":
            d.update(num_experts=self.n_experts, num_experts_per_tok=self.n_active_experts,
                     moe_intermediate_size=self.moe_hidden_dim, norm_topk_prob=self.router_norm,
                     decoder_sparse_step=1, use_sliding_window=bool(self.sliding_window),
                     sliding_window=self.sliding_window,
                     mlp_only_layers=[i for i in range(self.n_layers) if not self.is_moe(i)])
        if self.family == "deepseek_v3":
            first = next((i for i in range(self.n_layers) if self.is_moe(i)), self.n_layers)
            d.update(n_routed_experts=self.n_experts, num_experts_per_tok=self.n_active_experts,
                     moe_intermediate_size=self.moe_hidden_dim,
                     n_shared_experts=self.shared_hidden_dim // self.moe_hidden_dim,
                     routed_scaling_factor=self.router_scale, norm_topk_prob=self.router_norm,
                     n_group=self.router_groups, topk_group=self.router_topk_groups,
                     first_k_dense_replace=first, kv_lora_rank=self.kv_lora_rank,
                     q_lora_rank=self.q_lora_rank, qk_rope_head_dim=self.head_dim,
                     qk_nope_head_dim=self.qk_nope_dim, v_head_dim=self.v_head_dim,
                     rope_interleave=self.rope_interleaved, num_nextn_predict_layers=0,
                     scoring_func=self.router)  # DeepSeek's own key (V2: softmax, V3: sigmoid)
            del d["head_dim"]  # transformers derives it (the RoPE part)
        if self.family == "llama4_text":
            floor, scale = self.attn_temperature or (8192, 0.1)
            d.update(num_local_experts=self.n_experts, num_experts_per_tok=self.n_active_experts,
                     intermediate_size=self.moe_hidden_dim, intermediate_size_mlp=self.hidden_dim,
                     moe_layers=[i for i in range(self.n_layers) if self.is_moe(i)],
                     no_rope_layers=[int(self.uses_rope(i)) for i in range(self.n_layers)],
                     attention_chunk_size=self.attention_chunk, layer_types=self._layer_types(),
                     use_qk_norm=self.qk_l2_norm, attn_temperature_tuning=bool(
                         self.attn_temperature), floor_scale=int(floor), attn_scale=scale)
        if self.family in ("qwen2", "qwen3"):
            sliding = [i for i in range(self.n_layers) if self.is_sliding(i)]
            d.update(use_sliding_window=bool(sliding), sliding_window=self.sliding_window,
                     max_window_layers=sliding[0] if sliding else self.n_layers,
                     layer_types=self._layer_types())
        if self.family == "gemma3_text":
            del d["hidden_act"]
            d.update(hidden_activation="gelu_pytorch_tanh", sliding_window=self.sliding_window,
                     layer_types=self._layer_types(),
                     rope_local_base_freq=self.rope_local_theta or self.rope_theta,
                     query_pre_attn_scalar=round((self.attn_scale or self.head_dim ** -0.5) ** -2),
                     final_logit_softcapping=None, attn_logit_softcapping=None,
                     attention_bias=self.qkv_bias)
        return d

    def _layer_types(self) -> list[str]:
        return [SLIDING if self.is_sliding(i) else CHUNKED if self.is_chunked(i) else FULL
                for i in range(self.n_layers)]

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read transformers' config.json of any supported family (see FAMILIES)."""
        family = d.get("model_type")
        archs = d.get("architectures") or []
        if family is None and "LlamaForCausalLM" in archs:
            family = "llama"
        if family == "gemma3":
            raise CheckpointError(f"{source}: model_type 'gemma3' is Gemma 3 with vision; "
                                  "llamaworks reads the text models (model_type 'gemma3_text')")
        if family not in FAMILIES:
            raise CheckpointError(
                f"{source}: unsupported architecture model_type={family!r} architectures={archs}; "
                f"llamaworks reads {', '.join(FAMILIES)}")
        gemma = family == "gemma3_text"
        if d.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias=true is not supported by llamaworks")
        act = d.get("hidden_activation" if gemma else "hidden_act",
                    "gelu_pytorch_tanh" if gemma else "silu")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: activation {act!r} is not supported")
        for key in ("final_logit_softcapping", "attn_logit_softcapping",
                    "use_bidirectional_attention"):
            if d.get(key):
                raise CheckpointError(f"{source}: {key}={d[key]!r} is not supported")
        n_layers = int(d.get("num_hidden_layers", 0))
        rope = d.get("rope_parameters") or {}
        local_theta = None
        if gemma:
            full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
            theta = float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0)))
            local_theta = float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)))
            scaling = _rope_scaling(d.get("rope_scaling") or full, source)
        else:
            theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
            scaling = _rope_scaling(d.get("rope_scaling") or rope, source)
        # transformers' defaults where config.json leaves a key out (Gemma 3 and Mistral: 4096)
        window = d.get("sliding_window", 4096 if family in ("mistral", "gemma3_text") else None)
        if family in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window"):
            window = None
        if family in ("llama", "llama4_text"):
            window = None
        layer_types = d.get("layer_types")
        if window and layer_types is None:
            if gemma:
                pattern = int(d.get("sliding_window_pattern", 6))
                layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
            elif family in ("qwen2", "qwen3"):
                first = int(d.get("max_window_layers", 28))
                layer_types = [SLIDING if i >= first else FULL for i in range(n_layers)]
        if family == "llama4_text":
            pass  # its layer_types are chunked / full (`_llama4_fields`)
        elif not window or (layer_types is not None and SLIDING not in layer_types):
            window, layer_types = None, None
        bias = bool(d.get("attention_bias", False))
        moe = _moe_fields(d, family, n_layers, source)
        if family == "llama4_text":
            moe.update(_llama4_fields(d, n_layers, source))
            layer_types = moe.pop("layer_types")
        head_dim = d.get("head_dim", 256 if gemma else None)
        attn_scale = float(d.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None
        if family == "deepseek_v3":
            moe.update(_deepseek_fields(d, n_layers, source))
            head_dim, attn_scale = moe.pop("head_dim"), moe.pop("attn_scale")
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
            "sliding_window", "sliding_window_pattern", "layer_types", "use_sliding_window",
            "max_window_layers", "query_pre_attn_scalar", "final_logit_softcapping",
            "attn_logit_softcapping", "use_bidirectional_attention",
            "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_jitter_noise",
            "output_router_logits", "intermediate_size_mlp", "moe_layers",
            "llamaworks_router_bias",
            "interleave_moe_layer_step", "use_qk_norm", "no_rope_layers",
            "no_rope_layer_interval", "attention_chunk_size", "attn_temperature_tuning",
            "floor_scale", "attn_scale", "router_aux_loss_coef", "n_routed_experts",
            "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group",
            "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
            "qk_nope_head_dim", "v_head_dim", "rope_interleave", "num_mtp_layers", "qk_head_dim",
            "num_nextn_predict_layers", "scoring_func",
        }
        try:
            hidden = int(d["hidden_size"])
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=hidden,
                n_layers=int(d["num_hidden_layers"]),
                n_heads=int(d["num_attention_heads"]),
                n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                hidden_dim=int(d["intermediate_size_mlp" if family == "llama4_text"
                                 else "intermediate_size"]),
                head_dim=head_dim,
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                name=str(d.get("_name_or_path", "")),
                family=family,
                qkv_bias=bias or family == "qwen2",
                o_bias=bias,
                rope_interleaved=family == "llama4_text" or (
                    family == "deepseek_v3" and bool(d.get("rope_interleave", True))),
                qk_norm=family in ("qwen3", "gemma3_text", "qwen3_moe"),
                norm_plus_one=gemma,
                sandwich_norm=gemma,
                activation="silu" if act == "silu" else "gelu_tanh",
                embed_scale=hidden ** 0.5 if gemma else None,
                attn_scale=attn_scale,
                sliding_window=int(window) if window else None,
                layer_types=layer_types,
                rope_local_theta=local_theta,
                **moe,
                extra={k: v for k, v in d.items() if k not in known and k.startswith("_") is False
                       and k not in ("torch_dtype", "dtype", "transformers_version", "use_cache",
                                     "pretraining_tp", "initializer_range")},
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None

    # -- GGUF metadata ---------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], source: str = "GGUF") -> ModelConfig:
        """Build from GGUF key/values (see `checkpoint.gguf.read_metadata`), for the
        architectures in GGUF_ARCHS (llama, which Mistral files use too; qwen2; qwen3; gemma3),
        as llama.cpp reads them. Biases are not in the metadata: the loader sets `qkv_bias` /
        `o_bias` from the tensors present, and `tie_embeddings` from `output.weight`. Experts
        (`{arch}.expert_count`, `moe_fields` below): `llama` with experts is Mixtral, `qwen3moe`
        Qwen3-MoE, both with llama.cpp's routing (softmax, top-k always renormalized); `llama4`
        and `deepseek2` (DeepSeek-V2/V3) as llama.cpp's graphs run them (`_gguf_llama4`,
        `_gguf_deepseek2`)."""
        arch = md.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; llamaworks "
                                  f"reads general.architecture = {', '.join(GGUF_ARCHS)}")
        family = GGUF_ARCHS[arch]

        def get(key: str, default: Any = None) -> Any:
            v = md.get(f"{arch}.{key}", default)
            if v is None:
                raise CheckpointError(f"{source}: missing GGUF key '{arch}.{key}'")
            return v

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        n_layers = int(get("block_count"))
        head_dim = int(md.get(f"{arch}.attention.key_length",
                              md.get(f"{arch}.rope.dimension_count", dim // n_heads)))
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(md.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
        if not vocab:
            raise CheckpointError(f"{source}: cannot tell the vocabulary size")
        scaling = None
        scaling_type = md.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in (None, "none") and arch != "deepseek2":  # its YaRN: below
            raise CheckpointError(f"{source}: rope scaling type {scaling_type!r} is not supported")
        gemma = family == "gemma3_text"
        kw: dict[str, Any] = {}
        if gemma:
            window = int(md.get(f"{arch}.attention.sliding_window", 0))
            pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):  # one flag per layer: sliding or not
                sliding = [bool(x) for x in pattern]
            else:  # llama.cpp's set_swa_pattern: the last of every n layers is global
                n = int(pattern)
                sliding = [n == 0 or i % n < n - 1 for i in range(n_layers)]
            # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(dim/heads)
            scale = (dim // n_heads) ** -0.5 if n_layers == 62 else head_dim ** -0.5
            kw = dict(norm_plus_one=True, sandwich_norm=True, qk_norm=True,
                      activation="gelu_tanh", embed_scale=dim ** 0.5, attn_scale=scale)
            if window and any(sliding):
                kw.update(sliding_window=window,
                          layer_types=[SLIDING if x else FULL for x in sliding],
                          rope_local_theta=float(md.get(f"{arch}.rope.freq_base_swa", 10000.0)))
        def moe_fields() -> dict[str, Any]:
            """The expert fields as llama.cpp's `llama` (Mixtral) and `qwen3moe` graphs run them
            ({} for dense): every layer sparse; `expert_used_count` of `expert_count` experts by
            softmax, their weights always renormalized (llama.cpp hard-codes it for both, so a
            Qwen3-MoE with norm_topk_prob=false converted by llama.cpp's converter runs
            renormalized there and here), no scale; experts `feed_forward_length` wide (Mixtral)
            or `expert_feed_forward_length` (else llama.cpp's feed_forward_length / used)."""
            def one(key: str) -> int | None:
                v = md.get(f"{arch}.{key}")
                if isinstance(v, list):  # llama.cpp allows one value per layer
                    if len(set(v)) > 1:
                        raise CheckpointError(f"{source}: '{arch}.{key}' differs between "
                                              f"layers ({v[:8]}), which llamaworks does not "
                                              "support")
                    v = v[0] if v else None
                return None if v is None else int(v)

            n = one("expert_count") or 0
            if not n:
                if arch == "qwen3moe":
                    raise CheckpointError(f"{source}: a qwen3moe file needs "
                                          f"'{arch}.expert_count' > 0")
                return {}
            if arch not in ("llama", "qwen3moe"):
                raise CheckpointError(f"{source}: experts in the {arch} architecture are not "
                                      "supported")
            used = one("expert_used_count")
            if not used:
                raise CheckpointError(f"{source}: missing GGUF key '{arch}.expert_used_count'")
            ff = one("feed_forward_length") or 0
            hidden = ff if arch == "llama" else one("expert_feed_forward_length") or ff // used
            if not hidden:
                raise CheckpointError(f"{source}: cannot tell the experts' feed-forward size")
            if one("expert_shared_count") or one("expert_shared_feed_forward_length"):
                raise CheckpointError(f"{source}: shared experts in the {arch} architecture "
                                      "are not supported")
            return dict(n_experts=n, n_active_experts=used, moe_hidden_dim=hidden,
                        router="softmax", router_norm=True, router_scale=1.0)

        if family in ("qwen3", "qwen3_moe"):
            kw["qk_norm"] = True
        n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_heads))
        if arch == "llama4":  # llama.cpp's fixed iRoPE and router (see _gguf_llama4)
            kw.update(_gguf_llama4(md, n_layers, source))
        elif arch == "deepseek2":  # latent attention: one K/V "head" in the file, ours n_heads
            n_kv, n_layers = n_heads, n_layers - int(md.get(f"{arch}.nextn_predict_layers", 0))
            kw.update(_gguf_deepseek2(md, n_layers, source))
            head_dim = kw.pop("head_dim")
        else:
            kw.update(moe_fields())
        if arch == "llama" and kw.get("n_experts"):
            family = "mixtral"
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            hidden_dim=int(get("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=kw.pop("rope_scaling", scaling),
            max_seq_len=int(get("context_length", 2048)),
            tie_embeddings=True,  # the loader sets False when output.weight is present
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            name=str(md.get("general.name", "")),
            family=family,
            **kw,
        )

    # -- Meta params.json ------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, p: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """Meta's `params.json` (Llama 1/2/3 reference repos)."""
        vs = p.get("vocab_size", -1)
        if vs is None or vs <= 0:
            if vocab_size is None:
                raise CheckpointError("params.json has no vocab_size; it is read from the weights")
            vs = vocab_size
        scaling = None
        if p.get("use_scaled_rope"):
            scaling = {"rope_type": "llama3", "factor": float(p.get("rope_scaling_factor", 8.0)),
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
        return cls(
            vocab_size=int(vs),
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=int(p["n_heads"]),
            n_kv_heads=p.get("n_kv_heads"),
            multiple_of=int(p.get("multiple_of", 256)),
            ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(p.get("max_seq_len", 2048)),
        )


def _moe_fields(d: dict[str, Any], family: str, n_layers: int, source: str) -> dict[str, Any]:
    """ModelConfig's expert fields from a Mixtral / Qwen3-MoE config.json ({} for dense)."""
    bias = bool(d.get("llamaworks_router_bias", False))  # see ModelConfig.to_hf_dict
    if family == "mixtral":
        return dict(n_experts=int(d.get("num_local_experts", 8)),
                    n_active_experts=int(d.get("num_experts_per_tok", 2)),
                    moe_hidden_dim=int(d["intermediate_size"]), router_norm=True,
                    router_bias=bias)
    if family != "qwen3_moe":
        return {}
    if d.get("router_jitter_noise"):
        raise CheckpointError(f"{source}: router_jitter_noise is not supported")
    n = int(d.get("num_experts", d.get("num_local_experts", 128)))
    step = int(d.get("decoder_sparse_step", 1))
    dense = set(d.get("mlp_only_layers") or [])
    layers = [i for i in range(n_layers) if i not in dense and step > 0 and (i + 1) % step == 0]
    return dict(n_experts=n, n_active_experts=int(d.get("num_experts_per_tok", 8)),
                moe_hidden_dim=int(d.get("moe_intermediate_size", 768)),
                router_norm=bool(d.get("norm_topk_prob", False)), router_bias=bias,
                moe_layers=None if len(layers) == n_layers else layers)


def _llama4_fields(d: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """Llama 4 text's experts and iRoPE attention, with transformers' defaults for missing keys:
    every `no_rope_layer_interval`-th layer without RoPE and global, the others chunked;
    MoE every `interleave_moe_layer_step`-th layer (16E: all, 128E: every other) with a shared
    expert as wide as the routed ones; top-k of raw logits, sigmoid, scaling the expert input."""
    if d.get("router_jitter_noise"):
        raise CheckpointError(f"{source}: router_jitter_noise is not supported")
    interval = int(d.get("no_rope_layer_interval", 4))
    use_rope = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    chunk = d.get("attention_chunk_size", 8192)
    step = int(d.get("interleave_moe_layer_step", 1))
    moe = d.get("moe_layers")
    moe = list(range(step - 1, n_layers, step)) if moe is None else [int(i) for i in moe]
    types = d.get("layer_types") or [CHUNKED if r and chunk is not None else FULL
                                     for r in use_rope]
    temp = ([float(d.get("floor_scale", 8192)), float(d.get("attn_scale", 0.1))]
            if d.get("attn_temperature_tuning", True) else None)
    hidden = int(d.get("intermediate_size", 8192))
    return dict(n_experts=int(d.get("num_local_experts", 16)),
                n_active_experts=int(d.get("num_experts_per_tok", 1)), moe_hidden_dim=hidden,
                shared_hidden_dim=hidden, router="sigmoid", router_norm=False, router_pre=True,
                moe_layers=None if len(moe) == n_layers else moe,
                nope_layers=[i for i, r in enumerate(use_rope) if not r] or None,
                attention_chunk=int(chunk) if chunk is not None and CHUNKED in types else None,
                layer_types=None if set(types) == {FULL} else list(types),
                attn_temperature=temp, qk_l2_norm=bool(d.get("use_qk_norm", True)))


def _deepseek_fields(d: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """DeepSeek-V3's latent attention and experts (transformers' defaults for missing keys):
    the first `first_k_dense_replace` layers dense, then `n_routed_experts` experts chosen by
    sigmoid scores plus a correction bias, group-limited, renormalized and scaled by
    `routed_scaling_factor`, plus `n_shared_experts` shared ones; multi-token-prediction layers
    are not part of the model (their weights are skipped on load)."""
    rope, nope = int(d.get("qk_rope_head_dim", 64)), int(d.get("qk_nope_head_dim", 128))
    hidden = int(d.get("moe_intermediate_size", 2048))
    first = int(d.get("first_k_dense_replace", 3) or 0)
    n = int(d.get("n_routed_experts", 256))
    groups = int(d.get("n_group", 8) or 1)
    if n % groups:
        raise CheckpointError(f"{source}: n_routed_experts {n} is not divisible by n_group "
                              f"{groups}")
    return dict(n_experts=n, n_active_experts=int(d.get("num_experts_per_tok", 8)),
                moe_hidden_dim=hidden,
                shared_hidden_dim=hidden * int(d.get("n_shared_experts", 1) or 0),
                router=str(d.get("scoring_func", "sigmoid")),
                router_norm=bool(d.get("norm_topk_prob", True)),
                router_scale=float(d.get("routed_scaling_factor", 2.5)), router_bias=True,
                router_groups=groups, router_topk_groups=int(d.get("topk_group", 4) or 1),
                moe_layers=None if first == 0 else list(range(first, n_layers)),
                kv_lora_rank=int(d.get("kv_lora_rank", 512)), q_lora_rank=d.get("q_lora_rank"),
                qk_nope_dim=nope, v_head_dim=int(d.get("v_head_dim", 128)), head_dim=rope,
                attn_scale=(nope + rope) ** -0.5 * _deepseek_mscale(d) ** 2)


def _deepseek_mscale(d: dict[str, Any]) -> float:
    """DeepSeek's softmax-scale correction under YaRN: yarn_mscale(factor, mscale_all_dim)."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) == "default" or \
            not rope.get("mscale_all_dim"):
        return 1.0
    factor = float(rope["factor"])
    return 1.0 if factor <= 1 else 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0


def _rope_scaling(params: dict[str, Any], source: str) -> dict[str, Any] | None:
    """RoPE scaling from HF's `rope_scaling` or `rope_parameters`: None, llama3 or linear."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("llama3", "linear", "yarn"):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported "
                              "(only 'llama3', 'linear' and 'yarn')")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return scaling


def _gguf_int(md: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """An integer GGUF key (one value, or llama.cpp's per-layer array of equal values)."""
    v = md.get(key, default)
    if isinstance(v, list):
        if len(set(v)) > 1:
            raise CheckpointError(f"{source}: '{key}' differs between layers ({v[:8]}), which "
                                  "llamaworks does not support")
        v = v[0] if v else default
    if v is None:
        raise CheckpointError(f"{source}: missing GGUF key '{key}'")
    return int(v)


# llama.cpp's llama4 graph fixes these (llama-model.cpp / models/llama4.cpp): chunks of 8192
# positions on 3 of every 4 layers, no RoPE on every 4th (n_no_rope_layer_step), whose queries
# are scaled by 1 + 0.1 * log(1 + floor((pos + 1) / 8192)), whatever the HF config said.
LLAMA4_CHUNK, LLAMA4_NOPE_STEP, LLAMA4_TEMPERATURE = 8192, 4, [8192.0, 0.1]


def _gguf_llama4(md: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """Llama 4 text as llama.cpp's `llama4` runs it (its converter writes none of the iRoPE
    settings): experts `expert_feed_forward_length` wide on layers (i + 1) % step == 0 with a
    shared expert as wide; sigmoid of the top-k logits scaling the expert input, not
    renormalized; chunked attention / no RoPE / temperature as LLAMA4_*; weightless q/k norms on
    RoPE layers except with 128 experts (llama.cpp keys them off Maverick's expert count); RoPE
    on Meta's interleaved pairs (the converter does not permute Q/K)."""
    a = "llama4."
    n = _gguf_int(md, a + "expert_count", source, 0)
    if not n:
        raise CheckpointError(f"{source}: a llama4 file needs '{a}expert_count' > 0 (llama.cpp "
                              "refuses a llama4 model without experts)")
    if a + "attention.sliding_window" in md and not int(md[a + "attention.sliding_window"]):
        raise CheckpointError(f"{source}: a llama4 file without chunked attention (sliding_window "
                              "0, MobileLLM) runs llama.cpp's RoPE-less last layer, which "
                              "llamaworks does not support")
    base, swa = md.get(a + "rope.freq_base"), md.get(a + "rope.freq_base_swa")
    if swa is not None and base is not None and float(swa) != float(base):
        raise CheckpointError(f"{source}: a separate RoPE base for chunked layers ({swa}) is not "
                              "supported")
    pattern = md.get(a + "attention.sliding_window_pattern", LLAMA4_NOPE_STEP)
    if isinstance(pattern, list):
        chunked = [bool(x) for x in pattern][:n_layers]
    else:  # llama.cpp's set_swa_pattern: the last of every n layers is global
        k = int(pattern)
        chunked = [k == 0 or i % k < k - 1 for i in range(n_layers)]
    step = _gguf_int(md, a + "interleave_moe_layer_step", source)
    moe = [i for i in range(n_layers) if step > 0 and (i + 1) % step == 0]
    hidden = _gguf_int(md, a + "expert_feed_forward_length", source)
    nope = [i for i in range(n_layers) if (i + 1) % LLAMA4_NOPE_STEP == 0]
    return dict(n_experts=n, n_active_experts=_gguf_int(md, a + "expert_used_count", source),
                moe_hidden_dim=hidden, shared_hidden_dim=hidden, router="sigmoid",
                router_norm=False, router_pre=True, router_scale=1.0,  # (no scale key read)
                moe_layers=None if len(moe) == n_layers else moe, nope_layers=nope or None,
                attention_chunk=LLAMA4_CHUNK if any(chunked) else None,
                layer_types=[CHUNKED if c else FULL for c in chunked] if any(chunked) else None,
                attn_temperature=list(LLAMA4_TEMPERATURE), qk_l2_norm=n != 128,
                rope_interleaved=True)


def gguf_deepseek2_rope(md: dict[str, Any], qk_dim: int, source: str
                        ) -> tuple[dict[str, Any] | None, float]:
    """(rope_scaling, softmax scale) of a deepseek2 file as llama.cpp computes them: YaRN with
    its default betas 32 / 1 (the file's beta keys are not read for deepseek2), cos/sin times
    rope.scaling.attn_factor (x get_mscale(factor, 1) when there is no yarn_log_multiplier, 1
    with it: llama.cpp takes mscale = mscale_all_dim), and the softmax scale
    (that factor * (1 + 0.1 * mscale_all_dim * ln factor))^2 / sqrt(qk_dim), mscale_all_dim being
    yarn_log_multiplier / 0.1 (the converter writes 0.1 * mscale_all_dim)."""
    a = "deepseek2."
    kind = md.get(a + "rope.scaling.type", "none")
    factor = float(md.get(a + "rope.scaling.factor", 0.0) or 0.0)
    attn = float(md.get(a + "rope.scaling.attn_factor", 1.0))
    log_mul = float(md.get(a + "rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
    log_mul = float(f"{log_mul:.6g}")  # stored as float32: 0.1 * 1.0 reads 1.0000000149
    if kind in ("none", None) or (kind == "linear" and factor in (0.0, 1.0)):
        if attn != 1.0:
            raise CheckpointError(f"{source}: rope.scaling.attn_factor {attn} without YaRN is "
                                  "not supported")
        return None, qk_dim ** -0.5
    if kind != "yarn" or factor <= 1.0:
        raise CheckpointError(f"{source}: deepseek2 rope scaling {kind!r} (factor {factor}) is "
                              "not supported (YaRN with a factor > 1 or none)")
    ratio = 1.0 if log_mul else 1.0 + 0.1 * math.log(factor)
    scaling: dict[str, Any] = {
        "rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": int(md.get(
            a + "rope.scaling.original_context_length", md.get(a + "context_length", 0))),
        "attention_factor": ratio * attn}
    if log_mul:
        scaling.update(mscale=log_mul, mscale_all_dim=log_mul)
    mscale = ratio * attn * (1.0 + 0.1 * log_mul * math.log(factor))
    return scaling, mscale * mscale / math.sqrt(qk_dim)


def _gguf_deepseek2(md: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """DeepSeek-V2/V3 (`deepseek2`) as llama.cpp runs it: latent attention of rank
    `attention.kv_lora_rank` (key_length / value_length are the MQA view, rank + RoPE and rank;
    the per-head sizes are key_length_mla / value_length_mla, or key/value_length in legacy
    files), q through `q_lora_rank` (0 or absent: direct); experts after
    `leading_dense_block_count` dense layers, `expert_gating_func` scores (absent: softmax, as
    llama.cpp defaults for old V2 files), group-limited when expert_group_count > 1,
    renormalized only with expert_weights_norm, times expert_weights_scale, plus
    expert_shared_count shared experts; RoPE on interleaved pairs (llama.cpp's NORM rope, the
    converter keeps DeepSeek's layout). The correction bias (`exp_probs_b`) is set by the loader
    from the tensors."""
    a = "deepseek2."
    eps = float(md.get(a + "attention.layer_norm_rms_epsilon", 1e-6))
    if not math.isclose(eps, 1e-6, rel_tol=1e-4):
        raise CheckpointError(f"{source}: llama.cpp normalizes the q and kv latents with the "
                              f"model's epsilon {eps:g}, llamaworks (as transformers) with 1e-6")
    if float(md.get(a + "attention.temperature_scale", 0.0) or 0.0):
        raise CheckpointError(f"{source}: deepseek2 attention temperature tuning is not supported")
    rope = _gguf_int(md, a + "rope.dimension_count", source)
    rank = _gguf_int(md, a + "attention.kv_lora_rank", source)
    q_rank = _gguf_int(md, a + "attention.q_lora_rank", source, 0) or None
    if a + "attention.key_length_mla" in md:
        qk = _gguf_int(md, a + "attention.key_length_mla", source)
        v = _gguf_int(md, a + "attention.value_length_mla", source)
    else:  # legacy files (one kv_b tensor): key/value_length are the per-head sizes
        qk = _gguf_int(md, a + "attention.key_length", source)
        v = _gguf_int(md, a + "attention.value_length", source)
    if qk <= rope:
        raise CheckpointError(f"{source}: key length {qk} leaves no features without RoPE "
                              f"({rope})")
    n = _gguf_int(md, a + "expert_count", source, 0)
    if not n:
        raise CheckpointError(f"{source}: a deepseek2 file without experts is not supported")
    gating = int(md.get(a + "expert_gating_func", 0) or 0)
    if gating == 0:  # llama.cpp's default for files without the key (GLM 4.7 Lite: sigmoid)
        vocab = int(md.get(a + "vocab_size", len(md.get("tokenizer.ggml.tokens") or ())))
        gating = 2 if n_layers in (47, 48) and vocab == 154880 else 1
    if gating not in (1, 2):
        raise CheckpointError(f"{source}: expert gating function {gating} is not supported "
                              "(1 softmax, 2 sigmoid)")
    groups = _gguf_int(md, a + "expert_group_count", source, 0)
    used_groups = _gguf_int(md, a + "expert_group_used_count", source, 0)
    dense = _gguf_int(md, a + "leading_dense_block_count", source, 0)
    hidden = _gguf_int(md, a + "expert_feed_forward_length", source)
    scale = float(md.get(a + "expert_weights_scale", 0.0) or 0.0)
    scaling, attn_scale = gguf_deepseek2_rope(md, qk, source)
    return dict(n_experts=n, n_active_experts=_gguf_int(md, a + "expert_used_count", source),
                moe_hidden_dim=hidden,
                shared_hidden_dim=hidden * _gguf_int(md, a + "expert_shared_count", source, 0),
                router="sigmoid" if gating == 2 else "softmax",
                router_norm=bool(md.get(a + "expert_weights_norm", False)),
                router_scale=scale or 1.0, router_groups=groups if groups > 1 else 1,
                router_topk_groups=used_groups if groups > 1 else 1,
                moe_layers=None if dense == 0 else list(range(dense, n_layers)),
                kv_lora_rank=rank, q_lora_rank=q_rank, qk_nope_dim=qk - rope, v_head_dim=v,
                head_dim=rope, rope_interleaved=True, rope_scaling=scaling,
                attn_scale=attn_scale)


_LLAMA3_SCALING_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_SCALING_8 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_LLAMA4 = dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120,
               intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
               num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
               rope_theta=500000.0, attention_chunk_size=8192, num_experts_per_tok=1,
               tie_word_embeddings=False, bos_token_id=200000,
               eos_token_id=[200001, 200007, 200008])

# Published shapes. Parameter counts in comments are the papers'/model cards' figures, which
# `num_params()` reproduces within 1% (tests/test_config.py pins that).
PRESETS: dict[str, ModelConfig] = {
    # For unit tests and the CPU pretraining demo: GQA, odd-ish sizes, tiny vocab.
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        hidden_dim=176, max_seq_len=256, name="tiny"),
    # SmolLM2-135M (HuggingFaceTB): 134.5M.
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True, bos_token_id=1, eos_token_id=2,
                                name="smollm2-135m"),
    # LLaMA (2023), Table 2: 6.7B, 13.0B, 32.5B, 65.2B.
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                            norm_eps=1e-6, name="llama-7b"),
    "llama-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40,
                             norm_eps=1e-6, name="llama-13b"),
    "llama-33b": ModelConfig(vocab_size=32000, dim=6656, n_layers=60, n_heads=52,
                             norm_eps=1e-6, name="llama-33b"),
    "llama-65b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64,
                             norm_eps=1e-6, name="llama-65b"),
    # Llama 2 7B: 6.74B.
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                             max_seq_len=4096, norm_eps=1e-5, name="llama2-7b"),
    # Llama 3 8B: 8.03B.
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             hidden_dim=14336, rope_theta=500000.0, max_seq_len=8192,
                             bos_token_id=128000, eos_token_id=128001, name="llama3-8b"),
    # Llama 3.2 1B: 1.24B, tied embeddings, Llama-3 rope scaling (factor 32).
    "llama3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32,
                               n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0,
                               rope_scaling=_LLAMA3_SCALING_32, max_seq_len=131072,
                               tie_embeddings=True, bos_token_id=128000,
                               eos_token_id=[128001, 128008, 128009], name="llama3.2-1b"),
    # Llama 3.2 3B: 3.21B, the same rope scaling and tied embeddings (its config.json).
    "llama3.2-3b": ModelConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24,
                               n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0,
                               rope_scaling=_LLAMA3_SCALING_32, max_seq_len=131072,
                               tie_embeddings=True, bos_token_id=128000,
                               eos_token_id=[128001, 128008, 128009], name="llama3.2-3b"),
    # Llama 3.1 (model cards): 8.03B, 70.6B, 405.9B; 128K context through Llama-3 rope scaling
    # (factor 8), the Meta reference's published shapes (405B: 126 layers, 8 KV heads).
    "llama3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                               n_kv_heads=8, hidden_dim=14336, rope_theta=500000.0,
                               rope_scaling=_LLAMA3_SCALING_8, max_seq_len=131072,
                               bos_token_id=128000, eos_token_id=128001, name="llama3.1-8b"),
    "llama3.1-70b": ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64,
                                n_kv_heads=8, hidden_dim=28672, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_SCALING_8, max_seq_len=131072,
                                bos_token_id=128000, eos_token_id=128001, name="llama3.1-70b"),
    "llama3.1-405b": ModelConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128,
                                 n_kv_heads=8, hidden_dim=53248, rope_theta=500000.0,
                                 rope_scaling=_LLAMA3_SCALING_8, max_seq_len=131072,
                                 bos_token_id=128000, eos_token_id=128001, name="llama3.1-405b"),
    # Mistral-7B-v0.3 (model card): 7.25B; vocabulary extended to 32768, no sliding window.
    "mistral-7b": ModelConfig.from_hf_dict(dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1_000_000.0, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, _name_or_path="mistral-7b")),
    # Qwen2.5 (model cards): 0.5B "0.49B" (tied), 7B "7.61B"; q/k/v biases, windows off.
    "qwen2.5-0.5b": ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        use_sliding_window=False, sliding_window=32768, max_window_layers=24,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
        _name_or_path="qwen2.5-0.5b")),
    "qwen2.5-7b": ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
        _name_or_path="qwen2.5-7b")),
    # Qwen3 (model cards): 0.6B "0.6B, 0.44B non-embedding" (tied), 8B "8.2B, 6.95B
    # non-embedding"; q/k RMSNorm, head_dim 128, no biases.
    "qwen3-0.6b": ModelConfig.from_hf_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, attention_bias=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=28, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645, _name_or_path="qwen3-0.6b")),
    "qwen3-8b": ModelConfig.from_hf_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, attention_bias=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=36, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, _name_or_path="qwen3-8b")),
    # Gemma 3 text (model cards): 270M "268M: 170M embedding + 100M transformer", 1B "1.0B";
    # 5 local (window 512, RoPE 10k) : 1 global (RoPE 1M) layers, query_pre_attn_scalar 256.
    "gemma3-270m": ModelConfig.from_hf_dict(dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        _name_or_path="gemma3-270m")),
    "gemma3-1b": ModelConfig.from_hf_dict(dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106],
        _name_or_path="gemma3-1b")),
    # -- mixtures of experts: (total, active) from the model cards --
    # For tests and the CPU MoE pretraining demo: Qwen3-MoE's layout (so transformers and
    # llama.cpp open it), 8 experts, top-2 renormalized, the first layer dense.
    "tiny-moe": ModelConfig(vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                            hidden_dim=176, max_seq_len=256, family="qwen3_moe", qk_norm=True,
                            n_experts=8, n_active_experts=2, moe_hidden_dim=64,
                            moe_layers=[1, 2], bos_token_id=None, eos_token_id=None,
                            norm_eps=1e-6, name="tiny-moe"),
    # Mixtral-8x7B (Mistral AI): "46.7B total parameters but only uses 12.9B per token".
    "mixtral-8x7b": ModelConfig.from_hf_dict(dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        _name_or_path="mixtral-8x7b")),
    # Qwen3-30B-A3B (model card): "30.5B in total and 3.3B activated", 128 experts, 8 active.
    "qwen3-30b-a3b": ModelConfig.from_hf_dict(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        _name_or_path="qwen3-30b-a3b")),
    # DeepSeek-V3 (technical report): "671B total parameters with 37B activated for each token"
    # (the 14B multi-token-prediction module on top is left out, as at inference); YaRN to 128K.
    "deepseek-v3": ModelConfig.from_hf_dict(dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=dict(
            rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        _name_or_path="deepseek-v3")),
    # Llama 4 (Meta's model cards): Scout "17B active, 109B total" (16 experts; the total
    # includes its vision encoder, the text model is 107.8B), Maverick "17B active, 400B total"
    # (128 experts on every other layer, no q/k norm); top-1 routing plus a shared expert, iRoPE.
    "llama4-scout-17b-16e": ModelConfig.from_hf_dict(dict(
        _LLAMA4, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        max_position_embeddings=10485760, rope_scaling=dict(
            rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
            original_max_position_embeddings=8192),
        _name_or_path="llama4-scout-17b-16e")),
    "llama4-maverick-17b-128e": ModelConfig.from_hf_dict(dict(
        _LLAMA4, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576, _name_or_path="llama4-maverick-17b-128e")),
    # Llama 4 Behemoth: Meta announced "288B active parameters, 16 experts, nearly two trillion
    # total" and no shapes. This one is ours, Scout's layout scaled to match: 1.99T / 288.5B.
    "llama4-behemoth": ModelConfig.from_hf_dict(dict(
        _LLAMA4, hidden_size=16384, num_hidden_layers=96, num_attention_heads=128,
        intermediate_size=24064, intermediate_size_mlp=48128, num_local_experts=16,
        interleave_moe_layer_step=1, use_qk_norm=True, max_position_embeddings=10485760,
        _name_or_path="llama4-behemoth")),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[name])
    if cfg.rope_scaling is not None:
        cfg.rope_scaling = dict(cfg.rope_scaling)
    return cfg.replace(**overrides) if overrides else cfg

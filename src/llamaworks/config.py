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

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # HF model_type values
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types values
# GGUF general.architecture -> family. llama.cpp writes Mistral as `llama` (without its window).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


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
            "llama3", "linear", "default"
        ):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}; 'llama3' and "
                             "'linear' are implemented")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {FAMILIES}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                                 f"{self.n_layers} layers")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise ValueError("sliding layers need a sliding_window")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only to the last `sliding_window` positions."""
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    # -- derived ---------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, as papers report it (embeddings included, lm_head once if tied)."""
        hd, d = self.head_dim, self.dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        attn += (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + d * self.o_bias
        attn += 2 * hd * self.qk_norm
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + (4 if self.sandwich_norm else 2) * d
        n = self.n_layers * per_layer + d
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
                "gemma3_text": "Gemma3ForCausalLM"}[self.family]
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
        if self.family in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            d["mlp_bias"] = False
        if self.family == "mistral":
            d["sliding_window"] = self.sliding_window
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
        return [SLIDING if self.is_sliding(i) else FULL for i in range(self.n_layers)]

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
        if family in ("qwen2", "qwen3") and not d.get("use_sliding_window"):
            window = None
        if family == "llama":
            window = None
        layer_types = d.get("layer_types")
        if window and layer_types is None:
            if gemma:
                pattern = int(d.get("sliding_window_pattern", 6))
                layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
            elif family in ("qwen2", "qwen3"):
                first = int(d.get("max_window_layers", 28))
                layer_types = [SLIDING if i >= first else FULL for i in range(n_layers)]
        if not window or (layer_types is not None and SLIDING not in layer_types):
            window, layer_types = None, None
        bias = bool(d.get("attention_bias", False))
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
            "sliding_window", "sliding_window_pattern", "layer_types", "use_sliding_window",
            "max_window_layers", "query_pre_attn_scalar", "final_logit_softcapping",
            "attn_logit_softcapping", "use_bidirectional_attention",
        }
        try:
            hidden = int(d["hidden_size"])
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=hidden,
                n_layers=int(d["num_hidden_layers"]),
                n_heads=int(d["num_attention_heads"]),
                n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                hidden_dim=int(d["intermediate_size"]),
                head_dim=d.get("head_dim", 256 if gemma else None),
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
                qk_norm=family in ("qwen3", "gemma3_text"),
                norm_plus_one=gemma,
                sandwich_norm=gemma,
                activation="silu" if act == "silu" else "gelu_tanh",
                embed_scale=hidden ** 0.5 if gemma else None,
                attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
                sliding_window=int(window) if window else None,
                layer_types=layer_types,
                rope_local_theta=local_theta,
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
        `o_bias` from the tensors present, and `tie_embeddings` from `output.weight`."""
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
        elif scaling_type not in (None, "none"):
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
        if family == "qwen3":
            kw["qk_norm"] = True
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(md.get(f"{arch}.attention.head_count_kv", n_heads)),
            hidden_dim=int(get("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
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


def _rope_scaling(params: dict[str, Any], source: str) -> dict[str, Any] | None:
    """RoPE scaling from HF's `rope_scaling` or `rope_parameters`: None, llama3 or linear."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported "
                              "(only 'llama3' and 'linear')")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return scaling


_LLAMA3_SCALING_1B = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_SCALING_8 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

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
                               rope_scaling=_LLAMA3_SCALING_1B, max_seq_len=131072,
                               tie_embeddings=True, bos_token_id=128000,
                               eos_token_id=[128001, 128008, 128009], name="llama3.2-1b"),
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

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


@dataclass
class ModelConfig:
    """Shape and numerics of one Llama-family model."""

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
            "llama3", "default"
        ):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}; only 'llama3' is "
                             "implemented")

    # -- derived ---------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, as papers report it (embeddings included, lm_head once if tied)."""
        hd, d = self.head_dim, self.dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
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
        """transformers' LlamaConfig keys (legacy `rope_theta`/`rope_scaling` spelling, which
        both transformers 4.x/5.x and llama.cpp's converter read)."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            tie_word_embeddings=self.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        arch = d.get("model_type")
        archs = d.get("architectures") or []
        if arch != "llama" and "LlamaForCausalLM" not in archs:
            raise CheckpointError(
                f"{source}: unsupported architecture model_type={arch!r} architectures={archs}; "
                "llamaworks reads Llama-architecture models only")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported by llamaworks")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act={d['hidden_act']!r} is not supported")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported "
                                      "(only 'llama3')")
            else:
                scaling.pop("type", None)
                scaling["rope_type"] = "llama3"
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "bos_token_id", "eos_token_id",
        }
        try:
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=int(d["hidden_size"]),
                n_layers=int(d["num_hidden_layers"]),
                n_heads=int(d["num_attention_heads"]),
                n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                hidden_dim=int(d["intermediate_size"]),
                head_dim=d.get("head_dim"),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                name=str(d.get("_name_or_path", "")),
                extra={k: v for k, v in d.items() if k not in known and k.startswith("_") is False
                       and k not in ("torch_dtype", "dtype", "transformers_version", "use_cache",
                                     "pretraining_tp", "initializer_range")},
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None

    # -- GGUF metadata ---------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], source: str = "GGUF") -> ModelConfig:
        """Build from GGUF key/values (see `checkpoint.gguf.read_metadata`)."""
        arch = md.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; llamaworks "
                                  "reads general.architecture = 'llama' only")

        def get(key: str, default: Any = None) -> Any:
            v = md.get(f"llama.{key}", default)
            if v is None:
                raise CheckpointError(f"{source}: missing GGUF key 'llama.{key}'")
            return v

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        head_dim = int(md.get("llama.attention.key_length", md.get("llama.rope.dimension_count",
                                                                   dim // n_heads)))
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(md.get("llama.vocab_size", len(tokens) if tokens is not None else 0))
        if not vocab:
            raise CheckpointError(f"{source}: cannot tell the vocabulary size")
        scaling_type = md.get("llama.rope.scaling.type")
        if scaling_type not in (None, "none"):
            raise CheckpointError(f"{source}: rope scaling type {scaling_type!r} is not supported")
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(md.get("llama.attention.head_count_kv", n_heads)),
            hidden_dim=int(get("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 2048)),
            tie_embeddings=True,  # the loader sets False when output.weight is present
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            name=str(md.get("general.name", "")),
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


_LLAMA3_SCALING_1B = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
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

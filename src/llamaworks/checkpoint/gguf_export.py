"""Write a GGUF file that llama.cpp and `checkpoint.gguf` both load, in the architecture llama.cpp
uses for the model's family (llama, also for Mistral; qwen2; qwen3; gemma3).

Tensors get llama.cpp's names for that architecture (`gguf_name`); for `llama` the Q/K rows are
permuted into llama.cpp's rotary layout (`permute_qk`); Gemma's norms are stored as 1 + w; 1-D
tensors (norms, biases, `rope_freqs`) stay F32, and Llama-3 rope scaling is stored as the
`rope_freqs` tensor as llama.cpp's converter does. What llama.cpp cannot represent (a sliding
window in the llama or Qwen architectures, a Gemma attention scale other than the one llama.cpp
assumes) is refused rather than written wrong. Tensors are converted and written one at a
time, into a temporary file that is renamed into place when complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaworks.atomic import atomic_path
from llamaworks.checkpoint.gguf import (
    ROPE_SCALING_KEYS,
    ROPE_SCALING_PREFIX,
    gguf_arch,
    gguf_name,
    layer_map,
    permute_qk,
)
from llamaworks.checkpoint.shapes import check_state_dict
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError

FILE_TYPES = ("F32", "F16", "BF16", "Q8_0")


def _value_type(key: str, value: Any, source: str) -> tuple[Any, Any, Any]:
    """(value, GGUF type, array element type) for one `tokenizer.*` key, as llama.cpp expects."""
    from gguf import GGUFValueType as T

    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, (list, tuple)):
        if not value:
            raise CheckpointError(f"{source}: tokenizer metadata {key!r} is an empty array")
        if leaf == "scores":
            sub = T.FLOAT32
        elif leaf == "token_type":
            sub = T.INT32
        elif leaf == "precompiled_charsmap":
            sub = T.UINT8
        elif all(isinstance(v, str) for v in value):
            sub = T.STRING
        elif all(isinstance(v, bool) for v in value):
            sub = T.BOOL
        elif all(isinstance(v, int) for v in value):
            sub = T.INT32
        else:
            sub = T.FLOAT32
        if sub == T.FLOAT32:
            value = [float(v) for v in value]
        elif sub in (T.INT32, T.UINT8):
            value = [int(v) for v in value]
        return list(value), T.ARRAY, sub
    if isinstance(value, bool):
        return value, T.BOOL, None
    if isinstance(value, str):
        return value, T.STRING, None
    if isinstance(value, int):
        return value, (T.UINT32 if leaf.endswith(("_id", "_count")) and value >= 0 else T.INT32
                       ), None
    if isinstance(value, float):
        return value, T.FLOAT32, None
    raise CheckpointError(f"{source}: tokenizer metadata {key!r} has a value of unsupported "
                          f"type {type(value).__name__}")


def _tokenizer_kv(cfg: ModelConfig, md: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """The `tokenizer.*` key/values to write: `md`'s, with token arrays padded to the vocabulary
    (as llama.cpp's converter pads), or `tokenizer.ggml.model = "none"` without a tokenizer."""
    kv = {k: v for k, v in (md or {}).items() if k.startswith("tokenizer.")}
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        kv.setdefault("tokenizer.ggml.model", "none")
    else:
        if len(tokens) > cfg.vocab_size:
            raise CheckpointError(f"{source}: the tokenizer has {len(tokens)} tokens but the "
                                  f"model's vocabulary is {cfg.vocab_size}")
        pad = cfg.vocab_size - len(tokens)
        if pad:
            kv["tokenizer.ggml.tokens"] = list(tokens) + [f"[PAD{i}]" for i in
                                                          range(len(tokens), cfg.vocab_size)]
            if "tokenizer.ggml.scores" in kv:
                kv["tokenizer.ggml.scores"] = list(kv["tokenizer.ggml.scores"]) + [0.0] * pad
            if "tokenizer.ggml.token_type" in kv:
                kv["tokenizer.ggml.token_type"] = list(kv["tokenizer.ggml.token_type"]) + [5] * pad
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_ids)):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            kv.setdefault(f"tokenizer.ggml.{key}", int(value))
    return kv


def _llama3(cfg: ModelConfig) -> bool:
    """Whether `cfg` uses Llama-3 rope scaling (stored as the `rope_freqs` tensor)."""
    return bool(cfg.rope_scaling) and cfg.rope_scaling.get("rope_type", "llama3") == "llama3"


def _tensor_plan(cfg: ModelConfig, sd: dict[str, torch.Tensor]
                 ) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """(llama.cpp name, HF name or None for `rope_freqs`, shape) of every tensor to write."""
    plan: list[tuple[str, str | None, tuple[int, ...]]] = []
    if _llama3(cfg):
        plan.append(("rope_freqs.weight", None, (cfg.head_dim // 2,)))
    names = layer_map(gguf_arch(cfg))
    for hf, t in sd.items():
        if not (cfg.tie_embeddings and hf == "lm_head.weight"):
            plan.append((gguf_name(hf, names), hf, tuple(t.shape)))
    return plan


def _array(cfg: ModelConfig, sd: dict[str, torch.Tensor], hf: str | None) -> np.ndarray:
    """One tensor as float32 in llama.cpp's layout (Q/K permuted for `llama`, Gemma's norms as
    1 + w)."""
    if hf is None:
        from llamaworks.model import llama3_freq_factors

        return llama3_freq_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).numpy()
    w = sd[hf].detach().to("cpu", torch.float32)
    if gguf_arch(cfg) == "llama":  # the only architecture llama.cpp permutes
        if ".q_proj." in hf:
            w = permute_qk(w, cfg.n_heads)
        elif ".k_proj." in hf:
            w = permute_qk(w, cfg.n_kv_heads)
    if cfg.norm_plus_one and hf.endswith("norm.weight"):
        w = w + 1.0
    return np.ascontiguousarray(w.numpy(), dtype=np.float32)


def _check_representable(cfg: ModelConfig, source: str) -> None:
    """Refuse what llama.cpp would run differently from us."""
    arch = gguf_arch(cfg)
    if cfg.sliding_window and arch != "gemma3":
        raise CheckpointError(f"{source}: llama.cpp's {arch} architecture has no sliding window; "
                              f"this model attends over {cfg.sliding_window} positions on some "
                              "layers, which a GGUF file of it would silently ignore")
    if arch == "gemma3":
        head = (cfg.dim // cfg.n_heads) if cfg.n_layers == 62 else cfg.head_dim
        if not math.isclose(cfg.attn_scale or cfg.head_dim ** -0.5, head ** -0.5, rel_tol=1e-6):
            raise CheckpointError(f"{source}: llama.cpp gives a {cfg.n_layers}-layer Gemma 3 the "
                                  f"attention scale 1/sqrt({head}), this model uses "
                                  f"{cfg.attn_scale}")


def _ggml_type(shape: tuple[int, ...], file_type: str) -> Any:
    """The stored type: 1-D tensors stay F32; Q8_0 rows that are not a multiple of 32 fall back
    to F16, as llama.cpp's converter does."""
    from gguf import GGMLQuantizationType as Q

    kind = "F32" if len(shape) == 1 else file_type
    if kind == "Q8_0" and shape[-1] % 32:
        kind = "F16"
    return Q[kind]


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def export_gguf(path: str | os.PathLike[str], cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                tokenizer_metadata: dict[str, Any] | None = None, file_type: str = "F32") -> Path:
    """Write `state_dict` (HF names) as a llama GGUF at `path`; returns the path.

    tokenizer_metadata: `tokenizer.*` key/values as `checkpoint.gguf.read_metadata` returns them
    (other keys are ignored); None writes a vocabulary-less file (`tokenizer.ggml.model = none`).
    file_type: "F32", "F16", "BF16" or "Q8_0" for the 2-D weights."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type {file_type!r} is not one of {', '.join(FILE_TYPES)}")
    out = Path(path)
    source = f"export to {out}"
    check_state_dict(cfg, state_dict, source)
    _check_representable(cfg, source)
    tok_kv = [(k, *_value_type(k, v, source))
              for k, v in _tokenizer_kv(cfg, tokenizer_metadata, source).items()]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch=gguf_arch(cfg))
        try:
            _write(w, cfg, state_dict, file_type, tok_kv)
        finally:
            w.close()
    return out


def _write(w: Any, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], file_type: str,
           tok_kv: list) -> None:
    import gguf

    w.add_type("model")
    w.add_name(cfg.name or "llamaworks")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads or gguf_arch(cfg) == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.sliding_window:  # Gemma 3 (the only architecture _check_representable lets through)
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
        sliding = [cfg.is_sliding(i) for i in range(cfg.n_layers)]
        for n in range(1, cfg.n_layers + 1):  # llama.cpp's set_swa_pattern(n), if one fits
            if sliding == [i % n < n - 1 for i in range(cfg.n_layers)]:
                w.add_sliding_window_pattern(n)
                break
        else:
            w.add_sliding_window_pattern(sliding)
    if _llama3(cfg):  # exact parameters beside rope_freqs, for our loader
        for key in ROPE_SCALING_KEYS:
            value = cfg.rope_scaling[key]
            if key == "original_max_position_embeddings":
                w.add_uint32(ROPE_SCALING_PREFIX + key, int(value))
            else:
                w.add_float64(ROPE_SCALING_PREFIX + key, float(value))
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_file_type(int(getattr(gguf.LlamaFileType, "ALL_F32" if file_type == "F32"
                                else f"MOSTLY_{file_type}")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_kv:
        w.add_key_value(key, value, vtype, sub)
    # Tensor infos first (the header needs every shape and size), then the data, converted
    # one tensor at a time so memory stays at about one tensor.
    plan = [(name, hf, shape, _ggml_type(shape, file_type))
            for name, hf, shape in _tensor_plan(cfg, state_dict)]
    for name, _, shape, qtype in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, hf, _, qtype in plan:
        w.write_tensor_data(gguf.quants.quantize(_array(cfg, state_dict, hf), qtype))


__all__ = ["export_gguf", "FILE_TYPES"]

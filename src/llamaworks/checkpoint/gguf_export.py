"""Write a GGUF file that llama.cpp and `checkpoint.gguf` both load, in the architecture llama.cpp
uses for the model's family (llama, also for Mistral and Mixtral; qwen2; qwen3; qwen3moe; gemma3;
llama4; deepseek2 for DeepSeek-V3).

Tensors get llama.cpp's names for that architecture (`gguf_name`); for `llama` the Q/K rows are
permuted into llama.cpp's rotary layout (`permute_qk`); Gemma's norms are stored as 1 + w; 1-D
tensors (norms, biases, `rope_freqs`) stay F32, and Llama-3 rope scaling is stored as the
`rope_freqs` tensor as llama.cpp's converter does. What llama.cpp cannot represent (a sliding
window in the llama or Qwen architectures, a Gemma attention scale other than the one llama.cpp
assumes) is refused rather than written wrong. Mixture-of-experts models are written as
llama.cpp's converter writes them: Mixtral as `llama` with `expert_count` / `expert_used_count`
(experts `feed_forward_length` wide), Qwen3-MoE as `qwen3moe` (+ `expert_feed_forward_length`),
stacked experts as the 3-D `blk.N.ffn_{gate,up,down}_exps`, the router `ffn_gate_inp` kept F32;
routing llama.cpp runs differently (top-k not renormalized, sigmoid scores, a scale or bias,
shared experts, dense layers between sparse ones) is refused. Llama 4 goes out as `llama4`
(+ `interleave_moe_layer_step`, the shared expert as `ffn_*_shexp`), refused where llama.cpp's
fixed iRoPE (chunks of 8192, every 4th layer without RoPE, temperature 8192 / 0.1, q/k norm
unless 128 experts) or router differs; DeepSeek-V3 as `deepseek2` (MLA keys, kv_b split into
`attn_k_b` / `attn_v_b`, `exp_probs_b`, YaRN with `yarn_log_multiplier`; half-split RoPE rows
permuted into llama.cpp's pairs), refused where llama.cpp's YaRN factors, dense-then-sparse
layers, latent norm epsilon or biases differ. Tensors are converted and written one at a time,
into a temporary file that is renamed into place when complete.
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
    KV_SPLIT,
    ROPE_SCALING_KEYS,
    ROPE_SCALING_PREFIX,
    gguf_arch,
    gguf_name,
    layer_map,
    permute_qk,
)
from llamaworks.checkpoint.shapes import check_state_dict
from llamaworks.config import (
    CHUNKED,
    LLAMA4_CHUNK,
    LLAMA4_NOPE_STEP,
    LLAMA4_TEMPERATURE,
    ModelConfig,
    gguf_deepseek2_rope,
)
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
        if cfg.tie_embeddings and hf == "lm_head.weight":
            continue
        if cfg.mla and hf.endswith(".kv_b_proj.weight"):  # split as llama.cpp's converter does
            i, h, rank = hf.split(".")[2], cfg.n_heads, cfg.kv_lora_rank
            plan += [(f"blk.{i}.{KV_SPLIT[0]}.weight", hf + ":k", (h, rank, cfg.qk_nope_dim)),
                     (f"blk.{i}.{KV_SPLIT[1]}.weight", hf + ":v", (h, cfg.v_head_dim, rank))]
            continue
        plan.append((gguf_name(hf, names), hf, tuple(t.shape)))
    return plan


def _array(cfg: ModelConfig, sd: dict[str, torch.Tensor], hf: str | None) -> np.ndarray:
    """One tensor as float32 in llama.cpp's layout (Q/K permuted for `llama`, Gemma's norms as
    1 + w)."""
    if hf is None:
        from llamaworks.model import llama3_freq_factors

        return llama3_freq_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).numpy()
    part = None
    if cfg.mla:
        hf, _, part = hf.partition(":")
    w = sd[hf].detach().to("cpu", torch.float32)
    if cfg.mla:
        w = _latent_layout(cfg, hf, w, part)
    if gguf_arch(cfg) == "llama":  # the only architecture llama.cpp permutes
        if ".q_proj." in hf:
            w = permute_qk(w, cfg.n_heads)
        elif ".k_proj." in hf:
            w = permute_qk(w, cfg.n_kv_heads)
    if cfg.norm_plus_one and hf.endswith("norm.weight"):
        w = w + 1.0
    return np.ascontiguousarray(w.numpy(), dtype=np.float32)


def _latent_layout(cfg: ModelConfig, hf: str, w: torch.Tensor, part: str | None) -> torch.Tensor:
    """A latent-attention tensor in llama.cpp's deepseek2 layout: kv_b as attn_k_b [H, rank,
    nope] (`part` "k") or attn_v_b [H, v, rank] ("v"); RoPE rows on interleaved pairs (llama.cpp's
    NORM rope), so a half-split model (rope_interleave false) has its q and k_rope rows
    permuted into pairs."""
    h, nope, rope, rank = cfg.n_heads, cfg.qk_nope_dim, cfg.head_dim, cfg.kv_lora_rank
    if part:
        kv = w.view(h, nope + cfg.v_head_dim, rank)
        return kv[:, :nope].transpose(1, 2).contiguous() if part == "k" else kv[:, nope:].clone()
    if cfg.rope_interleaved:
        return w
    if hf.endswith((".q_b_proj.weight", ".q_proj.weight")):
        w = w.view(h, nope + rope, -1).clone()
        w[:, nope:] = permute_qk(w[:, nope:].reshape(h * rope, -1), h).view(h, rope, -1)
        return w.view(h * (nope + rope), -1)
    if hf.endswith(".kv_a_proj_with_mqa.weight"):
        w = w.clone()
        w[rank:] = permute_qk(w[rank:], 1)
    return w


def _moe_step(cfg: ModelConfig) -> int | None:
    """llama4's interleave_moe_layer_step: s with MoE layers exactly (i + 1) % s == 0 (None: no
    such s)."""
    moe = [cfg.is_moe(i) for i in range(cfg.n_layers)]
    return next((s for s in range(1, cfg.n_layers + 1)
                 if moe == [(i + 1) % s == 0 for i in range(cfg.n_layers)]), None)


def _llama4_differs(cfg: ModelConfig) -> str | None:
    """Why llama.cpp's llama4 graph would run `cfg` differently (None: it runs it as we do):
    its iRoPE is fixed (LLAMA4_* in config.py), q/k norms follow the expert count, no router
    scale or output bias is read."""
    n = cfg.n_layers
    chunked = [cfg.is_chunked(i) for i in range(n)]
    if [not cfg.uses_rope(i) for i in range(n)] != [(i + 1) % LLAMA4_NOPE_STEP == 0
                                                   for i in range(n)]:
        return f"llama.cpp leaves exactly every {LLAMA4_NOPE_STEP}th layer without RoPE"
    if chunked != [i % LLAMA4_NOPE_STEP < LLAMA4_NOPE_STEP - 1 for i in range(n)] or (
            any(chunked) and cfg.attention_chunk != LLAMA4_CHUNK):
        return (f"llama.cpp attends in chunks of {LLAMA4_CHUNK} on the layers with RoPE "
                f"(this model: chunk {cfg.attention_chunk}, {CHUNKED} layers {chunked})")
    if n >= LLAMA4_NOPE_STEP and [float(x) for x in cfg.attn_temperature or ()] != \
            LLAMA4_TEMPERATURE:
        return (f"llama.cpp tunes the no-RoPE layers' queries with floor {LLAMA4_TEMPERATURE[0]:g} "
                f"and scale {LLAMA4_TEMPERATURE[1]:g} (this model: {cfg.attn_temperature})")
    if cfg.qk_l2_norm != (cfg.n_experts != 128):
        return "llama.cpp applies the q/k norm exactly when a llama4 model has not 128 experts"
    if cfg.router != "sigmoid" or not cfg.router_pre or cfg.router_norm or cfg.router_bias \
            or cfg.router_scale != 1.0 or cfg.router_groups > 1:
        return "llama.cpp's llama4 router is sigmoid-weighted inputs, unscaled, not renormalized"
    if cfg.shared_hidden_dim != cfg.moe_hidden_dim:
        return "llama.cpp's llama4 shared expert is as wide as the routed ones"
    if _moe_step(cfg) is None:
        return "llama.cpp's llama4 puts experts on every step-th layer"
    if cfg.o_bias:
        return "llama.cpp's llama4 loads no output-projection bias"
    if cfg.attn_scale is not None and not math.isclose(cfg.attn_scale, cfg.head_dim ** -0.5):
        return "llama.cpp's llama4 reads no attention scale"
    if not cfg.rope_interleaved:
        return "llama.cpp's llama4 rotates Meta's interleaved pairs"
    return None


def _deepseek2_kv(cfg: ModelConfig) -> dict[str, Any]:
    """The deepseek2 RoPE keys llama.cpp reads (names without the `deepseek2.` prefix)."""
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", "default") == "default":
        return {}
    kv = {"rope.scaling.type": sc.get("rope_type"), "rope.scaling.factor": float(sc["factor"]),
          "rope.scaling.original_context_length": int(sc["original_max_position_embeddings"])}
    if sc.get("mscale_all_dim"):
        kv["rope.scaling.yarn_log_multiplier"] = 0.1 * float(sc["mscale_all_dim"])
    return kv


def _deepseek2_differs(cfg: ModelConfig) -> str | None:
    """Why llama.cpp's deepseek2 graph would run `cfg` differently (None: as we do)."""
    from llamaworks.model import rope_attention_factor

    first = next((i for i in range(cfg.n_layers) if cfg.is_moe(i)), cfg.n_layers)
    if [cfg.is_moe(i) for i in range(cfg.n_layers)] != [i >= first
                                                        for i in range(cfg.n_layers)]:
        return "llama.cpp's deepseek2 has dense layers only before the first sparse one"
    if not cfg.shared_hidden_dim or cfg.shared_hidden_dim % cfg.moe_hidden_dim:
        return "llama.cpp's deepseek2 runs a whole number (> 0) of expert-sized shared experts"
    if cfg.qkv_bias or cfg.o_bias:
        return "llama.cpp's deepseek2 has no attention biases"
    if cfg.router_pre:
        return "llama.cpp's deepseek2 weighs the experts' outputs"
    if not math.isclose(cfg.norm_eps, 1e-6, rel_tol=1e-4):
        return "llama.cpp norms the q and kv latents with the model's epsilon, we with 1e-6"
    if cfg.q_lora_rank and (cfg.n_layers in (26, 27) or cfg.n_layers == 48 and
                            cfg.vocab_size == 128256):
        return (f"llama.cpp reads a {cfg.n_layers}-layer deepseek2 as a Lite model without a q "
                "bottleneck")
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind not in ("default", "yarn") or kind == "yarn" and (
            float(sc.get("beta_fast") or 32) != 32 or float(sc.get("beta_slow") or 1) != 1
            or not sc.get("truncate", True)):
        return "llama.cpp's deepseek2 runs YaRN with betas 32 and 1 (truncated) or no scaling"
    md = {f"deepseek2.{k}": v for k, v in _deepseek2_kv(cfg).items()}
    try:
        want, scale = gguf_deepseek2_rope(md, cfg.qk_nope_dim + cfg.head_dim, "export")
    except CheckpointError as e:
        return str(e)
    ours = cfg.attn_scale or (cfg.qk_nope_dim + cfg.head_dim) ** -0.5
    if not (math.isclose(rope_attention_factor(want), rope_attention_factor(cfg.rope_scaling),
                         rel_tol=1e-6) and math.isclose(scale, ours, rel_tol=1e-6)):
        return ("llama.cpp derives YaRN's attention factors from mscale_all_dim alone "
                "(mscale taken equal to it)")
    return None


def _check_experts(cfg: ModelConfig, source: str) -> None:
    """Refuse expert routing that llama.cpp's llama / qwen3moe graphs would run differently: they
    score by softmax, always renormalize the top k, scale by nothing, and make every layer
    sparse."""
    if not cfg.n_experts:
        return
    why = None
    if cfg.family == "llama4_text":
        why = _llama4_differs(cfg)
    elif cfg.family == "deepseek_v3":
        why = _deepseek2_differs(cfg)
    elif cfg.family not in ("mixtral", "qwen3_moe"):
        why = f"llama.cpp has no {cfg.family} architecture with experts"
    elif not cfg.router_norm:
        why = ("its router does not renormalize the chosen experts' weights (norm_topk_prob "
               "false), llama.cpp always does")
    elif cfg.router != "softmax" or cfg.router_bias or cfg.router_scale != 1.0:
        why = "llama.cpp routes these architectures by plain softmax (no sigmoid, bias or scale)"
    elif cfg.shared_hidden_dim:
        why = "llama.cpp's llama / qwen3moe architectures have no shared expert"
    elif any(not cfg.is_moe(i) for i in range(cfg.n_layers)):
        why = "llama.cpp makes every layer of these architectures a mixture of experts"
    if why:
        raise CheckpointError(f"{source}: cannot write this {cfg.family} model as GGUF: {why}, "
                              "so a GGUF file of it would run differently in llama.cpp")


def _check_representable(cfg: ModelConfig, source: str) -> None:
    """Refuse what llama.cpp would run differently from us."""
    _check_experts(cfg, source)
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


def _ggml_type(shape: tuple[int, ...], file_type: str, name: str = "") -> Any:
    """The stored type: 1-D tensors and the router (`ffn_gate_inp`) stay F32; Q8_0 rows that are
    not a multiple of 32 fall back to F16, as llama.cpp's converter does."""
    from gguf import GGMLQuantizationType as Q

    kind = "F32" if len(shape) == 1 or name.endswith(".ffn_gate_inp.weight") else file_type
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


def _write_mla(w: Any, cfg: ModelConfig) -> None:
    """deepseek2's keys, as llama.cpp's converter writes them (key/value_length: the MQA view of
    the latent; the per-head sizes as *_mla; expert routing; YaRN)."""
    import gguf

    rank = cfg.kv_lora_rank
    w.add_key_length(rank + cfg.head_dim)
    w.add_value_length(rank)
    w.add_key_length_mla(cfg.qk_nope_dim + cfg.head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_kv_lora_rank(rank)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: attn_q (llama.cpp needs the key unless Lite)
    w.add_leading_dense_block_count(next(i for i in range(cfg.n_layers) if cfg.is_moe(i)))
    w.add_expert_shared_count(cfg.shared_hidden_dim // cfg.moe_hidden_dim)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.router == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.router_scale != 1.0:
        w.add_expert_weights_scale(cfg.router_scale)
    if cfg.router_norm:
        w.add_expert_weights_norm(True)
    if cfg.router_topk_groups < cfg.router_groups:  # (all groups: no restriction, no keys)
        w.add_expert_group_count(cfg.router_groups)
        w.add_expert_group_used_count(cfg.router_topk_groups)
    kv = _deepseek2_kv(cfg)
    if kv:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(kv["rope.scaling.factor"])
        w.add_rope_scaling_orig_ctx_len(kv["rope.scaling.original_context_length"])
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
        if "rope.scaling.yarn_log_multiplier" in kv:
            w.add_rope_scaling_yarn_log_mul(kv["rope.scaling.yarn_log_multiplier"])


def _write(w: Any, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], file_type: str,
           tok_kv: list) -> None:
    import gguf

    w.add_type("model")
    w.add_name(cfg.name or "llamaworks")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    # Mixtral's experts are feed_forward_length wide; Qwen3-MoE's have their own key
    w.add_feed_forward_length(cfg.moe_hidden_dim if cfg.family == "mixtral" else cfg.hidden_dim)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_active_experts)
        if cfg.family != "mixtral":
            w.add_expert_feed_forward_length(cfg.moe_hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1 if cfg.mla else cfg.n_kv_heads)  # MLA: llama.cpp's MQA view
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.mla:
        _write_mla(w, cfg)
    elif cfg.head_dim != cfg.dim // cfg.n_heads or gguf_arch(cfg) == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.family == "llama4_text":
        w.add_interleave_moe_layer_step(_moe_step(cfg))
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
    plan = [(name, hf, shape, _ggml_type(shape, file_type, name))
            for name, hf, shape in _tensor_plan(cfg, state_dict)]
    for name, _, shape, qtype in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, hf, _, qtype in plan:
        w.write_tensor_data(gguf.quants.quantize(_array(cfg, state_dict, hf), qtype))


__all__ = ["export_gguf", "FILE_TYPES"]

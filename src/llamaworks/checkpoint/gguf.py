"""Read GGUF files of the llama (Mixtral too), qwen2, qwen3, qwen3moe, gemma3, llama4 and deepseek2
architectures (parsed by `gguf_file`, decoded by the `gguf` package), with tensor names as
llama.cpp writes them per architecture.

Weights are dequantized to float32 by `gguf.quants.dequantize`, except the matrices of the types a
caller asks to keep (`load_gguf(path, keep=...)`: `StoredBlocks`, a view of the mapped file, as
the inference loader `infer.load` uses them); for the `llama` architecture only, llama.cpp's
converter permutes the Q and K projections (Meta's interleaved rotary pairs), so `unpermute_qk`
restores the HF layout that `model.py` uses (for kept blocks, by reordering whole rows); Gemma
files store each norm as 1 + w, and we keep HF's w. Experts (Mixtral's `llama` with
`expert_count`, `qwen3moe`) are 3-D tensors `blk.N.ffn_{gate,up,down}_exps` whose GGUF dims
{in, out, E} read in torch order as [E, out, in]: exactly our stacked `mlp.experts.*_proj`
([E, I, dim], down [E, dim, I]); the router `ffn_gate_inp` {dim, E} is `mlp.gate` [E, dim]. Kept
expert tensors come as `StoredBlocks` of E * out rows. Llama 4 (`llama4`) adds the shared
expert `ffn_{gate,up,down}_shexp` (`mlp.shared_expert`); its Q/K are not permuted (llama.cpp
rotates Meta's pairs as HF's Llama 4 stores them). DeepSeek-V2/V3 (`deepseek2`): latent attention
`attn_q` or `attn_q_a` / `attn_q_a_norm` / `attn_q_b`, `attn_kv_a_mqa`, `attn_kv_a_norm`, and
`kv_b_proj` either as legacy `attn_kv_b` or split as newer converters write it (`attn_k_b`
{nope, rank, H}: each head's key rows transposed; `attn_v_b` {rank, v, H}), joined back here
and always decoded to float32 (absorbed decode multiplies by it; it is small); the router's
correction bias `exp_probs_b.bias`; multi-token-prediction layers past the model are skipped.
Every failure raises `CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaworks.checkpoint.gguf_file import GGUFFile, TensorInfo, parse_gguf
from llamaworks.checkpoint.shapes import expected_shapes
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError

# The tensor types llamaworks reads: every type in the files people download (Q4_K_M and Q5_K_M
# files fall back to Q5_0/Q5_1/Q8_0 where rows are not multiples of 256; Q2_K/Q3_K files hold Q3_K
# to Q6_K; IQ4_NL/IQ4_XS in the i-quant files), all decoded by the `gguf` package. Anything else
# is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")

# llama.cpp tensor names -> HF names ({i} = layer index).
_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Where an architecture names things differently (llama.cpp's tensor names per architecture).
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Stacked experts (no `.weight` in our names: they are parameters of `Experts` itself).
EXPERTS = "mlp.experts."
_MOE = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": EXPERTS + "gate_proj",
        "ffn_up_exps": EXPERTS + "up_proj", "ffn_down_exps": EXPERTS + "down_proj"}
_SHARED = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj",
           "ffn_up_shexp": "mlp.shared_expert.up_proj",
           "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# DeepSeek-V3's expert-choice bias: `blk.N.exp_probs_b.bias`, a buffer of the router here.
ROUTER_BIAS = "mlp.gate.e_score_correction_bias"
# Latent attention (deepseek2). kv_b_proj is `attn_kv_b` in legacy files; newer converters split
# it into attn_k_b {nope, rank, H} (each head's key part, transposed) and attn_v_b {rank, v, H},
# which `load_gguf` joins back (KV_SPLIT).
_MLA = {"attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
        "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
        "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
        "attn_output": "self_attn.o_proj"}
KV_SPLIT = ("attn_k_b", "attn_v_b")
_ARCH_MAPS = {
    "llama": {**_LAYER_MAP, **_MOE},  # Mixtral is `llama` with experts
    "qwen2": _LAYER_MAP,
    "qwen3": {**_LAYER_MAP, **_QK_NORMS},
    "qwen3moe": {**_LAYER_MAP, **_QK_NORMS, **_MOE},
    "llama4": {**_LAYER_MAP, **_MOE, **_SHARED},
    "deepseek2": {**{k: v for k, v in _LAYER_MAP.items() if not k.startswith("attn_")},
                  "attn_norm": "input_layernorm", **_MLA, **_MOE, **_SHARED,
                  "exp_probs_b": ROUTER_BIAS},
    "gemma3": {**_LAYER_MAP, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}


def gguf_arch(cfg: ModelConfig) -> str:
    """The GGUF architecture llama.cpp uses for `cfg`'s family (Mistral is `llama`)."""
    return {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3",
            "qwen3_moe": "qwen3moe", "llama4_text": "llama4",
            "deepseek_v3": "deepseek2"}.get(cfg.family, cfg.family)


def layer_map(arch: str) -> dict[str, str]:
    """llama.cpp tensor name parts -> HF module names for a GGUF architecture."""
    return _ARCH_MAPS[arch]


_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_metadata(source: str | os.PathLike[str] | GGUFFile | Any) -> dict[str, Any]:
    """All GGUF key/values as plain Python (str, int, float, bool, lists), from a path, a parsed
    `GGUFFile`, or a `gguf.GGUFReader`.

    Tokenizer arrays (`tokenizer.ggml.tokens`, `.merges`, `.scores`, `.token_type`) come back as
    Python lists too."""
    if isinstance(source, (str, os.PathLike)):
        source = parse_gguf(source)
    if isinstance(source, GGUFFile):
        return dict(source.metadata)
    md: dict[str, Any] = {}  # a gguf.GGUFReader
    for name, fld in source.fields.items():
        if not name.startswith("GGUF."):
            md[name] = _field_value(fld)
    return md


def _field_value(fld: Any) -> Any:
    import gguf

    types = fld.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        return [fld.parts[i].tolist()[0] for i in fld.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
    v = fld.parts[fld.data[0]].tolist()
    v = v[0] if isinstance(v, list) else v
    return bool(v) if types[0] == gguf.GGUFValueType.BOOL else v


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's half split)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .transpose(1, 2).reshape(w.shape))


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF layout -> llama.cpp layout (inverse of `unpermute_qk`), for GGUF export."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
             .transpose(1, 2).reshape(w.shape))


def _dequantize(f: GGUFFile, t: TensorInfo) -> np.ndarray:
    """A tensor as float32 (numpy order), or `CheckpointError` for a type llamaworks refuses."""
    from gguf import GGMLQuantizationType, quants

    kind = t.type_name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{f.path}: tensor {t.name!r} has type {kind}, which llamaworks "
                              f"does not support (supported: {', '.join(SUPPORTED_TYPES)})")
    raw = f.data(t)
    try:
        if kind == "F32":
            arr = raw.view(np.float32)
        elif kind == "F16":
            arr = raw.view(np.float16).astype(np.float32)
        else:
            rows = raw.reshape(-1, t.n_bytes // max(1, math.prod(t.shape[:-1])))
            arr = quants.dequantize(rows, GGMLQuantizationType(t.type_id))
        return arr.reshape(t.shape)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{f.path}: cannot decode tensor {t.name!r} ({kind}, shape "
                              f"{t.shape}): {e}") from None


# Exact Llama-3 rope scaling parameters, written by our exporter beside `rope_freqs` (llama.cpp
# ignores keys it does not know); files from elsewhere get their parameters fitted to the tensor.
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")
ROPE_SCALING_PREFIX = "llamaworks.rope_scaling."


def _llama3_candidates(freqs: np.ndarray, cfg: ModelConfig, md: dict[str, Any]
                       ) -> list[dict[str, Any]]:
    """Llama-3 scaling parameters that may have produced `freqs`: the ones stored in the file's
    metadata, the published ones, then the ones solved from the tensor. The divisor is 1 for
    short wavelengths, `factor` for long ones, and between them 1/f = 1/factor + s (1 - 1/factor)
    with s = orig/(high-low)/wavelen - low/(high-low), linear in 1/wavelen; so (factor,
    orig/(high-low), low/(high-low)) fix the tensor, and low = 1 loses nothing."""
    from llamaworks.model import rope_inv_freq

    f = freqs.astype(np.float64)
    factor = float(f.max())
    cands = []
    if all(ROPE_SCALING_PREFIX + k in md for k in ROPE_SCALING_KEYS):
        stored = {k: float(md[ROPE_SCALING_PREFIX + k]) for k in ROPE_SCALING_KEYS}
        stored["original_max_position_embeddings"] = int(stored[ROPE_SCALING_KEYS[-1]])
        cands.append({"rope_type": "llama3", **stored})
    # (high_freq_factor 1: Llama 4's, a step at wavelength 8192 with no band between)
    cands += [{"rope_type": "llama3", "factor": fac, "low_freq_factor": 1.0,
              "high_freq_factor": high, "original_max_position_embeddings": 8192}
             for fac in dict.fromkeys((float(round(factor, 4)), 8.0, 16.0, 32.0, 4.0, 2.0))
             for high in (4.0, 1.0)]
    wavelen = 2 * np.pi / rope_inv_freq(cfg.head_dim, cfg.rope_theta).double().numpy()
    medium = (f > 1 + 1e-5) & (f < factor * (1 - 1e-5))
    if factor > 1 + 1e-5 and medium.sum() >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], s, 1)
        if intercept < 0:
            b = -intercept
            orig = slope / b
            cands.append({"rope_type": "llama3", "factor": float(round(factor, 4)),
                          "low_freq_factor": 1.0, "high_freq_factor": float(round(1 + 1 / b, 4)),
                          "original_max_position_embeddings": int(round(orig))})
    return cands


def _llama3_scaling_from_freqs(freqs: np.ndarray, cfg: ModelConfig, path: Path,
                               md: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """GGUF stores Llama-3 rope scaling as a `rope_freqs` tensor (per-frequency divisors);
    recover parameters that reproduce it (None when every divisor is 1)."""
    from llamaworks.model import llama3_freq_factors

    freqs = np.asarray(freqs, dtype=np.float32).reshape(-1)
    if freqs.shape != (cfg.head_dim // 2,):
        raise CheckpointError(f"{path}: rope_freqs tensor has {freqs.size} values, expected "
                              f"head_dim/2 = {cfg.head_dim // 2}")
    if np.allclose(freqs, 1.0, rtol=0, atol=1e-6):
        return None
    for cand in _llama3_candidates(freqs, cfg, md or {}):
        want = llama3_freq_factors(cfg.head_dim, cfg.rope_theta, cand).numpy()
        if np.allclose(want, freqs, rtol=1e-5, atol=0):
            return cand
    raise CheckpointError(f"{path}: rope_freqs tensor does not match any Llama-3 rope scaling "
                          f"that llamaworks can reproduce (divisors {freqs.tolist()[:8]} ...)")


@dataclass
class StoredBlocks:
    """A quantized matrix as the file stores it: `rows` uint8 [out, bytes per row] of GGUF blocks
    (`type_name`, e.g. Q4_1), a read-only view of the memory-mapped file (copy it, then
    `release()` its pages), for `shape` = (out, in) weights, or (E, out, in) stacked experts
    (then `rows` holds E * out rows, expert by expert). `order`: the row permutation that
    puts the rows in HF order (llama.cpp's Q/K permutation undone by moving whole rows), or
    None."""

    type_name: str
    shape: tuple[int, ...]
    rows: torch.Tensor
    order: torch.Tensor | None
    source: GGUFFile
    info: TensorInfo

    def release(self) -> None:
        self.source.release(self.info)


def _stored(f: GGUFFile, t: TensorInfo, heads: int | None) -> StoredBlocks:
    import warnings

    with warnings.catch_warnings():  # a read-only view on purpose: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.from_numpy(f.data(t)).reshape(math.prod(t.shape[:-1]), -1)
    order = None if heads is None else unpermute_qk(torch.arange(t.shape[0]), heads)
    return StoredBlocks(t.type_name, tuple(t.shape), rows, order, f, t)


def load_gguf(path: str | os.PathLike[str], keep: tuple[str, ...] = ()
              ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(config, HF-named state dict, metadata) from a llama GGUF file: float32 tensors, except
    that matrices (and stacked experts) of the types in `keep` (e.g. ("Q4_1", "Q8_0")) come as
    `StoredBlocks`, never decoded."""
    p = Path(path)
    f = parse_gguf(p)
    md = read_metadata(f)
    try:
        cfg = ModelConfig.from_gguf_metadata(md, source=str(p))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: invalid llama metadata ({e})") from None
    arch = md["general.architecture"]
    layer_map = _ARCH_MAPS[arch]
    tensors = {t.name: t for t in f.tensors}
    cfg.tie_embeddings = "output.weight" not in tensors
    cfg.qkv_bias = "blk.0.attn_q.bias" in tensors
    cfg.o_bias = "blk.0.attn_output.bias" in tensors
    if arch == "deepseek2":
        _deepseek2_layout(cfg, tensors, p)
    # Names, types and shapes are all checked before any tensor is decoded.
    by_hf: dict[str, TensorInfo] = {}
    kv_split: dict[str, list[TensorInfo]] = {}  # deepseek2's kv_b_proj from attn_k_b + attn_v_b
    for name, t in tensors.items():
        parts = name.split(".")
        if arch == "deepseek2" and parts[0] == "blk" and int(parts[1]) >= cfg.n_layers:
            continue  # a multi-token-prediction layer (nextn_predict_layers), not part of it
        if arch == "deepseek2" and len(parts) == 4 and parts[2] in KV_SPLIT:
            hf = f"model.layers.{int(parts[1])}.self_attn.kv_b_proj.weight"
            kv_split.setdefault(hf, [None, None])[KV_SPLIT.index(parts[2])] = t
            continue
        hf = None if name == "rope_freqs.weight" else _hf_name(name, layer_map)
        if hf is None and name != "rope_freqs.weight":
            raise CheckpointError(f"{p}: unexpected tensor {name!r} for the {arch} architecture")
        if t.type_name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{p}: tensor {name!r} has type {t.type_name}, which "
                                  "llamaworks does not support (supported: "
                                  f"{', '.join(SUPPORTED_TYPES)})")
        if hf is not None:
            by_hf[hf] = t
    shapes = expected_shapes(cfg)
    for hf, (k_b, v_b) in kv_split.items():
        if k_b is None or v_b is None or hf in by_hf:
            raise CheckpointError(f"{p}: {hf.split('.')[2]}'s kv_b needs attn_k_b and attn_v_b "
                                  "(or one attn_kv_b)")
        h, nope, v = cfg.n_heads, cfg.qk_nope_dim, cfg.v_head_dim
        if (k_b.shape, v_b.shape) != ((h, cfg.kv_lora_rank, nope), (h, v, cfg.kv_lora_rank)):
            raise CheckpointError(f"{p}: tensors {k_b.name!r} {k_b.shape} and {v_b.name!r} "
                                  f"{v_b.shape} do not fit the metadata")
    missing = sorted(set(shapes) - set(by_hf) - set(kv_split))
    if missing:
        names = [gguf_name(m, layer_map) for m in missing[:5]]
        raise CheckpointError(f"{p}: missing tensors {names} ({len(missing)} in all)")
    unexpected = sorted(set(by_hf) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{p}: unexpected tensors {unexpected[:5]} for this {arch} model")
    for hf, shape in shapes.items():
        if hf not in kv_split and by_hf[hf].shape != shape:
            raise CheckpointError(f"{p}: tensor {by_hf[hf].name!r} has shape "
                                  f"{by_hf[hf].shape}, the metadata implies {shape}")
    if "rope_freqs.weight" in tensors:
        freqs = _dequantize(f, tensors["rope_freqs.weight"])
        cfg.rope_scaling = _llama3_scaling_from_freqs(freqs, cfg, p, md)
    from tqdm import tqdm

    sd: dict[str, torch.Tensor] = {}
    for hf, t in tqdm(by_hf.items(), desc="loading GGUF", unit="tensor", leave=False,
                      disable=len(by_hf) < 64 or not _tty()):
        heads = None
        if arch == "llama":  # the only architecture llama.cpp permutes
            heads = cfg.n_heads if ".q_proj." in hf else cfg.n_kv_heads if ".k_proj." in hf \
                else None
        if t.type_name in keep and len(t.shape) in (2, 3) and not hf.endswith(".kv_b_proj.weight"):
            sd[hf] = _stored(f, t, heads)  # (kv_b always float: absorbed decode multiplies by it)
            continue
        w = torch.from_numpy(np.array(_dequantize(f, t), dtype=np.float32, order="C"))
        if cfg.norm_plus_one and hf.endswith("norm.weight"):
            w = w - 1.0  # the file stores 1 + w
        sd[hf] = w if heads is None else unpermute_qk(w, heads)
    for hf, (k_b, v_b) in kv_split.items():  # per head: key rows (k_b transposed), value rows
        k = torch.from_numpy(np.array(_dequantize(f, k_b), dtype=np.float32)).transpose(1, 2)
        v = torch.from_numpy(np.array(_dequantize(f, v_b), dtype=np.float32))
        sd[hf] = torch.cat([k, v], 1).reshape(-1, cfg.kv_lora_rank).contiguous()
    return cfg, sd, md


def _deepseek2_layout(cfg: ModelConfig, tensors: dict[str, TensorInfo], path: Path) -> None:
    """What a deepseek2 file's tensors say that its metadata does not: the router's correction
    bias (`exp_probs_b`, optional in llama.cpp) and the direct q projection (`attn_q`: llama.cpp
    reads q_lora_rank only for non-Lite layer counts and then takes attn_q when it is 0)."""
    first = next((i for i in range(cfg.n_layers) if cfg.is_moe(i)), None)
    cfg.router_bias = first is not None and f"blk.{first}.exp_probs_b.bias" in tensors
    if "blk.0.attn_q.weight" in tensors:
        cfg.q_lora_rank = None
    elif cfg.q_lora_rank is None:
        t = tensors.get("blk.0.attn_q_a.weight")
        if t is None:
            raise CheckpointError(f"{path}: neither blk.0.attn_q nor blk.0.attn_q_a is present")
        cfg.q_lora_rank = t.shape[0]
    for name in ("blk.0.attn_q_a.bias", "blk.0.attn_kv_a_mqa.bias"):
        if name in tensors:
            raise CheckpointError(f"{path}: {name!r}: llama.cpp's deepseek2 has no attention "
                                  "biases")


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _hf_name(name: str, layer_map: dict[str, str] = _LAYER_MAP) -> str | None:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    parts = name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[3] in ("weight", "bias")
            and parts[2] in layer_map and parts[1].isdigit()):
        module = layer_map[parts[2]]
        suffix = "weight" if module.startswith(EXPERTS) else "bias" if module == ROUTER_BIAS \
            else None  # names of parameters themselves: the file's suffix is fixed
        if suffix is not None:
            return f"model.layers.{int(parts[1])}.{module}" if parts[3] == suffix else None
        return f"model.layers.{int(parts[1])}.{module}.{parts[3]}"
    return None


def gguf_name(hf: str, layer_map: dict[str, str] = _LAYER_MAP) -> str:
    """HF name -> llama.cpp name (for export)."""
    inv = {v: k for k, v in _GLOBAL_MAP.items()}
    if hf in inv:
        return inv[hf]
    parts = hf.split(".")  # model.layers.{i}.<module...>.weight|bias
    if len(parts) == 6 and ".".join(parts[3:5]) + "." == EXPERTS:  # stacked experts: no suffix
        parts.append("weight")
    if ".".join(parts[3:]) == ROUTER_BIAS:
        parts = [*parts[:3], "exp_probs_b", "bias"]
    i, module = int(parts[2]), ".".join(parts[3:-1])
    rev = {v: k for k, v in layer_map.items()}
    if module == "exp_probs_b" and ROUTER_BIAS in rev:
        return f"blk.{i}.exp_probs_b.bias"
    if parts[:2] != ["model", "layers"] or module not in rev:
        raise KeyError(hf)
    return f"blk.{i}.{rev[module]}.{parts[-1]}"


__all__ = ["load_gguf", "StoredBlocks", "read_metadata", "parse_gguf", "unpermute_qk", "permute_qk",
           "gguf_name", "gguf_arch", "layer_map", "SUPPORTED_TYPES"]

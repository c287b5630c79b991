"""The one loader for inference: a checkpoint path -> a model ready to decode, with its weights kept
as the file stores them where our kernels run that type.

`load_for_use(path)` is what `LLM(path)` and the inference verbs (chat, generate, score, serve,
eval) call. For a GGUF file, every matrix of a type our kernels run stays in the file's own
blocks, so model memory is about the file size: Q4_1 and Q8_0 become `Int4Linear` /
`Int8Linear` over the blocks regrouped byte for byte into the integer kernels' row format; F16,
Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K become `GGUFLinear` over the bytes
as stored (integer dots over those blocks; F16 a float dot); an embedding table in any of these
is a `BlockEmbedding`, and a tied output head shares its blocks. A MoE file's stacked experts
(`blk.N.ffn_{gate,up,down}_exps`) of those types become `GGUFExperts` over the same blocks
(`_experts`): decode runs the kernels on the chosen experts' slices only. Only the other types
(BF16, Q2_K, Q3_K, IQ4) are dequantized to float32, as `checkpoint.load_model` does.
An HF safetensors directory is read tensor by tensor with bf16 matrices kept in bf16
(`load_hf_as_stored`). `quant=` converts on load instead (everything through float32, then
`quantize_model`); converting tensors that the file already stores quantized into another
quantized type warns (double quantization). LoRA adapters are merged into a float32 base
first, then `quant` applies.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llamaworks.checkpoint import Loaded, detect_format, fill_meta, load_model, resolve
from llamaworks.errors import CheckpointError
from llamaworks.infer import kernels
from llamaworks.infer.quantize import (
    BlockEmbedding,
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    fuse_projections,
    packed_row_bytes,
    packed_rows,
    quantize_model,
)
from llamaworks.memory import return_freed_memory
from llamaworks.model import Llama

# GGUF types our kernels run as stored (the GGML_KINDS types by kernels of ggml_types.h), and the
# `quant` mode that gives back exactly that type's blocks from their float32 dequantization.
KERNEL_TYPES = {"Q4_1": "int4", "Q8_0": "int8", **dict.fromkeys(kernels.GGML_KINDS)}
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def load_as_stored(path: str | Path) -> Loaded:
    """`path` with GGUF Q4_1 / Q8_0 matrices kept in their blocks (see the module docstring);
    other formats, or no usable kernels, load as `checkpoint.load_model` does (float32)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "hf":
        return load_hf_as_stored(p)
    if fmt != "gguf" or not kernels.preferred():
        return load_model(p)
    from llamaworks.checkpoint.gguf import StoredBlocks, load_gguf

    # (load_gguf checks every name, type and shape before anything is decoded)
    cfg, sd, _ = load_gguf(resolve(p, "gguf"), keep=tuple(KERNEL_TYPES))
    blocks = {k: v for k, v in sd.items() if isinstance(v, StoredBlocks)}
    floats = {k: v for k, v in sd.items() if not isinstance(v, StoredBlocks)}
    model = Llama(cfg, device="meta")
    _experts(model, blocks, floats)
    outs = _group_buffers(blocks, cfg.n_layers)
    for name, b in blocks.items():
        rows = packed_rows(b.rows, b.type_name, b.order, outs.get(name))
        b.release()
        module = name.removesuffix(".weight")
        kind = _kind(b.type_name)
        if module == "model.embed_tokens":
            new: nn.Module = BlockEmbedding(rows, kind, cfg.dim)
        else:
            new = _linear(rows, kind, b.shape[1])
        _replace(model, module, new)
    emb = model.model.embed_tokens
    if cfg.tie_embeddings and isinstance(emb, BlockEmbedding):
        model.lm_head = _linear(emb.blocks, emb.kind, cfg.dim)  # one table for both
    for name in [n for n in floats if n.endswith(".bias")]:
        owner = model.get_submodule(name.removesuffix(".bias"))
        if not isinstance(owner, nn.Linear):  # a block layer's bias buffer (Qwen2's q/k/v)
            owner.bias = floats.pop(name)
    unexpected = model.load_state_dict(floats, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise CheckpointError(f"{p}: nowhere to load {unexpected[:5]}")
    if not isinstance(emb, BlockEmbedding):
        model.tie_weights()
    model.reset_rope()  # the rotary tables are computed, not stored: every other tensor is loaded
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{p}: no weights for {left[:5]} ({len(left)} in all)")
    fuse_projections(model)
    del sd, blocks
    return_freed_memory()  # the per-tensor copies and the fused groups' parts were freed
    return Loaded(model=model.eval(), config=cfg, path=p, format="gguf")


def load_hf_as_stored(path: str | Path) -> Loaded:
    """An HF safetensors directory read tensor by tensor (`safe_open`, memory-mapped: nothing is
    held twice but the tensor being placed), bf16 projection matrices kept in bf16 as
    `BF16Linear` (the fused step runs them as bf16 x float32 dots), everything else float32
    (embeddings, norms, biases; fp16 or float32 matrices). An 8B bf16 checkpoint then needs about
    its file size plus its float32 embedding table, not twice the file. `.bin` pickles go through
    the checked loader (`checkpoint.load_model`)."""
    from llamaworks.checkpoint.hf import iter_tensors, read_config, weight_files
    from llamaworks.infer.quantize import BF16Linear

    d = resolve(Path(path), "hf")
    d = d if d.is_dir() else d.parent
    if any(f.suffix != ".safetensors" for f in weight_files(d)):
        return load_model(d)
    cfg = read_config(d)
    model = Llama(cfg, device="meta")
    shapes = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
    floats: dict[str, Tensor] = {}
    for f, key, name, t in iter_tensors(d, cfg):
        if name not in shapes or tuple(shapes[name]) != tuple(t.shape):
            want = tuple(shapes[name]) if name in shapes else "no such tensor"
            raise CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}; the config wants "
                                  f"{want}")
        module = name.removesuffix(".weight")
        if t.dtype == torch.bfloat16 and t.dim() == 2 and \
                isinstance(model.get_submodule(module), nn.Linear):
            _replace(model, module, BF16Linear.from_weight(t))
        else:
            floats[name] = t.float()
    for name in [n for n in floats if n.endswith(".bias")]:
        owner = model.get_submodule(name.removesuffix(".bias"))
        if isinstance(owner, BF16Linear):
            owner.bias = floats.pop(name)
    fill_meta(model, floats, str(d))
    return_freed_memory()
    return Loaded(model=model, config=cfg, path=d, format="hf")


# Matrices that read the same input: packed into one buffer, so `fuse_projections` runs them as one
# kernel call without concatenating (and briefly doubling) them.
_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           ("mlp.gate_proj", "mlp.up_proj"))


def _experts(model: Llama, blocks: dict[str, Any], floats: dict[str, Tensor]) -> None:
    """Each MoE layer with an expert tensor kept in blocks gets a `GGUFExperts` (the blocks
    copied out of the mapped file, Q4_1/Q8_0 repacked for the kernels; a projection of
    another type as the float32 tensor it was decoded to). Their entries leave `blocks` and
    `floats`."""
    from llamaworks.infer.experts import GGUFExperts

    cfg = model.config
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        names = [prefix + p for p in ("gate_proj", "up_proj", "down_proj")]
        if not any(n in blocks for n in names):
            continue
        parts: list[Tensor] = []
        kinds: list[int] = []
        stored = []
        for n in names:
            if n in blocks:
                b = blocks.pop(n)
                e, out = b.shape[0], b.shape[1]
                rows = b.rows if b.type_name in kernels.GGML_KINDS else packed_rows(
                    b.rows, b.type_name)
                parts.append(rows.reshape(e, out, -1))
                kinds.append(_kind(b.type_name))
                stored.append(b)
            else:
                parts.append(floats.pop(n))
                kinds.append(0)
        new = GGUFExperts(*parts, tuple(kinds), cfg.dim, cfg.activation)  # copies the blocks
        for b in stored:
            b.release()
        _replace(model, prefix.removesuffix("."), new)


def _group_buffers(blocks: dict[str, Any], n_layers: int) -> dict[str, Tensor]:
    """name -> the rows of a shared buffer its packed blocks go to, for groups of one type."""
    outs: dict[str, Tensor] = {}
    for i in range(n_layers):
        for group in _GROUPS:
            names = [f"model.layers.{i}.{g}.weight" for g in group]
            members = [blocks.get(n) for n in names]
            if any(m is None for m in members) or len({m.type_name for m in members}) != 1 \
                    or len({m.shape[1] for m in members}) != 1:
                continue
            row_bytes = packed_row_bytes(members[0].type_name, members[0].shape[1],
                                         members[0].rows.shape[1])
            buf = torch.empty(sum(m.rows.shape[0] for m in members), row_bytes, dtype=torch.uint8)
            start = 0
            for n, m in zip(names, members, strict=True):
                outs[n] = buf[start: start + m.rows.shape[0]]
                start += m.rows.shape[0]
    return outs


def with_float_head(model: Llama) -> Llama:
    """`model` with its output head as a frozen float32 nn.Linear (dequantized once), for training
    on a quantized base (QLoRA): the fused linear + cross-entropy loss reads the head's weight."""
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        w = head.dequantize()
        model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        model.lm_head.weight = nn.Parameter(w, requires_grad=False)
    return model


def _kind(type_name: str) -> int:
    """The kernel kind a stored type runs as: 4 (Q4_1), 8 (Q8_0) or its GGML kind."""
    return {"Q8_0": 8, "Q4_1": 4}.get(type_name) or kernels.GGML_KINDS[type_name]


def _linear(rows: Tensor, kind: int, in_features: int) -> nn.Module:
    if kind == 4:
        return Int4Linear.from_blocks(rows, in_features)
    if kind == 8:
        return Int8Linear.from_blocks(rows, in_features)
    return GGUFLinear(rows, kind, in_features)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def stored_types(path: str | Path) -> set[str]:
    """The tensor types of a GGUF file's matrices (empty for other formats)."""
    p = Path(path)
    if detect_format(p) != "gguf":
        return set()
    from llamaworks.checkpoint.gguf_file import parse_gguf

    f = parse_gguf(resolve(p, "gguf"))
    return {t.type_name for t in f.tensors if len(t.shape) == 2}


def load_for_use(path: str | Path, adapters: tuple[str | Path, ...] | list[str | Path] = (),
                 quant: str | None = None, group_size: int = 32) -> Llama:
    """The model at `path` for inference, in eval mode: as stored (module docstring), or with the
    LoRA `adapters` merged into its float32 weights and/or `quant` applied on load."""
    p = Path(path)
    if not adapters and quant is None:
        return load_as_stored(p).model
    if quant is not None:
        requant = stored_types(p) - _FLOAT_TYPES - {t for t, q in KERNEL_TYPES.items()
                                                     if q == quant}
        if requant and quant != "bf16":
            warnings.warn(f"{p.name} stores {', '.join(sorted(requant))} tensors: converting them "
                          f"to {quant} quantizes already quantized weights a second time (worse "
                          "than either alone); omit --quant to run the file's own types",
                          RuntimeWarning, stacklevel=2)
    model = load_model(p).model
    if adapters:
        from llamaworks.posttrain.lora import load_adapter

        for a in adapters:
            model = load_adapter(model, a)
    if quant is not None:
        model = quantize_model(model, quant, group_size, inplace=True)
    return model.eval()

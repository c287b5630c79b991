"""Tensor parallelism (Megatron-LM's split, with `torch.distributed.tensor.parallel`), applied
from outside the model: in every block q/k/v and gate/up are column-parallel (each rank holds
n_heads / tp query heads, n_kv_heads / tp key/value heads and hidden_dim / tp MLP units, biases
split with them) and o/down are row-parallel (partial outputs summed by one all-reduce per
branch), so the residual stream stays whole and identical on every rank of the group.

Embeddings, norms and the output head stay replicated (plain tensors, whole gradients on every
rank: the column-parallel layers' input gradients are all-reduced on their way back), as the loss
(`linear_cross_entropy` over `lm_head.weight`) reads the whole output matrix. Per-head q/k norms
run on each rank's own heads; their shared weight's gradient is summed over the group.

Split parameters are DTensors that keep their full names and shapes, so the trainer's full
state dict gathers whole tensors and DCP checkpoints reshard to any other layout. Attention's
head counts become the local ones (`n_heads`, `n_kv` attributes; the model's math unchanged).
Mixture-of-experts layers and latent attention (MLA) are refused: use --expert-parallel.
A linear wrapped from outside with its nn.Linear as `.base` (a LoRA adapter,
`posttrain/lora.py`) has that base split; the wrapper sees the split in the base weight's
DTensor placement and handles its own part.

`load_split` builds the split model straight from an HF safetensors directory: on the meta
device, each rank reading only its rows / columns of every split matrix (`checkpoint.hf.
iter_tensors(part=)`) and the replicated tensors whole, so no rank ever holds a whole block
matrix; the DTensors it makes are the ones `apply_tensor_parallel` would cut from whole tensors
(`generate` and `serve --tensor-parallel` on a 1-D mesh; `finetune --tensor-parallel` on the "tp"
dimension of the (dp, tp) mesh `distributed.parallelize` builds alike, so they are kept there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llamaworks.config import ModelConfig
from llamaworks.model import MLP, Attention, Llama
from llamaworks.train.distributed import sum_grad_over

# The split of every block: each layer and the dimension of its weight that each rank keeps
# 1/tp of: 0, its rows (column-parallel, the bias split alike), or 1, its columns
# (row-parallel, the bias whole on every rank).
PLAN = (("self_attn.q_proj", 0), ("self_attn.k_proj", 0), ("self_attn.v_proj", 0),
        ("self_attn.o_proj", 1), ("mlp.gate_proj", 0), ("mlp.up_proj", 0),
        ("mlp.down_proj", 1))


def check_splittable(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming what `cfg` cannot split over `tp` tensor-parallel ranks."""
    if tp < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, not {tp}")
    if cfg.mla:
        raise ValueError("--tensor-parallel does not split latent attention (MLA) models")
    if any(cfg.is_moe(i) for i in range(cfg.n_layers)):
        raise ValueError("--tensor-parallel does not split mixture-of-experts layers; use "
                         "--expert-parallel for MoE models")
    for what, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                    ("MLP hidden units", cfg.hidden_dim)):
        if n % tp:
            raise ValueError(f"--tensor-parallel {tp}: the model's {n} {what} do not split "
                             f"into {tp} equal parts")


def _sum_weight_grad(norm: nn.Module, group: Any) -> None:
    """Run `norm`'s own forward (its class's, on its attributes) with a weight whose gradient
    is summed over `group`; parameter names and the norm's math unchanged."""
    from types import SimpleNamespace

    cls_forward = type(norm).forward

    def forward(x: Tensor, _m: nn.Module = norm) -> Tensor:
        w = sum_grad_over(_m.weight, group)
        return cls_forward(SimpleNamespace(**vars(_m), weight=w), x)

    norm.forward = forward


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Split every block's attention and MLP over `tp_mesh` (one-dimensional). Call after the
    weights are loaded or initialized: each rank keeps its slice of the full tensors it holds
    (the same full tensors on every rank, as the trainer's seeded init makes them); weights
    that are already DTensors of the plan's placements (`load_split`) are kept as they are."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    check_splittable(model.config, tp)
    styles = (ColwiseParallel(), RowwiseParallel())
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if type(attn) is not Attention or type(mlp) is not MLP:
            raise ValueError(f"--tensor-parallel splits plain attention and MLP blocks, not "
                             f"{type(attn).__name__} / {type(mlp).__name__}")
        plan = {}
        for name, dim in PLAN:
            style = styles[dim]
            m = block.get_submodule(name)
            if type(getattr(m, "base", None)) is nn.Linear:  # a wrapper applied from outside
                name, m = f"{name}.base", m.base  # (LoRA): split its base; it reads the split
            if type(m) is not nn.Linear:  # from the base weight's placement
                raise ValueError(f"--tensor-parallel splits float nn.Linear layers, not "
                                 f"{type(m).__name__} (load without --quant, from float "
                                 f"weights)")
            plan[name] = style
        parallelize_module(block, tp_mesh, plan)
        attn.n_heads //= tp  # the forward views q/k/v with this rank's head counts
        attn.n_kv //= tp
        if hasattr(attn, "q_norm"):
            _sum_weight_grad(attn.q_norm, tp_mesh.get_group())
            _sum_weight_grad(attn.k_norm, tp_mesh.get_group())


def _split_names(cfg: ModelConfig) -> dict[str, int | None]:
    """HF name -> the dimension this rank reads 1/tp of, or None for a tensor of a split layer
    kept whole (a row-parallel bias); names not in it are replicated plain tensors."""
    out: dict[str, int | None] = {}
    for i in range(cfg.n_layers):
        for layer, dim in PLAN:
            out[f"model.layers.{i}.{layer}.weight"] = dim
            out[f"model.layers.{i}.{layer}.bias"] = 0 if dim == 0 else None
    return out


def load_split(directory: str | Path, tp_mesh: Any) -> Llama:
    """The float32 model of the HF safetensors `directory` with this rank's parts of the split
    layers as the DTensors over `tp_mesh` that `apply_tensor_parallel` cuts (which, called next
    on the same mesh, keeps them and installs the split's forward). Built on the meta device,
    this rank reading only its part of each split matrix (rank r of tp: rows or columns
    [r n/tp, (r+1) n/tp)) and the other tensors whole. Peak memory: the replicated tensors +
    1/tp of the block matrices (+ the one part being read, in its stored dtype).
    CheckpointError for a tensor of the wrong shape or one missing; ValueError for a model
    that does not split."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from llamaworks.checkpoint import fill_meta
    from llamaworks.checkpoint.hf import iter_tensors, read_config
    from llamaworks.errors import CheckpointError

    d = Path(directory)
    cfg = read_config(d)
    device = torch.device(tp_mesh.device_type)
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    check_splittable(cfg, tp)
    model = Llama(cfg, device="meta")
    shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(),
                                              *model.named_buffers()]}
    split = _split_names(cfg)

    def part(name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        dim = split.get(name)
        if dim is None:
            return None
        if shapes.get(name) != shape:  # checked before a slice of it is read
            raise CheckpointError(f"{d}: {name} has shape {shape}; the config wants "
                                  f"{shapes.get(name)}")
        n = shape[dim] // tp
        return tuple(slice(rank * n, (rank + 1) * n) if i == dim else slice(None)
                     for i in range(len(shape)))

    whole: dict[str, Tensor] = {}
    for f, key, name, t in iter_tensors(d, cfg, part=part):
        if split.get(name) is None and shapes.get(name) != tuple(t.shape):
            want = shapes.get(name, "no such tensor")
            raise CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}; the config wants "
                                  f"{want}")
        if name not in split:
            whole[name] = t.to(device, torch.float32)
            continue
        dim = split[name]
        local = DTensor.from_local(t.to(device, torch.float32).contiguous(), tp_mesh,
                                   [Replicate() if dim is None else Shard(dim)])
        module, _, pname = name.rpartition(".")
        old = model.get_submodule(module).get_parameter(pname)
        model.get_submodule(module).register_parameter(
            pname, nn.Parameter(local, requires_grad=old.requires_grad))
    return fill_meta(model, whole, str(d))


def inference_mesh(tensor_parallel: int, device: torch.device) -> Any:
    """Under torchrun with `tensor_parallel` ranks: the process group (gloo on CPU, NCCL on
    CUDA) and the one-dimensional mesh of all of them; ValueError for another world size."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tensor_parallel:
        raise ValueError(f"--tensor-parallel {tensor_parallel} needs as many processes: torchrun "
                         f"--nproc-per-node {tensor_parallel} (this run has {world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (tensor_parallel,))


def shard_for_inference(model: nn.Module, mesh: Any) -> bool:
    """Split `model` (whole, or from `load_split` on `mesh`) over `mesh` (`inference_mesh`) for
    decoding; returns whether this is rank 0 (the one that prints). Every rank then runs the same
    engine steps: the logits are replicated, so greedy and seeded sampling pick the same tokens
    everywhere. The config's `n_kv_heads` becomes this rank's share, so the KV caches the
    engine builds from it hold only this rank's heads."""
    tp = mesh.size()
    apply_tensor_parallel(model, mesh)
    cfg = model.config
    model.config = cfg.replace(n_kv_heads=cfg.n_kv_heads // tp)
    return dist.get_rank() == 0

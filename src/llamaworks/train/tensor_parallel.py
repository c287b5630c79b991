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
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from llamaworks.config import ModelConfig
from llamaworks.model import MLP, Attention
from llamaworks.train.distributed import sum_grad_over


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
    (the same full tensors on every rank, as the trainer's seeded init makes them)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    check_splittable(model.config, tp)
    col, row = ColwiseParallel(), RowwiseParallel()
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if type(attn) is not Attention or type(mlp) is not MLP:
            raise ValueError(f"--tensor-parallel splits plain attention and MLP blocks, not "
                             f"{type(attn).__name__} / {type(mlp).__name__}")
        plan = {}
        for name, style in (("self_attn.q_proj", col), ("self_attn.k_proj", col),
                            ("self_attn.v_proj", col), ("self_attn.o_proj", row),
                            ("mlp.gate_proj", col), ("mlp.up_proj", col),
                            ("mlp.down_proj", row)):
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


def shard_for_inference(model: nn.Module, tensor_parallel: int) -> bool:
    """Under torchrun with `tensor_parallel` ranks, split `model` (loaded whole on every rank)
    over all of them for decoding; returns whether this is rank 0 (the one that prints). Every
    rank then runs the same engine steps: the logits are replicated, so greedy and seeded
    sampling pick the same tokens everywhere. The config's `n_kv_heads` becomes this rank's
    share, so the KV caches the engine builds from it hold only this rank's heads."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tensor_parallel:
        raise ValueError(f"--tensor-parallel {tensor_parallel} needs as many processes: torchrun "
                         f"--nproc-per-node {tensor_parallel} (this run has {world})")
    device = model.device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    apply_tensor_parallel(model, init_device_mesh(device.type, (tensor_parallel,)))
    cfg = model.config
    model.config = cfg.replace(n_kv_heads=cfg.n_kv_heads // tensor_parallel)
    return dist.get_rank() == 0

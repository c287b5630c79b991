"""Parallelism applied from outside the model, under `torchrun` (gloo on CPU, NCCL on CUDA), by
`parallelize` in torchtitan's order: tensor parallelism (and expert parallelism, next to it) ->
activation checkpointing -> torch.compile (per block) -> FSDP2 (`fully_shard` per block, then
the root). The ranks form a (dp, tp) mesh: rank = dp_index * tp + tp_index, so each tensor-
parallel group is tp consecutive ranks (one node's GPUs) and FSDP2 shards over the dp dimension;
every rank of a tp group reads the same data."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return DistInfo(device=torch.device(device or ("cuda" if cuda else "cpu")))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (parameter names unchanged)."""
    for layer in model.model.layers:
        fwd = layer.forward

        def wrapped(*args: Any, _f=fwd) -> torch.Tensor:
            return checkpoint(_f, *args, use_reentrant=False)

        layer.forward = wrapped


def world_mesh(info: DistInfo, tensor_parallel: int = 1) -> Any:
    """The mesh over all ranks: one-dimensional ("dp": FSDP2 and expert parallelism share it),
    or ("dp", "tp") with `tensor_parallel` > 1 (world_size / tp data-parallel groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    tp = tensor_parallel
    if tp < 1 or info.world_size % tp:
        raise ValueError(f"--tensor-parallel {tp} does not divide the {info.world_size} ranks "
                         f"of this run (torchrun --nproc-per-node a multiple of {tp})")
    if tp == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(info.device.type, (info.world_size // tp, tp),
                            mesh_dim_names=("dp", "tp"))


def data_rank(info: DistInfo, tensor_parallel: int = 1) -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel size): the ranks of a tensor-parallel
    group share one slice of the batch."""
    return info.rank // tensor_parallel, info.world_size // tensor_parallel


def parallelize(model: nn.Module, info: DistInfo, *, tensor_parallel: int = 1,
                expert_parallel: int = 1, activation_checkpointing: bool = False,
                compile: bool = False, mixed_bf16: bool = False) -> None:
    """Apply, in place and in this order: tensor parallelism over the "tp" mesh dimension and
    expert parallelism over all ranks -> activation checkpointing per block -> torch.compile per
    block (`Module.compile`: parameter names unchanged) -> FSDP2 over the "dp" dimension (under
    torchrun). Call after the weights are initialized or loaded and before the
    optimizer is built. Raises ValueError for a layout the model or the run cannot take."""
    tp, ep = tensor_parallel, expert_parallel
    if tp > 1 and ep > 1:
        raise ValueError("--tensor-parallel and --expert-parallel do not combine (tensor "
                         "parallelism does not split MoE layers)")
    if tp > 1 and activation_checkpointing and compile:  # tested: each alone works with TP
        raise ValueError("--tensor-parallel with both --activation-checkpointing and --compile "
                         "fails inside PyTorch's AOT autograd (checkpointed DTensor blocks); "
                         "use one of the two")
    if tp > 1 and not info.enabled:
        raise ValueError(f"--tensor-parallel {tp} needs torchrun with a multiple of {tp} "
                         f"ranks (torchrun --nproc-per-node {tp} ...); this is one process")
    if ep > 1 and ep != info.world_size:
        raise ValueError(f"--expert-parallel {ep} needs as many ranks (torchrun "
                         f"--nproc-per-node {ep}); this run has {info.world_size}")
    mesh = world_mesh(info, tp) if info.enabled else None
    ignored = None
    if tp > 1:
        from llamaworks.train.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    if ep > 1:
        from llamaworks.train.expert_parallel import apply_expert_parallel

        ignored = set(apply_expert_parallel(model, mesh, info.world_size))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    if mesh is not None:  # also over a dp dimension of one rank: then every parameter is a
        # DTensor (foreach kernels take DTensors of several meshes, not DTensors and tensors)
        apply_fsdp(model, info, mixed_bf16=mixed_bf16, mesh=mesh["dp"], ignored=ignored)


def apply_fsdp(model: nn.Module, info: DistInfo, mixed_bf16: bool = False, mesh: Any = None,
               ignored: set[nn.Parameter] | None = None) -> None:
    """Shard every block and the root with FSDP2 over all ranks (one-dimensional mesh);
    `ignored` parameters (expert-parallel experts, already sharded) are left to their owner."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else world_mesh(info)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)


class _GradThrough(torch.autograd.Function):
    """Identity forward; backward passes the gradient through `fn`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:  # type: ignore[override]
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.fn(g), None


def grad_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`x` unchanged; on the way back its gradient becomes `fn(gradient)` (the one hook that
    expert parallelism's gradient scaling and tensor parallelism's gradient sums use)."""
    return _GradThrough.apply(x, fn)


def sum_grad_over(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`x` unchanged; backward sums its gradient over `group`: for a tensor every rank of the
    group holds whole and applies to its own share of the work (a norm over this rank's heads,
    a LoRA factor beside a split layer; Megatron's copy to the tensor-parallel region)."""
    def summed(g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous()
        dist.all_reduce(g, group=group)
        return g

    return grad_through(x, summed)


class _SumOver(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


def sum_over(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of every rank's `x` over `group`, on every rank; the gradient passes back
    unchanged (the sum is used whole and alike by every rank: Megatron's reduce from the
    tensor-parallel region)."""
    return _SumOver.apply(x, group)


def all_reduce_mean(x: float, info: DistInfo) -> float:
    if not info.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is True on any (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (on every rank when distributed)."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """DCP sharded checkpoint of model + optimizer (each rank writes its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _mesh_key(t: torch.Tensor) -> Any:
    """Tensors that foreach kernels may take together: plain ones, or DTensors of one mesh."""
    from torch.distributed.tensor import DTensor

    return (id(t.device_mesh), t.placements) if isinstance(t, DTensor) else None


def clip_grad_norm_(params: Any, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose gradients mix plain tensors and
    DTensors of several meshes (tensor parallelism leaves norms and embeddings plain or on the
    dp mesh, the split layers on the (dp, tp) mesh): each kind's norm is reduced over its own
    mesh, the global norm combines them, every gradient is scaled by the same coefficient."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [p for p in params if p.grad is not None]
    groups: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(_mesh_key(p.grad), []).append(p)
    norms = []
    for ps in groups.values():
        n = get_total_norm([p.grad for p in ps])
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not norms:
        return torch.zeros(())
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for ps in groups.values():
        clip_grads_with_norm_(ps, max_norm, total)
    return total

"""Expert parallelism, applied from outside the model: each rank of the group holds E / ep of
every MoE layer's experts, and token copies travel to the rank holding their expert and back
(two all-to-alls per layer: counts first, then the tokens), as torchtitan and DeepSpeed-MoE do.

The group is every rank of the run (ep = world size): the data-parallel ranks are borrowed, so
each rank still trains on its own slice of the batch and the experts see all of them. The
parameters keep their names and full shapes as DTensors sharded on the expert dimension, so the
trainer's full state dict gathers whole [E, ...] tensors, DCP checkpoints reshard to any other
rank count, and gradient clipping sees one norm over all of them. FSDP2 must leave them alone
(`ignored_params`): their gradients already hold every rank's tokens and are scaled by 1/world
in backward, which makes them the gradient of the mean loss over the global batch, as FSDP's
averaged gradients of the other parameters are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llamaworks.model import Experts, MoE, gated_mlp
from llamaworks.train.distributed import grad_through

PROJS = ("gate_proj", "up_proj", "down_proj")


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Rows of `x` split `in_splits` to the ranks in order, `out_splits` rows back from each
    (differentiable: the backward is the reverse exchange)."""
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty(sum(out_splits), *x.shape[1:])
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


class ExpertParallelExperts(nn.Module):
    """This rank's slice of one layer's `Experts`; a drop-in for it (same forward)."""

    def __init__(self, experts: Experts, mesh, grad_scale: float):
        from torch.distributed.tensor import DTensor, Shard

        super().__init__()
        ep, rank = mesh.size(), mesh.get_local_rank()
        if experts.n_experts % ep:
            raise ValueError(f"{experts.n_experts} experts do not split over {ep} "
                             "expert-parallel ranks")
        self.n_experts, self.n_local, self.ep = experts.n_experts, experts.n_experts // ep, ep
        self.gelu, self.grad_scale, self.group = experts.gelu, grad_scale, mesh.get_group()
        mine = slice(rank * self.n_local, (rank + 1) * self.n_local)
        for name in PROJS:
            local = getattr(experts, name).detach()[mine].clone()
            full = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(full, requires_grad=getattr(experts, name)
                                             .requires_grad))

    def _scale(self, g: Tensor) -> Tensor:
        """An expert weight's gradient times 1 / world (see the module docstring)."""
        return g * self.grad_scale

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor, pre: bool = False) -> Tensor:
        """As `Experts.forward`: sum_j weights[:, j] * expert_idx[:, j](x) for x [N, dim]."""
        k = idx.shape[-1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # token copies by expert, so by the rank holding it
        counts = torch.bincount(flat, minlength=self.n_experts).view(self.ep, self.n_local)
        recv = torch.empty_like(counts)  # [source rank, my expert]: what comes here
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        sent, got = counts.sum(1).tolist(), recv.sum(1).tolist()
        w = weights.reshape(-1)[order, None]
        xs = (x[order // k] * w).to(x.dtype) if pre else x[order // k]
        arrived = _exchange(xs, got, sent, self.group)  # by source rank, then by expert
        which = torch.arange(self.n_local, device=x.device).repeat(self.ep).repeat_interleave(
            recv.flatten())
        by_expert = which.argsort(stable=True)
        mats = [grad_through(getattr(self, p).to_local(), self._scale) for p in PROJS]
        xe, outs, start = arrived[by_expert], [x.new_zeros(0, x.shape[-1])], 0
        for e, n in enumerate(recv.sum(0).tolist()):
            if n:
                outs.append(gated_mlp(xe[start:start + n], mats[0][e], mats[1][e], mats[2][e],
                                      self.gelu))
                start += n
        done = torch.cat(outs)[by_expert.argsort()]  # back to arrival order
        back = _exchange(done, sent, got, self.group)
        if not pre:
            back = back * w
        return torch.zeros_like(x).index_add_(0, order // k, back.to(x.dtype))


def apply_expert_parallel(model: nn.Module, mesh, world_size: int) -> list[nn.Parameter]:
    """Shard every MoE layer's experts over `mesh` (all ranks); returns their parameters (for
    FSDP2's `ignored_params`). Call after the weights are loaded or initialized (each rank
    keeps its slice of the full tensors it holds)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, MoE):
            if type(m.experts) is not Experts:
                raise ValueError(f"expert parallelism needs plain stacked experts, not "
                                 f"{type(m.experts).__name__}")
            m.experts = ExpertParallelExperts(m.experts, mesh, 1.0 / world_size)
            params += [getattr(m.experts, p) for p in PROJS]
    if not params:
        raise ValueError("--expert-parallel needs a mixture-of-experts model (this one has no "
                         "MoE layers)")
    return params

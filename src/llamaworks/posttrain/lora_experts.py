"""LoRA on a MoE layer's experts: one low-rank update per expert and projection.

Expert e's gate / up / down projection W_e gets W_e + scaling * B_e A_e, exactly as a LoRA on
each expert's own linear layer would (how PEFT adapters of Mixtral / Qwen3-MoE checkpoints name
them: `mlp.experts.{e}.gate_proj`, Mixtral `block_sparse_moe.experts.{e}.w1`; PEFT fuses them
into its own layout on load). Here they are stacked like the experts: A [E, r, in], B [E, out, r].
No dropout on expert inputs: PEFT's expert LoRA has none either (it refuses lora_dropout != 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llamaworks.model import Experts, dispatch

PROJS = ("gate_proj", "up_proj", "down_proj")


class LoRAExperts(nn.Module):
    """Frozen stacked experts plus trainable per-expert LoRA on the `projs` chosen; a drop-in for
    `Experts` (same forward(x, weights, idx))."""

    def __init__(self, base: Experts, r: int, alpha: float, projs: tuple[str, ...]):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.projs = r, alpha / r, tuple(p for p in PROJS if p in projs)
        self.n_experts, self.enabled = base.n_experts, True
        dev = base.gate_proj.device
        for proj in self.projs:
            e, out_f, in_f = getattr(base, proj).shape
            a = nn.Parameter(torch.empty(e, r, in_f, device=dev))
            for i in range(e):  # each expert as PEFT initializes a LoRA linear
                nn.init.kaiming_uniform_(a.data[i], a=math.sqrt(5))
            self.register_parameter(f"{proj}_A", a)
            self.register_parameter(f"{proj}_B", nn.Parameter(torch.zeros(e, out_f, r,
                                                                          device=dev)))

    def pair(self, proj: str) -> tuple[Tensor, Tensor]:
        """(A [E, r, in], B [E, out, r]) of one projection."""
        return getattr(self, f"{proj}_A"), getattr(self, f"{proj}_B")

    def delta(self, proj: str) -> Tensor:
        """scaling * B_e @ A_e for every expert, shaped like the stacked base weight."""
        a, b = self.pair(proj)
        return torch.bmm(b, a) * self.scaling

    def _linear(self, proj: str, e: int, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, getattr(self.base, proj)[e])
        if self.enabled and proj in self.projs:
            a, b = self.pair(proj)
            y = y + ((x.to(a.dtype) @ a[e].t() @ b[e].t()) * self.scaling).to(y.dtype)
        return y

    def expert(self, e: int, x: Tensor) -> Tensor:
        g = self._linear("gate_proj", e, x)
        g = nn.functional.gelu(g, approximate="tanh") if self.base.gelu else nn.functional.silu(g)
        return self._linear("down_proj", e, g * self._linear("up_proj", e, x))

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor, pre: bool = False) -> Tensor:
        return dispatch(x, weights, idx, self.n_experts, self.expert, pre)

    @torch.no_grad()
    def merged(self) -> Experts:
        """The base experts with every update folded in (in place)."""
        for proj in self.projs:
            w = getattr(self.base, proj)
            w += self.delta(proj).to(w.dtype)
        return self.base

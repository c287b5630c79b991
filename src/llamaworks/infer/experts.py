"""Stacked experts kept in a GGUF file's blocks: `GGUFExperts`, the quantized counterpart of
`model.Experts`, which `infer.load` puts at `model.layers.{i}.mlp.experts` for a MoE GGUF.

Each projection is one tensor of E experts' rows: uint8 [E, out, row bytes] of one block kind
(`quantize.block_linear`'s kinds: 4 = Q4_1, 8 = Q8_0, a `kernels.GGML_KINDS` type's own blocks)
or float32 [E, out, in] (kind 0: a type the kernels do not run, dequantized on load). Expert e's
rows are one contiguous slice, so a token runs the block kernels on its k chosen experts' slices
only: decode reads k / E of the expert weights, never dequantizing the rest. gate and up of one
kind sit in one buffer [E, 2 * I, bytes] (expert e's gate rows, then its up rows), so each expert
needs one kernel call for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamaworks.infer import kernels
from llamaworks.infer.quantize import frozen_block_linear
from llamaworks.model import dispatch

F32 = 0  # kind of a float32 projection


def _linear(x: Tensor, w: Tensor, kind: int, tier: str | None) -> Tensor:
    if kind == F32:
        return F.linear(x, w)
    return frozen_block_linear(x, w, kind, tier)


class GGUFExperts(nn.Module):
    """E gated MLPs in blocks: `gate_up` [E, 2I, bytes] when gate and up share a kind (else
    `gate`, `up` [E, I, bytes] apart), `down` [E, dim, bytes]; `kinds` (gate, up, down). Same
    interface and math as `model.Experts` (`expert(e, x)`, `forward(x, weights, idx, pre)`)."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, kinds: tuple[int, int, int],
                 dim: int, activation: str = "silu"):
        super().__init__()
        self.n_experts, self.hidden = gate.shape[0], gate.shape[1]
        self.dim, self.kinds, self.gelu = dim, tuple(kinds), activation == "gelu_tanh"
        self.tier = kernels.tier()  # the kernel tier the blocks run on (fixed when built)
        # copies, always: the inputs may be views of a memory-mapped file
        if kinds[0] == kinds[1] and gate.shape[2] == up.shape[2] and gate.dtype == up.dtype:
            self.register_buffer("gate_up", torch.cat([gate, up], 1))
        else:
            self.register_buffer("gate_up", None)
            self.register_buffer("gate", gate.clone(memory_format=torch.contiguous_format))
            self.register_buffer("up", up.clone(memory_format=torch.contiguous_format))
        self.register_buffer("down", down.clone(memory_format=torch.contiguous_format))

    def projections(self, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """Expert e's (gate, up, down) rows, each contiguous."""
        if self.gate_up is not None:
            gu = self.gate_up[e]
            return gu[: self.hidden], gu[self.hidden:], self.down[e]
        return self.gate[e], self.up[e], self.down[e]

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert `e` on tokens x [n, dim]."""
        kg, ku, kd = self.kinds
        if self.gate_up is not None:  # one call for gate and up
            g, u = _linear(x, self.gate_up[e], kg, self.tier).split(self.hidden, -1)
        else:
            g = _linear(x, self.gate[e], kg, self.tier)
            u = _linear(x, self.up[e], ku, self.tier)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return _linear(g * u, self.down[e], kd, self.tier)

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor, pre: bool = False) -> Tensor:
        """As `model.Experts.forward` (`model.dispatch`: each chosen expert once over its
        tokens), on the blocks."""
        return dispatch(x, weights, idx, self.n_experts, self.expert, pre)

    def resident_bytes(self) -> int:
        """Bytes the expert weights hold (the blocks as the file stores them)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


__all__ = ["GGUFExperts"]

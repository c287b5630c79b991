"""Weight-only quantization applied from outside the model by swapping `nn.Linear` modules.

Modes: "bf16" (weights cast to bfloat16), "int8" (symmetric per-output-channel scales, PyTorch's
`_weight_int8pack_mm`) and "int4" (asymmetric groups of 32/64/128 along the input dimension,
PyTorch's packed `_weight_int4pack_mm_for_cpu` on CPU, tinygemm `_weight_int4pack_mm` on CUDA).
Activations stay in the model's dtype; each quantized linear runs its matmul in bfloat16 (on this
CPU kind the packed kernels are fast only with bf16 activations: measured 10-20x faster than with
fp32 activations) and casts the result back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANT_MODES = ("bf16", "int8", "int4")


class BF16Linear(nn.Module):
    """y = x @ W.T with W stored in bfloat16."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))

    def rows(self, idx: Tensor) -> Tensor:
        return self.weight[idx].float()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


class Int8Linear(nn.Module):
    """Symmetric int8 weights, one float scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(torch.bfloat16))

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def rows(self, idx: Tensor) -> Tensor:
        return self.weight[idx].float() * self.scales[idx].float()[..., None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def int4_group_size(in_features: int, group_size: int) -> int:
    """The requested group size, or the largest of 128/64/32 below it that divides in_features."""
    for g in (128, 64, 32):
        if g <= group_size and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs in_features divisible by 32; got {in_features}")


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups along the input dim: w = (q - 8) * scale + zero."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        g = self.group_size = int4_group_size(linear.in_features, group_size)
        w = linear.weight.detach().float()
        o, i = w.shape
        wg = w.reshape(o, i // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-8) / 15
        q = ((wg - lo) / scale).round().clamp(0, 15).reshape(o, i).to(torch.int32)
        zero = lo + 8 * scale
        # [groups, out, 2] (scale, zero), the layout both packed kernels take.
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        if w.is_cuda:
            packed_in = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_in, 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        self.register_buffer("_q", q.to(torch.uint8), persistent=False)  # for dequantize()

    def dequantize(self) -> Tensor:
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [out, groups, 2]
        o, i, g = self.out_features, self.in_features, self.group_size
        q = self._q.float().reshape(o, i // g, g)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(o, i)

    def rows(self, idx: Tensor) -> Tensor:
        g = self.group_size
        sz = self.scales_and_zeros.float().transpose(0, 1)[idx]  # [..., groups, 2]
        q = self._q[idx].float().unflatten(-1, (-1, g))
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class RefinedHead(nn.Module):
    """The output head: logits from the quantized kernel (bf16 precision, ~3 significant digits),
    then the `k` largest recomputed in float32 from the dequantized rows, so near-ties among the
    likely tokens (which decide greedy and top-k/top-p sampling) are resolved exactly."""

    def __init__(self, inner: BF16Linear | Int8Linear | Int4Linear, k: int = 32):
        super().__init__()
        self.inner, self.k = inner, k
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x).float()
        top = y.topk(min(self.k, y.shape[-1]), dim=-1).indices
        exact = torch.einsum("...i,...ki->...k", x.float(), self.inner.rows(top))
        return y.scatter(-1, top, exact).to(x.dtype)


def quantize_model(model: nn.Module, mode: str, group_size: int = 32,
                   inplace: bool = False, head_int8: bool = True) -> nn.Module:
    """Swap every `nn.Linear` for its `mode` counterpart.

    Returns a quantized copy unless `inplace`. Embeddings and norms keep their dtype; a tied
    lm_head gets its own quantized weight (the embedding table stays full precision). With int4,
    `lm_head` is int8 unless `head_int8=False` (as llama.cpp's Q4 files keep the output matrix in
    Q8_0: the logits are the most quantization-sensitive matmul); layers the packed int4 kernel
    cannot take (input size not a multiple of 32, output size not a multiple of 16) get int8."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if not inplace:
        model = copy.deepcopy(model)
    make = {"bf16": BF16Linear, "int8": Int8Linear,
            "int4": lambda lin: Int4Linear(lin, group_size)}[mode]
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        unpackable = lin.in_features % 32 or lin.out_features % 16
        int8_instead = head_int8 and name == "lm_head" or unpackable
        build = Int8Linear if mode == "int4" and int8_instead else make
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = build(lin)
        setattr(parent, child, RefinedHead(new) if name == "lm_head" else new)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of linear-layer weights read per decoded token (the bandwidth-bound numerator)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, (BF16Linear, Int8Linear, Int4Linear)):  # a RefinedHead counts here
            for name, b in m.named_buffers(recurse=False):
                if name != "_q":
                    total += b.numel() * b.element_size()
    return total

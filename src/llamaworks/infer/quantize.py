"""Weight-only quantization applied from outside the model by swapping `nn.Linear` modules.

Modes: "bf16" (weights cast to bfloat16), "int8" and "int4".

On CPU, when our C++ kernels build (`llamaworks.infer.kernels.preferred()`, any tier), int8 is
llama.cpp's Q8_0 (symmetric blocks of 32, fp16 scales) and int4 with groups of 32 is Q4_1
(asymmetric blocks of 32, fp16 scale and min), run by fused dequantize-matvec kernels on
int16-quantized activations (a layer keeps the kernel tier it was built on):
measured 2-3x faster than fp32 matvecs here, and weights that came from a Q4_1/Q8_0 GGUF are
re-packed into exactly their original blocks. Otherwise (CUDA, other group sizes, no compiler):
int8 has symmetric per-output-channel scales (PyTorch's `_weight_int8pack_mm`) and int4 asymmetric
groups of 32/64/128 (PyTorch's `_weight_int4pack_mm_for_cpu`, tinygemm `_weight_int4pack_mm` on
CUDA), run in bfloat16 (the packed CPU kernels are fast only with bf16 activations).
Activations stay in the model's dtype; results are cast back to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamaworks.infer import kernels

QUANT_MODES = ("bf16", "int8", "int4")


def _keep_bias(layer: nn.Module, linear: nn.Linear | None) -> None:
    """Every quantized layer keeps the float bias of the linear it replaces (Qwen2's q/k/v) as a
    `bias` buffer (None when it has none); `_biased` adds it to the output."""
    bias = None if linear is None or linear.bias is None else linear.bias.detach()
    layer.register_buffer("bias", bias)


def _biased(layer: nn.Module, y: Tensor) -> Tensor:
    b = layer.bias
    return y if b is None else y + b.to(y.dtype)


class BF16Linear(nn.Module):
    """y = x @ W.T with W stored in bfloat16."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        _keep_bias(self, linear)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> BF16Linear:
        """Over a bf16 [out, in] matrix as given (no float32 copy on the way, as a checkpoint
        stores it)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.bfloat16))
        self.register_buffer("bias", bias)
        return self

    def rows(self, idx: Tensor) -> Tensor:
        return self.weight[idx].float()

    def forward(self, x: Tensor) -> Tensor:
        return _biased(self, F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype))


def _kernel_ok(linear: nn.Linear) -> bool:
    """Whether our block kernels can take this layer: CPU weights, input size a multiple of 32."""
    w = linear.weight
    return w.device.type == "cpu" and w.shape[1] % kernels.QK == 0 and kernels.preferred()


# Inputs of at least this many rows (prompt chunks, scoring) are multiplied as float32 GEMMs over
# weight tiles dequantized on the fly, instead of the block matvec kernels: exact float32 math
# (as the dequantized model computes it) and BLAS speed; memory stays bounded by the tile.
GEMM_MIN_ROWS = 16
GEMM_TILE_ROWS = 2048  # weight rows dequantized at a time (2048 x 4096 floats = 32 MB)


PROMPT_GEMMS = ("auto", "fp32", "bf16")
_FAST_PROMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("fast_prompt", default=False)


@functools.cache
def _bf16_gemm_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX's bf16 tiles or AVX-512-BF16's
    vdpbf16ps) and PyTorch's oneDNN will use bf16 GEMMs."""
    flags = kernels._cpu_flags().split()
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prompt_gemm_dtype(tier: str | None = None) -> torch.dtype:
    """The precision of the GEMMs over dequantized weight tiles (`block_linear`) inside
    `fast_prompt()` (outside it: float32, exact, as the dequantized model computes it: scoring,
    evaluation, prompt log-probabilities). `LLAMAWORKS_PROMPT_GEMM`: `fp32`; `bf16` (weights,
    activations and the GEMM's output rounded to bfloat16, float32 accumulation: oneDNN's
    kernels); `auto` (default): bf16 where the CPU has AMX-BF16 or AVX-512-BF16 and the kernel
    tier is avx512 (prefill 2.4x float32's on a Zen 4, AMX's tiles 6-7x on a Xeon: BENCHMARKS.md),
    else fp32."""
    if not _FAST_PROMPT.get():
        return torch.float32
    want = os.environ.get("LLAMAWORKS_PROMPT_GEMM", "auto").strip().lower() or "auto"
    if want not in PROMPT_GEMMS:
        raise ValueError(f"LLAMAWORKS_PROMPT_GEMM={want!r}: choose one of "
                         f"{', '.join(PROMPT_GEMMS)}")
    if want == "auto":
        want = "bf16" if (tier or kernels.tier()) == "avx512" and _bf16_gemm_hardware() else "fp32"
    return torch.bfloat16 if want == "bf16" else torch.float32


@contextlib.contextmanager
def fast_prompt() -> Iterator[None]:
    """Within: prompt GEMMs at `prompt_gemm_dtype`'s precision (the engine's prompt chunks, whose
    only outputs are the cache and the last token's logits)."""
    token = _FAST_PROMPT.set(True)
    try:
        yield
    finally:
        _FAST_PROMPT.reset(token)


def dequantize_blocks(blocks: Tensor, kind: int, k: int, tier: str | None = None) -> Tensor:
    """float32 weights [N, k] of block rows of `kind`: 4 = our packed Q4_1, 8 = packed Q8_0, a
    `kernels.GGML_KINDS` value = that GGUF type's own blocks."""
    if kind == 4:
        return kernels.unpack_q4_1(blocks)
    if kind == 8:
        return kernels.unpack_q8_0(blocks)
    return kernels.dequant_rows(blocks, kind, k, tier)


def gathered_rows(blocks: Tensor, idx: Tensor, kind: int, k: int, tier: str | None = None
                  ) -> Tensor:
    """float32 weights [..., k] of the block rows `idx` [...] (an embedding lookup, the head's
    re-checked rows): only those rows are decoded."""
    w = dequantize_blocks(blocks[idx.reshape(-1)], kind, k, tier)
    return w.reshape(*idx.shape, k)


def _weight_tiles(blocks: Tensor, kind: int, k: int, tier: str | None,
                  dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, int, Tensor]]:
    """(r0, r1, weights of rows r0:r1 in `dtype`) over the block rows, GEMM_TILE_ROWS at a
    time (GGUF types decode straight to bf16 when asked)."""
    for r0 in range(0, blocks.shape[0], GEMM_TILE_ROWS):
        r1 = min(r0 + GEMM_TILE_ROWS, blocks.shape[0])
        if dtype == torch.bfloat16 and kind not in (4, 8):
            yield r0, r1, kernels.dequant_rows_bf16(blocks[r0:r1], kind, k, tier)
        else:
            yield r0, r1, dequantize_blocks(blocks[r0:r1], kind, k, tier).to(dtype)


def block_linear(x: Tensor, blocks: Tensor, kind: int, tier: str | None) -> Tensor:
    """x [..., K] @ W.T for block rows W of `kind` (4 = Q4_1, 8 = Q8_0, or a GGUF type's own
    blocks, `kernels.GGML_KINDS`): the block kernels for few rows (decode), tiled dequantize +
    float32 GEMM for many (prefill)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < GEMM_MIN_ROWS or torch.compiler.is_compiling():
        if kind in (4, 8):
            linear = kernels.q4_1_linear if kind == 4 else kernels.q8_0_linear
            return linear(x, blocks, tier)
        return kernels.gguf_linear(x, blocks, kind, tier)
    dtype = prompt_gemm_dtype(tier)
    x2 = x.reshape(rows, x.shape[-1]).to(dtype)
    y = torch.empty(rows, blocks.shape[0], dtype=dtype, device=x.device)
    for r0, r1, w in _weight_tiles(blocks, kind, x.shape[-1], tier, dtype):
        torch.mm(x2, w.T, out=y[:, r0:r1])
    return y.reshape(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


class _FrozenBlockMatmul(torch.autograd.Function):
    """x @ W.T with W frozen in blocks: the gradient flows to x only (grad_x = grad_y @ W, over
    weight tiles dequantized on the fly), so LoRA adapters train on a base that stays quantized
    (QLoRA) and memory stays that of the blocks plus one tile."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: Tensor, kind: int, tier: str | None) -> Tensor:
        ctx.save_for_backward(blocks)
        ctx.kind, ctx.tier, ctx.k = kind, tier, x.shape[-1]
        return block_linear(x, blocks, kind, tier)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (blocks,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        gx = torch.zeros(g.shape[0], ctx.k, dtype=torch.float32, device=grad.device)
        for r0, r1, w in _weight_tiles(blocks, ctx.kind, ctx.k, ctx.tier):
            gx.addmm_(g[:, r0:r1], w)
        return gx.reshape(*grad.shape[:-1], ctx.k).to(grad.dtype), None, None, None


def frozen_block_linear(x: Tensor, blocks: Tensor, kind: int, tier: str | None) -> Tensor:
    """`block_linear`, differentiable with respect to x when x needs a gradient."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenBlockMatmul.apply(x, blocks, kind, tier)
    return block_linear(x, blocks, kind, tier)


def _wants_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _over_blocks(cls: type, blocks: Tensor, in_features: int) -> Any:
    """An Int8Linear / Int4Linear over packed rows, built without a float weight to quantize."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, blocks.shape[0]
    layer.register_buffer("blocks", blocks)
    _keep_bias(layer, None)
    layer.tier = kernels.tier()
    return layer


class Int8Linear(nn.Module):
    """Symmetric int8 weights: Q8_0 blocks of 32 for our CPU kernel, else one float scale per
    output channel for PyTorch's kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("blocks", None)
        _keep_bias(self, linear)
        self.tier = None  # the kernel tier the blocks run on (fixed when built)
        if _kernel_ok(linear):
            self.register_buffer("blocks", kernels.pack_q8_0(linear.weight))
            self.tier = kernels.tier()
            return
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(torch.bfloat16))

    @classmethod
    def from_blocks(cls, blocks: Tensor, in_features: int) -> Int8Linear:
        """A layer over packed Q8_0 rows (`kernels` row format), e.g. a GGUF tensor as stored."""
        return _over_blocks(cls, blocks, in_features)

    def dequantize(self) -> Tensor:
        if self.blocks is not None:
            return kernels.unpack_q8_0(self.blocks)
        return self.weight.float() * self.scales.float()[:, None]

    def rows(self, idx: Tensor) -> Tensor:
        if self.blocks is not None:
            return kernels.unpack_q8_0(self.blocks, idx)
        return self.weight[idx].float() * self.scales[idx].float()[..., None]

    def forward(self, x: Tensor) -> Tensor:
        return _biased(self, self._matmul(x))

    def _matmul(self, x: Tensor) -> Tensor:
        if self.blocks is not None:
            fused = getattr(self, "fused", None)
            if fused is not None and not torch.compiler.is_compiling() and not _wants_grad(x):
                return fused(x)[..., self.fused_span]
            return frozen_block_linear(x, self.blocks, 8, self.tier)
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
    """Asymmetric 4-bit weights in groups along the input dim: Q4_1 blocks (w = d * q + m) for our
    CPU kernel with groups of 32, else w = (q - 8) * scale + zero for PyTorch's packed kernels."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        g = self.group_size = int4_group_size(linear.in_features, group_size)
        self.register_buffer("blocks", None)
        _keep_bias(self, linear)
        self.tier = None  # the kernel tier the blocks run on (fixed when built)
        if g == kernels.QK and _kernel_ok(linear):
            self.register_buffer("blocks", kernels.pack_q4_1(linear.weight))
            self.tier = kernels.tier()
            return
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

    @classmethod
    def from_blocks(cls, blocks: Tensor, in_features: int) -> Int4Linear:
        """A layer over packed Q4_1 rows (`kernels` row format), e.g. a GGUF tensor as stored."""
        layer = _over_blocks(cls, blocks, in_features)
        layer.group_size = kernels.QK
        return layer

    def dequantize(self) -> Tensor:
        if self.blocks is not None:
            return kernels.unpack_q4_1(self.blocks)
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [out, groups, 2]
        o, i, g = self.out_features, self.in_features, self.group_size
        q = self._q.float().reshape(o, i // g, g)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(o, i)

    def rows(self, idx: Tensor) -> Tensor:
        if self.blocks is not None:
            return kernels.unpack_q4_1(self.blocks, idx)
        g = self.group_size
        sz = self.scales_and_zeros.float().transpose(0, 1)[idx]  # [..., groups, 2]
        q = self._q[idx].float().unflatten(-1, (-1, g))
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        return _biased(self, self._matmul(x))

    def _matmul(self, x: Tensor) -> Tensor:
        if self.blocks is not None:
            fused = getattr(self, "fused", None)
            if fused is not None and not torch.compiler.is_compiling() and not _wants_grad(x):
                return fused(x)[..., self.fused_span]
            return frozen_block_linear(x, self.blocks, 4, self.tier)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class BlockEmbedding(nn.Module):
    """An embedding table kept in blocks as a GGUF file stores it (`kind` as in `block_linear`):
    the looked-up rows are dequantized to float32, never the whole table. A tied output head
    shares `blocks`."""

    def __init__(self, blocks: Tensor, kind: int, dim: int):
        super().__init__()
        self.kind, self.embedding_dim = kind, dim
        self.num_embeddings = blocks.shape[0]
        self.register_buffer("blocks", blocks)

    def forward(self, tokens: Tensor) -> Tensor:
        return gathered_rows(self.blocks, tokens, self.kind, self.embedding_dim)


class GGUFLinear(nn.Module):
    """y = x @ W.T with W in a GGUF type's own blocks (F16, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K:
    `kernels.GGML_KINDS`), as the file stores them: integer-dot kernels (F16: float) for decode,
    float32 GEMMs over dequantized tiles for prompts (`block_linear`)."""

    def __init__(self, blocks: Tensor, kind: int, in_features: int):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, blocks.shape[0], kind
        self.register_buffer("blocks", blocks)
        _keep_bias(self, None)
        self.tier = kernels.tier()

    def dequantize(self) -> Tensor:
        return dequantize_blocks(self.blocks, self.kind, self.in_features, self.tier)

    def rows(self, idx: Tensor) -> Tensor:
        return gathered_rows(self.blocks, idx, self.kind, self.in_features, self.tier)

    def forward(self, x: Tensor) -> Tensor:
        return _biased(self, frozen_block_linear(x, self.blocks, self.kind, self.tier))


class RefinedHead(nn.Module):
    """The output head: logits from the quantized kernel (bf16 precision, ~3 significant digits),
    then the `k` largest recomputed in float32 from the dequantized rows, so near-ties among the
    likely tokens (which decide greedy and top-k/top-p sampling) are resolved exactly. Our block
    kernels (int16 activations) are already within ~1e-5 of float32: their logits pass through."""

    def __init__(self, inner: BF16Linear | Int8Linear | Int4Linear, k: int = 32):
        super().__init__()
        self.inner, self.k = inner, k
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x).float()
        top = y.topk(min(self.k, y.shape[-1]), dim=-1).indices
        blocks = getattr(self.inner, "blocks", None)
        if blocks is not None:
            bits = 4 if isinstance(self.inner, Int4Linear) else 8
            exact = kernels.rows_dot(x, blocks, top, bits, self.inner.tier)
        else:
            exact = torch.einsum("...i,...ki->...k", x.float(), self.inner.rows(top))
        return y.scatter(-1, top, exact).to(x.dtype)


def _adjacent(members: list[Int4Linear] | list[Int8Linear]) -> Tensor | None:
    """The members' blocks as one tensor when they already are consecutive rows of one (as the
    loader packs q/k/v and gate/up), else None."""
    first = members[0].blocks
    base, at = first.untyped_storage().data_ptr(), first.data_ptr()
    for m in members:
        b = m.blocks
        if (b.untyped_storage().data_ptr() != base or b.data_ptr() != at or
                not b.is_contiguous() or b.shape[1] != first.shape[1]):
            return None
        at += b.numel()
    rows = sum(m.blocks.shape[0] for m in members)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


class FusedRows:
    """Several kernel-backed linears that read the same input (q/k/v, gate/up) as one matmul: their
    packed rows are views into one tensor; the first member called on an input computes every
    member's output in one kernel call, the others slice that result (matched by the input
    tensor's identity, so a different input is always recomputed). Under torch.compile each
    member runs its own rows instead (the kernel call is opaque there, the saving is per-op
    Python overhead in eager mode)."""

    def __init__(self, members: list[Int4Linear] | list[Int8Linear]):
        self.bits = 4 if isinstance(members[0], Int4Linear) else 8
        self.tier = members[0].tier
        joined = _adjacent(members)
        self.blocks = torch.cat([m.blocks for m in members]) if joined is None else joined
        start = 0
        for m in members:
            end = start + m.out_features
            m.blocks, m.fused, m.fused_span = self.blocks[start:end], self, slice(start, end)
            start = end
        self._last: tuple[Tensor, Tensor] | None = None  # (input, output), swapped atomically

    def __call__(self, x: Tensor) -> Tensor:
        last = self._last  # one read: safe against another thread replacing it meanwhile
        if last is None or last[0] is not x:
            last = self._last = (x, block_linear(x, self.blocks, self.bits, self.tier))
        return last[1]

    def __deepcopy__(self, memo: dict) -> FusedRows:
        new = copy.copy(self)
        memo[id(self)] = new
        new.blocks = copy.deepcopy(self.blocks, memo)
        new._last = None
        return new


def fuse_projections(model: nn.Module) -> int:
    """Group q/k/v and gate/up projections that read the same input into `FusedRows` where they
    are kernel-backed and of one kind; returns the number of groups."""
    groups = 0
    for mod in list(model.modules()):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            members = [getattr(mod, n, None) for n in names]
            kinds = {type(m) for m in members}
            if len(kinds) == 1 and kinds <= {Int4Linear, Int8Linear} and all(
                    m.blocks is not None and getattr(m, "fused", None) is None for m in members
            ) and len({m.tier for m in members}) == 1:
                FusedRows(members)
                groups += 1
    return groups


def quantize_model(model: nn.Module, mode: str, group_size: int = 32,
                   inplace: bool = False, head_int8: bool = True, fuse: bool = True
                   ) -> nn.Module:
    """Swap every `nn.Linear` for its `mode` counterpart.

    Returns a quantized copy unless `inplace`. Embeddings and norms keep their dtype; a tied
    lm_head gets its own quantized weight (the embedding table stays full precision). With int4,
    `lm_head` is int8 unless `head_int8=False` (as llama.cpp's Q4 files keep the output matrix in
    Q8_0: the logits are the most quantization-sensitive matmul); layers the packed int4 kernel
    cannot take (input size not a multiple of 32, output size not a multiple of 16) get int8.
    With `fuse`, projections that share an input run as one kernel call (`fuse_projections`)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if not inplace:
        model = copy.deepcopy(model)
    make = {"bf16": BF16Linear, "int8": Int8Linear,
            "int4": lambda lin: Int4Linear(lin, group_size)}[mode]
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        # our block kernels take any output size; PyTorch's packed int4 needs multiples of 16
        unpackable = lin.in_features % 32 or lin.out_features % 16 and not _kernel_ok(lin)
        int8_instead = head_int8 and name == "lm_head" or unpackable
        build = Int8Linear if mode == "int4" and int8_instead else make
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = build(lin)
        setattr(parent, child, RefinedHead(new) if name == "lm_head" else new)
    if fuse:
        fuse_projections(model)
    return model


# Bytes per block of 32 of the kernels' packed rows a stored type becomes.
_PACKED_BLOCK_BYTES = {"Q4_1": kernels.Q4_1_BYTES, "Q8_0": kernels.Q8_0_BYTES}


def packed_row_bytes(type_name: str, in_features: int, stored_row_bytes: int) -> int:
    """Bytes per row of what `packed_rows` makes of a stored matrix of `type_name`."""
    if type_name in kernels.GGML_KINDS:
        return stored_row_bytes
    if type_name not in _PACKED_BLOCK_BYTES:
        raise ValueError(f"no block kernel for {type_name}")
    return in_features // kernels.QK * _PACKED_BLOCK_BYTES[type_name]


def packed_rows(gguf_rows: Tensor, type_name: str, order: Tensor | None = None,
                out: Tensor | None = None) -> Tensor:
    """GGUF Q4_1 / Q8_0 block rows uint8 [N, nb * block bytes] (rows `order` of them, if given)
    -> our kernels' packed rows (Q4_1 or Q8_0): the same bytes regrouped, quants first, then the
    fp16 scales (and mins), written into `out` if given. The `kernels.GGML_KINDS` types (Q4_0
    among them) stay as stored. No weight is decoded; the output is the only full-size
    allocation."""
    n = gguf_rows.shape[0]
    if type_name in kernels.GGML_KINDS:  # kept exactly as stored (rows reordered if asked)
        src = gguf_rows if order is None else gguf_rows.index_select(0, order)
        if out is None:
            return src.clone() if order is None else src
        return out.copy_(src)
    if type_name == "Q4_1":  # per block: d, m (fp16), 16 quant bytes
        b = gguf_rows.reshape(n, -1, kernels.Q4_1_BYTES)
        parts = (b[..., 4:], b[..., 0:2], b[..., 2:4])
    elif type_name == "Q8_0":  # per block: d (fp16), 32 int8
        b = gguf_rows.reshape(n, -1, kernels.Q8_0_BYTES)
        parts = (b[..., 2:], b[..., 0:2])
    else:
        raise ValueError(f"no block kernel for {type_name}")
    nb = b.shape[1]
    if out is None:
        out = torch.empty(n, sum(nb * p.shape[-1] for p in parts), dtype=torch.uint8)
    at = 0
    for part in parts:  # each segment of the packed rows: one field of every block
        width = part.shape[-1]
        seg = out[:, at: at + nb * width].view(n, nb, width)
        seg.copy_(part if order is None else part.index_select(0, order))
        at += nb * width
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of linear-layer weights read per decoded token (the bandwidth-bound numerator)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, (BF16Linear, Int8Linear, Int4Linear, GGUFLinear)):  # incl. RefinedHead's
            for name, b in m.named_buffers(recurse=False):
                if name != "_q":
                    total += b.numel() * b.element_size()
    return total

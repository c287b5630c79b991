"""Cross-entropy fused with the output projection, computed in row chunks.

`F.cross_entropy(lm_head(h))` materializes [tokens, vocab] float32 logits, then log-softmax, then
its gradient: three passes over a tensor that is 200 MB for 1024 tokens of a 49k vocabulary, and
a fresh allocation of it each step (page faults on CPU). Here each chunk of rows gets its logits,
its loss and, in the same pass, its gradient (softmax minus one-hot), which goes straight into
the two backward matmuls; only one chunk of logits ever exists. Same FLOPs, same result within
float rounding (tests compare with `F.cross_entropy`). The idea is Liger-Kernel's
FusedLinearCrossEntropy; the chunk buffer is reused across chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for a linear layer here."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, ignore_index: int,
                chunk: int, dtype: torch.dtype) -> Tensor:
        n = h.shape[0]
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        count = valid.sum().clamp(min=1)  # the mean's divisor; 1 keeps "no target" at 0
        scale = (valid.to(torch.float32) / count)[:, None]
        hc, wc = h.to(dtype), weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.empty_like(weight, dtype=torch.float32) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=dtype, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = torch.mm(hc[s:e], wc.t(), out=buf[: e - s])
            z = logits if dtype == torch.float32 else logits.float()
            picked = z.gather(1, safe[s:e, None])
            m = z.amax(dim=1, keepdim=True)
            z.sub_(m).exp_()  # z is now exp(logit - max); the logits are gone
            sum_exp = z.sum(dim=1, keepdim=True)
            nll = sum_exp.log() + m - picked  # logsumexp - target logit
            total += (nll * valid[s:e, None]).sum()
            if not (want_h or want_w):
                continue
            z.div_(sum_exp)  # softmax
            z.scatter_add_(1, safe[s:e, None], torch.full_like(picked, -1.0))
            z.mul_(scale[s:e])
            g = z if dtype == torch.float32 else z.to(dtype)
            if want_h and grad_h.dtype == dtype:
                torch.mm(g, wc, out=grad_h[s:e])
            elif want_h:
                grad_h[s:e].copy_(g @ wc)
            if want_w:
                if dtype == torch.float32 and s == 0:
                    torch.mm(g.t(), hc[s:e], out=grad_w)
                elif dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc[s:e])
                elif s == 0:
                    grad_w.copy_(g.t() @ hc[s:e])
                else:
                    grad_w += (g.t() @ hc[s:e]).float()
        if n == 0 and grad_w is not None:
            grad_w.zero_()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # d(loss) is usually exactly 1; skip a pass over the [vocab, dim] gradient then (checked
        # on CPU only: on CUDA reading the value would synchronize)
        if not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
            grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_out if grad_w is not None else None
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


CHUNK_BYTES = 256 << 20  # float32 logits per chunk: 1365 rows of a 49k vocab, 523 of Llama 3's


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                         chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `target` over targets != ignore_index.

    h: [..., dim] hidden states (the model's output with `hidden_only=True`); weight: [vocab,
    dim]; target: [...]. Gradients for h and weight are computed in the forward pass, `chunk`
    rows at a time (default: as many as fit CHUNK_BYTES of float32 logits; smaller chunks made
    the CPU matmuls slower, bf16 ones especially); under autocast the matmuls run in the autocast
    dtype and the softmax in float32. With every target ignored (or none) the loss is 0 with
    zero gradients, where `F.cross_entropy` gives nan.
    """
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    if h.shape[:-1] != target.shape:
        raise ValueError(f"hidden states {tuple(h.shape)} do not match targets "
                         f"{tuple(target.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, target.flatten(),
                                         ignore_index, chunk, dtype)

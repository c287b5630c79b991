"""How a MoE layer's experts should run on this machine: our loop of one GEMM per chosen expert
(`model.Experts.forward`: token copies sorted by expert) vs `torch._grouped_mm` on the same
sorted tokens (one call over all experts, offsets per expert), forward alone and forward +
backward, float32, same routing. Medians over `--steps` alternating runs; prints the ratio.

    .venv/bin/python bench/moe_grouped.py [--tokens 512] [--experts 8] [--top 2] [--dim 512]
        [--hidden 1408] [--steps 10]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaworks.model import Experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_times, parse, parser  # noqa: E402


def grouped(ex: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor
            ) -> torch.Tensor:
    """The same sum as `Experts.forward`, each projection one `torch._grouped_mm` call."""
    k = idx.shape[-1]
    order = idx.reshape(-1).argsort(stable=True)
    offs = torch.bincount(idx.reshape(-1), minlength=ex.n_experts).cumsum(0).to(torch.int32)
    xs = x[order // k]
    g = torch._grouped_mm(xs, ex.gate_proj.transpose(1, 2), offs=offs)
    u = torch._grouped_mm(xs, ex.up_proj.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(F.silu(g) * u, ex.down_proj.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, order // k, y)


def main() -> None:
    ap = parser(__doc__.split("\n\n")[0], steps=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1408)
    args = parse(ap)
    torch.manual_seed(0)
    ex = Experts(args.experts, args.dim, args.hidden, "silu")
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    logits = torch.randn(args.tokens, args.experts)
    w, idx = logits.softmax(-1).topk(args.top, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    with torch.no_grad():
        diff = (grouped(ex, x, w, idx) - ex(x, w, idx)).abs().max().item()

    def fwd(f: Callable) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                f(ex, x, w, idx)
        return step

    def fwd_bwd(f: Callable) -> Callable[[], None]:
        def step() -> None:
            f(ex, x, w, idx).sum().backward()
        return step

    loop = Experts.forward
    dev = torch.device("cpu")
    print(f"{args.experts} experts, top-{args.top}, {args.tokens} tokens, {args.dim} -> "
          f"{args.hidden}, float32, {torch.get_num_threads()} threads; outputs differ by "
          f"{diff:.1e}")
    for label, wrap in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t = median_times({"loop": wrap(loop), "grouped_mm": wrap(grouped)}, args.steps,
                         args.warmup, dev)
        print(f"{label:17s} loop {t['loop'] * 1e3:7.1f} ms   grouped_mm "
              f"{t['grouped_mm'] * 1e3:7.1f} ms   grouped_mm / loop time "
              f"{t['grouped_mm'] / t['loop']:.2f}")

if __name__ == "__main__":
    main()

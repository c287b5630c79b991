"""Mixture-of-experts training speed, side by side: llamaworks (our model + the trainer's step:
fused AdamW, chunked linear + cross-entropy, router aux loss through `train.moe.RouterBalance`,
glibc kept from unmapping freed memory on CPU) vs HF transformers' `MixtralForCausalLM` +
`torch.optim.AdamW` with its own load-balancing loss (`load_balancing_loss_func`, the same
coefficient), same Mixtral shape, float32, same batch, one run.

A step = forward, cross-entropy + 0.01 x aux loss, backward, clip, optimizer step. Tok/s = B*T /
median step time over `--steps` steps after `--warmup`; the engines' steps alternate (machine
drift hits both alike), and HF also runs under our malloc setting ("HF, same malloc"). Each HF
experts implementation in `--hf-experts` (transformers' eager loop is its default; grouped_mm
/ batched_mm where this torch has them) gets its own row.

    .venv/bin/python bench/moe_train.py [--batch 4] [--seq 256] [--steps 5]
        [--hf-experts eager,batched_mm]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaworks.config import ModelConfig
from llamaworks.model import Llama
from llamaworks.train.allocator import reuse_freed_memory
from llamaworks.train.config import TrainConfig
from llamaworks.train.distributed import DistInfo
from llamaworks.train.loss import linear_cross_entropy
from llamaworks.train.moe import RouterBalance
from llamaworks.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_trainee, median_times, optimizer_step, parse, parser  # noqa: E402

AUX = 0.01
CPU = torch.device("cpu")
# A Mixtral-layout shape that fits a small CPU: 8 experts, top-2, 32k vocabulary (112M total,
# 56M active parameters per token).
SHAPE = dict(model_type="mixtral", vocab_size=32000, hidden_size=512, intermediate_size=1024,
             num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
             num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
             tie_word_embeddings=False, _name_or_path="bench-mixtral")


def ours_step(cfg: ModelConfig, x: torch.Tensor) -> Callable[[], None]:
    """The trainer's step on our model (float32)."""
    model = Llama(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.train()
    tc = TrainConfig(router_aux_loss_coef=AUX)
    opt = build_optimizer(model, tc)
    balance = RouterBalance.of(model, tc, DistInfo())
    assert balance is not None

    def step() -> None:
        h = model(x[:, :-1], hidden_only=True)
        balance.loss(linear_cross_entropy(h, model.lm_head.weight, x[:, 1:])).backward()
        optimizer_step(model, opt)
        balance.end_step()

    return step


def hf_step(cfg: ModelConfig, x: torch.Tensor, experts: str) -> Callable[[], None]:
    """transformers' Mixtral, its router logits through its own load-balancing loss."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model, opt = hf_trainee(MixtralConfig, MixtralForCausalLM, cfg,
                            _experts_implementation=experts)

    def step() -> None:
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        aux = load_balancing_loss_func(out.router_logits, cfg.n_experts, cfg.n_active_experts)
        (loss + AUX * aux).backward()
        optimizer_step(model, opt)

    return step


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hf-experts", default="eager", help="comma list: eager, grouped_mm, "
                    "batched_mm (transformers' experts implementations)")
    args = parse(ap)
    import transformers

    cfg = ModelConfig.from_hf_dict(dict(SHAPE))
    b, t = args.batch, args.seq
    x = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(0))
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; Mixtral shape {cfg.num_params() / 1e6:.0f}M total, "
          f"{cfg.num_params(active=True) / 1e6:.0f}M active, float32, B x T = {b} x {t}")
    print("| HF experts | ours tok/s | HF tok/s | ours / HF | HF, same malloc | ours / that |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl in args.hf_experts.split(","):
        hf = median_times({"hf": hf_step(cfg, x, impl)}, args.steps, args.warmup, CPU)["hf"]
        with reuse_freed_memory(True):
            med = median_times({"ours": ours_step(cfg, x), "hf2": hf_step(cfg, x, impl)},
                               args.steps, args.warmup, CPU)
        ours, hf2 = med["ours"], med["hf2"]
        print(f"| {impl} | {b * t / ours:,.0f} | {b * t / hf:,.0f} | {hf / ours:.2f}x | "
              f"{b * t / hf2:,.0f} | {hf2 / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

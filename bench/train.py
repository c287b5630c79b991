"""Training speed, side by side: llamaworks (our model + what `llamaworks pretrain` runs around
it) vs HF transformers' `LlamaForCausalLM` + `torch.optim.AdamW`, same shapes, same numerics, one
run each.

A step = forward, cross-entropy, backward, optimizer step. Tok/s = B*T / median step time over
`--steps` steps after `--warmup`. Ours is the trainer's step: fused AdamW, the chunked
linear + cross-entropy loss (train/loss.py) and, on CPU, glibc kept from unmapping freed memory
(train/allocator.py). HF runs as shipped, then once more with that same allocator setting
("HF, same malloc"; its steps alternate with ours, so drift of the machine hits both alike):
the table shows what comes from the engine and what from malloc.
Each precision in `--precisions` runs all of them: fp32, or bf16 autocast (what
`llamaworks pretrain --precision bf16` does; `auto` = bf16 on CUDA, fp32 on CPU). Also printed:
ours in bf16 over HF in fp32 (what switching precision buys on this machine), MFU.

    .venv/bin/python bench/train.py [--shapes smollm2-135m,tiny] [--precisions fp32,bf16]
        [--steps 5] [--compile]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaworks.config import get_preset
from llamaworks.model import Llama
from llamaworks.train.allocator import reuse_freed_memory
from llamaworks.train.config import TrainConfig
from llamaworks.train.loss import linear_cross_entropy
from llamaworks.train.metrics import flops_per_token, peak_flops
from llamaworks.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_trainee, median_times, optimizer_step, parse, parser  # noqa: E402

SHAPES = {"smollm2-135m": (4, 256), "tiny": (16, 128), "llama3.2-1b": (4, 2048)}


def ours_step(name: str, b: int, t: int, args, dev: torch.device,
              bf16: bool) -> Callable[[], None]:
    cfg = get_preset(name)
    model = Llama(cfg, device="meta")
    model.to_empty(device=dev)
    model.init_weights(generator=torch.Generator(dev).manual_seed(0))
    opt = build_optimizer(model, TrainConfig())
    fwd = torch.compile(model) if args.compile else model
    x = torch.randint(0, cfg.vocab_size, (b, t + 1), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            h = fwd(x[:, :-1], hidden_only=True)
            loss = linear_cross_entropy(h, model.lm_head.weight, x[:, 1:])
        loss.backward()
        optimizer_step(model, opt)

    return step


def hf_step(name: str, b: int, t: int, dev: torch.device, bf16: bool) -> Callable[[], None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = get_preset(name)
    model, opt = hf_trainee(LlamaConfig, LlamaForCausalLM, cfg, dev)
    x = torch.randint(0, cfg.vocab_size, (b, t + 1), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer_step(model, opt)

    return step


def main() -> None:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,tiny")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parse(ap)
    dev = torch.device(args.device)
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    cpu = dev.type == "cpu"
    print("| shape | B x T | precision | ours tok/s | HF tok/s | ours / HF | "
          + ("HF, same malloc | ours / that | " if cpu else "") + "ours MFU |")
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if cpu else "") + "---:|")
    for name in args.shapes.split(","):
        b, t = SHAPES.get(name, (4, 256))
        rates: dict[tuple[str, str], float] = {}
        for prec in args.precisions.split(","):
            bf16 = prec == "bf16"
            # HF as shipped (glibc's default malloc) on its own, then ours (the trainer's
            # setup, malloc included) alternating with HF under that same malloc setting
            hf = median_times({"hf": hf_step(name, b, t, dev, bf16)}, args.steps, args.warmup,
                              dev)["hf"]
            with reuse_freed_memory(cpu):
                steps = {"ours": ours_step(name, b, t, args, dev, bf16)}
                if cpu:
                    steps["hf2"] = hf_step(name, b, t, dev, bf16)
                med = median_times(steps, args.steps, args.warmup, dev)
                del steps
            ours = med["ours"]
            same = f"{b * t / med['hf2']:,.0f} | {med['hf2'] / ours:.2f}x | " if cpu else ""
            rates["ours", prec], rates["hf", prec] = b * t / ours, b * t / hf
            mfu = flops_per_token(get_preset(name), t) * b * t / ours / peak_flops(dev)
            print(f"| {name} | {b} x {t} | {prec} | {b * t / ours:,.0f} | {b * t / hf:,.0f} | "
                  f"{hf / ours:.2f}x | {same}{mfu:.1%} |", flush=True)
        if ("ours", "bf16") in rates and ("hf", "fp32") in rates:
            print(f"| {name} | {b} x {t} | ours bf16 / HF fp32 | | | "
                  f"{rates['ours', 'bf16'] / rates['hf', 'fp32']:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()

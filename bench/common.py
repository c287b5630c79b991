"""What the training-speed benchmarks (bench/train.py, bench/moe_train.py, bench/moe_grouped.py)
share: the command line's `--steps`/`--warmup`/`--threads`, the alternating median timer, the
optimizer step both engines take, and transformers' model + AdamW set up as they race it."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def parser(description: str, steps: int = 5, warmup: int = 2) -> argparse.ArgumentParser:
    """An argument parser with the timer's `--steps`, `--warmup` and `--threads`; the script adds
    its own options and reads them with `parse`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per engine")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line, `--threads` applied."""
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def median_times(steps: dict[str, Callable[[], None]], n: int, warmup: int,
                 dev: torch.device) -> dict[str, float]:
    """Median seconds per step of each engine, their steps alternating (machine drift hits all
    of them alike)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    ts: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """After backward: clip the gradients' norm to 1, step, drop the gradients."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_trainee(config_cls: type, model_cls: type, cfg: Any, dev: torch.device | str = "cpu",
               **settings: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """transformers' model of our `cfg` (`config_cls`/`model_cls`, e.g. LlamaConfig and
    LlamaForCausalLM; `settings` set on its config), seeded, in train mode on `dev`, with
    `torch.optim.AdamW` at the trainer's lr, betas and weight decay (on every parameter)."""
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_dict().items()
                           if k not in ("architectures", "model_type")})
    hf_cfg.use_cache = False
    for k, v in settings.items():
        setattr(hf_cfg, k, v)
    torch.manual_seed(0)
    model = model_cls(hf_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt

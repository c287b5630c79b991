"""Per-matvec microbenchmark of our block kernels: one weight matrix of each type times one input
row (decode), one thread, every tier this CPU runs; microseconds per call (median of --repeat
timed calls after warm-up: this thread's CPU time, so a machine shared with other jobs slows the
numbers less than wall time would; --wall for wall time) and the weight bytes streamed per
second.

    .venv/bin/python bench/kernels.py --shapes 2048x2048,4096x14336 --repeat 50

Weights are random valid blocks (random quant bits, sane fp16 scales), as the kernel tests make.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np
import torch

from llamaworks.infer import kernels

# GGUF types kept in their blocks: (weights per block, bytes per block, offsets of fp16 fields)
GGML = {"Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208]),
        "Q4_0": (32, 18, [0]), "Q5_0": (32, 22, [0]), "Q5_1": (32, 24, [0, 2])}


def blocks(type_name: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(weight rows, kind) of a random n x k matrix of `type_name`."""
    if type_name in ("Q4_1", "Q8_0"):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
        if type_name == "Q4_1":
            return kernels.pack_q4_1(w), 4
        return kernels.pack_q8_0(w), 8
    rng = np.random.default_rng(seed)
    block, size, fp16 = GGML[type_name]
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in fp16:
        d = (rng.random((n, k // block)) * 0.01 + 1e-3).astype(np.float16)
        b[..., off:off + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return torch.from_numpy(b.reshape(n, -1)), kernels.GGML_KINDS[type_name]


def matvec(x: torch.Tensor, w: torch.Tensor, kind: int, tier: str) -> torch.Tensor:
    if kind == 4:
        return kernels.q4_1_linear(x, w, tier)
    if kind == 8:
        return kernels.q8_0_linear(x, w, tier)
    return kernels.gguf_linear(x, w, kind, tier)


def time_call(fn, repeat: int, clock=time.thread_time) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2048x2048,4096x14336", help="NxK (rows x inputs), ...")
    p.add_argument("--types", default="Q4_1,Q8_0,Q4_K,Q6_K,Q5_K,Q5_0")
    p.add_argument("--tiers", default="all")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    a = p.parse_args()
    torch.set_num_threads(1)
    kernels.load()
    tiers = kernels.host_tiers() if a.tiers == "all" else a.tiers.split(",")
    clock = time.perf_counter if a.wall else time.thread_time
    print(f"load average {os.getloadavg()[0]:.2f}; one thread; us per matvec "
          f"({'wall' if a.wall else 'CPU'} time; GB/s of weights)")
    print("| matrix | type | " + " | ".join(kernels.isa(t) for t in tiers) + " |")
    print("|---|---|" + "---:|" * len(tiers))
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k)
        for t in a.types.split(","):
            w, kind = blocks(t, n, k)
            cells = []
            for tier in tiers:
                fn = functools.partial(matvec, x, w, kind, tier)
                us = time_call(fn, a.repeat, clock)
                cells.append(f"{us:.0f} ({w.numel() / us / 1e3:.1f})")
            print(f"| {n} x {k} | {t} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

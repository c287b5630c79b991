"""CPU scaling of `llamaworks pretrain` under torchrun (gloo): 1 rank vs FSDP2 and tensor
parallelism on 2 and 4 ranks, one global batch for all (strong scaling), one thread per rank.

Each layout trains `--steps` steps of the preset on the same prepared data (a slice of the
bundled corpus, prepared once into `--work`); a step's time is tokens per step / the tok_per_s
`metrics.jsonl` logs (forward, backward, clipping, the optimizer step: the collectives included,
the data load too), the median over the steps after the first two. Scaling efficiency =
t(1 rank, 1 thread) / (threads in all x t(layout)): 100% is a perfect N-fold speedup; one rank
with 2 threads is the same cores' other use. Also printed: the 1-minute load average before each
layout (the machine may be shared).

    .venv/bin/python bench/train_scaling.py [--preset tiny] [--set KEY=VALUE ...] [--rows 8]
        [--seq-len 128] [--steps 12] [--work /tmp/llamaworks-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# (name, ranks, tensor-parallel, threads per rank); the data-parallel groups split the batch
LAYOUTS = [("1 rank", 1, 1, 1), ("1 rank, 2 threads", 1, 1, 2), ("FSDP2 x2", 2, 1, 1),
           ("TP 2", 2, 2, 1), ("FSDP2 x4", 4, 1, 1), ("FSDP2 2 x TP 2", 4, 2, 1)]


def _prepare(work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from train_fixtures import prepare_small

    data = work / "data"
    if not (data / "manifest.json").exists():
        prepare_small(work)
    return data


def _run(data: Path, out: Path, preset: str, sets: list[str], ranks: int, tp: int,
         threads: int, rows: int, seq: int, steps: int) -> float:
    """Median step seconds of one layout."""
    shutil.rmtree(out, ignore_errors=True)
    dp = ranks // tp
    if rows % dp:
        raise SystemExit(f"--rows {rows} does not split over {dp} data-parallel groups")
    args = ["-m", "llamaworks.cli", "pretrain", "--preset", preset, "--data", str(data),
            "--out", str(out), "--micro-batch", str(rows // dp), "--seq-len", str(seq),
            "--max-steps", str(steps), "--eval-every", str(10 * steps), "--eval-rows", "8",
            "--save-every", str(10 * steps), "--log-every", "1", "--no-progress",
            "--device", "cpu", "--tensor-parallel", str(tp)]
    for kv in sets:
        args += ["--set", kv]
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(launch + args, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
    rows_ = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [rows * seq / r["tok_per_s"] for r in rows_ if r["step"] > 2]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, default=8, help="global batch rows per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model override passed to pretrain, e.g. --set dim=512")
    ap.add_argument("--work", default="/tmp/llamaworks-scaling")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = _prepare(work)
    print(f"{' '.join([a.preset, *a.set])}, {a.rows} x {a.seq_len} tokens per step, "
          f"{a.steps} steps, {os.cpu_count()} CPUs")
    print("| layout | ranks x threads | load avg | step (ms) | tok/s | speedup | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, ranks, tp, threads in LAYOUTS:
        load = os.getloadavg()[0]
        t = _run(data, work / "out", a.preset, a.set, ranks, tp, threads, a.rows, a.seq_len,
                 a.steps)
        base = base or t
        cores = ranks * threads
        print(f"| {name} | {ranks} x {threads} | {load:.1f} | {t * 1e3:.0f} | "
              f"{a.rows * a.seq_len / t:,.0f} | {base / t:.2f}x | {base / t / cores:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()

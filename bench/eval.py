"""Multiple-choice evaluation throughput: `llamaworks eval` vs lm-eval's `hf` backend.

Both score the same task file (tests/data/eval/mc_small.jsonl by default: 48 items, 4 choices)
on the SmolLM2 GGUF with `--threads` CPU threads: ours through `eval.mc.evaluate_mc` (prefix
sharing + scoring only the continuation positions), lm-eval through `simple_evaluate(model="hf",
...)` on transformers' GGUF loader. Model loading is excluded from both timings; the two runs
alternate for `--rounds` rounds and the median of the per-round ratios is reported (on a shared
machine that skews least). acc/acc_norm of both are printed too: they must be equal.

    .venv/bin/python bench/eval.py [--task-file F.jsonl] [--threads 1] [--batch-size 16]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task-file", default=str(ROOT / "tests/data/eval/mc_small.jsonl"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamaworks.checkpoint.discovery import default_model_path
    from llamaworks.eval.harness import task_yaml
    from llamaworks.eval.mc import evaluate_mc
    from llamaworks.eval.runner import load_for_eval
    from llamaworks.eval.tasks import load_task_file

    torch.set_num_threads(args.threads)
    path = default_model_path()
    items = load_task_file(args.task_file).items
    model, tok = load_for_eval(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hflm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=args.batch_size)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "bench_mc.yaml").write_text(task_yaml("bench_mc", args.task_file, "mc"))
    tasks = TaskManager(include_path=str(tmp), include_defaults=False)

    ours_t, hf_t, ratios = [], [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        res = evaluate_mc(model, tok, items, batch_size=args.batch_size)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = lm_eval.simple_evaluate(model=hflm, tasks=["bench_mc"], task_manager=tasks)
        hf_t.append(time.perf_counter() - t)
        ratios.append(hf_t[-1] / ours_t[-1])
        print(f"round {r + 1}: ours {ours_t[-1]:.2f} s, lm-eval hf {hf_t[-1]:.2f} s, "
              f"ratio {ratios[-1]:.2f}x", flush=True)
    n = len(items)
    ref_m = ref["results"]["bench_mc"]
    print(f"\n{n} items ({sum(len(i.choices) for i in items)} choices), batch size "
          f"{args.batch_size}, {args.threads} thread(s), {args.rounds} rounds (best time)\n")
    print("| engine | items/s | acc | acc_norm |\n|---|---|---|---|")
    print(f"| llamaworks eval | {n / min(ours_t):.2f} | {res.metrics['acc']:.4f} | "
          f"{res.metrics['acc_norm']:.4f} |")
    print(f"| lm-eval hf (transformers {transformers.__version__}) | {n / min(hf_t):.2f} | "
          f"{ref_m['acc,none']:.4f} | {ref_m['acc_norm,none']:.4f} |")
    print(f"\nspeed-up (median of per-round ratios): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()

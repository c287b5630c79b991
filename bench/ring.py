"""Sliding layers' KV ring vs caching every position: KV memory and decode speed at a long
context, on the real Gemma-3-270M (15 of 18 layers slide over 512 positions).

Runs one process per mode (the ring is chosen when the pool is built), interleaved `--rounds`
times: a `--prompt`-token prompt through the engine, then 64 greedy tokens decoded after it.
Usage: python bench/ring.py [--model gemma3-270m] [--prompt 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(model: str, n_prompt: int, full: bool) -> dict:
    import llamaworks.infer.kv as kv

    if full:
        kv.RING_SLACK = 10**9  # a ring no shorter than the context: none
    from llamaworks import LLM, SamplingParams
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import model_path

    path = model_path(model)
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(2000))
    ids = load_tokenizer(path).encode(text, bos=None)[:n_prompt]
    eng = LLM(path).engine
    t0 = time.perf_counter()
    (seq,) = group = eng.sequences(ids, SamplingParams(max_tokens=65, ignore_eos=True))
    eng.add(group)
    while not seq.ids:
        eng.step()
    t1 = time.perf_counter()
    while not seq.finish:
        eng.step()
    t2 = time.perf_counter()
    ctx = eng.pool.context
    return {"ring": eng.pool.ring, "kv_mb_now": eng.pool.nbytes / 2**20,
            "kv_mb_at_context": eng.pool.bytes_at(1, ctx) / 2**20, "context": ctx,
            "prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": 64 / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompt", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=["ring", "full"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.prompt, a.one == "full")))
        return
    runs: dict[str, list[dict]] = {"ring": [], "full": []}
    for r in range(a.rounds):
        for mode in (("ring", "full") if r % 2 == 0 else ("full", "ring")):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--model", a.model,
                                  "--prompt", str(a.prompt)], capture_output=True, text=True,
                                 check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{a.model}, prompt {a.prompt} tokens, then 64 decoded; {a.rounds} interleaved rounds")
    print("| sliding layers | ring slots | KV MB now | KV MB at full context | decode tok/s "
          "(median, range) | prefill tok/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, rs in runs.items():
        dec = [x["decode_tok_s"] for x in rs]
        print(f"| {mode} | {rs[0]['ring'] or '-'} | {rs[0]['kv_mb_now']:.0f} | "
              f"{rs[0]['kv_mb_at_context']:.0f} ({rs[0]['context']}) | "
              f"{statistics.median(dec):.1f} ({min(dec):.1f}-{max(dec):.1f}) | "
              f"{statistics.median(x['prefill_tok_s'] for x in rs):.0f} |")


if __name__ == "__main__":
    main()

"""Serving throughput: the same requests from 1 client (one at a time) vs C concurrent clients.

Starts `llamaworks serve`'s app in-process on a free port (or uses `--url`), sends `--requests`
greedy /v1/completions requests of `--max-tokens` tokens through the official `openai` client,
first sequentially, then from `--concurrency` threads at once, and prints generated tokens/s for
both and their ratio (continuous batching should give >= 2x at 8 clients).

    .venv/bin/python bench/serve.py [--model PATH] [--requests 16] [--concurrency 8]
        [--max-tokens 64] [--max-batch 8] [--threads 2] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The history of the printing press begins", "Once upon a time in a small village",
           "The three laws of thermodynamics are", "A recipe for bread starts with",
           "The largest planets in the solar system", "In the year 1900, the city of London",
           "The main ideas of the theory of evolution", "To build a wooden boat, you first"]


def _run(client, model: str, n: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) for n requests from `concurrency` clients."""
    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--url", default=None, help="benchmark a running server instead")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import openai

    server = engine = None
    if args.url:
        url = args.url
        model = openai.OpenAI(base_url=url + "/v1", api_key="x").models.list().data[0].id
    else:
        import torch

        from llamaworks.serve.app import create_app
        from llamaworks.serve.background import BackgroundServer
        from llamaworks.serve.cli import build_engine

        if args.threads:
            torch.set_num_threads(args.threads)
        ns = argparse.Namespace(model=args.model, threads=args.threads, adapter=None, quant=None,
                                group_size=32, max_batch=args.max_batch, max_queue=256,
                                context=2048, model_name=None)
        engine, model = build_engine(ns)
        server = BackgroundServer(create_app(engine, model))
        url = server.start()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    try:
        _run(client, model, 2, 2, 4)  # warm-up
        seq_tokens, seq_s = _run(client, model, args.requests, 1, args.max_tokens)
        con_tokens, con_s = _run(client, model, args.requests, args.concurrency, args.max_tokens)
    finally:
        if server is not None:
            server.stop()
            engine.shutdown()
    seq, con = seq_tokens / seq_s, con_tokens / con_s
    print(f"model {model}, {args.requests} requests x {args.max_tokens} tokens (greedy), "
          f"max batch {args.max_batch}")
    print("| clients | requests | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| 1 (sequential) | {args.requests} | {seq_tokens} | {seq_s:.1f} | {seq:.1f} |")
    print(f"| {args.concurrency} (concurrent) | {args.requests} | {con_tokens} | {con_s:.1f} | "
          f"{con:.1f} |")
    print(f"throughput ratio {args.concurrency} clients / 1 client: {con / seq:.2f}x")


if __name__ == "__main__":
    main()

"""Decode speed, side by side: llamaworks vs HF transformers vs llama.cpp, in one run.

Greedy decoding of `--new-tokens` tokens (EOS ignored) after the same prompt, `--threads` CPU
threads each. Decode tok/s counts tokens after the first (prefill excluded); the first token's
latency is reported separately. Prints a markdown table with ratios for BENCHMARKS.md.

    .venv/bin/python bench/decode.py [--model PATH.gguf] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from pathlib import Path

PROMPT = "The history of the printing press begins"
FLOOR = 0.0  # set by bench_ours


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def _rates(stamps: list[float], start: float) -> tuple[float, float]:
    """(first-token latency s, decode tok/s over the remaining tokens)."""
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def matvec_floor(model) -> float:
    """tok/s if a decode step cost only its weight matvecs (fp32, run back to back): the
    memory-bandwidth bound this machine puts on any fp32 engine."""
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    with torch.inference_mode():
        for _ in range(3):
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
        t0 = time.perf_counter()
        for _ in range(10):
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
    return 10 / (time.perf_counter() - t0)


def bench_ours(path: Path, prompt_ids: list[int], n: int) -> tuple[float, float]:
    from llamaworks.checkpoint import load_model
    from llamaworks.infer.generate import generate_tokens

    model = load_model(path).model
    global FLOOR
    FLOOR = matvec_floor(model)
    list(generate_tokens(model, prompt_ids, 4))  # warm-up
    stamps: list[float] = []
    t0 = time.perf_counter()
    for _ in generate_tokens(model, prompt_ids, n):  # no stop ids: always n tokens
        stamps.append(time.perf_counter())
    return _rates(stamps, t0)


def bench_hf(path: Path, prompt_ids: list[int], n: int) -> tuple[float, float]:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    x = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        clock = Clock()
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kw)
    return _rates(clock.stamps, t0)


def bench_llama_cpp(path: Path, prompt_ids: list[int], n: int, threads: int
                    ) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run(k: int) -> tuple[list[float], float]:
        llm.reset()
        stamps: list[float] = []
        t0 = time.perf_counter()
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == k:
                break
        return stamps, t0

    run(4)
    stamps, t0 = run(n)
    return _rates(stamps, t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of: hf,llama.cpp")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import default_model_path

    path = a.model or default_model_path()
    prompt_ids = load_tokenizer(path).encode(PROMPT, bos=None)
    rows: list[tuple[str, float, float]] = []
    runners = [("llamaworks fp32", lambda: bench_ours(path, prompt_ids, a.new_tokens))]
    if "hf" not in a.skip:
        runners.append(("HF transformers fp32", lambda: bench_hf(path, prompt_ids, a.new_tokens)))
    if "llama.cpp" not in a.skip:
        runners.append((f"llama.cpp ({path.suffix[1:]} as shipped)",
                        lambda: bench_llama_cpp(path, prompt_ids, a.new_tokens, a.threads)))
    for name, fn in runners:
        first, rate = fn()
        rows.append((name, first, rate))
        print(f"# {name}: {rate:.1f} tok/s decode, first token {first * 1000:.0f} ms", flush=True)
        gc.collect()

    ours = rows[0][2]
    print(f"\n{datetime.date.today()} · {_machine()} · torch {torch.__version__} · "
          f"{a.threads} threads · {path.name} · prompt {len(prompt_ids)} tokens · greedy "
          f"{a.new_tokens} new tokens\n")
    print(f"fp32 matvec floor (bandwidth bound for fp32 weights): {FLOOR:.1f} tok/s; "
          f"llamaworks fp32 reaches {100 * ours / FLOOR:.0f}% of it\n")
    print("| engine | decode tok/s | first token ms | ours / this |")
    print("|---|---:|---:|---:|")
    for name, first, rate in rows:
        print(f"| {name} | {rate:.1f} | {first * 1000:.0f} | {ours / rate:.2f}x |")


if __name__ == "__main__":
    main()

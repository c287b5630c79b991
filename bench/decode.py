"""Decode speed, side by side: llamaworks vs HF transformers vs llama.cpp, in one run.

Greedy decoding of `--new-tokens` tokens (EOS ignored) after the same prompt, `--threads` CPU
threads each. Decode tok/s counts tokens after the first (prefill excluded); the first token's
latency is reported separately. Ours runs in each weight format (fp32, bf16, int8, int4) with
the fused C++ decode step (`infer.fused`, the default); the formats in --eager once more with
the per-op PyTorch forward, those in --compile with the decode step compiled; int8/int4 use our
C++ Q8_0/Q4_1 kernels, and the formats in --torch-kernels run once more on PyTorch's packed
kernels. Then `--rounds` rounds alternate our int4 decode with llama.cpp's, back to back, for a
ratio that load on a shared machine skews least (the median of the per-round ratios). The
bandwidth bound of a row is the machine's weight-reading rate (bytes/s, measured first: the
faster of `amax()` over the fp32 weights and their matvecs run back to back) over that row's weight
bytes per token. Then prefill tok/s for a 512-token prompt and batch 1/4/16 throughput. Prints
markdown tables for BENCHMARKS.md.

Every kernel tier the CPU can run (`--tiers`, default all: avx512, avx2, scalar) gets its own rows
for the formats in --tier-quants. To see what an AVX2-only machine sees on an AVX-512 one, also
hold PyTorch and llama.cpp to AVX2: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
LLAMA_CPP_LIB_PATH=<a llama.cpp built with GGML_NATIVE=OFF GGML_AVX512=OFF>` (`tools/
llama_cpp_wheel.py --avx2-only` builds one); the header says what each engine ran.

    .venv/bin/python bench/decode.py [--model PATH.gguf] [--new-tokens 128] [--threads 2]
        [--quants fp32,bf16,int8,int4] [--eager fp32,int4] [--compile int4]
        [--torch-kernels int4] [--rounds 5] [--batches 1,4,16] [--skip hf,...]
        [--tiers avx512,avx2,scalar] [--tier-quants int8,int4]
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


def _llama_cpp_isa() -> str:
    """The instruction sets the loaded llama.cpp library was built with (its system info)."""
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
    except Exception:  # noqa: BLE001 - a missing llama.cpp is reported, not fatal
        return "not available"
    return " ".join(f.split("=")[0].strip() for f in info.split("|")
                    if f.strip().endswith("= 1") and "AVX" in f)


def _rss() -> float:
    """This process's resident memory, bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rates(stamps: list[float], start: float) -> tuple[float, float]:
    """(first-token latency s, decode tok/s over the remaining tokens)."""
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def read_bandwidth(model) -> float:
    """Bytes/s at which this machine reads the fp32 linear weights: the best of 3 passes of
    `amax()` over each weight (a pure streaming read on all threads) and of their matvecs run back
    to back. Divided by an engine's weight bytes per token, it bounds that engine's decode rate."""
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() * 4 for w in weights)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    best = 0.0
    with torch.inference_mode():
        for op in (lambda w: w.amax(), lambda w: torch.nn.functional.linear(xs[w.shape[1]], w)):
            for w in weights:
                op(w)
            for _ in range(3):
                t0 = time.perf_counter()
                for w in weights:
                    op(w)
                best = max(best, total / (time.perf_counter() - t0))
    return best


def bench_ours(loaded, prompt_ids: list[int], n: int, quant: str | None = None,
               compile: bool = False, our_kernels: bool = True, fused: bool = True,
               tier: str | None = None) -> dict:
    """Decode rate (batch 1), first-token latency, weight bytes, and the LLM for further runs.
    our_kernels=False builds int8/int4 layers on PyTorch's packed kernels instead of ours;
    fused=False decodes with the model's per-op forward instead of the fused C++ step; `tier`
    builds the model on that kernel tier."""
    import contextlib

    from llamaworks import LLM
    from llamaworks.infer import kernels
    from llamaworks.infer.quantize import weight_bytes

    ctx = kernels.disabled() if not our_kernels else kernels.using(tier) if tier \
        else contextlib.nullcontext()
    with ctx:
        llm = LLM(loaded, quant=quant, compile=compile)
    if not fused:
        llm.step.fused = None
    first, rate = decode_rate(llm, prompt_ids, n)
    return {"first": first, "rate": rate, "bytes": weight_bytes(llm.model), "llm": llm}


def decode_rate(llm, prompt_ids: list[int], n: int) -> tuple[float, float]:
    """(first-token latency s, decode tok/s) of one greedy run of `n` tokens, after a warm-up."""
    from llamaworks.infer.generate import generate_tokens

    list(generate_tokens(llm.engine, prompt_ids, 4))  # warm-up (and compile)
    llm.engine.prefix = None  # every run computes its prompt (no cached prefix)
    stamps: list[float] = []
    t0 = time.perf_counter()
    for _ in generate_tokens(llm.engine, prompt_ids, n):  # no stop ids: n tokens
        stamps.append(time.perf_counter())
    return _rates(stamps, t0)


def bench_prefill(llm, length: int = 512) -> float:
    """Prompt tokens per second for one `length`-token prompt (one forward pass)."""
    from llamaworks import SamplingParams

    ids = [(i * 7919) % 1000 + 100 for i in range(length)]
    llm.generate([ids[:16]], SamplingParams(max_tokens=1))
    t0 = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1))
    return length / (time.perf_counter() - t0)


def bench_batch(llm, prompt_ids: list[int], batch: int, n: int) -> float:
    """Generated tokens per second over `batch` rows decoding `n` tokens each (prefill included)."""
    from llamaworks import SamplingParams

    prompts = [prompt_ids[: max(2, len(prompt_ids) - i % 3)] for i in range(batch)]
    p = SamplingParams(max_tokens=n, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    llm.generate(prompts, p)
    return batch * n / (time.perf_counter() - t0)


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


def hf_prefill(path: Path, length: int = 512) -> float:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([[(i * 7919) % 1000 + 100 for i in range(length)]])
    with torch.inference_mode():
        hf(x[:, :16])
        t0 = time.perf_counter()
        hf(x, logits_to_keep=1)
    return length / (time.perf_counter() - t0)


def llama_cpp_prefill(path: Path, threads: int, length: int = 512) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512,
                          n_threads_batch=threads, verbose=False)
    ids = [(i * 7919) % 1000 + 100 for i in range(length)]
    llm.eval(ids[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    return length / (time.perf_counter() - t0)


def bench_llama_cpp(path: Path, prompt_ids: list[int], n: int, threads: int, llm=None
                    ) -> tuple[float, float]:
    import llama_cpp

    if llm is None:
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


def interleaved(ours: dict[str, dict], path: Path, prompt_ids: list[int], n: int, threads: int,
                rounds: int) -> None:
    """Alternate each of `ours` (name -> bench_ours result) with llama.cpp, `rounds` times, and
    print every round's rates and the median ratio per engine."""
    import statistics

    import llama_cpp

    cpp = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ratios: dict[str, list[float]] = {name: [] for name in ours}
    print(f"\n{rounds} interleaved rounds (decode tok/s; each of ours right before llama.cpp):\n")
    print("| round | " + " | ".join(ours) + " | llama.cpp | " +
          " | ".join(f"{k} / llama.cpp" for k in ours) + " |")
    print("|---:|" + "---:|" * (2 * len(ours) + 1))
    for i in range(rounds):
        rates = {name: decode_rate(r["llm"], prompt_ids, n)[1] for name, r in ours.items()}
        ref = bench_llama_cpp(path, prompt_ids, n, threads, cpp)[1]
        for name, rate in rates.items():
            ratios[name].append(rate / ref)
        print(f"| {i + 1} | " + " | ".join(f"{v:.1f}" for v in rates.values()) + f" | {ref:.1f} | "
              + " | ".join(f"{v / ref:.2f}x" for v in rates.values()) + " |", flush=True)
    for name, rs in ratios.items():
        print(f"\nmedian {name} / llama.cpp: {statistics.median(rs):.2f}x", end="")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="GGUF file or an installed model's name (default: SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="fp32,bf16,int8,int4",
                    help="comma list of our weight formats to run")
    ap.add_argument("--eager", default="fp32,int4",
                    help="comma list of our formats also run without the fused decode step")
    ap.add_argument("--compile", default="int4",
                    help="comma list of our formats also run with the decode step compiled "
                    "('' = none; compiling takes minutes on 2 cores)")
    ap.add_argument("--torch-kernels", default="int4",
                    help="comma list of int8/int4 also run on PyTorch's packed kernels")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved int4-vs-llama.cpp rounds (0 = none)")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes for the throughput table")
    ap.add_argument("--skip", default="", help="comma list of: hf,llama.cpp,prefill,batch")
    ap.add_argument("--tiers", default="all",
                    help="comma list of kernel tiers to run ('all': every tier this CPU runs)")
    ap.add_argument("--tier-quants", default="int8,int4",
                    help="formats run once per extra tier (the best tier runs every format)")
    a = ap.parse_args()

    import torch

    from llamaworks.infer import kernels

    kernels.load()
    tiers = kernels.host_tiers() if a.tiers == "all" else [t for t in a.tiers.split(",") if t]
    best = kernels.tier()

    torch.set_num_threads(a.threads)
    from llamaworks.checkpoint import load_model, load_tokenizer
    from llamaworks.checkpoint.discovery import model_path

    path = model_path(a.model)  # a file, or a name such as gemma3-270m, as every verb takes
    prompt_ids = load_tokenizer(path).encode(PROMPT, bos=None)
    rows: list[tuple[str, float, float, float]] = []  # name, first s, tok/s, weight bytes
    ours: dict[str, dict] = {}
    memory: dict[str, float] = {}  # engine -> resident growth of loading it, bytes
    if path.suffix == ".gguf":  # the default: the file's own types (blocks as stored)
        from llamaworks import LLM

        gc.collect()
        rss0 = _rss()
        t0 = time.perf_counter()
        llm = LLM(path)
        load_s = time.perf_counter() - t0
        memory["llamaworks as stored"] = _rss() - rss0
        first, rate = decode_rate(llm, prompt_ids, a.new_tokens)
        from llamaworks.infer.quantize import weight_bytes

        name = "llamaworks as stored"
        ours[name] = {"first": first, "rate": rate, "bytes": weight_bytes(llm.model), "llm": llm}
        rows.append((name, first, rate, ours[name]["bytes"]))
        print(f"# {name}: loaded in {load_s:.1f} s, model memory "
              f"{memory[name] / 1e6:.0f} MB (file {path.stat().st_size / 1e6:.0f} MB), "
              f"{rate:.1f} tok/s decode", flush=True)
    quants = [q for q in a.quants.split(",") if q]
    # The float32 load (the other formats start from it; also the bandwidth probe): skipped when
    # only the file as stored runs (an 8B float32 copy would not fit in memory).
    loaded = load_model(path) if quants or "hf" not in a.skip else None
    fp32_bytes = bandwidth = floor = None
    if loaded is not None:
        fp32_bytes = sum(m.weight.numel() * 4 for m in loaded.model.modules()
                         if isinstance(m, torch.nn.Linear))
        bandwidth = read_bandwidth(loaded.model)
        floor = bandwidth / fp32_bytes
    compiled = [q for q in a.compile.split(",") if q]
    eager = [q for q in a.eager.split(",") if q]
    for q in quants:
        variants = [("", {})] + [(" (eager ops)", {"fused": False})] * (q in eager) \
            + [(" compiled", {"compile": True})] * (q in compiled)
        if q in a.tier_quants.split(","):
            variants += [(f" [{t}]", {"tier": t}) for t in tiers if t != best]
        for suffix, kw in variants:
            name = f"llamaworks {q}{suffix}"
            r = bench_ours(loaded, prompt_ids, a.new_tokens, None if q == "fp32" else q, **kw)
            ours[name] = r
            rows.append((name, r["first"], r["rate"], r["bytes"]))
            print(f"# {name}: {r['rate']:.1f} tok/s decode", flush=True)
            gc.collect()
        if q in a.torch_kernels.split(","):
            name = f"llamaworks {q} (PyTorch kernels)"
            r = bench_ours(loaded, prompt_ids, a.new_tokens, q, our_kernels=False)
            rows.append((name, r["first"], r["rate"], r["bytes"]))
            print(f"# {name}: {r['rate']:.1f} tok/s decode", flush=True)
            del r
            gc.collect()
    if "hf" not in a.skip:
        first, rate = bench_hf(path, prompt_ids, a.new_tokens)
        rows.append(("HF transformers fp32", first, rate, fp32_bytes))
        print(f"# HF: {rate:.1f} tok/s", flush=True)
        gc.collect()
    if "llama.cpp" not in a.skip:
        import llama_cpp

        gc.collect()
        rss0 = _rss()
        cpp_llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=a.threads,
                                  n_threads_batch=a.threads, verbose=False)
        first, rate = bench_llama_cpp(path, prompt_ids, a.new_tokens, a.threads, cpp_llm)
        memory["llama.cpp"] = _rss() - rss0  # its mapped file pages, once read, count too
        del cpp_llm
        rows.append((f"llama.cpp ({path.suffix[1:]} as shipped)", first, rate,
                     path.stat().st_size))
        print(f"# llama.cpp: {rate:.1f} tok/s", flush=True)
    int4 = {k: v for k, v in ours.items()
            if k in ("llamaworks as stored", "llamaworks int4", "llamaworks int4 compiled")
            or k.startswith("llamaworks int4 [")}
    if "llama.cpp" not in a.skip and a.rounds and int4:
        interleaved(int4, path, prompt_ids, a.new_tokens, a.threads, a.rounds)

    print(f"\n{datetime.date.today()} · {_machine()} · torch {torch.__version__} · "
          f"{a.threads} threads · {path.name} · prompt {len(prompt_ids)} tokens · greedy "
          f"{a.new_tokens} new tokens\n")
    print(f"kernel tiers: default {best} (build: {kernels.isa() if best else '-'}), also run: "
          f"{', '.join(t for t in tiers if t != best) or 'none'} · PyTorch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} · llama.cpp library "
          f"{os.environ.get('LLAMA_CPP_LIB_PATH', 'as installed (native build)')} "
          f"({_llama_cpp_isa()})\n")
    if bandwidth:
        print(f"weight reading rate: {bandwidth / 1e9:.1f} GB/s (fp32 bound {floor:.1f} tok/s); "
              "the bandwidth bound of each row is that rate over its weight bytes per token "
              "(llama.cpp: the file size)\n")
    ref = {name: rate for name, _, rate, _ in rows}
    hf = next((v for k, v in ref.items() if k.startswith("HF")), None)
    cpp = next((v for k, v in ref.items() if k.startswith("llama.cpp")), None)
    print("| engine | weights MB | decode tok/s | % of bandwidth bound | first token ms "
          "| / HF fp32 | / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, first, rate, nbytes in rows:
        share = f"{100 * rate * nbytes / bandwidth:.0f}%" if bandwidth else "-"
        print(f"| {name} | {nbytes / 1e6:.0f} | {rate:.1f} | {share} | "
              f"{first * 1000:.0f} | {f'{rate / hf:.2f}x' if hf else '-'} | "
              f"{f'{rate / cpp:.2f}x' if cpp else '-'} |")

    if memory:
        size = path.stat().st_size
        print("\n| engine | model memory MB (resident growth: load + one decode for llama.cpp) "
              "| / file size |\n|---|---:|---:|")
        for name, m in memory.items():
            print(f"| {name} | {m / 1e6:.0f} | {m / size:.2f}x |")

    if "prefill" not in a.skip:
        print("\n| engine | prefill tok/s (512-token prompt) |\n|---|---:|")
        for name, r in ours.items():
            if "compiled" not in name:
                print(f"| {name} | {bench_prefill(r['llm']):.0f} |", flush=True)
        if "hf" not in a.skip:
            print(f"| HF transformers fp32 | {hf_prefill(path):.0f} |", flush=True)
        if "llama.cpp" not in a.skip:
            print(f"| llama.cpp | {llama_cpp_prefill(path, a.threads):.0f} |", flush=True)

    if "batch" not in a.skip:
        sizes = [int(b) for b in a.batches.split(",") if b]
        print("\n| engine | " + " | ".join(f"batch {b} tok/s" for b in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for name, r in ours.items():
            if "compiled" in name:
                continue
            rates = [bench_batch(r["llm"], prompt_ids, b, 32) for b in sizes]
            print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in rates) + " |", flush=True)


if __name__ == "__main__":
    main()

"""MoE decode speed, side by side: llamaworks vs llama.cpp on one random-weight ~1B-total
mixture-of-experts GGUF, quantized by llama.cpp's own quantizer, in one run.

The model is Qwen3-30B-A3B's layout scaled down (`--shape`: qwen3-moe-1b, 1.11B total / 0.41B
active with embeddings and head: 16 layers, dim 1024, 64 experts of 256, top 8 renormalized, q/k
norms, untied head; or mixtral-1b: 12 layers, dim 1024, 8 experts of 1792, top 2), Llama 3's
vocabulary (llama.cpp's
ggml-vocab-llama-bpe.gguf). The F16 file is written by our exporter (random weights per tensor,
bench/make_gguf.py's RandomWeights), then quantized (`--type`, Q4_K_M) by llama.cpp; both are
kept in --out. Ours loads the file as stored (experts in their blocks, `GGUFExperts`) and decodes
on the fused C++ step, once per kernel tier the CPU runs (`--tiers`); then `--rounds` rounds
run each tier's decode and then llama.cpp's (bench/decode.py's timing: greedy, `--new-tokens`
tokens after the same prompt, `--threads` threads each) and print median and best rates and
ratios. The best tier also runs once on the per-op forward (the
same blocks through `GGUFExperts`, no fused step) for scale.

    .venv/bin/python bench/moe.py [--shape qwen3-moe-1b] [--type Q4_K_M] [--threads 2]
        [--new-tokens 64] [--rounds 5] [--tiers all] [--no-eager]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode import PROMPT, _llama_cpp_isa, _machine, bench_llama_cpp, decode_rate  # noqa: E402
from make_gguf import VOCAB, RandomWeights, quantize  # noqa: E402

SHAPES = {  # name -> ModelConfig fields (vocab: Llama 3's 128256)
    "qwen3-moe-1b": dict(dim=1024, n_layers=16, n_heads=8, n_kv_heads=2, head_dim=128,
                         hidden_dim=3072, family="qwen3_moe", qk_norm=True, n_experts=64,
                         n_active_experts=8, moe_hidden_dim=256, router_norm=True,
                         rope_theta=1e6, norm_eps=1e-6),
    "mixtral-1b": dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, hidden_dim=1792,
                       family="mixtral", n_experts=8, n_active_experts=2, moe_hidden_dim=1792,
                       router_norm=True, rope_theta=1e6),
}


def write_f16(shape: str, out: Path) -> Path:
    """The F16 GGUF of `shape` with random weights (kept: delete it to rebuild)."""
    from llamaworks.checkpoint.gguf import read_metadata
    from llamaworks.checkpoint.gguf_export import export_gguf
    from llamaworks.checkpoint.shapes import expected_shapes
    from llamaworks.config import ModelConfig

    if not VOCAB.exists():
        raise SystemExit(f"{VOCAB} is missing: run `make test` once (it extracts the vocab)")
    tok = {k: v for k, v in read_metadata(VOCAB).items() if k.startswith("tokenizer.")}
    cfg = ModelConfig(vocab_size=len(tok["tokenizer.ggml.tokens"]), max_seq_len=4096,
                      tie_embeddings=False, name=shape, **SHAPES[shape])
    path = out / f"{shape}-F16.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        export_gguf(path, cfg, RandomWeights(expected_shapes(cfg)), tok, "F16")
        print(f"# wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"# {shape}: {cfg.num_params() / 1e9:.2f}B total, "
          f"{cfg.num_params(active=True) / 1e9:.2f}B active", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-moe-1b", choices=list(SHAPES))
    ap.add_argument("--type", default="Q4_K_M", help="llama.cpp quantization of the file")
    ap.add_argument("--out", type=Path, default=HERE.parent / ".cache" / "bench-gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-eager", dest="eager", action="store_false",
                    help="skip the per-op forward run (best tier)")
    ap.add_argument("--tiers", default="all",
                    help="comma list of kernel tiers ('all': every tier this CPU runs)")
    a = ap.parse_args()

    import torch

    from llamaworks import LLM
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.infer import kernels
    from llamaworks.infer.experts import GGUFExperts

    a.out.mkdir(parents=True, exist_ok=True)
    path = quantize(write_f16(a.shape, a.out), a.type)
    torch.set_num_threads(a.threads)
    kernels.load()
    tiers = kernels.host_tiers() if a.tiers == "all" else [t for t in a.tiers.split(",") if t]
    prompt_ids = load_tokenizer(path).encode(PROMPT, bos=None)
    print(f"# {datetime.date.today()} {_machine()}; {a.threads} threads; {path.name} "
          f"({path.stat().st_size / 1e6:.0f} MB); llama.cpp built with {_llama_cpp_isa()}",
          flush=True)
    ours: dict[str, dict] = {}
    for tier in tiers:
        with kernels.using(tier):
            llm = LLM(path)
        experts = llm.model.model.layers[0].mlp.experts
        assert isinstance(experts, GGUFExperts) and llm.step.kind == "fused", llm.step.kind
        first, rate = decode_rate(llm, prompt_ids, a.new_tokens)
        name = f"llamaworks [{kernels.isa(tier)}]"
        ours[name] = {"first": first, "rate": rate, "llm": llm}
        print(f"# {name}: {rate:.1f} tok/s decode (first token {first * 1e3:.0f} ms)",
              flush=True)
        if a.eager and tier == tiers[0]:  # the per-op forward on the same blocks, for scale
            fused, llm.step.fused = llm.step.fused, None
            print(f"# {name} per-op forward (GGUFExperts, no fused step): "
                  f"{decode_rate(llm, prompt_ids, a.new_tokens)[1]:.1f} tok/s", flush=True)
            llm.step.fused = fused
    if a.rounds:
        rounds(ours, path, prompt_ids, a.new_tokens, a.threads, a.rounds)


def rounds(ours: dict[str, dict], path: Path, prompt_ids: list[int], n: int, threads: int,
           count: int) -> None:
    """`count` rounds, each running every one of ours and then llama.cpp once; prints each
    engine's median and best decode tok/s and, per tier, the median of the per-round ratios and
    the ratio of the bests (on a machine other jobs share, the best round is the closest to a
    quiet one: a descheduled thread stalls either engine's barriers for a whole time slice)."""
    import statistics

    import llama_cpp

    cpp = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    rates: dict[str, list[float]] = {name: [] for name in [*ours, "llama.cpp"]}
    for _ in range(count):
        for name, r in ours.items():
            rates[name].append(decode_rate(r["llm"], prompt_ids, n)[1])
        rates["llama.cpp"].append(bench_llama_cpp(path, prompt_ids, n, threads, cpp)[1])
    cpp.close()
    ref = rates["llama.cpp"]
    print(f"\n{count} rounds, decode tok/s ({n} tokens, {threads} threads):\n")
    print("| engine | median | best | / llama.cpp (median of rounds) | / llama.cpp (best/best) |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in rates.items():
        ratios = [r / c for r, c in zip(rs, ref, strict=True)]
        print(f"| {name} | {statistics.median(rs):.1f} | {max(rs):.1f} | "
              f"{statistics.median(ratios):.2f}x | {max(rs) / max(ref):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

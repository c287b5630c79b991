"""The engine's scheduling, measured on a real model in-process (no HTTP): the chunked-prefill
gap, the prefix-cache time to first token, and the speculative speed-up.

1. gap: 4 streams decode; a 2,000-token prompt is admitted. Longest gap between two tokens of the
   running streams, as a multiple of their median gap before it arrived: chunked prefill (the
   server's default, --max-gap 2.5) vs the whole prompt in one step.
2. prefix: a chat with a ~1,000-token system prompt; time to first token of its second turn
   with the prefix cache vs without (and the first turn's, which computes everything).
3. speculative: greedy tokens/s of one stream, plain vs prompt-lookup drafting (n-gram, k=4) on
   a prompt whose answer copies from it; the outputs are checked identical.
4. grammar: the per-token cost of a JSON-schema mask against a decode step, and a new schema's
   first mask (compile + matcher + mask).

    .venv/bin/python bench/engine.py [--model PATH] [--threads 2] [--only gap|prefix|spec|grammar]
"""

from __future__ import annotations

import argparse
import datetime
import queue
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _machine  # noqa: E402

SYSTEM = ("You are a meticulous research assistant working for a small team of historians. "
          "You answer in plain English, cite dates when you know them, say when you are unsure, "
          "and keep answers under one hundred words unless asked for more. ")
PASSAGE = ("The printing press was invented by Johannes Gutenberg around 1440 in Mainz. It used "
           "movable metal type, oil-based ink and a wooden press adapted from wine presses. "
           "Within fifty years presses operated in more than two hundred European cities, and "
           "millions of books had been printed. ")


def _engine(llm, **kw):
    from llamaworks.infer.continuous import ContinuousEngine

    return ContinuousEngine(llm, max_batch=8, context=4096, reserve=True, **kw).start()


def bench_gap(llm, tok) -> dict[str, float]:
    from llamaworks import SamplingParams

    out = {}
    long_prompt = tok.encode((PASSAGE * 40)[:9000], bos=None)[:2000]
    for name, kw in (("chunked", {}), ("one step", {"max_gap": None, "chunk": 4096})):
        eng = _engine(llm, cache_mb=0, **kw)
        stamps: list[list[float]] = [[] for _ in range(4)]
        p = SamplingParams(max_tokens=400, ignore_eos=True)
        for i in range(4):
            eng.submit(f"Story {i}: once upon a time", p,
                       lambda ev, s=stamps[i]: s.append(time.perf_counter()))
        while min(len(s) for s in stamps) < 20:
            time.sleep(0.01)
        before = [b - a for s in stamps for a, b in zip(s[:-1], s[1:], strict=True)]
        normal = statistics.median(before)
        mark = [len(s) for s in stamps]
        t_submit = time.perf_counter()
        got = eng.generate([long_prompt], SamplingParams(max_tokens=1))[0]
        t_first = time.perf_counter()
        assert got.token_ids
        gaps = [b - a for s, m in zip(stamps, mark, strict=True)
                for a, b in zip(s[m - 1:-1], s[m:], strict=True) if b <= t_first + normal]
        eng.shutdown()
        out[name] = max(gaps) / normal
        print(f"  {name:9s} normal step {normal * 1e3:6.1f} ms, longest gap while a 2000-token "
              f"prompt entered {max(gaps) * 1e3:7.1f} ms = {max(gaps) / normal:5.1f}x; its "
              f"first token after {t_first - t_submit:5.2f} s", flush=True)
    return out


def bench_prefix(llm, tok) -> float:
    from llamaworks import SamplingParams

    system = (SYSTEM * 30)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Who invented "
                                                                               "the press?"}]
    p = SamplingParams(max_tokens=24)

    def ttft(eng, messages) -> tuple[float, int, str]:
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), bos=False)
        first: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        req = eng.submit(ids, p, lambda ev: first.put(time.perf_counter()))
        t = first.get(timeout=600) - t0
        while req.result.outputs == []:
            time.sleep(0.01)
        return t, len(ids), req.result.text

    warm = _engine(llm, cache_mb=256)
    t1, n1, reply = ttft(warm, msgs)
    turn2 = msgs + [{"role": "assistant", "content": reply.strip()},
                    {"role": "user", "content": "And when?"}]
    t2, n2, _ = ttft(warm, turn2)
    cached = warm.engine.prefix.hits
    warm.shutdown()
    cold = _engine(llm, cache_mb=0)
    t3, _, _ = ttft(cold, turn2)
    cold.shutdown()
    print(f"  first turn ({n1} prompt tokens) {t1:.3f} s; second turn ({n2} tokens): "
          f"{t2:.3f} s with the prefix cache ({cached} hit) vs {t3:.3f} s without = "
          f"{t3 / t2:.1f}x sooner", flush=True)
    return t3 / t2


def bench_spec(llm, tok) -> float:
    from llamaworks import LLM, SamplingParams
    from llamaworks.infer.speculative import NgramDrafter

    msgs = [{"role": "user", "content": "Repeat this text exactly, word for word:\n\n" + PASSAGE}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), bos=False)
    p = SamplingParams(max_tokens=96)
    rates, outs = {}, {}
    for name, drafter in (("plain", None), ("n-gram k=4", NgramDrafter(k=4))):
        eng = LLM(llm.model, tok, max_batch_size=1, cache_mb=0, draft=drafter).engine
        eng.run([eng.sequences(ids, SamplingParams(max_tokens=4))])  # warm-up
        (seq,) = group = eng.sequences(ids, p)
        t0 = time.perf_counter()
        eng.run([group])
        dt = time.perf_counter() - t0
        rates[name], outs[name] = len(seq.ids) / dt, seq.ids
        acc = f", {seq.accepted} of {seq.proposed} drafts kept" if drafter else ""
        print(f"  {name:11s} {len(seq.ids)} tokens in {dt:.2f} s = {rates[name]:6.1f} tok/s"
              f"{acc}", flush=True)
    assert outs["plain"] == outs["n-gram k=4"], "speculative output differs from plain greedy"
    ratio = rates["n-gram k=4"] / rates["plain"]
    print(f"  speed-up {ratio:.2f}x, identical greedy output", flush=True)
    return ratio


def bench_grammar(llm, tok) -> float:
    """Per-token cost of a JSON-schema constraint (mask + advance, timed inside the run) against
    a plain decode step (3 interleaved rounds, medians), and a new schema's first mask
    (compile + matcher + mask)."""
    import torch

    from llamaworks import SamplingParams
    from llamaworks.infer.grammar import Constraint

    schema = {"type": "object", "properties": {"items": {
        "type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 64}},
        "required": ["items"], "additionalProperties": False}
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "List fruits as JSON"
                                               " under the key items."}],
                                             add_generation_prompt=True), bos=False)
    eng = llm.engine
    t0 = time.perf_counter()
    eng.grammars._tokenizer()
    t_vocab = time.perf_counter() - t0
    spent = [0.0]
    apply, advance = Constraint.apply, Constraint.advance

    def timed(fn):
        def run(*a):
            t = time.perf_counter()
            out = fn(*a)
            spent[0] += time.perf_counter() - t
            return out
        return run

    Constraint.apply, Constraint.advance = timed(apply), timed(advance)
    runs: dict[str, list[float]] = {"plain": [], "schema": []}
    grammar_per = []
    try:
        for _ in range(3):
            for name, p in (("plain", SamplingParams(max_tokens=96, ignore_eos=True)),
                            ("schema", SamplingParams(max_tokens=96, json_schema=schema))):
                (seq,) = group = eng.sequences(ids, p)
                eng.add(group)
                eng.step()  # the prompt
                spent[0] = 0.0
                t0 = time.perf_counter()
                while not seq.finish:
                    eng.step()
                n = max(len(seq.ids) - 1, 1)
                runs[name].append((time.perf_counter() - t0) / n)
                if name == "schema":
                    grammar_per.append(spent[0] / n)
    finally:
        Constraint.apply, Constraint.advance = apply, advance
    plain, constrained = statistics.median(runs["plain"]), statistics.median(runs["schema"])
    g = statistics.median(grammar_per)
    logits = torch.randn(llm.model.config.vocab_size)
    new = {**schema, "properties": {"other": {"type": "integer"}}, "required": ["other"]}
    t0 = time.perf_counter()
    eng.grammars.constraint(json_schema=new).apply(logits)
    first = time.perf_counter() - t0
    print(f"  decode step {plain * 1e3:.2f} ms plain, {constrained * 1e3:.2f} ms constrained "
          f"(medians of 3); the constraint's own work {g * 1e3:.2f} ms per token = "
          f"{g / plain * 100:.1f}% of a step; a new schema's first mask {first * 1e3:.1f} ms; "
          f"the vocabulary for llguidance built once in {t_vocab:.2f} s", flush=True)
    return g / plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["gap", "prefix", "spec", "grammar"], default=None)
    args = ap.parse_args()
    from llamaworks import LLM
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import model_path
    from llamaworks.infer import kernels
    from llamaworks.infer.threads import use_threads

    use_threads(args.threads)
    path = model_path(args.model)
    llm = LLM(path)
    tok = load_tokenizer(path)
    print(f"# bench/engine.py {datetime.date.today()} | {_machine()} | kernels {kernels.tier()} "
          f"| step {llm.step.kind} | {path.name}\n# {' '.join(sys.argv)}", flush=True)
    for name, fn in (("gap", bench_gap), ("prefix", bench_prefix), ("spec", bench_spec),
                     ("grammar", bench_grammar)):
        if args.only in (None, name):
            print(f"{name}:", flush=True)
            fn(llm, tok)


if __name__ == "__main__":
    main()

"""Continuous batching: requests that join and leave a running batch produce exactly what `LLM`
produces for each alone (greedy, seeded sampling, stops, logprobs); cancelled rows free their
slot; a full queue refuses work. Tiny random models, plus the real SmolLM2 (slow)."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.config import get_preset
from llamaworks.infer.continuous import ContinuousEngine, Event, QueueFullError
from llamaworks.model import KVCache

PROMPTS = ["hello there", "a", "the quick brown fox jumps over", "xyz", "0123456789", "zz top",
           "continuous batching", "q"]


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM(tiny_model(), ByteTokenizer())


@pytest.fixture(scope="module")
def engine(tiny_llm):
    eng = ContinuousEngine(tiny_llm, max_batch=3, max_queue=64).start()
    yield eng
    eng.shutdown()


def _alone(llm: LLM, prompt: str, params: SamplingParams):
    return llm.generate(prompt, params)[0]


def test_per_row_cache_writes_each_row_at_its_own_positions():
    cfg = get_preset("tiny")
    shared, per_row = KVCache(cfg, 2, 8), KVCache(cfg, 2, 8, per_row=True)
    k = torch.randn(2, cfg.n_kv_heads, 2, cfg.head_dim)
    per_row.update(0, torch.tensor([[1, 2], [5, 6]]), k, k, 8)
    shared.update(0, torch.tensor([1, 2]), k, k, 8)
    assert torch.equal(per_row.k[0, 0, :, 1:3], k[0]) and torch.equal(per_row.k[0, 1, :, 5:7], k[1])
    assert torch.equal(shared.k[0, :, :, 1:3], k)
    assert per_row.k[0, 0, :, 5:7].abs().sum() == 0 and per_row.k[0, 1, :, 1:3].abs().sum() == 0


def test_greedy_outputs_equal_llm_one_at_a_time_with_more_requests_than_rows(tiny_llm, engine):
    # 8 prompts of different lengths and budgets over 3 rows: requests join and leave mid-batch.
    params = [SamplingParams(max_tokens=5 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    done: queue.Queue[Event] = queue.Queue()
    reqs = [engine.submit(p, sp, lambda ev: ev.done and done.put(ev))
            for p, sp in zip(PROMPTS, params, strict=True)]
    for _ in reqs:
        assert done.get(timeout=60).error is None
    for req, prompt, sp in zip(reqs, PROMPTS, params, strict=True):
        ref = _alone(tiny_llm, prompt, sp)
        assert req.result.token_ids == ref.token_ids, prompt
        assert req.result.text == ref.text and req.result.finish_reason == ref.finish_reason


def test_request_arriving_mid_decode_joins_and_matches(tiny_llm, engine):
    long_p = SamplingParams(max_tokens=60, ignore_eos=True)
    events: queue.Queue[Event] = queue.Queue()
    first = engine.submit("a long one", long_p, events.put)
    events.get(timeout=30)  # the first request is decoding now
    late = engine.generate(["late arrival"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    while not events.get(timeout=60).done:
        pass
    assert first.result.token_ids == _alone(tiny_llm, "a long one", long_p).token_ids
    assert late.token_ids == _alone(tiny_llm, "late arrival",
                                    SamplingParams(max_tokens=10, ignore_eos=True)).token_ids


def test_seeded_sampling_with_n_rows_equals_llm(tiny_llm, engine):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=7, n=3, max_tokens=12, ignore_eos=True)
    got = engine.generate(["sample me"], p)[0]
    ref = _alone(tiny_llm, "sample me", p)
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs]
    assert len({tuple(o.token_ids) for o in got.outputs}) > 1  # the n rows really differ


def test_stop_strings_eos_and_logprobs_match_llm(tiny_llm, engine):
    ref_text = _alone(tiny_llm, "hello there", SamplingParams(max_tokens=20, ignore_eos=True)).text
    stop = ref_text[4:6]
    for p in [SamplingParams(max_tokens=20, stop=[stop], logprobs=3),
              SamplingParams(max_tokens=30, logprobs=0)]:
        got = engine.generate(["hello there"], p)[0]
        ref = _alone(tiny_llm, "hello there", p)
        assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids,
                                                                 ref.finish_reason)
        assert [sorted(d) for d in got.logprobs] == [sorted(d) for d in ref.logprobs]
        flat = [[d[k] for k in sorted(d)] for d in got.logprobs]
        assert flat == [pytest.approx([d[k] for k in sorted(d)], abs=1e-4) for d in ref.logprobs]
    assert engine.generate(["hello there"], SamplingParams(max_tokens=20, stop=[stop]))[0] \
        .finish_reason == "stop"


def test_streamed_text_deltas_concatenate_to_the_final_text(engine):
    events: queue.Queue[Event] = queue.Queue()
    engine.submit("stream it", SamplingParams(max_tokens=25, stop=["ab"], ignore_eos=True),
                  events.put)
    parts, ev = [], events.get(timeout=30)
    while not ev.done:
        parts.append(ev.text)
        ev = events.get(timeout=30)
    assert "".join(parts) == ev.result.text


def test_cancel_frees_the_rows_at_once(engine):
    events: queue.Queue[Event] = queue.Queue()
    req = engine.submit("cancel me", SamplingParams(max_tokens=200, ignore_eos=True, n=2),
                        events.put)
    events.get(timeout=30)
    req.cancel()
    while not (ev := events.get(timeout=30)).done:
        pass
    assert ev.result.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while engine.free_slots != engine.max_batch and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.free_slots == engine.max_batch


def test_full_queue_raises_and_bad_requests_are_refused(tiny_llm):
    eng = ContinuousEngine(tiny_llm, max_batch=1, max_queue=1)  # not started: nothing drains
    eng.submit("one", SamplingParams(), lambda ev: None)
    with pytest.raises(QueueFullError, match="retry"):
        eng.submit("two", SamplingParams(), lambda ev: None)
    with pytest.raises(ValueError, match="n=2"):
        eng.submit("three", SamplingParams(n=2), lambda ev: None)
    with pytest.raises(ValueError, match="context"):
        eng.submit("x" * 300, SamplingParams(), lambda ev: None)


def test_a_failing_sink_does_not_stop_the_scheduler(engine):
    def bad(ev: Event) -> None:
        raise RuntimeError("client went away")

    engine.submit("boom", SamplingParams(max_tokens=50, ignore_eos=True), bad)
    assert engine.generate(["still alive"], SamplingParams(max_tokens=3))[0].token_ids


@pytest.mark.slow
def test_real_model_concurrent_greedy_equals_llm_one_at_a_time(smollm, smollm_tokenizer):
    llm = LLM(smollm, smollm_tokenizer)
    eng = ContinuousEngine(llm, max_batch=4, context=512).start()
    try:
        prompts = [smollm_tokenizer.encode(smollm_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True), bos=False)
            for q in ["What is the capital of France?", "Name three colors.", "What is 2+2?",
                      "Write a haiku about the sea.", "Who wrote Hamlet?"]]
        params = SamplingParams(max_tokens=16)
        results: list = [None] * len(prompts)

        def run(i: int) -> None:  # real concurrency: each client submits on its own thread
            results[i] = eng.generate([prompts[i]], params, timeout=120)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, prompt in zip(results, prompts, strict=True):
            ref = llm.generate([prompt], params)[0]
            assert got.token_ids == ref.token_ids and got.text == ref.text
    finally:
        eng.shutdown()

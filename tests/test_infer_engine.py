"""The LLM engine: batching, KV cache, stop conditions, streaming, logprobs, chat; greedy output
equal to transformers' `generate` on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "xyz"]


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM(tiny_model(), ByteTokenizer())


def _recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_full_recomputation(tiny_llm):
    for text in PROMPTS:
        prompt = tiny_llm.tokenizer.encode(text)
        got = tiny_llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
        assert got.token_ids == _recompute_greedy(tiny_llm.model, prompt, 12)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(tiny_llm):
    p = SamplingParams(max_tokens=15, ignore_eos=True)
    batched = [o.token_ids for o in tiny_llm.generate(PROMPTS, p)]
    single = [tiny_llm.generate(t, p)[0].token_ids for t in PROMPTS]
    assert batched == single


def test_results_come_back_in_prompt_order_with_prompt_ids(tiny_llm):
    out = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=2))
    assert [o.prompt for o in out] == PROMPTS
    assert [o.prompt_token_ids for o in out] == [tiny_llm.tokenizer.encode(t) for t in PROMPTS]


def test_token_id_prompts_equal_text_prompts(tiny_llm):
    p = SamplingParams(max_tokens=5)
    ids = tiny_llm.tokenizer.encode("hello there")
    from_text = tiny_llm.generate("hello there", p)[0].token_ids
    assert tiny_llm.generate(ids, p)[0].token_ids == from_text


def test_max_tokens_finishes_with_length(tiny_llm):
    out = tiny_llm.generate("hello", SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_id_ends_the_sequence_and_is_kept_in_token_ids(tiny_llm):
    free = tiny_llm.generate("hello", SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    stop = free[4]
    first = free.index(stop)
    out = tiny_llm.generate("hello", SamplingParams(max_tokens=10, stop_token_ids=[stop]))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"


def test_eos_from_the_config_stops_unless_ignored():
    model = tiny_model()
    tok = ByteTokenizer()
    free = LLM(model, tok).generate("hello", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    eos = free.token_ids[3]
    model.config = model.config.replace(eos_token_id=eos)
    tok.stop_ids = []
    out = LLM(model, tok).generate("hello", SamplingParams(max_tokens=10))[0]
    assert out.token_ids[-1] == eos and out.finish_reason == "stop"
    assert len(out.token_ids) == free.token_ids.index(eos) + 1


def test_stop_string_spanning_tokens_is_cut_from_the_text(tiny_llm):
    free = tiny_llm.generate("the quick", SamplingParams(max_tokens=20, ignore_eos=True))[0]
    text = free.text
    stop = text[5:8]  # three one-byte tokens
    assert len(stop) == 3
    out = tiny_llm.generate("the quick", SamplingParams(max_tokens=20, stop=[stop, "\x00never"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert stop not in out.text


def test_stream_deltas_concatenate_to_the_generated_text_and_never_show_the_stop(tiny_llm):
    free = tiny_llm.generate("hello", SamplingParams(max_tokens=20, ignore_eos=True))[0].text
    stop = free[6:9]
    p = SamplingParams(max_tokens=20, stop=stop, ignore_eos=True)
    deltas = list(tiny_llm.stream("hello", p))
    assert len(deltas) > 1
    assert "".join(deltas) == tiny_llm.generate("hello", p)[0].text
    assert all(stop not in "".join(deltas[:i + 1]) for i in range(len(deltas)))


def test_same_seed_same_text_and_other_seed_differs(tiny_llm):
    def run(seed: int) -> list[list[int]]:
        p = SamplingParams(max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True)
        return [o.token_ids for o in tiny_llm.generate(PROMPTS, p)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_n_samples_per_prompt_are_distinct_and_reproducible(tiny_llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=5, n=3, ignore_eos=True)
    out = tiny_llm.generate("hello", p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert [c.token_ids for c in tiny_llm.generate("hello", p)[0].outputs] == \
        [c.token_ids for c in out.outputs]


def test_logprobs_are_the_model_log_softmax_with_top_alternatives(tiny_llm):
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=0, logprobs=3, ignore_eos=True)
    out = tiny_llm.generate("hello", p)[0]
    prompt = tiny_llm.tokenizer.encode("hello")
    with torch.inference_mode():
        full = tiny_llm.model(torch.tensor([prompt + out.token_ids]))[0].log_softmax(-1)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=False)):
        row = full[len(prompt) - 1 + i]
        assert entry[tok] == pytest.approx(float(row[tok]), abs=1e-4)
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(entry) and len(entry) in (3, 4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(out.token_ids, out.logprobs, strict=False)))


def test_chat_applies_the_chat_template(tiny_llm):
    msgs = [{"role": "user", "content": "hi"}]
    p = SamplingParams(max_tokens=5)
    ids = tiny_llm.tokenizer.encode("<user>hi\n<assistant>")
    assert tiny_llm.chat(msgs, p)[0].token_ids == tiny_llm.generate([ids], p)[0].token_ids
    assert len(tiny_llm.chat([msgs, msgs], p)) == 2


def test_more_prompts_than_max_batch_size_are_split_into_batches():
    llm = LLM(tiny_model(), ByteTokenizer(), max_batch_size=2)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS, p)] == \
        [o.token_ids for o in LLM(llm.model, ByteTokenizer()).generate(PROMPTS, p)]


def test_empty_prompt_is_rejected(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[]])


def test_package_exports_the_vllm_shaped_api():
    import llamaworks

    assert llamaworks.LLM is LLM and llamaworks.SamplingParams is SamplingParams


# -- the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_llm(smollm, smollm_tokenizer) -> LLM:
    return LLM(smollm, smollm_tokenizer)


REAL = ["The capital of France is", "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):", "1, 2, 3,"]


@pytest.mark.slow
def test_smollm_greedy_equals_transformers_generate(smol_llm, hf_smollm):
    for text in REAL[:2]:
        ids = smol_llm.tokenizer.encode(text, bos=None)
        ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        got = smol_llm.generate([ids], SamplingParams(max_tokens=24, ignore_eos=True))[0]
        assert got.token_ids == ref


@pytest.mark.slow
def test_smollm_batched_greedy_equals_unbatched(smol_llm):
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    batched = [o.token_ids for o in smol_llm.generate(REAL[:3], p)]
    assert batched == [smol_llm.generate(t, p)[0].token_ids for t in REAL[:3]]


@pytest.mark.slow
def test_smollm_stop_string_across_token_boundaries(smol_llm):
    out = smol_llm.generate("1, 2, 3,", SamplingParams(max_tokens=20, stop="5, 6"))[0]
    assert out.text == " 4, " and out.finish_reason == "stop"
    assert len(out.token_ids) > 4  # '5', ',', ' ', '6' were generated, then cut from the text

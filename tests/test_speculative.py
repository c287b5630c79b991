"""Speculative decoding: greedy output identical to the target alone, sampled output with the
target's distribution, acceptance reported."""

from __future__ import annotations

import copy

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.infer.sampling import probs_for
from llamaworks.infer.speculative import ModelDrafter, NgramDrafter, speculative_generate


def _perturbed(model, scale: float, seed: int = 1):
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


def _plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = LLM(model, ByteTokenizer()).generate([prompt], SamplingParams(max_tokens=n,
                                                                         ignore_eos=True))
    return out[0].token_ids


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy_with_a_perturbed_draft(k):
    target = tiny_model()
    draft = _perturbed(target, 0.05)
    prompt = ByteTokenizer().encode("hello world")
    res = speculative_generate(target, draft, prompt, 30, k=k)
    assert res.token_ids == _plain_greedy(target, prompt, 30)
    assert 0 < res.acceptance_rate < 1  # some drafts kept, some rejected


def test_identical_draft_is_always_accepted():
    target = tiny_model()
    res = speculative_generate(target, target, [5, 6, 7], 20, k=4)
    assert res.acceptance_rate == 1.0
    assert res.token_ids == _plain_greedy(target, [5, 6, 7], 20)


def test_a_truncated_draft_of_another_depth_still_gives_the_target_greedy_output():
    target = tiny_model(n_layers=3)
    draft = tiny_model(n_layers=3)
    draft.model.layers = draft.model.layers[:1]  # a 1-layer draft
    prompt = [9, 10, 11]
    res = speculative_generate(target, draft, prompt, 25, k=3)
    assert res.token_ids == _plain_greedy(target, prompt, 25)


def test_stop_id_ends_speculative_output():
    target = tiny_model()
    free = _plain_greedy(target, [5, 6], 15)
    res = speculative_generate(target, _perturbed(target, 0.3), [5, 6], 15, stop_ids=[free[6]])
    assert res.token_ids == free[:free.index(free[6]) + 1]


@pytest.mark.slow
def test_sampled_first_token_follows_the_target_distribution():
    """Rejection sampling makes each emitted token distributed as the target's p, whatever the
    draft: compare the empirical distribution of the first token with p."""
    target = tiny_model(std=0.05)  # a flat-ish distribution so many tokens are likely
    draft = _perturbed(target, 2.0)
    prompt = [40, 41]
    params = SamplingParams(temperature=1.0, top_k=8)
    with torch.inference_mode():
        p = probs_for(target(torch.tensor([prompt]))[0, -1], params)
    counts = torch.zeros_like(p)
    n = 600
    for seed in range(n):
        params.seed = seed
        first = speculative_generate(target, draft, prompt, 1, params, k=1).token_ids[0]
        counts[first] += 1
    assert (counts[p == 0] == 0).all()
    assert torch.allclose(counts / n, p, atol=0.06)  # ~4 standard errors


def test_penalized_greedy_speculation_equals_penalized_plain_greedy():
    """Penalties look at the tokens kept so far, draft by draft: the output is still exactly the
    target's own penalized greedy output."""
    target = tiny_model(seed=1)
    prompt = [1, 72, 105, 72, 105]
    for p in (SamplingParams(repetition_penalty=1.8, penalty_last_n=8),
              SamplingParams(presence_penalty=3.0, frequency_penalty=0.5)):
        want = LLM(target, ByteTokenizer()).generate(
            [prompt], SamplingParams(**{**p.__dict__, "max_tokens": 24, "ignore_eos": True}))
        for draft in (_perturbed(target, 0.05), None):
            res = speculative_generate(target, draft, prompt, 24, p, k=3)
            assert res.token_ids == want[0].token_ids


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    d = NgramDrafter(k=3, max_n=2)
    assert d.lookup([5, 6, 7, 8, 9, 5, 6], 3) == [7, 8, 9]  # the 2-gram [5, 6] seen before
    assert d.lookup([1, 2, 3, 4, 2], 3) == [3, 4, 2]  # only the 1-gram [2]
    assert d.lookup([1, 2, 9, 2, 7, 9], 2) == [2, 7]  # the latest earlier occurrence of [9]
    assert d.lookup([1, 2, 3], 3) == []


def test_prompt_lookup_greedy_equals_plain_greedy_and_accepts_copied_text():
    """A repetitive prompt: the n-gram drafts are often right, and the output is the target's."""
    target = tiny_model()
    prompt = ByteTokenizer().encode("abcabcabcabcabcabc")
    res = speculative_generate(target, None, prompt, 40, k=4)
    assert res.token_ids == _plain_greedy(target, prompt, 40)
    assert res.proposed > 0 and res.accepted > 0


def test_engine_with_a_drafter_keeps_batched_greedy_outputs():
    """Speculation inside the engine, several rows at once (rows join and finish at different
    steps): every row's tokens equal plain decoding's."""
    target = tiny_model()
    prompts = ["hello world", "abab abab abab", "x", "the the the the"]
    params = [SamplingParams(max_tokens=10 + 5 * i, ignore_eos=True) for i in range(4)]
    plain = LLM(target, ByteTokenizer()).generate(prompts, params)
    for drafter in (NgramDrafter(k=3), ModelDrafter(_perturbed(target, 0.05), k=3)):
        llm = LLM(target, ByteTokenizer(), max_batch_size=3, draft=drafter)
        got = llm.generate(prompts, params)
        assert [g.token_ids for g in got] == [p.token_ids for p in plain]


@pytest.mark.slow
def test_smollm_speculative_greedy_equals_plain_greedy_with_an_int4_draft(smollm,
                                                                          smollm_tokenizer):
    from llamaworks.infer.quantize import quantize_model

    prompt = smollm_tokenizer.encode("The history of the printing press begins", bos=None)
    draft = quantize_model(smollm, "int4")
    res = speculative_generate(smollm, draft, prompt, 12, k=4)
    plain = LLM(smollm, smollm_tokenizer).generate([prompt], SamplingParams(max_tokens=12,
                                                                            ignore_eos=True))
    assert res.token_ids == plain[0].token_ids
    assert res.acceptance_rate > 0.5

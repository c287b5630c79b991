"""Speculative decoding: greedy output identical to the target alone, sampled output with the
target's distribution, acceptance reported."""

from __future__ import annotations

import copy

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.infer.sampling import probs_for
from llamaworks.infer.speculative import speculative_generate


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


def test_penalties_are_refused():
    m = tiny_model()
    with pytest.raises(ValueError, match="penalties"):
        speculative_generate(m, m, [1, 2], 5, SamplingParams(repetition_penalty=1.2))


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

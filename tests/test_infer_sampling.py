"""Samplers: each filter equals transformers' logits processor, and sampling under fixed seeds has
the distribution the filter defines."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llamaworks.infer.sampling import SamplingParams, apply_penalties, sample_row, warp

V = 50


def _logits(seed: int = 0, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(logits: torch.Tensor, p: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([sample_row(logits, p, gen) for _ in range(n)])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_keeps_exactly_what_transformers_top_k_keeps(k):
    x = _logits()
    ours = warp(x, SamplingParams(temperature=1.0, top_k=k))
    ref = TopKLogitsWarper(k)(None, x.clone())
    assert torch.equal(ours.isinf(), ref.isinf())


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_exactly_what_transformers_top_p_keeps(top_p):
    x = _logits(1)
    ours = warp(x, SamplingParams(temperature=1.0, top_p=top_p))
    ref = TopPLogitsWarper(top_p)(None, x.clone())
    assert torch.equal(ours.isinf(), ref.isinf())


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_keeps_exactly_what_transformers_min_p_keeps(min_p):
    x = _logits(2)
    ours = warp(x, SamplingParams(temperature=1.0, min_p=min_p))
    ref = MinPLogitsWarper(min_p)(None, x.clone())
    assert torch.equal(ours.isinf(), ref.isinf())


def test_temperature_scales_logits_as_transformers_does():
    x = _logits(3)
    ours = warp(x, SamplingParams(temperature=0.7))
    assert torch.allclose(ours, TemperatureLogitsWarper(0.7)(None, x.clone()))


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers_over_prompt_and_output(penalty):
    x = _logits(4, rows=1)[0]
    prompt, output = [3, 7, 7, 11], [11, 20, 3]
    ours = apply_penalties(x, SamplingParams(repetition_penalty=penalty), prompt, output)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), x[None])[0]
    assert torch.allclose(ours, ref)


@pytest.mark.parametrize("last_n", [1, 3, 5, 100])
def test_repeat_last_n_penalizes_what_transformers_penalizes_over_those_tokens(last_n):
    x = _logits(4, rows=1)[0]
    prompt, output = [3, 7, 7, 11], [11, 20, 3, 30]
    p = SamplingParams(repetition_penalty=1.1, penalty_last_n=last_n)
    ours = apply_penalties(x, p, prompt, output)
    window = (prompt + output)[-last_n:]  # llama.cpp's --repeat-last-n
    ref = RepetitionPenaltyLogitsProcessor(1.1)(torch.tensor([window]), x[None])[0]
    assert torch.allclose(ours, ref)


def test_repeat_last_n_zero_turns_the_repetition_penalty_off():
    x = _logits(4, rows=1)[0]
    p = SamplingParams(repetition_penalty=1.5, penalty_last_n=0)
    assert not p.penalized
    assert torch.equal(apply_penalties(x, p, [3, 7], [11]), x)


def test_generate_tokens_applies_the_penalties_as_llm_generate_does():
    from infer_fixtures import ByteTokenizer, tiny_model

    from llamaworks.infer.engine import Engine
    from llamaworks.infer.generate import generate_tokens
    from llamaworks.infer.llm import LLM

    model = tiny_model(seed=1)
    engine = Engine(model, ByteTokenizer(), max_batch=1)
    prompt = [1, 72, 105, 72, 105]
    for p in (SamplingParams(repetition_penalty=1.8, penalty_last_n=8, max_tokens=24),
              SamplingParams(presence_penalty=3.0, frequency_penalty=0.5, max_tokens=24),
              SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=5, max_tokens=24)):
        ours = list(generate_tokens(engine, prompt, 24, p))
        ref = LLM(model, ByteTokenizer()).generate([prompt], p)[0].outputs[0].token_ids
        assert ours == ref
        plain = list(generate_tokens(engine, prompt, 24, SamplingParams(
            temperature=p.temperature, seed=p.seed)))
        assert ours != plain  # the penalty changed the text


def test_frequency_and_presence_penalties_subtract_count_and_indicator_of_output_tokens():
    x = _logits(5, rows=1)[0]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5)
    out = apply_penalties(x, p, prompt_ids=[9, 9], output_ids=[4, 4, 4, 8])
    expected = x.clone()
    expected[4] -= 0.5 * 3 + 1.5
    expected[8] -= 0.5 * 1 + 1.5
    assert torch.allclose(out, expected)  # prompt tokens (9) are not penalized (OpenAI/vLLM)


def test_temperature_near_zero_is_greedy():
    x = _logits(6, rows=1)[0]
    assert (_draws(x, SamplingParams(temperature=0.0), n=20) == x.argmax()).all()
    assert (_draws(x, SamplingParams(temperature=1e-6), n=20) == x.argmax()).all()


def test_top_k_never_emits_outside_the_k_most_likely():
    x = _logits(7, rows=1)[0]
    draws = _draws(x, SamplingParams(temperature=2.0, top_k=3), n=2000)
    top3 = set(torch.topk(x, 3).indices.tolist())
    assert set(draws.tolist()) == top3  # all three appear at temperature 2, nothing else


def test_top_p_samples_only_from_the_nucleus_and_renormalizes():
    x = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    draws = _draws(x, SamplingParams(temperature=1.0, top_p=0.75), n=4000)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2:].sum() == 0  # 0.5 + 0.3 reaches 0.75: the rest is cut
    assert abs(freq[0] - 0.5 / 0.8) < 0.03


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    x = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    draws = _draws(x, SamplingParams(temperature=1.0, min_p=0.15), n=3000)
    assert set(draws.tolist()) == {0, 1, 2}  # 0.06 < 0.15 * 0.5 = 0.075


@pytest.mark.slow
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature():
    x = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        draws = _draws(x, SamplingParams(temperature=t), n=6000, seed=int(t * 10))
        freq = torch.bincount(draws, minlength=4).float() / len(draws)
        assert torch.allclose(freq, (x / t).softmax(-1), atol=0.025), t


def test_same_seed_same_draws_and_different_seed_different_draws():
    x = _logits(8, rows=1)[0]
    p = SamplingParams(temperature=1.0)
    assert torch.equal(_draws(x, p, 50, seed=1), _draws(x, p, 50, seed=1))
    assert not torch.equal(_draws(x, p, 50, seed=1), _draws(x, p, 50, seed=2))


def test_repetition_penalty_lowers_the_rate_of_repeated_tokens():
    x = torch.zeros(V)
    plain = _draws(x, SamplingParams(temperature=1.0), 3000)
    pen = _draws(x, SamplingParams(temperature=1.0, presence_penalty=5.0), 3000)
    # with nothing generated yet, penalties have no effect (same seed, same draws)
    assert torch.equal(plain, pen)
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, presence_penalty=50.0)
    out: list[int] = []
    for _ in range(V):
        out.append(sample_row(x, p, gen, output_ids=out))
    assert len(set(out)) == V  # a huge presence penalty never repeats a token


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(min_p=1.5), dict(max_tokens=0), dict(n=0),
                                 dict(repetition_penalty=0), dict(penalty_last_n=-2)])
def test_invalid_params_are_rejected_with_the_field_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_stop_accepts_a_string_or_a_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]

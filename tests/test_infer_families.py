"""The inference engines on Mistral, Qwen2, Qwen3, Gemma 3 and the mixtures of experts (Mixtral,
Qwen3-MoE, Llama 4 with its chunked attention, DeepSeek-V3's latent attention), sliding windows
above all:
random tiny checkpoints made by transformers (weights drawn wide, std 0.25, so a wrong detail
changes the argmax), loaded from the saved HF directory, decoded greedily past the window by
`LLM.generate` (a left-padded batch of prompts of different lengths, and each prompt alone), by
the continuous engine (requests joining and leaving rows) and by transformers' own `generate`;
and int8 weights of a biased Qwen2 through the same paths."""

from __future__ import annotations

import queue

import pytest
import torch
from family_fixtures import TINY, load_saved, tiny_family_model
from infer_fixtures import ByteTokenizer

transformers = pytest.importorskip("transformers")

import llamaworks.model as model_mod  # noqa: E402
from llamaworks import LLM, SamplingParams  # noqa: E402
from llamaworks.infer.continuous import ContinuousEngine, Event  # noqa: E402

VOCAB = TINY["vocab_size"]  # 96 < ByteTokenizer's 259: every id decodes
CASES = {
    "mistral-sliding": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=24, sliding_window=6,
                                              tie_word_embeddings=False)),
    # Untied: tied, the sqrt(dim)-scaled embedding dominates the residual of random weights and
    # greedy decoding repeats the last prompt token forever, which no window changes.
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=6, sliding_window_pattern=2, rope_theta=20000.0,
        rope_local_base_freq=500.0, tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, rope_theta=1000.0)),
    "qwen3-qk-norm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=40, tie_word_embeddings=False)),
    "qwen2-sliding-upper-layers": ("Qwen2Config", dict(
        num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True, sliding_window=6,
        max_window_layers=2, tie_word_embeddings=False)),
    # Mixture of experts: routed tokens go through the same engines.
    "mixtral-top2": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=4, num_experts_per_tok=2,
                                           tie_word_embeddings=False)),
    "qwen3moe-dense-first": ("Qwen3MoeConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0],
        tie_word_embeddings=False)),
    # Llama 4: chunks of 6 (prompts and replies cross several), a global no-RoPE layer.
    "llama4-chunked": ("Llama4TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
        intermediate_size_mlp=80, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=6, floor_scale=4, attn_scale=0.5,
        tie_word_embeddings=False)),
    # DeepSeek-V3: latent attention, its cache one latent + one RoPE key per token (decode runs
    # absorbed over it), group-limited routing with the correction bias, shared experts.
    "deepseek3-mla": ("DeepseekV3Config", dict(
        num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=24,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, n_shared_experts=1, tie_word_embeddings=False)),
}
WINDOWED = ["mistral-sliding", "gemma3-local-global", "qwen2-sliding-upper-layers"]
WINDOW = 6
LENGTHS = (17, 9, 13, 7)  # all longer than the window; the batch is left-padded to 17
NEW = 16  # prompt + generation: up to 33 tokens, 5x the window
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _hf_model(case: str, seed: int = 0):
    return tiny_family_model(CASES[case], seed)


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(case, transformers model, LLM over our model loaded from the directory HF saved)."""
    hf = _hf_model(request.param)
    ours = load_saved(hf, tmp_path_factory.mktemp(request.param))
    if request.param in WINDOWED:
        assert ours.config.sliding_window == WINDOW
    return request.param, hf, LLM(ours, ByteTokenizer())


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long),
                          max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.mark.slow
def test_batched_greedy_equals_each_prompt_alone_and_transformers(family):
    case, hf, llm = family
    prompts = _prompts()
    batch = _ids(llm.generate(prompts, GREEDY))
    assert all(len(ids) == NEW for ids in batch)
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert batch == alone, case
    want = [_hf_greedy(hf, p) for p in prompts]
    assert batch == want, case


@pytest.mark.parametrize(("case", "mask_fn"), [*((c, "_window_mask") for c in WINDOWED),
                                             ("llama4-chunked", "_chunk_mask")])
@pytest.mark.slow
def test_these_prompts_need_the_window(case, mask_fn, tmp_path, monkeypatch):
    """The comparisons above can fail: with the window (Llama 4: the attention chunk) widened
    past the sequence (a decoder that ignores it), the greedy tokens are not transformers' any
    more."""
    hf = _hf_model(case)
    llm = LLM(load_saved(hf, tmp_path), ByteTokenizer())
    prompts = _prompts()
    want = [_hf_greedy(hf, p) for p in prompts]
    assert _ids(llm.generate(prompts, GREEDY)) == want
    real = getattr(model_mod, mask_fn)
    monkeypatch.setattr(model_mod, mask_fn,
                        lambda mask, pos, kv_len, size: real(mask, pos, kv_len, 10**6))
    assert _ids(llm.generate(prompts, GREEDY)) != want
    assert [llm.generate([p], GREEDY)[0].token_ids for p in prompts] != want


def _continuous(llm: LLM, prompts, params: list[SamplingParams], max_batch: int = 3):
    """Each prompt through a ContinuousEngine of `max_batch` rows, all submitted at once."""
    eng = ContinuousEngine(llm, max_batch=max_batch, max_queue=16).start()
    done: queue.Queue[Event] = queue.Queue()
    try:
        reqs = [eng.submit(p, sp, lambda ev: ev.done and done.put(ev))
                for p, sp in zip(prompts, params, strict=True)]
        for _ in reqs:
            assert done.get(timeout=120).error is None
    finally:
        eng.shutdown()
    return [r.result for r in reqs]


# Different budgets: rows leave at different steps and the fourth request joins mid-decode.
BUDGETS = [SamplingParams(max_tokens=NEW - 3 * i, ignore_eos=True) for i in range(len(LENGTHS))]


def test_continuous_engine_equals_llm_generate(family):
    """Four prompts over three rows, each row at its own positions in the per-row cache, past
    the window: the tokens `LLM.generate` gives (checked against transformers above)."""
    case, _, llm = family
    prompts = _prompts(seed=2)
    want = _ids(llm.generate(prompts, BUDGETS))
    assert [len(ids) for ids in want] == [sp.max_tokens for sp in BUDGETS]
    got = _continuous(llm, prompts, BUDGETS)
    assert _ids(got) == want, case
    assert all(r.finish_reason == "length" for r in got)


@pytest.fixture(scope="module")
def qwen2_int8(tmp_path_factory):
    ours = load_saved(_hf_model("qwen2-bias"), tmp_path_factory.mktemp("qwen2-int8"))
    return ours, LLM(ours, ByteTokenizer(), quant="int8")


def test_int8_qwen2_with_biases_decodes_through_batch_alone_and_continuous(qwen2_int8):
    from llamaworks.infer.quantize import Int8Linear

    ours, llm = qwen2_int8
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.model.modules())
    assert any(isinstance(m, Int8Linear) for m in llm.model.modules())
    prompts = _prompts(seed=3)
    batch = _ids(llm.generate(prompts, GREEDY))
    assert all(len(ids) == NEW for ids in batch)
    assert batch == [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert _ids(_continuous(llm, prompts, [GREEDY] * len(prompts))) == batch
    # int8 weights of a float model: the first greedy token mostly agrees with float's
    ref = _ids(LLM(ours, ByteTokenizer()).generate(prompts, SamplingParams(max_tokens=1,
                                                                           ignore_eos=True)))
    assert sum(b[0] == r[0] for b, r in zip(batch, ref, strict=True)) >= len(prompts) - 1

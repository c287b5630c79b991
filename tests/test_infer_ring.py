"""Sliding layers' KV cache as a bounded ring (infer.kv.KVPool, model.KVCache(ring=...)): position
p in slot p % ring, slots masked by the position they hold. Checked against transformers' greedy
decoding on random tiny Mistral / Gemma 3 / Qwen2 checkpoints with a ring much shorter than the
sequence (window 6, ring 9: a prompt of 17 and 16 new tokens wrap it three times), through every
path that writes the cache: the fused step, the per-op forward, chunked prompts, padded batches,
the continuous engine, n samples sharing a prefill, the prefix cache and speculative decoding."""

from __future__ import annotations

import pytest
import torch
from infer_fixtures import ByteTokenizer
from test_infer_families import (
    BUDGETS,
    CASES,
    GREEDY,
    NEW,
    WINDOW,
    WINDOWED,
    _continuous,
    _hf_greedy,
    _hf_model,
    _ids,
    _prompts,
)

import llamaworks.infer.kv as kv_mod
from llamaworks import LLM, SamplingParams
from llamaworks.checkpoint import load_model
from llamaworks.infer.kv import PrefixCache
from llamaworks.model import KVCache, ring_mask

SLACK = 3  # ring = window + 3 = 9 slots; one forward feeds at most 4 tokens per row


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, directory it saved)."""
    out = {}
    for case in WINDOWED:
        hf = _hf_model(case)
        d = tmp_path_factory.mktemp(case)
        hf.save_pretrained(d)
        out[case] = hf, d
    return out


def _llm(d, monkeypatch, fused: bool = True, **kw) -> LLM:
    monkeypatch.setattr(kv_mod, "RING_SLACK", SLACK)
    llm = LLM(load_model(d).model, ByteTokenizer(), **kw)
    if not fused:
        llm.step.fused = None
    assert llm.engine.pool.ring == WINDOW + SLACK
    return llm


def test_ring_mask_is_the_window_of_the_positions_the_slots_hold():
    ring, window = 9, 6
    for q in range(40):
        held = [q - ((q - s) % ring) for s in range(ring)]  # latest position <= q in slot s
        want = torch.tensor([q - window < p <= q and p >= 0 for p in held])
        assert torch.equal(ring_mask(torch.tensor(q), ring, window), want), q


def test_sliding_layers_hold_ring_slots_and_global_layers_the_context(saved, monkeypatch):
    llm = _llm(saved["gemma3-local-global"][1], monkeypatch)
    cfg = llm.model.config
    pool = llm.engine.pool
    pool.reserve()
    c = pool.cache
    n_ring = sum(cfg.is_sliding(i) for i in range(cfg.n_layers))
    assert 0 < n_ring < cfg.n_layers  # local:global 1:1 in this checkpoint
    assert c.rk.shape == (n_ring, pool.rows, cfg.n_kv_heads, WINDOW + SLACK, cfg.head_dim)
    assert c.k.shape == (cfg.n_layers - n_ring, pool.rows, cfg.n_kv_heads, pool.context,
                         cfg.head_dim)
    per_slot = 2 * pool.rows * cfg.n_kv_heads * cfg.head_dim * 4
    want = per_slot * ((cfg.n_layers - n_ring) * pool.context + n_ring * (WINDOW + SLACK))
    assert pool.nbytes == pool.bytes_at(pool.rows, pool.context) == want
    # Mistral: every layer slides, nothing holds the full context
    mistral = _llm(saved["mistral-sliding"][1], monkeypatch).engine.pool
    assert mistral.cache.k.shape[0] == 0 and mistral.cache.rk.shape[0] == cfg.n_layers


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-op"])
@pytest.mark.parametrize("case", WINDOWED)
def test_ring_decoding_equals_transformers_past_several_wraps(case, fused, saved, monkeypatch):
    """Batched and alone, prompts fed in ring-sized pieces, then decoded past the window."""
    hf, d = saved[case]
    llm = _llm(d, monkeypatch, fused)
    prompts = _prompts()
    want = [_hf_greedy(hf, p) for p in prompts]
    assert _ids(llm.generate(prompts, GREEDY)) == want, case
    assert [llm.generate([p], GREEDY)[0].token_ids for p in prompts] == want, case


@pytest.mark.parametrize("case", WINDOWED)
def test_ring_continuous_engine_with_small_chunks_equals_llm_generate(case, saved, monkeypatch):
    """Rows joining and leaving, prompts entering two tokens per step beside decoding rows."""
    llm = _llm(saved[case][1], monkeypatch)
    prompts = _prompts(seed=2)
    want = _ids(llm.generate(prompts, BUDGETS))
    llm.engine.chunk = 2
    assert _ids(_continuous(llm, prompts, BUDGETS)) == want, case


def test_the_prefix_cache_with_rings_reuses_the_last_window_and_changes_no_token(
        saved, monkeypatch):
    hf, d = saved["gemma3-local-global"]
    llm = _llm(d, monkeypatch)
    llm.engine.chunk = 4
    llm.engine.prefix = PrefixCache(2**20, block=4)  # blocks shorter than the ring
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 96, (40,), generator=g).tolist()
    a, b = shared + [7, 8, 9], shared + [10, 11]
    first = llm.generate([a], GREEDY)[0]
    assert first.token_ids == _hf_greedy(hf, a)
    second = llm.generate([b], GREEDY)[0]
    assert second.num_cached_tokens == 40  # every block of the shared tokens
    assert second.token_ids == _hf_greedy(hf, b)
    # blocks the rings had lost when the reply was stored carry no ring keys; early ones are
    # still used (the global layers need them), the last window before the match end is whole
    kept = [parts[2] is not None for _, parts in llm.engine.prefix.blocks.values()]
    assert not all(kept) and any(kept)
    second = llm.generate([b], GREEDY)[0]
    assert second.num_cached_tokens == 40
    assert second.token_ids == _hf_greedy(hf, b)
    # a cache with the ring layers' keys cut out of the window: not used
    for key, (own, parts) in llm.engine.prefix.blocks.items():
        llm.engine.prefix.blocks[key] = (own, (*parts[:2], None, None))
    third = llm.generate([b], GREEDY)[0]
    assert third.num_cached_tokens == 0 and third.token_ids == second.token_ids


def test_n_samples_and_speculation_on_rings_equal_plain_greedy(saved, monkeypatch):
    from llamaworks.infer.speculative import NgramDrafter

    hf, d = saved["mistral-sliding"]
    prompt = _prompts(seed=4)[0]
    want = _hf_greedy(hf, prompt)
    llm = _llm(d, monkeypatch)
    outs = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=NEW, n=3,
                                                 ignore_eos=True))[0].outputs
    assert [o.token_ids for o in outs] == [want] * 3
    spec = _llm(d, monkeypatch, draft=NgramDrafter(k=3))
    assert spec.generate([prompt], GREEDY)[0].token_ids == want


def test_a_forward_longer_than_the_ring_allows_is_refused(saved, monkeypatch):
    llm = _llm(saved["mistral-sliding"][1], monkeypatch)
    cfg = llm.model.config
    cache = KVCache(cfg, 1, 32, per_row=True, ring=WINDOW + SLACK)
    with pytest.raises(ValueError, match="at most 4 at a time"):
        llm.model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache,
                  torch.ones(1, 1, 5, 32, dtype=torch.bool), 32)


def test_models_without_sliding_layers_or_short_contexts_keep_one_cache(monkeypatch, saved):
    monkeypatch.setattr(kv_mod, "RING_SLACK", 100)  # ring 106 > context 64: no ring
    llm = LLM(load_model(saved["mistral-sliding"][1]).model, ByteTokenizer())
    assert llm.engine.pool.ring == 0 and llm.engine.pool.cache.rk is None
    assert "qwen2-bias" in CASES  # (no window at all: see test_infer_families)

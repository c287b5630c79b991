"""The engine's scheduling: prompts entering in chunks beside decoding rows, the prefix cache
(reuse, its memory budget, LRU eviction), and that neither changes an output token."""

from __future__ import annotations

import queue

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.infer.continuous import ContinuousEngine, Event
from llamaworks.infer.engine import Engine
from llamaworks.infer.kv import KVPool, PrefixCache
from llamaworks.infer.speculative import NgramDrafter

SYSTEM = "You are a careful assistant. Answer briefly and check your arithmetic. " * 3
PROMPTS = [SYSTEM + q for q in ("2+2?", "what is 17*23?", "name a prime", "x")]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=512)


def _run(engine: Engine, prompts: list[str], params: SamplingParams = GREEDY) -> list[list[int]]:
    tok = ByteTokenizer()
    groups = [engine.sequences(tok.encode(p), params) for p in prompts]
    engine.run(groups)
    return [[s.ids for s in g] for g in groups]


@pytest.mark.slow
def test_chunked_prefill_changes_no_output_token(model):
    want = _run(Engine(model, ByteTokenizer(), cache_mb=0), PROMPTS)
    for chunk in (1, 7, 64):
        assert _run(Engine(model, ByteTokenizer(), cache_mb=0, chunk=chunk), PROMPTS) == want


def test_a_long_prompt_enters_in_chunks_while_running_rows_decode_every_step(model):
    """Four rows decoding; a 400-token prompt joins: it takes many steps, and in every one of them
    each running row gets its next token (the prefill never stalls them)."""
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=5, chunk=32, cache_mb=0)
    runners = [engine.sequences(tok.encode(f"row {i}"), SamplingParams(max_tokens=40,
                                                                       ignore_eos=True))
               for i in range(4)]
    for g in runners:
        engine.add(g)
    while any(not g[0].ids for g in runners):
        engine.step()
    (long,) = late = engine.sequences(tok.encode("z" * 400), GREEDY)
    engine.add(late)
    steps = 0
    while not long.ids:
        before = [len(g[0].ids) for g in runners]
        engine.step()
        steps += 1
        assert [len(g[0].ids) for g in runners] == [b + 1 for b in before]
    assert steps >= 400 // 32
    ref = LLM(model, tok).generate(["z" * 400], GREEDY)[0].token_ids
    while not long.finish:
        engine.step()
    assert long.ids == ref


def test_the_adaptive_chunk_budget_follows_the_measured_step_costs(model):
    engine = Engine(model, ByteTokenizer(), chunk=512, max_gap=3.0)
    assert engine._budget(decoding=True, mixed=True) == 8  # nothing measured yet: start small
    engine._decode_s, engine._mixed_s, engine._token_s = 0.010, 0.002, 0.0005
    assert engine._budget(decoding=True, mixed=True) == 10  # (3 - 1) x 10 ms of 2 ms rows
    assert engine._budget(decoding=True, mixed=False) == 40  # of 0.5 ms eager prompt tokens
    assert engine._budget(decoding=False, mixed=False) == 512  # nothing to stall: everything
    engine._mixed_s = 1e-5
    assert engine._budget(decoding=True, mixed=True) == 512  # more than MIX_MAX: an eager chunk


def test_prompt_tokens_riding_in_the_fused_step_give_the_eager_keys_and_values(model):
    """A prompt chunk fed as rows of the fused step (sharing one cache row) writes the cache the
    eager forward writes, and its last row's logits are the eager ones."""
    from llamaworks.infer.step import Step

    step = Step(model)
    if step.fused is None:
        pytest.fail("the fused step must build on the test machines")
    ids = ByteTokenizer().encode("a prompt of some length")
    pools = [KVPool(model, 2, 512), KVPool(model, 2, 512)]
    want = step.extend(pools[0], [1], [ids], [0])[0][-1]
    n = len(ids)
    got = step.mixed(pools[1], torch.tensor(ids), torch.arange(n), torch.ones(n, dtype=torch.long),
                     torch.tensor([n - 1]))[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pools[1].cache.k[:, 1, :, :n], pools[0].cache.k[:, 1, :, :n],
                               atol=1e-4, rtol=1e-4)
    assert pools[1].cache.k[:, 0].abs().sum() == 0  # the other row untouched


def test_the_prefix_cache_reuses_a_shared_system_prompt_and_changes_no_token(model):
    plain = _run(Engine(model, ByteTokenizer(), cache_mb=0), PROMPTS)
    engine = Engine(model, ByteTokenizer(), cache_mb=64)
    tok = ByteTokenizer()
    groups = [engine.sequences(tok.encode(p), GREEDY) for p in PROMPTS]
    engine.run(groups)
    assert [[s.ids for s in g] for g in groups] == plain
    shared = len(tok.encode(SYSTEM))
    block = engine.prefix.block
    assert groups[0][0].cached_prefix == 0  # the first computes it
    for g in groups[1:]:  # the others copy its full blocks (computed earlier in the same step)
        assert g[0].cached_prefix == (shared // block) * block
    # a repeat of a whole request reuses everything but the last prompt token's block
    again = engine.sequences(tok.encode(PROMPTS[1]), GREEDY)
    engine.run([again])
    n = len(tok.encode(PROMPTS[1]))
    assert again[0].cached_prefix == ((n - 1) // block) * block and again[0].ids == plain[1][0]


def test_a_finished_reply_is_cached_for_the_next_turn(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok, cache_mb=64)
    (first,) = g = engine.sequences(tok.encode(SYSTEM + "hi"), SamplingParams(max_tokens=40,
                                                                               ignore_eos=True))
    engine.run([g])
    turn2 = first.tokens + tok.encode(" and then?")
    (second,) = g2 = engine.sequences(turn2, GREEDY)
    engine.run([g2])
    block = engine.prefix.block
    assert second.cached_prefix == (len(first.tokens) - 1) // block * block > len(first.prompt_ids)
    assert second.ids == LLM(model, tok, cache_mb=0).generate([turn2], GREEDY)[0].token_ids


def _filled_pool(model, tokens: list[int]) -> KVPool:
    pool = KVPool(model, 1, 512)
    pool.cache.k[:, 0, :, :len(tokens)] = torch.randn_like(pool.cache.k[:, 0, :, :len(tokens)])
    return pool


def test_the_prefix_cache_stays_within_its_budget_and_evicts_least_recently_used(model):
    block = 8
    per_block = 2 * model.config.n_layers * model.config.n_kv_heads * block * \
        model.config.head_dim * 4
    cache = PrefixCache(budget_bytes=3 * per_block, block=block)
    a, b, c = ([i] * 16 for i in (1, 2, 3))  # two blocks each
    for seq in (a, b):
        cache.insert(seq, _filled_pool(model, seq), 0, 0, 16)
    # b's second block evicted the least recently used one: a's second (a chain's later blocks
    # go before its earlier ones, so no stored block ever lacks its prefix)
    assert len(cache.blocks) == 3 and cache.used <= cache.budget and cache.evictions == 1
    assert len(cache.match(a, 16)) == 1 and len(cache.match(b, 16)) == 2
    assert len(cache.match(a, 16)) == 1  # a is now the most recently used
    cache.insert(c, _filled_pool(model, c), 0, 0, 16)
    assert cache.used <= cache.budget and cache.evictions == 3
    assert len(cache.match(b, 16)) == 0  # b (least recently used) went
    assert len(cache.match(c, 16)) == 2 and len(cache.match(a, 16)) == 1


def test_cached_blocks_hold_the_keys_and_values_a_fresh_prefill_computes(model):
    tok = ByteTokenizer()
    ids = tok.encode(SYSTEM)
    fresh = Engine(model, tok, cache_mb=0)
    fresh.run([fresh.sequences(ids, SamplingParams(max_tokens=1))])
    cached = Engine(model, tok, cache_mb=64)
    cached.run([cached.sequences(ids, SamplingParams(max_tokens=1))])
    blocks = cached.prefix.match(ids, len(ids))
    assert blocks
    ref = KVPool(model, 1, 512)
    Engine(model, tok).step_fn.extend(ref, [0], [ids], [0])
    for b, (k, v) in enumerate(blocks):
        lo = b * cached.prefix.block
        torch.testing.assert_close(k, ref.cache.k[:, 0, :, lo:lo + cached.prefix.block])
        torch.testing.assert_close(v, ref.cache.v[:, 0, :, lo:lo + cached.prefix.block])


def test_continuous_engine_reports_cached_tokens_and_matches_llm(model):
    tok = ByteTokenizer()
    llm = LLM(model, tok, cache_mb=0)
    eng = ContinuousEngine(llm, max_batch=2, cache_mb=64).start()
    try:
        first = eng.generate([PROMPTS[0]], GREEDY)[0]
        second = eng.generate([PROMPTS[1]], GREEDY)[0]
    finally:
        eng.shutdown()
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 32
    assert [first.token_ids, second.token_ids] == [
        r.token_ids for r in llm.generate(PROMPTS[:2], GREEDY)]


def test_n_samples_share_one_prefill_and_a_cancel_frees_every_row(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=3)
    p = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=50, ignore_eos=True)
    group = engine.sequences(tok.encode("sample me"), p)
    engine.add(group)
    engine.step()
    assert all(len(s.ids) == 1 for s in group) and not engine.pool.free
    engine.abort(group)
    assert sorted(engine.pool.free) == [0, 1, 2] and not engine.has_work
    assert all(s.finish == "cancelled" for s in group)


def test_speculative_serving_gives_the_plain_greedy_stream():
    model = tiny_model()
    tok = ByteTokenizer()
    llm = LLM(model, tok)
    prompts = ["abcabcabcabc", "hello hello hello", "xyz"]
    want = [r.token_ids for r in llm.generate(prompts, GREEDY)]
    eng = ContinuousEngine(llm, max_batch=2, drafter=NgramDrafter(k=3)).start()
    done: queue.Queue[Event] = queue.Queue()
    try:
        reqs = [eng.submit(p, GREEDY, lambda ev: ev.done and done.put(ev)) for p in prompts]
        for _ in reqs:
            assert done.get(timeout=60).error is None
    finally:
        eng.shutdown()
    assert [r.result.token_ids for r in reqs] == want
    assert sum(s.proposed for r in reqs for s in r.seqs) > 0  # drafts were verified


@pytest.mark.parametrize("chunk", [4, 8])
def test_n_samples_start_when_a_chunk_leaves_only_the_last_prompt_token(model, chunk):
    """A 9-token prompt in chunks of 4 or 8 ends with one token, decoded as the first reply
    step: its n siblings must start from it too (they used to wait forever)."""
    tok = ByteTokenizer()
    prompt = tok.encode("abcdefghi")
    assert len(prompt) == 9
    p = SamplingParams(temperature=0.0, n=3, max_tokens=5, ignore_eos=True)
    engine = Engine(model, tok, max_batch=3, chunk=chunk, cache_mb=0)
    group = engine.sequences(prompt, p)
    engine.run([group])
    want = _run(Engine(model, tok, cache_mb=0), ["abcdefghi"], p)[0]
    assert [s.ids for s in group] == want and all(len(ids) == 5 for ids in want)

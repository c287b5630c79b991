"""The fused C++ decode step (infer.fused, kernels/decode.cpp): its logits against transformers on
the real SmolLM2, against the model's own per-op forward for every weight format, with padded
batches and per-row caches; unsupported models fall back to the per-op forward."""

from __future__ import annotations

import copy

import pytest
import torch
from infer_fixtures import ByteTokenizer, decode_logits, tiny_model
from torch import nn

from llamaworks import LLM, SamplingParams
from llamaworks.infer import kernels
from llamaworks.infer.fused import FusedDecoder
from llamaworks.infer.quantize import Int4Linear, Int8Linear, quantize_model
from llamaworks.model import KVCache


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert kernels.load(), "the kernels must build on the test machines (gcc is installed)"


@pytest.fixture(params=kernels.host_tiers())
def tier(request):
    """Each kernel tier this CPU runs (avx512, avx2, scalar): models built in the test use it."""
    with kernels.using(request.param):
        yield request.param


def _dequantized(quantized: nn.Module, base: nn.Module) -> nn.Module:
    """`base` with every linear replaced by the float32 weights `quantized` actually uses."""
    ref = copy.deepcopy(base)
    for name, mod in quantized.named_modules():
        if isinstance(mod, (Int4Linear, Int8Linear)):
            ref.get_submodule(name.replace(".inner", "")).weight = nn.Parameter(mod.dequantize())
    return ref


def test_fused_fp32_step_equals_the_per_op_forward_on_a_padded_batch(tier):
    model = tiny_model()
    fused, eager = decode_logits(model, True), decode_logits(model, False)
    assert fused.abs().max() > 1  # sharp random logits: a wrong layer would show
    torch.testing.assert_close(fused, eager, atol=5e-5, rtol=1e-5)


def test_fused_bf16_weights_are_exact_bf16_dots_in_float32(tier):
    """bf16 weights times float32 activations accumulated in float32: one decode step equals the
    float32 model with the same bf16-rounded weights, from the same cache (the per-op BF16Linear
    also rounds activations, so it is looser). Compared on each row's 8 most likely tokens: the
    head recomputes its top 32 logits exactly, the rest are bf16 matmul outputs."""
    base = tiny_model()
    rounded = copy.deepcopy(base)
    for m in rounded.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.bfloat16().float()
    fused = FusedDecoder.build(quantize_model(base, "bf16"))
    assert fused is not None and fused.tier == tier
    prompt = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.inference_mode():
        cache = KVCache(base.config, 1, 16)
        rounded(prompt, cache=cache)
        k, v = cache.k.clone(), cache.v.clone()
        ref = rounded(torch.tensor([[42]]), torch.tensor([6]), cache)[:, -1]
        got = fused(torch.tensor([42]), torch.tensor([6]), torch.tensor([6]), (k, v),
                    torch.ones(1, 7, dtype=torch.bool))
    top = ref.topk(8, -1).indices
    torch.testing.assert_close(got.gather(-1, top), ref.gather(-1, top), atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(k, cache.k)  # the new key/value written at slot 6
    torch.testing.assert_close(v, cache.v)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_block_kernels_are_as_close_to_the_dequantized_weights_as_the_per_op_path(
        mode, tier):
    base = tiny_model(hidden_dim=192)  # block formats need input sizes divisible by 32
    q = quantize_model(base, mode)
    assert q.model.layers[0].mlp.up_proj.tier == tier
    ref = decode_logits(_dequantized(q, base), False)
    fused_err = (decode_logits(q, True) - ref).abs().max()
    eager_err = (decode_logits(q, False) - ref).abs().max()
    # both round activations to int16 blocks; only float summation order differs
    assert fused_err < 1e-2 and fused_err <= 2 * eager_err + 1e-5


def test_per_row_cache_positions_equal_each_row_decoded_alone(tier):
    """Continuous batching: rows at different positions of a per-row cache (a view of the first
    3 rows of a 5-row pool, as the engine passes it), two steps in one call each, equal each row
    run through the model's forward on its own cache, and write the same keys and values."""
    model = tiny_model()
    cfg = model.config
    fused = FusedDecoder.build(model)
    assert fused is not None
    prompts = [[1, 7, 8, 9, 10, 11, 12], [1, 40], [1, 50, 51, 52]]
    pool = KVCache(cfg, 5, 32, per_row=True)
    caches, alone, got = [], [], []
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            c = KVCache(cfg, 1, 32)
            model(torch.tensor([p]), cache=c)
            pool.k[:, r, :, :len(p)] = c.k[:, 0, :, :len(p)]
            pool.v[:, r, :, :len(p)] = c.v[:, 0, :, :len(p)]
            caches.append(c)
        pos = torch.tensor([len(p) for p in prompts])
        for step in range(2):
            toks = torch.tensor([60 + r + step for r in range(3)])
            alone.append(torch.stack([
                model(toks[r].view(1, 1), pos[r].view(1) + step, caches[r])[0, -1]
                for r in range(3)]))
            p = pos + step
            mask = torch.arange(int(p.max()) + 1)[None, :] <= p[:, None]
            got.append(fused(toks, p, p, (pool.k[:, :3], pool.v[:, :3]), mask))
    torch.testing.assert_close(torch.stack(got), torch.stack(alone), atol=5e-5, rtol=1e-5)
    for r, p in enumerate(prompts):
        n = len(p) + 2
        torch.testing.assert_close(pool.k[:, r, :, :n], caches[r].k[:, 0, :, :n])
        torch.testing.assert_close(pool.v[:, r, :, :n], caches[r].v[:, 0, :, :n])
    assert pool.k[:, 3:].abs().sum() == 0  # rows outside the view untouched


def test_unsupported_models_fall_back_to_the_per_op_forward(monkeypatch):
    from llamaworks.posttrain.lora import LoraConfig, apply_lora

    lora = apply_lora(tiny_model(), LoraConfig(r=4))
    assert FusedDecoder.build(lora) is None
    with kernels.disabled():  # PyTorch's packed int4 layout
        assert FusedDecoder.build(quantize_model(tiny_model(), "int4")) is None
    assert FusedDecoder.build(tiny_model().to(torch.bfloat16)) is None
    monkeypatch.setenv("LLAMAWORKS_NO_FUSED", "1")
    llm = LLM(tiny_model(), ByteTokenizer())
    assert llm.step.fused is None
    monkeypatch.delenv("LLAMAWORKS_NO_FUSED")
    fused_llm = LLM(tiny_model(), ByteTokenizer())
    assert fused_llm.step.fused is not None
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    assert llm.generate("hello", p)[0].token_ids == fused_llm.generate("hello", p)[0].token_ids


def test_bad_shapes_get_a_clear_error():
    model = tiny_model()
    fused = FusedDecoder.build(model)
    cache = KVCache(model.config, 1, 16)
    with pytest.raises(RuntimeError, match="mask longer than layer 0"):
        fused(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), cache,
              torch.ones(1, 40, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="write position 99 out of range"):
        fused(torch.tensor([5]), torch.tensor([0]), torch.tensor([99]), cache,
              torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.slow
def test_fused_smollm_decode_logits_match_transformers(smollm, smollm_tokenizer, hf_smollm):
    """Real reference: each fused decode step's log-probabilities equal transformers' full forward
    over the same tokens."""
    llm = LLM(smollm, smollm_tokenizer)
    assert llm.step.fused is not None
    ids = smollm_tokenizer.encode("The capital of France is", bos=None)
    out = llm.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=5))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smollm(torch.tensor([ids + out.token_ids])).logits[0].float(),
                                -1)
    for i, entry in enumerate(out.logprobs):
        for tok, lp in entry.items():
            assert abs(lp - float(ref[len(ids) - 1 + i, tok])) < 2e-4, (i, tok)

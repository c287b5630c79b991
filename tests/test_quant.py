"""Weight-only quantization: each packed kernel computes x @ dequantized(W).T, swaps happen from
outside the model, and SmolLM2's perplexity on held-out English stays within 1% (int8) and 5%
(int4) of fp32."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model
from torch import nn

from llamaworks import LLM, SamplingParams
from llamaworks.infer.quantize import (
    BF16Linear,
    Int4Linear,
    Int8Linear,
    int4_group_size,
    quantize_model,
    weight_bytes,
)

HELDOUT = Path(__file__).parent / "data" / "heldout_english.txt"


def _linear(out_f: int = 96, in_f: int = 256, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)))
    return lin


@pytest.mark.parametrize("make", [Int8Linear, lambda lin: Int4Linear(lin, 32),
                                  lambda lin: Int4Linear(lin, 64),
                                  lambda lin: Int4Linear(lin, 128)])
def test_packed_kernel_equals_matmul_with_the_dequantized_weight(make):
    q = make(_linear())
    x = torch.randn(5, 256)
    ref = x.bfloat16().float() @ q.dequantize().T
    assert torch.allclose(q(x), ref, atol=0.05 * ref.abs().max().item() / 10)
    assert q(x[None]).shape == (1, 5, 96)  # any leading dims


def test_quantization_error_is_bounded_by_half_a_step():
    """Half a grid step, plus the rounding of the bf16 scales/zeros the kernels take."""
    lin = _linear()
    w = lin.weight.detach()
    bf16_slack = w.abs().amax(1, keepdim=True) * 2**-7
    err8 = (Int8Linear(lin).dequantize() - w).abs()
    assert (err8 <= w.abs().amax(1, keepdim=True) / 127 / 2 + bf16_slack).all()
    errs = {}
    for g in (32, 64, 128):
        wg = w.reshape(96, -1, g)
        step = (wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 15
        err = (Int4Linear(lin, g).dequantize() - w).reshape(96, -1, g).abs()
        assert (err <= step / 2 + bf16_slack[:, :, None]).all()
        errs[g] = err.mean().item()
    assert errs[32] < errs[64] < errs[128]  # smaller groups, finer grids


def test_int4_group_size_falls_back_to_one_that_divides_the_input_dim():
    assert int4_group_size(576, 128) == 64 and int4_group_size(1536, 128) == 128
    assert int4_group_size(576, 32) == 32
    with pytest.raises(ValueError, match="divisible by 32"):
        int4_group_size(100, 32)


@pytest.mark.parametrize("mode,cls", [("bf16", BF16Linear), ("int8", Int8Linear),
                                      ("int4", Int4Linear)])
def test_quantize_model_swaps_every_linear_on_a_copy(mode, cls):
    model = tiny_model()
    q = quantize_model(model, mode)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert sum(isinstance(m, cls) for m in q.modules()) >= 10
    assert all(isinstance(m, nn.Linear) for m in (model.lm_head, model.model.layers[0].mlp.up_proj))
    assert weight_bytes(q) < weight_bytes(model)


def test_int4_uses_int8_for_the_output_head_unless_asked_and_for_unaligned_inputs():
    q = quantize_model(tiny_model(), "int4")  # tiny's ffn is 176 wide: not a multiple of 32
    assert isinstance(q.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(q.model.layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(q.lm_head.inner, Int8Linear)
    q = quantize_model(tiny_model(vocab_size=512), "int4", head_int8=False)
    assert isinstance(q.lm_head.inner, Int4Linear)


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_head_recomputes_the_top_logits_in_float32_from_the_quantized_weights(mode):
    q = quantize_model(tiny_model(vocab_size=512), mode, head_int8=False)
    head = q.lm_head
    x = torch.randn(3, 64)
    y = head(x)
    fast = head.inner(x).float()
    full = x @ (head.inner.dequantize() if mode != "bf16" else head.inner.weight.float()).T
    top = fast.topk(head.k).indices
    assert torch.allclose(y.gather(-1, top), full.gather(-1, top), atol=1e-4)
    rest = torch.ones_like(y, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(y[rest], fast[rest])  # the tail keeps the kernel's values


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="bf16, int8, int4"):
        quantize_model(tiny_model(), "int3")


def test_bf16_greedy_equals_fp32_greedy_on_a_tiny_model():
    model = tiny_model()
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = LLM(model, ByteTokenizer()).generate("hello", p)[0].token_ids
    assert LLM(model, ByteTokenizer(), quant="bf16").generate("hello", p)[0].token_ids == ref


def _perplexity(model: nn.Module, ids: list[int]) -> float:
    from llamaworks.cli import score_ids

    nll = score_ids(model, ids)
    return math.exp(sum(nll) / len(nll))


@pytest.mark.slow
def test_smollm_quantized_perplexity_stays_close_to_fp32(smollm, smollm_tokenizer):
    ids = smollm_tokenizer.encode(HELDOUT.read_text(encoding="utf-8"), bos=False)
    assert len(ids) > 500
    base = _perplexity(smollm, ids)
    assert 5 < base < 100  # sane English perplexity for a 135M model
    for mode, tol in (("bf16", 0.01), ("int8", 0.01), ("int4", 0.05)):
        ppl = _perplexity(quantize_model(smollm, mode, group_size=32), ids)
        assert abs(ppl / base - 1) < tol, (mode, ppl, base)

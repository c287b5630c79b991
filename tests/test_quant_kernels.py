"""Our C++ Q4_1/Q8_0 dequantize-matvec kernels (llamaworks.infer.kernels) and the int4/int8 swaps
that use them: the kernels against a float64 matmul with the dequantized weights, packing that
recovers llama.cpp's own GGUF blocks bit for bit, logits against llama.cpp on the same Q4_1 file,
perplexity against fp32, torch.compile treating the ops as opaque, and the fallback when the build
fails."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.infer import kernels
from llamaworks.infer.quantize import Int4Linear, Int8Linear, quantize_model

HELDOUT = Path(__file__).parent / "data" / "heldout_english.txt"
FORMATS = {"q4_1": (kernels.pack_q4_1, kernels.unpack_q4_1, kernels.q4_1_linear),
           "q8_0": (kernels.pack_q8_0, kernels.unpack_q8_0, kernels.q8_0_linear)}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert kernels.load(), "the kernels must build on the test machines (gcc is installed)"


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + torch.randn(n, 1, generator=g) * 0.01


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(96, 576), (48, 32), (40, 96), (17, 1536), (24, 160), (20, 608),
                                 (12, 480), (8, 224)],
                         ids=["even-blocks", "one-block", "odd-blocks", "long-rows",
                              "group-of-4-and-1", "chunks-then-2-and-1", "group-of-4-and-2-and-1",
                              "seven-blocks"])
@pytest.mark.slow
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)], ids=["decode", "batch", "3d"])
def test_kernel_equals_float64_matmul_with_the_dequantized_weight(tier, fmt, n, k, lead):
    pack, unpack, linear = FORMATS[fmt]
    blocks = pack(_weights(n, k))
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1))
    y = linear(x, blocks, tier)
    ref = (x.double() @ unpack(blocks).double().T).float()
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    # int16 activations: error ~1e-5 of the output scale (int8 ones, as llama.cpp's, are ~1e-2)
    torch.testing.assert_close(y, ref, atol=2e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_keeps_bf16_activations_bf16(fmt):
    pack, unpack, linear = FORMATS[fmt]
    blocks = pack(_weights(64, 128))
    x = torch.randn(3, 128).bfloat16()
    y = linear(x, blocks)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ unpack(blocks).double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_packing_is_llama_cpp_quantization_and_round_trips():
    w = _weights(32, 64)
    wq = kernels.unpack_q4_1(kernels.pack_q4_1(w)).reshape(32, 2, 32)
    wb = w.reshape(32, 2, 32)
    step = (wb.amax(-1, keepdim=True) - wb.amin(-1, keepdim=True)) / 15
    assert ((wq - wb).abs() <= step / 2 * 1.01 + 1e-6).all()  # half a step (fp16 scales)
    w8 = kernels.unpack_q8_0(kernels.pack_q8_0(w)).reshape(32, 2, 32)
    assert ((w8 - wb).abs() <= wb.abs().amax(-1, keepdim=True) / 127 / 2 * 1.01).all()
    for fmt in FORMATS:  # packing dequantized blocks gives back the same bytes
        pack, unpack, _ = FORMATS[fmt]
        blocks = pack(w)
        assert torch.equal(pack(unpack(blocks)), blocks)


def test_quantized_linears_use_the_kernels_and_dequantize_consistently():
    q = quantize_model(tiny_model(vocab_size=512), "int4", head_int8=True)
    up, head = q.model.layers[0].mlp.up_proj, q.lm_head.inner
    assert isinstance(up, Int4Linear) and up.blocks is not None
    assert isinstance(head, Int8Linear) and head.blocks is not None
    x = torch.randn(2, 64)
    ref = x @ up.dequantize().T
    torch.testing.assert_close(up(x), ref, atol=2e-4 * ref.abs().max().item(), rtol=0)
    idx = torch.tensor([[3, 1], [0, 7]])
    assert torch.equal(up.rows(idx), up.dequantize()[idx])
    assert torch.equal(head.rows(idx), head.dequantize()[idx])


@pytest.mark.slow
def test_custom_ops_trace_as_opaque_calls_under_torch_compile():
    blocks4, blocks8 = kernels.pack_q4_1(_weights(64, 96)), kernels.pack_q8_0(_weights(32, 64))

    def f(x: torch.Tensor) -> torch.Tensor:
        return kernels.q8_0_linear(torch.nn.functional.silu(kernels.q4_1_linear(x, blocks4)),
                                   blocks8)

    x = torch.randn(1, 2, 96)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # no graph break allowed
    torch.testing.assert_close(compiled(x), f(x))


def test_failed_build_warns_and_falls_back_to_pytorch_kernels(monkeypatch):
    def broken(tier: str) -> None:
        raise OSError("no compiler")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not build .*no compiler"):
        assert not kernels.load()
    model = tiny_model()
    q = quantize_model(model, "int4")
    up = q.model.layers[0].mlp.up_proj
    assert isinstance(up, Int4Linear) and up.blocks is None  # PyTorch's packed int4 format
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    out = LLM(q, ByteTokenizer()).generate("hello", p)[0]
    assert len(out.token_ids) == 8


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLAMAWORKS_NO_KERNELS", "1")
    assert not kernels.load()
    assert quantize_model(tiny_model(), "int8").model.layers[0].mlp.up_proj.blocks is None


def test_int4_greedy_decoding_matches_its_dequantized_fp32_model_on_a_tiny_model():
    q = quantize_model(tiny_model(), "int4")
    deq = tiny_model()  # the same model with the int4 weights in float32
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, (Int4Linear, Int8Linear)):
                deq.get_submodule(name.removesuffix(".inner")).weight.copy_(mod.dequantize())
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    tok = ByteTokenizer()
    assert (LLM(q, tok).generate("hello", p)[0].token_ids
            == LLM(deq, tok).generate("hello", p)[0].token_ids)


# -- the real Q4_1 GGUF ----------------------------------------------------------------------------
def _gguf_rows(reader, name: str) -> tuple[str, torch.Tensor]:
    """A GGUF tensor's raw blocks regrouped into our packed rows (no dequantization)."""
    t = next(t for t in reader.tensors if t.name == name)
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(int(t.shape[-1]), -1).copy())
    size = {"Q4_1": 20, "Q8_0": 34}[t.tensor_type.name]
    b = raw.reshape(raw.shape[0], -1, size)
    if size == 20:  # block: fp16 d, fp16 m, 16 nibble bytes
        rows = [b[..., 4:].flatten(1), b[..., 0:2].flatten(1), b[..., 2:4].flatten(1)]
    else:  # block: fp16 d, 32 int8
        rows = [b[..., 2:].flatten(1), b[..., 0:2].flatten(1)]
    return t.tensor_type.name, torch.cat(rows, 1)


@pytest.mark.slow
def test_requantizing_the_gguf_model_recovers_llama_cpp_blocks_bit_for_bit(smollm, smollm_gguf):
    import gguf

    reader = gguf.GGUFReader(str(smollm_gguf))
    q = quantize_model(smollm, "int4")
    pairs = {"token_embd.weight": q.lm_head.inner}
    for i in (0, 17, 29):
        layer = q.model.layers[i]
        pairs |= {f"blk.{i}.ffn_down.weight": layer.mlp.down_proj,
                  f"blk.{i}.ffn_gate.weight": layer.mlp.gate_proj,
                  f"blk.{i}.attn_v.weight": layer.self_attn.v_proj,
                  f"blk.{i}.attn_output.weight": layer.self_attn.o_proj}
    for name, mod in pairs.items():
        kind, rows = _gguf_rows(reader, name)
        assert kind == ("Q8_0" if name.startswith("token_embd") else "Q4_1")
        assert torch.equal(mod.blocks, rows), name


@pytest.mark.slow
def test_int4_logits_match_llama_cpp_on_the_same_q4_1_file(smollm, smollm_tokenizer, smollm_gguf,
                                                           llama_cpp):
    ids = smollm_tokenizer.encode("The history of the printing press begins in", bos=None)
    cpp = llama_cpp.Llama(model_path=str(smollm_gguf), logits_all=True, n_ctx=64, n_threads=2,
                          verbose=False)
    cpp.eval(ids)
    want = torch.from_numpy(np.array(cpp.scores[: len(ids)], dtype=np.float32))
    cpp.close()
    q = quantize_model(smollm, "int4")
    with torch.no_grad():
        got = q(torch.tensor([ids]))[0].float()
        full = smollm(torch.tensor([ids]))[0].float()
    # llama.cpp rounds activations to int8 per block, we to int16: logits differ by that, not
    # by the weights (ours equal the fp32 model's, which reads the same blocks dequantized).
    assert (got - full).abs().max() < 0.05
    assert (got - want).abs().max() < 1.0
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    top = want.topk(5, -1).indices
    assert (got.gather(-1, top) - want.gather(-1, top)).abs().max() < 0.5


def _perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


@pytest.mark.slow
def test_int4_and_int8_kernel_perplexity_within_5_and_1_percent_of_fp32(smollm, smollm_tokenizer):
    ids = smollm_tokenizer.encode(HELDOUT.read_text(encoding="utf-8"), bos=False)[:384]
    base = _perplexity(smollm, ids)
    assert 5 < base < 100
    for mode, tol in (("int8", 0.01), ("int4", 0.05)):
        q = quantize_model(smollm, mode)
        assert q.model.layers[0].mlp.up_proj.blocks is not None
        ppl = _perplexity(q, ids)
        assert abs(ppl / base - 1) < tol, (mode, ppl, base)


def test_fused_projections_give_the_same_outputs_as_separate_ones():
    model = tiny_model()
    fused, plain = quantize_model(model, "int4"), quantize_model(model, "int4", fuse=False)
    attn, ref = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused is not None
    assert fused.model.layers[1].mlp.gate_proj.fused is fused.model.layers[1].mlp.up_proj.fused
    x, other = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attn, name)(x), getattr(ref, name)(x))
    assert torch.equal(attn.k_proj(other), ref.k_proj(other))  # a new input is recomputed
    assert torch.equal(attn.q_proj(x), ref.q_proj(x))
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    tok = ByteTokenizer()
    assert (LLM(fused, tok).generate("hello", p)[0].token_ids
            == LLM(plain, tok).generate("hello", p)[0].token_ids)


def test_a_copy_of_a_fused_model_owns_its_weights():
    import copy

    q = quantize_model(tiny_model(), "int4")
    c = copy.deepcopy(q)
    a, b = q.model.layers[0].self_attn, c.model.layers[0].self_attn
    assert b.k_proj.fused is b.q_proj.fused is not a.q_proj.fused
    assert b.k_proj.blocks.untyped_storage().data_ptr() == b.q_proj.fused.blocks.data_ptr()
    c.model.layers[0].self_attn.k_proj.fused.blocks.zero_()
    assert a.k_proj.blocks.any() and not b.k_proj.blocks.any()


def test_every_tier_this_cpu_runs_builds_and_says_its_instruction_set():
    names = {"avx512": ("avx512", "avx512vnni"), "avx2": ("avx2", "avx2vnni"),
             "scalar": ("scalar",)}
    assert kernels.host_tiers()[-1] == "scalar"
    for tier in kernels.host_tiers():
        assert kernels.build(tier), tier
        assert kernels.isa(tier) in names[tier]


def test_the_best_tier_runs_by_default_and_llamaworks_isa_forces_one(monkeypatch):
    monkeypatch.setattr(kernels, "_state", dict(kernels._state, active=None))
    del kernels._state["active"]
    monkeypatch.delenv("LLAMAWORKS_ISA", raising=False)
    assert kernels.tier() == kernels.host_tiers()[0]
    for forced in kernels.host_tiers():
        monkeypatch.setenv("LLAMAWORKS_ISA", forced)
        del kernels._state["active"]
        assert kernels.tier() == forced
        layer = quantize_model(tiny_model(), "int4").model.layers[0].mlp.up_proj
        assert layer.tier == forced  # the layer runs the tier it was built on
    monkeypatch.setenv("LLAMAWORKS_ISA", "sse9")
    del kernels._state["active"]
    with pytest.raises(ValueError, match="LLAMAWORKS_ISA='sse9': choose one of avx512, avx2"):
        kernels.load()


def test_a_tier_the_cpu_cannot_run_warns_and_the_next_tier_down_runs(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"built": dict(kernels._state.get("built", {}))})
    monkeypatch.setattr(kernels, "host_tiers", lambda: ["avx2", "scalar"])
    monkeypatch.setenv("LLAMAWORKS_ISA", "avx512")
    with pytest.warns(RuntimeWarning, match="cannot run the avx512 kernels"):
        assert kernels.tier() == "avx2"


@pytest.mark.skipif(len(kernels.host_tiers()) < 2, reason="this CPU runs only the portable tier")
def test_a_tier_that_fails_to_build_warns_naming_it_and_the_next_tier_runs(monkeypatch):
    real = kernels._build
    top = kernels.host_tiers()[0]

    def flaky(tier: str) -> None:
        if tier == top:
            raise OSError("assembler rejected vpdpwssd")
        real(tier)

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", flaky)
    monkeypatch.delenv("LLAMAWORKS_ISA", raising=False)
    with pytest.warns(RuntimeWarning, match=f"could not build llamaworks' {top} CPU kernels"):
        assert kernels.load()
    assert kernels.tier() == kernels.host_tiers()[1]


# -- the other GGUF types, kept in their own blocks (ggml_types.h) -----------------------------
GGML_SIZES = {"F16": (1, 2), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q5_1": (32, 24),
              "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
GGML_FP16_FIELDS = {"Q4_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
                    "Q6_K": [208]}


def ggml_blocks(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random valid block rows of a GGUF type: random quant bits, sane fp16 scales (gguf-py can
    quantize none of the K-quants, and random bits exercise every bit of the formats)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_SIZES[type_name]
    if type_name == "F16":
        return (rng.standard_normal((n, k)) * 0.1).astype(np.float16).view(np.uint8)
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in GGML_FP16_FIELDS[type_name]:
        d = (rng.random((n, k // block)) * 0.01 + 1e-3).astype(np.float16)
        b[..., off:off + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return b.reshape(n, -1)


# Types whose kernels run on int8 activation blocks, and the block: 256 for the K-quants
# (llama.cpp's Q8_K), 32 for Q4_0 / Q5_0 / Q5_1.
INT8_BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32}


def q8_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization in torch: per block, d = amax / 127 and
    q = round(x * (1 / d)) (float32, half to even) -> (q [R, K] as float64, d [R, K / block])."""
    xb = x.float().reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return q.reshape(x.shape).double(), d


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("block", [256, 32])
def test_int8_activations_are_round_to_nearest_per_block_with_their_sums(tier, block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 768, generator=g) * torch.tensor([1.0, 1e-3, 50.0, 0.0])[:, None]
    x[1, 256:512] = 0  # all-zero blocks: d = 0, q = 0
    q, d, sums = kernels.q8_quantize(x, block, tier)
    assert q.dtype == torch.int8 and d.dtype == torch.float32 and sums.dtype == torch.int16
    want_q, want_d = q8_reference(x, block)
    assert torch.equal(q.double(), want_q) and torch.equal(d, want_d)
    group = 16 if block == 256 else 32  # the K-quants' sub-blocks of 16 (Q6_K), else the block
    assert torch.equal(sums, q.reshape(4, -1, group).sum(-1).short())
    assert q.abs().max() == 127 and (q[3] == 0).all() and (q[1, 256:512] == 0).all()
    with pytest.raises(RuntimeError, match="block must be 256 or 32"):
        kernels.q8_quantize(x, 64, tier)


INT8_CASES = [(t, k) for t in INT8_BLOCK for k in (256, 768, 2304)] + [
    ("Q4_0", 96), ("Q5_0", 96), ("Q5_1", 160),
    # blocks in fours (AVX-512) and twos (AVX2), then one to three left over
    ("Q4_0", 672), ("Q5_0", 704), ("Q5_1", 736), ("Q4_0", 544)]


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("type_name,k", INT8_CASES, ids=[f"{t}-{k}" for t, k in INT8_CASES])
@pytest.mark.parametrize("lead", [(1,), (3,)], ids=["decode", "batch"])
def test_int8_kernels_equal_float64_dot_with_their_quantized_activations(tier, type_name, k,
                                                                         lead):
    """Each int8-activation kernel is exact integer math up to float32 scaling: it equals the
    float64 dot of gguf-py's dequantized weights with the quantized activations to 1e-5 of the
    sum of the terms' magnitudes, and the dot with the float activations within the int8
    rounding bound (|x - q d| <= d / 2 per element)."""
    import gguf

    kind, n, block = kernels.GGML_KINDS[type_name], 37, INT8_BLOCK[type_name]
    raw = ggml_blocks(type_name, n, k, seed=k)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
                         ).reshape(n, k).double()
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(4))
    y = kernels.gguf_linear(x, torch.from_numpy(raw), kind, tier).double().reshape(-1, n)
    x2 = x.reshape(-1, k)
    q, d = q8_reference(x2, block)
    xq = (q.reshape(len(x2), -1, block) * d.double()[..., None]).reshape(len(x2), k)
    exact, size = xq @ w.T, xq.abs() @ w.abs().T
    assert ((y - exact).abs() <= 1e-5 * size).all(), ((y - exact).abs() / size).max()
    step = d.double().repeat_interleave(block, -1) / 2  # the largest rounding of each element
    bound = step @ w.abs().T + 1e-5 * size
    err = (y - x2.double() @ w.T).abs()
    assert (err <= bound).all() and err.max() > 0, (err / bound).max()


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("type_name", list(kernels.GGML_KINDS))
def test_gguf_type_rows_dequantize_as_gguf_py(tier, type_name):
    import gguf

    kind, k = kernels.GGML_KINDS[type_name], 768
    raw = ggml_blocks(type_name, 37, k)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(37, k)
    assert torch.equal(kernels.dequant_rows(torch.from_numpy(raw), kind, k, tier),
                       torch.from_numpy(ref))


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("type_name", list(kernels.GGML_KINDS))
def test_gguf_type_rows_decode_to_bf16_as_float32_rounded_to_nearest_even(tier, type_name):
    """The bf16 weight tiles of prompt GEMMs: bit for bit torch's float32 -> bf16 rounding of
    the float32 dequantization (one pass, no float32 tile)."""
    kind, k = kernels.GGML_KINDS[type_name], 768
    raw = torch.from_numpy(ggml_blocks(type_name, 37, k, seed=5))
    if type_name == "F16":  # a corrupt file's infinities and NaNs stay what they are
        raw.view(torch.float16)[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    got = kernels.dequant_rows_bf16(raw, kind, k, tier)
    assert got.dtype == torch.bfloat16 and got.shape == (37, k)
    want = kernels.dequant_rows(raw, kind, k, tier).to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("tier", kernels.host_tiers())
@pytest.mark.parametrize("lead", [(1,), (3,)], ids=["decode", "batch"])
def test_f16_kernel_equals_float64_matmul(tier, lead):
    import gguf

    kind, k = kernels.GGML_KINDS["F16"], 768
    raw = ggml_blocks("F16", 37, k)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.F16).reshape(37, k)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(2))
    y = kernels.gguf_linear(x, torch.from_numpy(raw), kind, tier)
    want = x.double() @ torch.from_numpy(ref).double().T
    # float32 weights and activations: only the summation order differs
    torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_gguf_type_kernels_refuse_rows_that_do_not_fit_the_input_size():
    blocks = torch.from_numpy(ggml_blocks("Q4_K", 4, 512))
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.gguf_linear(torch.randn(1, 256), blocks, kernels.GGML_KINDS["Q4_K"])
    with pytest.raises(RuntimeError, match="unknown GGUF weight kind"):
        kernels.gguf_linear(torch.randn(1, 512), blocks, 199)

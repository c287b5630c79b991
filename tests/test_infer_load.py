"""The one loader for inference (infer.load): GGUF Q4_1/Q8_0 matrices kept as the file's own blocks
(byte for byte, no float32 copy), other types dequantized; the same numbers as the dequantized
model (float32 GEMM over dequantized tiles for prompts, the block kernels for decode); model
memory about the file size (measured in a subprocess); --quant on an already quantized file warns;
and the real SmolLM2 Q4_1 file as stored against the float32 model and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams
from llamaworks.checkpoint import load_model
from llamaworks.checkpoint.gguf_export import export_gguf
from llamaworks.checkpoint.gguf_file import parse_gguf
from llamaworks.infer import kernels
from llamaworks.infer.load import load_as_stored, load_for_use
from llamaworks.infer.quantize import (
    GEMM_MIN_ROWS,
    BlockEmbedding,
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    block_linear,
    fast_prompt,
    prompt_gemm_dtype,
)

Q4_1 = gguf.GGMLQuantizationType.Q4_1
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q4_0 = gguf.GGMLQuantizationType.Q4_0


def mixed_gguf(path: Path) -> Path:
    """A tiny model as a GGUF whose matrices mix the types of real files: Q8_0 embedding (tied
    head), Q4_1 q/v and gate, Q5_0 k, Q4_0 up, Q8_0 down projections, F16 o_proj, F32 norms."""
    model = tiny_model(hidden_dim=192, tie_embeddings=True)
    f32 = export_gguf(path.with_suffix(".f32.gguf"), model.config, model.state_dict())
    src = parse_gguf(f32)
    w = gguf.GGUFWriter(path, arch="llama")
    for k, v in src.metadata.items():
        if k != "general.architecture":
            vtype, sub = src.value_types[k]
            w.add_key_value(k, v, gguf.GGUFValueType(vtype),
                            None if sub is None else gguf.GGUFValueType(sub))
    for t in src.tensors:
        arr = src.data(t).view(np.float32).reshape(t.shape)
        kind = None
        if len(t.shape) == 2:
            kind = Q8_0 if "token_embd" in t.name or "ffn_down" in t.name else \
                gguf.GGMLQuantizationType.F16 if "attn_output" in t.name else \
                Q4_0 if "ffn_up" in t.name else \
                gguf.GGMLQuantizationType.Q5_0 if "attn_k" in t.name else Q4_1
        if kind is None:
            w.add_tensor(t.name, np.ascontiguousarray(arr))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(t.name, arr.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return mixed_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf")


def test_q4_1_and_q8_0_matrices_are_the_files_own_blocks(mixed):
    stored, ref = load_as_stored(mixed).model, load_model(mixed).model
    layer, ref_layer = stored.model.layers[1], ref.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Int4Linear)
    assert isinstance(layer.mlp.down_proj, Int8Linear)
    # F16 and Q5_0 stay in their own blocks too (dequantize-row kernels), rows reordered for k
    for name in ("self_attn.o_proj", "self_attn.k_proj"):
        mod = layer.get_submodule(name)
        assert isinstance(mod, GGUFLinear), name
        assert torch.equal(mod.dequantize(), ref_layer.get_submodule(name).weight), name
    assert isinstance(stored.model.embed_tokens, BlockEmbedding)
    # the tied head reads the embedding's own blocks (one table in memory)
    assert stored.lm_head.blocks.data_ptr() == stored.model.embed_tokens.blocks.data_ptr()
    # byte for byte what packing the float32 dequantization would give (which recovers the
    # file's blocks), with llama.cpp's Q/K row permutation undone
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj"):
        got = layer.get_submodule(name).blocks
        want = kernels.pack_q4_1(ref_layer.get_submodule(name).weight)
        assert torch.equal(got, want), name
    down = kernels.pack_q8_0(ref_layer.mlp.down_proj.weight)
    assert torch.equal(layer.mlp.down_proj.blocks, down)
    # Q4_0 stays in its own blocks (the file's bytes): the same weights as gguf-py decodes
    assert isinstance(layer.mlp.up_proj, GGUFLinear)
    up = layer.mlp.up_proj
    assert up.blocks.dtype == torch.uint8 and up.blocks.shape[1] == up.in_features // 32 * 18
    assert torch.equal(layer.mlp.up_proj.dequantize(), ref_layer.mlp.up_proj.weight)
    tokens = torch.tensor([[1, 70, 80, 90]])
    torch.testing.assert_close(stored.model.embed_tokens(tokens), ref.model.embed_tokens(tokens),
                               atol=0, rtol=0)


def test_prompts_score_exactly_as_the_dequantized_model_and_decode_within_kernel_rounding(mixed):
    stored, ref = load_as_stored(mixed).model, load_model(mixed).model
    x = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = stored(x), ref(x)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)  # float32 GEMM, only sum order differs
    tok = ByteTokenizer()
    p = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3)
    llm = LLM(stored, tok)
    assert llm.step.fused is not None  # one fused step over layers of six matrix types
    got = llm.generate("hello there", p)[0]
    llm.step.fused = None
    eager = llm.generate("hello there", p)[0]
    assert eager.token_ids == got.token_ids
    for g, e in zip(got.logprobs, eager.logprobs, strict=True):
        for t in g.keys() & e.keys():
            # the same kernels, one op vs per-op: float sum orders differ (norms, attention), so
            # an activation at an int8 rounding boundary (Q4_0, Q5_0 inputs) may round the other
            # way, an error of the kind bounded by 0.1 below: 0.004 measured on an Intel Xeon,
            # 0.013-0.017 on a Zen 4 (the same before and after the 2026-12-04 kernels)
            assert abs(g[t] - e[t]) < 0.05
    want = LLM(ref, tok).generate("hello there", p)[0]
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        for t in g.keys() & w.keys():
            # the decode kernels quantize activations to int8 blocks of 32 for Q4_0 and Q5_0, as
            # llama.cpp does (Q8_0 activations): up to 0.057 measured on this model's 16 steps
            # (0.020 while Q4_0 ran as Q4_1 on int16 activations)
            assert abs(g[t] - w[t]) < 0.1


@pytest.mark.parametrize("bits", [4, 8])
def test_block_linear_takes_kernels_for_few_rows_and_tiled_gemm_for_many(bits, monkeypatch):
    pack, unpack = (kernels.pack_q4_1, kernels.unpack_q4_1) if bits == 4 else \
        (kernels.pack_q8_0, kernels.unpack_q8_0)
    g = torch.Generator().manual_seed(0)
    blocks = pack(torch.randn(100, 96, generator=g) * 0.05)
    monkeypatch.setattr("llamaworks.infer.quantize.GEMM_TILE_ROWS", 32)  # several tiles + a rest
    for rows in (1, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 50):
        x = torch.randn(rows, 96, generator=g)
        ref = x.double() @ unpack(blocks).double().T
        y = block_linear(x, blocks, bits, None)
        tol = 2e-4 if rows < GEMM_MIN_ROWS else 1e-5
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def _q4_k_rows(n: int, k: int) -> torch.Tensor:
    from test_quant_kernels import ggml_blocks

    return torch.from_numpy(ggml_blocks("Q4_K", n, k, seed=1))


def test_prompt_gemms_are_float32_outside_fast_prompt_and_bf16_inside_when_asked(monkeypatch):
    """Only the engine's prompt chunks (`fast_prompt`) may round: there a bf16 GEMM is within
    bf16's rounding of the float64 product and not the float32 result; outside it (scoring,
    every-token logits) the same call stays float32-exact even with bf16 asked for."""
    kind, k = kernels.GGML_KINDS["Q4_K"], 512
    blocks = _q4_k_rows(80, k)
    w = kernels.dequant_rows(blocks, kind, k).double()
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w.T
    monkeypatch.setenv("LLAMAWORKS_PROMPT_GEMM", "bf16")
    monkeypatch.setattr("llamaworks.infer.quantize.GEMM_TILE_ROWS", 32)
    exact = block_linear(x, blocks, kind, None)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    with fast_prompt():
        assert prompt_gemm_dtype() == torch.bfloat16
        fast = block_linear(x, blocks, kind, None)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    # x and w rounded to 8 significant bits (2^-9 relative each), the output once more
    size = x.double().abs() @ w.abs().T
    assert ((fast.double() - ref).abs() <= 2 ** -7 * size).all()
    monkeypatch.setenv("LLAMAWORKS_PROMPT_GEMM", "fp32")
    with fast_prompt():
        assert torch.equal(block_linear(x, blocks, kind, None), exact)


def test_auto_prompt_gemm_is_bf16_only_on_the_avx512_tier_with_bf16_hardware(monkeypatch):
    monkeypatch.delenv("LLAMAWORKS_PROMPT_GEMM", raising=False)
    assert prompt_gemm_dtype("avx512") == torch.float32  # outside fast_prompt: always exact
    for hw, tier, want in [(True, "avx512", torch.bfloat16), (True, "avx2", torch.float32),
                           (True, "scalar", torch.float32), (False, "avx512", torch.float32)]:
        monkeypatch.setattr("llamaworks.infer.quantize._bf16_gemm_hardware", lambda hw=hw: hw)
        with fast_prompt():
            assert prompt_gemm_dtype(tier) == want, (hw, tier)
    monkeypatch.setenv("LLAMAWORKS_PROMPT_GEMM", "int3")
    with fast_prompt(), pytest.raises(ValueError, match="LLAMAWORKS_PROMPT_GEMM='int3'"):
        prompt_gemm_dtype()


def test_quant_on_a_quantized_file_warns_about_double_quantization(mixed):
    with pytest.warns(RuntimeWarning, match="quantizes already quantized weights a second time"):
        load_for_use(mixed, quant="int4")  # Q8_0 tensors -> Q4_1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_for_use(mixed, quant="bf16")  # not a quantized type


def test_without_kernels_a_gguf_loads_as_float32(mixed, monkeypatch):
    with kernels.disabled():
        model = load_as_stored(mixed).model
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


MEMORY_PROBE = textwrap.dedent("""
    import gc, json, os, sys
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import torch
    from llamaworks.config import ModelConfig
    from llamaworks.infer import kernels
    from llamaworks.infer.load import load_as_stored
    from llamaworks.model import Llama
    kernels.load()
    # the process after imports (incl. what building a model on meta imports lazily)
    Llama(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                      hidden_dim=96), device="meta")
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) here
    model = load_as_stored(sys.argv[1]).model
    gc.collect()
    seen, tensors = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            tensors += t.untyped_storage().nbytes()
    print(json.dumps({"after": status("VmRSS") - base, "peak": status("VmHWM") - base,
                      "tensors": tensors}))
""")


def _model_memory(path: Path) -> dict[str, int]:
    """MEMORY_PROBE's measurement of loading `path` as stored, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_building_a_model_on_meta_runs_no_initializer_so_imports_no_compiler_stack():
    """A meta tensor's first `normal_` imports torch's Python decompositions (dynamo, sympy:
    ~830 modules, 2 s and 74 MB resident), a fixed cost every load paid for a model whose weights
    are then read from the file. Measured in a fresh process."""
    probe = ("import sys; from llamaworks.config import ModelConfig; "
             "from llamaworks.model import Llama; "
             "Llama(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, "
             "hidden_dim=96), device='meta'); "
             "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("which", ["q4_1", "q4_k_m"])
def test_smollm2_as_stored_keeps_model_memory_about_the_file_size(which, smollm_gguf,
                                                                   request):
    """Measured: Q4_1 (98.4 MB file) 96.4 MB of tensors, resident growth 112 MB, peak 125 MB;
    llama.cpp's Q4_K_M recipe (105.5 MB: Q4_K, Q6_K, Q5_0) 103.7 / 119 / 130 MB. The rest is the
    parsed vocabulary (~13 MB, a fixed cost). The float32 load: 577 / 675 MB."""
    path = smollm_gguf if which == "q4_1" else request.getfixturevalue("smollm2_q4_k_m")
    m, size = _model_memory(path), path.stat().st_size
    assert m["tensors"] <= size, m
    assert m["peak"] <= 1.1 * size + 32e6, (m, size)


@pytest.mark.slow
def test_smollm2_as_stored_greedy_equals_the_int4_conversion_and_scores_as_float32(
        smollm_gguf, smollm_tokenizer, smollm):
    from llamaworks.cli import score_ids

    stored = LLM(smollm_gguf)  # the default: the file's own Q4_1 / Q8_0 blocks
    assert isinstance(stored.model.model.layers[0].mlp.up_proj, Int4Linear)
    assert stored.step.fused is not None
    p = SamplingParams(max_tokens=32, ignore_eos=True)
    prompt = "The history of the printing press begins"
    converted = LLM(smollm, smollm_tokenizer, quant="int4")  # float32 -> Q4_1 recovers the blocks
    assert stored.generate(prompt, p)[0].token_ids == converted.generate(prompt, p)[0].token_ids
    ids = smollm_tokenizer.encode((Path(__file__).parent / "data" / "heldout_english.txt")
                                  .read_text(), bos=False)[:200]
    a, b = np.array(score_ids(stored.model, ids)), np.array(score_ids(smollm, ids))
    assert np.abs(a - b).max() < 1e-4


def _lora_grads(model, seed: int = 0) -> dict[str, torch.Tensor]:
    from llamaworks.posttrain.lora import LoraConfig, apply_lora, lora_modules

    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    for _, m in lora_modules(model):  # a trained-looking B, so A's gradient is not zero
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05
    tokens = torch.randint(3, 259, (2, 12), generator=g)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return {f"{n}.{p}": getattr(m, p).grad for n, m in lora_modules(model)
            for p in ("lora_A", "lora_B")}


def test_qlora_gradients_on_the_quantized_base_equal_those_on_its_float32_dequantization(mixed):
    """LoRA on the base as stored (Q4_1, Q4_0, Q5_0, Q8_0 and F16 blocks, frozen) gets the
    gradients it gets on the float32 dequantization of the same file: within 1e-4 of the largest
    (float32 GEMMs over dequantized tiles forward and backward; only summation order differs)."""
    from llamaworks.infer.load import with_float_head

    stored = with_float_head(load_as_stored(mixed).model)
    assert isinstance(stored.model.layers[0].self_attn.q_proj, Int4Linear)
    got, want = _lora_grads(stored), _lora_grads(load_model(mixed).model)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * stored.config.n_layers
    for k in want:
        scale = want[k].abs().max().item()
        assert scale > 0, k
        torch.testing.assert_close(got[k], want[k], atol=1e-4 * scale, rtol=0)
    # the base stays in its blocks: nothing but the adapters is trainable
    assert {n.rsplit(".", 1)[-1] for n, p in stored.named_parameters() if p.requires_grad} \
        == {"lora_A", "lora_B"}


def test_an_adapter_cannot_be_merged_into_a_quantized_base(mixed):
    from llamaworks.posttrain.lora import LoraConfig, apply_lora, merge_lora

    model = apply_lora(load_as_stored(mixed).model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="the base is quantized"):
        merge_lora(model)


@pytest.mark.slow
def test_finetune_qlora_on_the_stored_smollm2_trains_as_lora_on_its_float32_weights(tmp_path):
    """`llamaworks finetune --qlora` on the Q4_1 file (its blocks stay quantized) follows the same
    loss curve as LoRA on the float32 dequantization (same seed), and writes a PEFT adapter."""
    from llamaworks.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} plus {a + 3}?"},
        {"role": "assistant", "content": f"{a} plus {a + 3} is {2 * a + 3}."}]}) + "\n"
        for a in range(8)))
    common = ["--data", str(data), "--max-steps", "2", "--batch-size", "4", "--max-len", "96",
              "--eval-fraction", "0", "--seed", "0"]
    assert main(["finetune", "--qlora", "--out", str(tmp_path / "q"), *common]) == 0
    assert main(["finetune", "--out", str(tmp_path / "f"), *common]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").open()]
              for d in ("q", "f")]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert (tmp_path / "q" / "adapter_model.safetensors").exists()

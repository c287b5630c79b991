"""Mistral, Qwen2, Qwen3 and Gemma 3 through the one model definition, against transformers' own
modeling code: random tiny checkpoints made by transformers (weights drawn wide so a wrong detail
shows), loaded from the saved HF directory; logits on sequences longer than the sliding window,
gradients of one training step, and our saved checkpoint opened by transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from family_fixtures import (
    QWEN2_VOCAB_SIZE,
    TINY,
    hf_family_model,
    llama_cpp_logits,
    load_saved,
    tiny_family_model,
    write_qwen2_tokenizer,
)
from infer_fixtures import decode_logits

transformers = pytest.importorskip("transformers")

from llamaworks.checkpoint import load_model, save_native  # noqa: E402
from llamaworks.config import ModelConfig  # noqa: E402

CASES = {
    "llama-attention-bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                                 attention_bias=True, tie_word_embeddings=False)),
    "mistral-sliding-gqa": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=24, sliding_window=7,
                                                  tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True, rope_theta=1000.0)),
    "qwen2-sliding-upper-layers": ("Qwen2Config", dict(
        num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True, sliding_window=6,
        max_window_layers=2, tie_word_embeddings=False)),
    # YaRN (Qwen2.5's long-context RoPE): cos/sin scaled by its attention factor too.
    "qwen2-yarn": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False, rope_theta=10000.0,
                                       rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                         original_max_position_embeddings=8))),
    "qwen3-mqa-head-dim": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=40, tie_word_embeddings=False)),
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=6, sliding_window_pattern=2, rope_theta=20000.0,
        rope_local_base_freq=500.0, tie_word_embeddings=True)),
    # Mixtral: every layer 4 experts, top-2 renormalized, Mistral's window.
    "mixtral-sliding-top2": ("MixtralConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=7, tie_word_embeddings=False)),
    # Qwen3-MoE: q/k norms, 6 experts of their own size, top-3 not renormalized, layer 1 dense,
    # every other layer sparse from layer 1 (decoder_sparse_step 2), tied.
    "qwen3moe-sparse-step": ("Qwen3MoeConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=False,
        decoder_sparse_step=2, mlp_only_layers=[1], tie_word_embeddings=True)),
    # Llama 4 text: iRoPE (layer 3 without RoPE, global, temperature-tuned; the others chunked
    # in 8s with L2 q/k norms), experts on every other layer (top-1 sigmoid scaling the input)
    # with a shared expert, dense layers of their own width, Meta's interleaved RoPE pairs.
    "llama4-irope-top1": ("Llama4TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
        intermediate_size_mlp=80, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
        tie_word_embeddings=False)),
    "llama4-top2-attention-bias": ("Llama4TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=80, num_local_experts=5, num_experts_per_tok=2,
        interleave_moe_layer_step=1, attention_chunk_size=6, no_rope_layer_interval=2,
        floor_scale=3, attn_scale=0.3, attention_bias=True, use_qk_norm=False,
        tie_word_embeddings=False)),
    # DeepSeek-V3: latent attention (q through a normed low-rank bottleneck, keys/values from a
    # 16-dim latent + a shared RoPE key, interleaved pairs), first layer dense, 8 experts in 4
    # groups (top-3 from the best 2 groups, chosen with the correction bias, weighted without
    # it, renormalized, x2.5), 2 shared experts.
    "deepseek3-mla-groups": ("DeepseekV3Config", dict(
        num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=24,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, n_shared_experts=2, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
    # ... without the q bottleneck, RoPE on halves, no groups, not renormalized, attention bias.
    "deepseek3-direct-q": ("DeepseekV3Config", dict(
        num_attention_heads=2, num_key_value_heads=2, moe_intermediate_size=16,
        n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=0, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=8, v_head_dim=20, n_shared_experts=1, rope_interleave=False,
        norm_topk_prob=False, routed_scaling_factor=1.5, attention_bias=True,
        tie_word_embeddings=False)),
    "qwen3moe-renormalized": ("Qwen3MoeConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
        tie_word_embeddings=False)),
}
SEQ = 20  # longer than every sliding window above


def _hf_model(case: str, seed: int = 0):
    return tiny_family_model(CASES[case], seed)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, HF model, our model loaded from the directory transformers saved)."""
    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    return request.param, hf, load_saved(hf, d), d


def _tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, SEQ),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_logits_equal_transformers(pair):
    case, hf, ours, _ = pair
    tokens = _tokens()
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (case, (got - want).abs().max())


def test_cached_decode_equals_the_full_forward(pair):
    """Prefill a prompt, then one token at a time through the KV cache, past the window."""
    _, _, ours, _ = pair
    tokens = _tokens(batch=1)
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.new_cache(1, SEQ)
        steps = [ours(tokens[:, :5], cache=cache)]
        for i in range(5, SEQ):
            steps.append(ours(tokens[:, i:i + 1], input_pos=torch.tensor([i]), cache=cache))
    got = torch.cat(steps, 1)
    assert torch.allclose(got, full, atol=1e-4, rtol=1e-4), (got - full).abs().max()


def _hf_grad(theirs: dict, name: str, family: str) -> torch.Tensor:
    """The gradient of our parameter `name` in transformers' model: its experts live in memory
    fused as gate_up_proj [E, 2I, dim] (gate rows first; Llama 4: [E, dim, 2I] and down_proj
    [E, I, dim], input-major, under `feed_forward.` with the router as `router`), ours as
    gate_proj and up_proj [E, I, dim], down_proj [E, dim, I]."""
    llama4 = family == "llama4_text"
    if family == "deepseek_v3":
        name = name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
    if llama4:
        name = name.replace(".mlp.gate.", ".feed_forward.router.").replace(".mlp.",
                                                                           ".feed_forward.")
    if name.endswith(("experts.gate_proj", "experts.up_proj")):
        fused = theirs[name.rsplit(".", 1)[0] + ".gate_up_proj"].grad
        part = fused.chunk(2, dim=2 if llama4 else 1)[name.endswith("up_proj")]
        return part.transpose(1, 2) if llama4 else part
    if llama4 and name.endswith("experts.down_proj"):
        return theirs[name].grad.transpose(1, 2)
    return theirs[name].grad


def test_one_training_step_has_transformers_gradients(pair):
    case, hf, ours, _ = pair
    tokens = _tokens(seed=2)
    hf.zero_grad()
    ours.zero_grad()
    loss_hf = hf(tokens, labels=tokens).loss
    logits = ours(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss_hf.backward()
    loss.backward()
    assert torch.allclose(loss, loss_hf, atol=1e-5)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = _hf_grad(theirs, name, ours.config.family)
        assert torch.allclose(p.grad, ref, atol=1e-5, rtol=1e-4), (case, name,
                                                                   (p.grad - ref).abs().max())


def test_our_saved_checkpoint_opens_in_transformers_with_equal_logits(pair, tmp_path):
    case, hf, ours, _ = pair
    save_native(tmp_path, ours.config, ours.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(back) is type(hf)
    tokens = _tokens(seed=3)
    with torch.no_grad():  # the very model transformers saved: the same weights and config
        assert torch.equal(back(tokens).logits, hf(tokens).logits), case


def test_config_round_trips_through_config_json(pair):
    case, hf, ours, _ = pair
    cfg = ours.config
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    for f in ("family", "qkv_bias", "o_bias", "qk_norm", "norm_plus_one", "sandwich_norm",
              "activation", "embed_scale", "attn_scale", "sliding_window", "layer_types",
              "rope_theta", "rope_local_theta", "head_dim", "tie_embeddings"):
        assert getattr(again, f) == getattr(cfg, f), (case, f)
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()), case


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantized_layers_keep_the_projection_biases(mode):
    """Qwen2's q/k/v biases survive `quantize_model`: each quantized projection is its own
    dequantized weight's matmul plus the float bias."""
    from llamaworks.infer.quantize import quantize_model

    ours = load_model_from(_hf_model("qwen2-bias-tied"))
    q = quantize_model(ours, mode, fuse=mode != "bf16")
    x = torch.randn(3, TINY["hidden_size"], generator=torch.Generator().manual_seed(4))
    for name in ("q_proj", "k_proj", "v_proj"):
        float_layer = getattr(ours.model.layers[1].self_attn, name)
        layer = getattr(q.model.layers[1].self_attn, name)
        w = layer.weight.float() if mode == "bf16" else layer.dequantize()
        want = x @ w.T + float_layer.bias
        with torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, want, atol=0.02), (name, (got - want).abs().max())


def load_model_from(hf) -> torch.nn.Module:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return load_saved(hf, Path(d))


GGUF_CASES = {  # converter arch: (transformers config, its kwargs)
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, vocab_size=QWEN2_VOCAB_SIZE)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=40,
                                  tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        query_pre_attn_scalar=32, sliding_window=6,
                                        tie_word_embeddings=True)),
    "llama (mistral)": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                              sliding_window=None, tie_word_embeddings=False)),
}
# text the GGUF's tokenizer (read by us) must split as the HF tokenizer the converter read; all
# NFC (Qwen2's HF tokenizer NFC-normalizes, our GGUF tokenizer does not: "cafe\u0301" differs)
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. I'm sure we'll see; HE'S there, they'RE not.",
    "Äpfel und Öl kosten 12,50 € – straße, naïve café, Ærøskøbing.",
    "我想在apple工作1314151天～ 你好，世界！",
    "日本語のテキスト、カタカナとひらがな。",
    "нещо на Български и Русский язык",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "한국어 문장입니다. 🚀 😶\u200d🌫️ 🦙🦙 ✅",
    "def f(x):\n\treturn x**2  # 3.14159 3..3 333333\r\n\n\n   \t end",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_qwen2_tokenizer_json_built_from_llama_cpps_vocab_gives_its_test_ids(vocab_dir, tmp_path):
    """`write_qwen2_tokenizer` (Qwen2's HF tokenizer rebuilt from ggml-vocab-qwen2.gguf) gives
    llama.cpp's expected ids (made by the real Qwen tokenizer) on every .inp/.out case, both as
    the bare tokenizer.json and through transformers' AutoTokenizer on the directory."""
    from tokenizers import Tokenizer as HFTokenizer

    name = "ggml-vocab-qwen2.gguf"
    d = write_qwen2_tokenizer(vocab_dir / name, tmp_path / "tok")
    raw = (vocab_dir / f"{name}.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw[:-len(sep)].split(sep) if raw.endswith(sep) else raw.split(sep)
    outputs = (vocab_dir / f"{name}.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs) > 40
    bare = HFTokenizer.from_file(str(d / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(d)
    assert type(auto).__name__ == "Qwen2Tokenizer" and len(auto) == 151646
    for text, out in zip(inputs, outputs, strict=True):
        want = [int(t) for t in out.split()]
        assert bare.encode(text, add_special_tokens=False).ids == want, text
        assert auto.encode(text, add_special_tokens=False) == want, text
    assert auto.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert (auto.bos_token, auto.eos_token_id, auto.pad_token_id) == (None, 151643, 151643)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_made_by_llama_cpps_converter_loads_with_transformers_logits(case, tmp_path,
                                                                         vocab_dir, request):
    """llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, extracted by `make`)
    turns a random tiny checkpoint into GGUF; we load that file with HF's logits, and its
    tokenizer splits text as the HF tokenizer the converter read. The converter needs a real
    tokenizer whose pre-tokenizer it knows (by the hash of its ids on a check text): Qwen2 gets
    Qwen2's own (rebuilt from llama.cpp's ggml-vocab-qwen2.gguf, 151936 ids, tied embeddings),
    the others SmolLM2's. 6 layers, so Gemma 3's 5 local : 1 global pattern, which llama.cpp
    assumes for GGUF files, holds."""
    import subprocess
    import sys
    from pathlib import Path

    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.gguf import read_metadata
    from llamaworks.tokenizer import Tokenizer

    converter = Path(__file__).resolve().parents[1] / ".cache" / "convert" / "convert_hf_to_gguf.py"
    if not converter.exists():
        pytest.fail(f"{converter} missing: run `make test` (it extracts llama.cpp's converter)")
    cls_name, kw = GGUF_CASES[case]
    hf = hf_family_model(cls_name, {**dict(vocab_size=49152, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=6, max_position_embeddings=128,
                                           rms_norm_eps=1e-6), **kw})
    vocab_size = hf.config.vocab_size
    hf.save_pretrained(tmp_path / "hf")
    if case == "qwen2":
        write_qwen2_tokenizer(vocab_dir / "ggml-vocab-qwen2.gguf", tmp_path / "hf")
        tok = Tokenizer.from_dir(tmp_path / "hf")
    else:
        tok = request.getfixturevalue("smollm_tokenizer")
        tok.save(tmp_path / "hf")
    out = tmp_path / "model.gguf"
    run = subprocess.run([sys.executable, str(converter), str(tmp_path / "hf"), "--outtype",
                          "f32", "--outfile", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    md = read_metadata(out)
    assert md["tokenizer.ggml.pre"] == ("qwen2" if case == "qwen2" else "smollm"), case
    assert len(md["tokenizer.ggml.tokens"]) == vocab_size
    # `llamaworks score` on the HF directory transformers saved (with its tokenizer)
    text = "The quick brown fox jumps over the lazy dog."
    score = subprocess.run([sys.executable, "-m", "llamaworks.cli", "score", "--model",
                            str(tmp_path / "hf"), "--text", text, "--json"], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert score.returncode == 0, score.stderr[-2000:]
    ids = torch.tensor([tok.encode(text, bos=None)])
    with torch.no_grad():
        want_lp = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(
            -1, ids[0, 1:, None]).sum().item()
    got = json.loads(score.stdout)  # nll: each predicted token's negative log-likelihood
    assert got["tokens"] == ids.shape[1] and len(got["nll"]) == ids.shape[1] - 1
    assert abs(sum(got["nll"]) + want_lp) < 1e-4 * abs(want_lp), (got, want_lp)
    ours = load_model(out).model
    assert ours.config.family == {"qwen2": "qwen2", "qwen3": "qwen3",
                                  "gemma3": "gemma3_text"}.get(case, "llama")
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    tokens = torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = ours(tokens), hf(tokens).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    gguf_tok = load_tokenizer(out)
    for s in MULTILINGUAL:
        assert gguf_tok.encode(s) == auto.encode(s, add_special_tokens=False), (case, s)


EXPORT_CASES = ["qwen2-bias-tied", "qwen3-mqa-head-dim", "gemma3-local-global",
                "llama-attention-bias"]


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_our_gguf_export_runs_in_llama_cpp_with_our_logits(case, tmp_path, llama_cpp):
    """Each family exported by us to an F32 GGUF of llama.cpp's architecture for it; llama.cpp's
    logits (F32 KV cache) equal ours, past Gemma's sliding window, and our loader reads it back."""
    import numpy as np

    from llamaworks.checkpoint import export_gguf

    ours = load_model_from(_hf_model(case))
    cfg = ours.config
    if case.startswith("gemma3"):  # llama.cpp's scale for Gemma 3 is 1/sqrt(head_dim)
        ours.config = cfg = cfg.replace(attn_scale=cfg.head_dim ** -0.5)
        for layer in ours.model.layers:
            layer.self_attn.scale = cfg.attn_scale
    path = export_gguf(tmp_path / "m.gguf", cfg, ours.state_dict(), None, "F32")
    toks = _tokens(seed=6, batch=1)[0].tolist()
    theirs = llama_cpp_logits(llama_cpp, path, toks)
    with torch.no_grad():
        want = ours(torch.tensor([toks]))[0].numpy()
        back = load_model(path).model(torch.tensor([toks]))[0].numpy()
    # ggml's CPU GELU looks its input up in an fp16 table: ~1e-3 on Gemma's logits
    np.testing.assert_allclose(theirs, want, atol=5e-3 if cfg.activation != "silu" else 2e-4,
                               rtol=0)
    np.testing.assert_allclose(back, want, atol=1e-5, rtol=0)


def test_export_refuses_a_window_llama_cpp_would_ignore(tmp_path):
    from llamaworks.checkpoint import export_gguf
    from llamaworks.errors import CheckpointError

    ours = load_model_from(_hf_model("mistral-sliding-gqa"))
    with pytest.raises(CheckpointError, match="has no sliding window"):
        export_gguf(tmp_path / "m.gguf", ours.config, ours.state_dict(), None, "F32")
    assert not list(tmp_path.iterdir())


def test_fused_decode_step_equals_the_per_op_forward(pair):
    """The C++ decode step runs each family (biases, q/k norms, sandwich norms, GeGLU, sliding
    layers with their own RoPE; MoE layers: router, top-k with and without renormalization,
    dense layers between sparse ones) on rows at different positions decoded past the window,
    as the model, in every kernel tier the CPU runs."""
    from llamaworks.infer import kernels
    from llamaworks.infer.fused import FUSED_FAMILIES, FusedDecoder
    from llamaworks.infer.step import Step
    from llamaworks.model import rope_attention_factor

    case, _, ours, _ = pair
    if not kernels.preferred():
        pytest.fail("the kernels must build on the test machines")
    if ours.config.family not in FUSED_FAMILIES or rope_attention_factor(
            ours.config.rope_scaling) != 1.0:  # not in the C++ step yet: runs eagerly
        assert Step(ours).fused is None
        return
    assert isinstance(Step(ours).fused, FusedDecoder), case
    eager = decode_logits(ours, False, steps=8)
    assert eager.abs().max() > 1
    for tier in kernels.host_tiers() if ours.config.n_experts else [kernels.tier()]:
        with kernels.using(tier):
            fused = decode_logits(ours, True, steps=8)
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4, msg=f"{case} {tier}")


@pytest.mark.slow
def test_lora_on_each_family_merges_and_loads_in_peft_with_equal_logits(pair, tmp_path):
    """LoRA over every projection of each family (Qwen2's biased q/k/v included, and each expert
    of a MoE layer): merging equals the unmerged adapter, and PEFT loads what we save onto
    transformers' model (fusing per-expert LoRA into its own layout) with our logits."""
    from peft import PeftModel

    from llamaworks.posttrain.lora import (
        LoraConfig,
        LoRALinear,
        apply_lora,
        merge_lora,
        save_adapter,
    )
    from llamaworks.posttrain.lora_experts import LoRAExperts

    case, _, _, d = pair
    base = load_model(d).model
    # Mixtral / Qwen3-MoE: experts adapted too, one update each (no dropout); Llama 4 (fused
    # experts): its dense layers and shared experts, as PEFT
    moe = base.config.family in ("mixtral", "qwen3_moe", "deepseek_v3")
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0 if moe else 0.05)
    model = apply_lora(load_model(d).model, cfg).eval()
    assert any(isinstance(m, LoRAExperts) for m in model.modules()) == moe
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        # PEFT 0.21 moves gate/up/down targets of a MoE family wholly onto the experts and
        # leaves the dense layers' MLPs (Qwen3-MoE's mlp_only_layers) without LoRA: keep
        # those updates zero so the comparison is with what PEFT can represent.
        for name, m in model.named_modules():
            if moe and isinstance(m, LoRALinear) and ".mlp." in name:
                m.lora_B.zero_()
        for m in model.modules():
            if isinstance(m, LoRAExperts):
                for proj in m.projs:
                    b = m.pair(proj)[1]
                    b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    save_adapter(model, cfg, tmp_path / "ad", base_model=str(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    tokens = _tokens(seed=8)
    with torch.no_grad():
        unmerged = model(tokens)
        ref = peft(tokens).logits
        assert (unmerged - base(tokens)).abs().max() > 1e-3, case
        merged = merge_lora(model)(tokens)
    # float32 sums in another order, amplified by the wide weights: ~3e-5 on logits of ~10
    torch.testing.assert_close(unmerged, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls_name", ["MistralConfig", "Gemma3TextConfig", "Qwen2Config"])
def test_keys_left_out_of_config_json_take_transformers_defaults(cls_name):
    """A hand-written config.json without head_dim / sliding_window / max_window_layers reads as
    transformers reads it."""
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=30,
              num_attention_heads=4, num_key_value_heads=2)
    model_type = {"MistralConfig": "mistral", "Gemma3TextConfig": "gemma3_text",
                  "Qwen2Config": "qwen2"}[cls_name]
    d = {"model_type": model_type, **kw}
    if cls_name == "Qwen2Config":
        d["use_sliding_window"], d["sliding_window"] = True, 8
    ref = getattr(transformers, cls_name)(**{k: v for k, v in d.items() if k != "model_type"})
    ours = ModelConfig.from_hf_dict(d)
    assert ours.head_dim == getattr(ref, "head_dim", None) or ours.head_dim == 64 // 4
    assert ours.sliding_window == ref.sliding_window
    want = [t == "sliding_attention" for t in ref.layer_types] if getattr(
        ref, "layer_types", None) else [bool(ref.sliding_window)] * 30
    assert [ours.is_sliding(i) for i in range(30)] == want

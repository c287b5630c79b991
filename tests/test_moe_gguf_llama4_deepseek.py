"""Llama 4 text (llama.cpp's `llama4`) and DeepSeek-V3 (`deepseek2`) GGUF files: made by
llama.cpp's own converter and quantizer from random tiny checkpoints made by transformers, they
load with transformers' logits (where llama.cpp runs the model as transformers does) or
llama.cpp's (where it does not), their quantized experts stay in the file's blocks and
DeepSeek's kv_b stays float32 (absorbed decode); our export runs in llama.cpp with our logits,
and what llama.cpp would run differently is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from family_fixtures import hf_family_model, llama_cpp_logits, load_saved, widen
from test_moe_gguf import (
    _assert_experts_in_blocks,
    _close_to_float32_and_llama_cpp,
    _convert,
    _quantize,
    _tokens,
)

pytest.importorskip("transformers")

from llamaworks.checkpoint import export_gguf, load_model  # noqa: E402
from llamaworks.checkpoint.gguf import read_metadata  # noqa: E402
from llamaworks.checkpoint.gguf_file import parse_gguf  # noqa: E402
from llamaworks.config import ModelConfig  # noqa: E402
from llamaworks.errors import CheckpointError  # noqa: E402
from llamaworks.infer.experts import GGUFExperts  # noqa: E402
from llamaworks.infer.load import load_as_stored  # noqa: E402
from llamaworks.model import Experts, Llama  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer, which llama.cpp's converter knows
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
            max_position_embeddings=128, rms_norm_eps=1e-6)
# llama.cpp fixes Llama 4's chunk (8192), no-RoPE step (4) and temperature (8192, 0.1): these
# are transformers' defaults, so the tiny models keep them (4 layers: layer 3 without RoPE).
LLAMA4 = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
              intermediate_size_mlp=80)
# DeepSeek-V3's config.json says scoring_func "sigmoid" (transformers' modeling ignores it, the
# key is saved as given; llama.cpp's converter reads it, and without it llama.cpp routes by
# softmax)
DEEPSEEK = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, scoring_func="sigmoid")
CASES = {
    # experts on every other layer, top-1, untied
    "llama4-step2-top1": ("Llama4TextConfig", dict(
        LLAMA4, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        tie_word_embeddings=False)),
    # every layer sparse, top-2 of 5, MQA, tied embeddings
    "llama4-top2-tied": ("Llama4TextConfig", dict(
        LLAMA4, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2,
        interleave_moe_layer_step=1, tie_word_embeddings=True)),
    # Llama 4 Scout's RoPE scaling (llama3 with low = high = 1: a step, written as rope_freqs)
    "llama4-scout-rope": ("Llama4TextConfig", dict(
        LLAMA4, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
        rope_theta=10000.0, tie_word_embeddings=False, rope_scaling=dict(
            rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
            original_max_position_embeddings=8192))),
    # q bottleneck, first layer dense, 8 experts in 4 groups (top-3 of the best 2), correction
    # bias, renormalized x2.5, 2 shared experts, YaRN with mscale_all_dim
    "deepseek3-groups-yarn": ("DeepseekV3Config", dict(
        DEEPSEEK, q_lora_rank=24, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
        topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
    # direct q (no bottleneck), no groups, not renormalized, x1.5, every layer sparse. llama.cpp
    # needs attention.q_lora_rank for a 4-layer deepseek2, which its converter leaves out here:
    # llama.cpp cannot load this file (our export writes 0 and llama.cpp runs it)
    "deepseek3-direct-q": ("DeepseekV3Config", dict(
        DEEPSEEK, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
        moe_intermediate_size=16, n_routed_experts=6, n_group=1, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
        norm_topk_prob=False, routed_scaling_factor=1.5, tie_word_embeddings=False)),
    # RoPE on halves (rope_interleave false): llama.cpp's converter does not permute, and
    # llama.cpp rotates pairs, so the file means pairs (our export permutes the rows instead)
    "deepseek3-halves": ("DeepseekV3Config", dict(
        DEEPSEEK, q_lora_rank=24, moe_intermediate_size=16, n_routed_experts=6, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
        norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False,
        tie_word_embeddings=False)),
    # no scoring_func in config.json: llama.cpp's converter writes no gating function and
    # llama.cpp routes by softmax, so the file means softmax (transformers: sigmoid)
    "deepseek3-softmax-by-default": ("DeepseekV3Config", dict(
        {k: v for k, v in DEEPSEEK.items() if k != "scoring_func"}, q_lora_rank=24,
        moe_intermediate_size=24, n_routed_experts=4, n_group=1, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=2, n_shared_experts=1,
        tie_word_embeddings=False)),
}
# files llama.cpp runs differently from transformers: we read them as llama.cpp does
LLAMA_CPP_DIFFERS = {"deepseek3-halves", "deepseek3-softmax-by-default"}


def _hf(case: str, wide: bool = False, std: float = 0.25):
    cls_name, kw = CASES[case]
    kw = {**BASE, **kw}
    if wide:  # K-quants need rows of 256; narrower weights keep llama.cpp's 8-bit activations
        kw.update(hidden_size=256, intermediate_size=256)  # from flipping most routing
        if cls_name.startswith("Llama4"):
            kw.update(head_dim=64, intermediate_size_mlp=256)
        else:
            kw.update(moe_intermediate_size=256, kv_lora_rank=64, qk_rope_head_dim=32,
                      qk_nope_head_dim=32, v_head_dim=32,
                      q_lora_rank=64 if kw.get("q_lora_rank") else None)
    model = hf_family_model(cls_name, kw)
    return model if std == 0.25 else widen(model, False, std)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_converter_made_gguf_loads_with_transformers_logits(case, tmp_path, smollm_tokenizer,
                                                            llama_cpp):
    """An F32 file from llama.cpp's converter: family, experts, router and attention read from
    its metadata as llama.cpp runs them; logits equal transformers' (wide weights) through the
    float32 loader and as stored, and llama.cpp's on the same file. Where llama.cpp runs the
    model differently (no scoring_func: softmax), its logits and not transformers'."""
    hf = _hf(case)
    path = _convert(hf, smollm_tokenizer, tmp_path / "hf")
    ours = load_model(path).model
    cfg = ours.config
    llama4 = case.startswith("llama4")
    assert cfg.family == ("llama4_text" if llama4 else "deepseek_v3")
    assert cfg.n_active_experts == hf.config.num_experts_per_tok
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    if llama4:
        assert (cfg.nope_layers, cfg.attention_chunk, cfg.qk_l2_norm) == ([3], 8192, True)
        assert cfg.router_pre and cfg.shared_hidden_dim == cfg.moe_hidden_dim
        if case == "llama4-scout-rope":  # recovered from the rope_freqs tensor
            keys = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            assert "rope_freqs.weight" in {t.name for t in parse_gguf(path).tensors}
            assert {k: cfg.rope_scaling[k] for k in keys} == {
                k: hf.config.rope_parameters[k] for k in keys}
    else:
        assert cfg.mla and cfg.router_bias and cfg.q_lora_rank == hf.config.q_lora_rank
        assert cfg.rope_interleaved  # llama.cpp's pairs, whatever rope_interleave said
        groups = hf.config.n_group if hf.config.topk_group < hf.config.n_group else 1
        assert (cfg.router_groups, cfg.router) == (groups, "softmax" if case ==
                                                   "deepseek3-softmax-by-default" else "sigmoid")
        kinds = {t.name.split(".")[2] for t in parse_gguf(path).tensors if t.name[:4] == "blk."}
        assert {"attn_k_b", "attn_v_b", "exp_probs_b"} <= kinds and "attn_kv_b" not in kinds
    toks = _tokens()
    with torch.no_grad():
        got = ours(torch.tensor([toks]))[0]
        stored = load_as_stored(path).model(torch.tensor([toks]))[0]
        want = hf(torch.tensor([toks])).logits[0]
    moe = next(i for i in range(cfg.n_layers) if cfg.is_moe(i))
    assert isinstance(ours.model.layers[moe].mlp.experts, Experts)
    torch.testing.assert_close(stored, got, atol=1e-5, rtol=0)
    if case in LLAMA_CPP_DIFFERS:
        assert (got - want).abs().max() > 0.1
    else:
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    if case == "deepseek3-direct-q":  # no q_lora_rank key: llama.cpp refuses the file
        assert "deepseek2.attention.q_lora_rank" not in read_metadata(path)
        return
    theirs = torch.from_numpy(llama_cpp_logits(llama_cpp, path, toks))
    torch.testing.assert_close(got, theirs, atol=2e-4, rtol=0)


QUANT_CASES = [("llama4-step2-top1", "Q4_K_M"), ("llama4-top2-tied", "Q8_0"),
               ("deepseek3-groups-yarn", "Q4_K_M"), ("deepseek3-groups-yarn", "Q8_0")]


@pytest.mark.slow
@pytest.mark.parametrize("case,ftype", QUANT_CASES, ids=[f"{c}-{f}" for c, f in QUANT_CASES])
def test_llama_cpp_quantized_file_keeps_experts_in_blocks(case, ftype, tmp_path,
                                                          smollm_tokenizer, llama_cpp):
    """A file quantized by llama.cpp's quantizer loads as stored with every expert tensor in its
    blocks (`GGUFExperts`, Llama 4's weighing the input), DeepSeek's kv_b joined from the
    quantized attn_k_b / attn_v_b as float32 (so cached decode runs absorbed); logits equal our
    float32 dequantization of the same file (prompt and decode steps) and llama.cpp's up to its
    8-bit activations."""
    f32 = _convert(_hf(case, wide=True, std=0.05), smollm_tokenizer, tmp_path / "hf")
    path = _quantize(llama_cpp, f32, ftype)
    infos = {t.name: t for t in parse_gguf(path).tensors}
    stored = load_as_stored(path).model
    _assert_experts_in_blocks(stored, infos, ftype)
    cfg = stored.config
    if cfg.mla:
        assert infos["blk.0.attn_k_b.weight"].type_name != "F32"
        for layer in stored.model.layers:
            w = layer.self_attn.kv_b_proj.weight
            assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    # experts given few tokens (and every one-token step) run the block kernels: Q8_0 on int16
    # activations; the K-quants on int8 ones, as llama.cpp, so their logits move by ~1-5% of the
    # largest (measured: decode steps 2.2-4.8%), more at a token whose routing that flips (38%)
    per_token = _close_to_float32_and_llama_cpp(llama_cpp, path, stored)
    # measured, of the largest logit: median 2.4% (Llama 4 Q4_K_M), 2.7% (DeepSeek Q8_0), 4.0%
    # (DeepSeek Q4_K_M: llama.cpp's 8-bit activations through latent attention's chain of
    # matmuls), where the quantization itself moves the logits by 26-44% (Q4_K_M) and 3.6%
    # (Q8_0) of it; up to 50% at the 1-3 tokens of 24 whose routing those 8 bits flip
    assert per_token.median() < 0.05 and (per_token < 0.06).sum() >= len(per_token) - 4, \
        per_token


EXPORT_CASES = ["llama4-step2-top1", "llama4-top2-tied", "llama4-scout-rope",
                "deepseek3-groups-yarn", "deepseek3-direct-q", "deepseek3-halves"]


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_our_export_runs_in_llama_cpp_with_our_logits(case, tmp_path, llama_cpp):
    """Our F32 export of a model read from transformers' directory: llama.cpp's logits equal
    ours, our loader reads the file back exactly. DeepSeek with RoPE on halves
    (rope_interleave false) has its rope rows permuted into llama.cpp's pairs; a direct-q
    DeepSeek gets q_lora_rank 0, which llama.cpp needs."""
    hf = _hf(case)
    with torch.no_grad():
        ours = load_saved(hf, tmp_path / "hf")
    assert ours.config.rope_interleaved == (case != "deepseek3-halves")
    path = export_gguf(tmp_path / "m.gguf", ours.config, ours.state_dict(), None, "F32")
    toks = _tokens(seed=6)
    theirs = llama_cpp_logits(llama_cpp, path, toks)
    with torch.no_grad():
        want = ours(torch.tensor([toks]))[0].numpy()
        back = load_model(path).model(torch.tensor([toks]))[0].numpy()
        ref = hf(torch.tensor([toks])).logits[0].numpy()
    np.testing.assert_allclose(want, ref, atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(theirs, want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(back, want, atol=1e-5, rtol=0)


# -- without llama.cpp: configs and state dicts made here ------------------------------------
def _tiny(family: str, **kw) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A random tiny Llama 4 or DeepSeek-V3 (HF config keys in `kw` override)."""
    if family == "llama4_text":
        d = dict(model_type="llama4_text", vocab_size=96, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                 num_experts_per_tok=2, interleave_moe_layer_step=1, rms_norm_eps=1e-6,
                 max_position_embeddings=64, tie_word_embeddings=False)
    else:
        d = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                 moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                 n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                 kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                 v_head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=64,
                 tie_word_embeddings=False)
    cfg = ModelConfig.from_hf_dict({**d, **kw})
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
            if p.dim() == 1:
                p.add_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    return cfg, model.state_dict()


@pytest.mark.parametrize("family,change,match", [
    ("llama4_text", dict(attention_chunk_size=8), "chunks of 8192"),
    ("llama4_text", dict(no_rope_layer_interval=2), "every 4th layer"),
    ("llama4_text", dict(floor_scale=4), "floor 8192"),
    ("llama4_text", dict(attn_temperature_tuning=False), "floor 8192"),
    ("llama4_text", dict(use_qk_norm=False), "q/k norm"),
    ("llama4_text", dict(attention_bias=True), "output-projection bias"),
    ("llama4_text", dict(moe_layers=[0, 3]), "every step-th layer"),
    ("deepseek_v3", dict(first_k_dense_replace=0, rms_norm_eps=1e-5), "epsilon"),
    ("deepseek_v3", dict(attention_bias=True), "no attention biases"),
    ("deepseek_v3", dict(n_shared_experts=0), "shared experts"),
    ("deepseek_v3", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=16,
                                           original_max_position_embeddings=16)), "betas"),
    ("deepseek_v3", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, mscale=0.7,
                                           mscale_all_dim=1.0,
                                           original_max_position_embeddings=16)),
     "mscale_all_dim"),
    ("deepseek_v3", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                           original_max_position_embeddings=16)),
     "mscale_all_dim"),
])
def test_export_refuses_what_llama_cpp_would_run_differently(family, change, match, tmp_path):
    cfg, sd = _tiny(family, **change)
    with pytest.raises(CheckpointError, match=match):
        export_gguf(tmp_path / "m.gguf", cfg, sd, None, "F32")
    assert not list(tmp_path.iterdir())


def test_export_refuses_dense_layers_after_sparse_ones(tmp_path):
    cfg, sd = _tiny("deepseek_v3")
    cfg.moe_layers = [1]  # layer 2 dense after a sparse one: not a leading dense block
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    with pytest.raises(CheckpointError, match="only before the first sparse"):
        export_gguf(tmp_path / "m.gguf", cfg, model.state_dict(), None, "F32")


@pytest.mark.parametrize("family,kw", [
    ("llama4_text", {}),
    ("llama4_text", dict(interleave_moe_layer_step=2, num_experts_per_tok=1)),
    ("deepseek_v3", {}),
    # RoPE on halves and a direct q: the export permutes the rope rows into pairs
    ("deepseek_v3", dict(rope_interleave=False, q_lora_rank=None, n_group=1, topk_group=1,
                         rope_scaling=dict(rope_type="yarn", factor=4.0, mscale=1.0,
                                           mscale_all_dim=1.0,
                                           original_max_position_embeddings=16))),
])
def test_q8_0_export_loads_as_stored_with_the_dequantized_models_logits(family, kw, tmp_path):
    """Our export (no llama.cpp): F32 reads back as the model it was written from (incl. a
    half-split DeepSeek read back as pairs); Q8_0 as stored keeps the experts in `GGUFExperts`
    (Llama 4 weighing their input) with the float32 dequantization's logits, prompt and decode
    (DeepSeek's cached decode absorbed over a float32 kv_b)."""
    from infer_fixtures import decode_logits

    cfg, sd = _tiny(family, **kw)
    model = Llama(cfg)
    model.load_state_dict(sd)
    toks = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    f32 = load_model(export_gguf(tmp_path / "f32.gguf", cfg, sd, None, "F32")).model
    with torch.no_grad():
        torch.testing.assert_close(f32(toks), model(toks), atol=1e-5, rtol=1e-5)
    assert f32.config.family == family and f32.config.rope_interleaved
    path = export_gguf(tmp_path / "m.gguf", cfg, sd, None, "Q8_0")
    stored, floats = load_as_stored(path).model, load_model(path).model
    moe = next(i for i in range(cfg.n_layers) if cfg.is_moe(i))
    assert isinstance(stored.model.layers[moe].mlp.experts, GGUFExperts)
    if cfg.mla:
        assert isinstance(stored.model.layers[0].self_attn.kv_b_proj.weight, torch.Tensor)
    with torch.no_grad():
        got, want = stored(toks), floats(toks)
    # an expert given fewer than 16 tokens runs the block kernels on int16 activations
    # (measured: 2-5e-5 of the largest logit)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    a, b = decode_logits(stored, False, steps=4), decode_logits(floats, False, steps=4)
    torch.testing.assert_close(a, b, atol=2e-3 * b.abs().max().item(), rtol=0)


def _md(arch: str, **kw) -> dict:
    base = {"general.architecture": arch, f"{arch}.block_count": 8,
            f"{arch}.embedding_length": 64, f"{arch}.attention.head_count": 4,
            f"{arch}.feed_forward_length": 96, f"{arch}.vocab_size": 64,
            f"{arch}.expert_count": 16, f"{arch}.expert_used_count": 1,
            f"{arch}.expert_feed_forward_length": 32,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    if arch == "llama4":
        base.update({"llama4.attention.key_length": 16, "llama4.interleave_moe_layer_step": 2})
    else:
        base.update({"deepseek2.attention.kv_lora_rank": 32, "deepseek2.attention.key_length":
                     48, "deepseek2.attention.value_length": 32,
                     "deepseek2.attention.key_length_mla": 24,
                     "deepseek2.attention.value_length_mla": 20,
                     "deepseek2.rope.dimension_count": 16, "deepseek2.expert_shared_count": 2,
                     "deepseek2.attention.q_lora_rank": 24,
                     "deepseek2.leading_dense_block_count": 3})
    return {**base, **{f"{arch}.{k}": v for k, v in kw.items()}}


def test_gguf_metadata_reads_as_llama_cpp_runs_it():
    """llama4: llama.cpp's fixed iRoPE and q/k norm by expert count; deepseek2: MLA sizes from
    the *_mla keys, gating by default softmax, YaRN factors from yarn_log_multiplier (the
    converter's 0.1 * mscale_all_dim), MTP layers not part of the model."""
    cfg = ModelConfig.from_gguf_metadata(_md("llama4"))
    assert (cfg.family, cfg.moe_layers, cfg.nope_layers) == ("llama4_text", [1, 3, 5, 7], [3, 7])
    assert cfg.layer_types[3] == "full_attention" and cfg.is_chunked(2)
    assert (cfg.attention_chunk, cfg.attn_temperature, cfg.qk_l2_norm) == (8192, [8192.0, 0.1],
                                                                            True)
    assert cfg.shared_hidden_dim == cfg.moe_hidden_dim == 32 and cfg.router_pre
    assert not ModelConfig.from_gguf_metadata(_md("llama4", expert_count=128)).qk_l2_norm
    with pytest.raises(CheckpointError, match="MobileLLM"):
        ModelConfig.from_gguf_metadata(_md("llama4", **{"attention.sliding_window": 0}))
    ds = ModelConfig.from_gguf_metadata(_md("deepseek2", **{"nextn_predict_layers": 1}))
    assert (ds.n_layers, ds.moe_layers, ds.kv_lora_rank, ds.qk_nope_dim, ds.v_head_dim,
            ds.head_dim, ds.n_kv_heads) == (7, [3, 4, 5, 6], 32, 8, 20, 16, 4)
    assert (ds.router, ds.router_norm, ds.router_scale, ds.shared_hidden_dim) == (
        "softmax", False, 1.0, 64)
    assert ds.rope_scaling is None and ds.attn_scale == pytest.approx(24 ** -0.5)
    yarn = ModelConfig.from_gguf_metadata(_md(
        "deepseek2", expert_gating_func=2, expert_weights_norm=True, expert_weights_scale=2.5,
        expert_group_count=4, expert_group_used_count=2, **{
            "rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
            "rope.scaling.original_context_length": 4096,
            "rope.scaling.yarn_log_multiplier": 0.1, "rope.scaling.yarn_beta_fast": 16.0}))
    assert (yarn.router, yarn.router_norm, yarn.router_scale) == ("sigmoid", True, 2.5)
    assert (yarn.router_groups, yarn.router_topk_groups) == (4, 2)
    mscale = 1 + 0.1 * math.log(40.0)  # DeepSeek-V3's softmax scale, as transformers'
    assert yarn.attn_scale == pytest.approx(mscale ** 2 / math.sqrt(24))
    assert yarn.rope_scaling["beta_fast"] == 32.0  # llama.cpp does not read deepseek2's betas
    assert yarn.rope_scaling["attention_factor"] == 1.0
    with pytest.raises(CheckpointError, match="epsilon"):
        ModelConfig.from_gguf_metadata(_md("deepseek2", **{
            "attention.layer_norm_rms_epsilon": 1e-5}))
    with pytest.raises(CheckpointError, match="gating function 3"):
        ModelConfig.from_gguf_metadata(_md("deepseek2", expert_gating_func=3))


def _as_legacy_kv_b(src: Path, dst: Path) -> Path:
    """`src` (deepseek2, split attn_k_b / attn_v_b) rewritten as older converters wrote it: one
    `attn_kv_b` per layer, key/value_length the per-head sizes, K/V heads = heads, no *_mla
    keys."""
    import gguf

    from llamaworks.checkpoint.gguf import _field_value

    r = gguf.GGUFReader(src)
    md = read_metadata(r)
    w = gguf.GGUFWriter(dst, arch="deepseek2")
    lengths = {"deepseek2.attention.key_length": md["deepseek2.attention.key_length_mla"],
               "deepseek2.attention.value_length": md["deepseek2.attention.value_length_mla"],
               "deepseek2.attention.head_count_kv": md["deepseek2.attention.head_count"]}
    for name, fld in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name.endswith("_mla"):
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, lengths.get(name, _field_value(fld)), vtype, sub)
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    for name, data in tensors.items():
        if ".attn_v_b." in name:
            continue
        if ".attn_k_b." in name:  # [H, rank, nope] and [H, v, rank] -> [H * (nope + v), rank]
            v = tensors[name.replace("attn_k_b", "attn_v_b")]
            data = np.concatenate([data.transpose(0, 2, 1), v], 1).reshape(-1, v.shape[-1])
            name = name.replace("attn_k_b", "attn_kv_b")
        w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_legacy_kv_b_file_reads_as_the_split_one(tmp_path, llama_cpp):
    """A deepseek2 file with one `attn_kv_b` per layer (converters before the split) gives the
    logits of the same model in the split form, in our loader and in llama.cpp (which runs it
    without the absorption)."""
    cfg, sd = _tiny("deepseek_v3", rope_scaling=dict(
        rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
        original_max_position_embeddings=16))
    split = export_gguf(tmp_path / "split.gguf", cfg, sd, None, "F32")
    legacy = _as_legacy_kv_b(split, tmp_path / "legacy.gguf")
    names = {t.name for t in parse_gguf(legacy).tensors}
    assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k_b.weight" not in names
    toks = [1, 5, 9, 17, 33, 2, 64, 80, 11, 7]
    a, b = load_model(split).model, load_model(legacy).model
    assert (b.config.qk_nope_dim, b.config.v_head_dim) == (cfg.qk_nope_dim, cfg.v_head_dim)
    with torch.no_grad():
        want = a(torch.tensor([toks]))[0]
        torch.testing.assert_close(b(torch.tensor([toks]))[0], want, atol=1e-6, rtol=0)
    theirs = torch.from_numpy(llama_cpp_logits(llama_cpp, legacy, toks))
    torch.testing.assert_close(theirs, want, atol=2e-4, rtol=0)

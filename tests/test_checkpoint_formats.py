"""Every checkpoint layout we read or write, each checked against an independent reference:
transformers (HF directories), Meta's original forward pass (consolidated.NN.pth), llama.cpp
(GGUF files we export, and its own quantizer's outputs), and transformers' GGUF loader (SmolLM2).

Tolerances for llama.cpp comparisons (2-layer dim-256 model with SmolLM2's vocabulary, logit
std ~0.32, 64 random tokens; llama.cpp run with an F32 KV cache). llama.cpp quantizes the
*activations* of every matmul to the weight's dot-product type (F16 -> F16, BF16 -> BF16,
Q8_0/Q4_0/Q4_1 -> Q8_0/Q8_1, K-quants -> Q8_K), which we do not, so quantized files cannot match
exactly. Measured max / mean |diff| (tolerance): F32 1.2e-6 / 1.1e-7 (1e-5), F16 7.1e-4 / 9.5e-5
(3e-3), BF16 5.4e-3 / 7.7e-4 (2e-2), Q8_0 1.9e-2 / 2.6e-3 (5e-2), Q4_0 1.9e-2 / 2.7e-3 (5e-2),
Q4_1 1.7e-2 / 2.7e-3 (5e-2), Q4_K 2.7e-2 / 3.6e-3 (6e-2), Q5_K 2.5e-2 / 3.6e-3 (6e-2), Q6_K
2.9e-2 / 3.7e-3 (6e-2); argmax agreement 100% (required: 90%). For the 4-6 bit types that is
well below what the weight quantization itself does (mean 0.012-0.049), and the test requires
it, so a wrong dequantization cannot pass; for F16/BF16/Q8_0 our exporter's bytes are also
checked to be identical to llama.cpp's quantizer output.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaworks.checkpoint import detect_format, load_model, load_state_dict, save_native
from llamaworks.checkpoint.gguf import parse_gguf, read_metadata
from llamaworks.checkpoint.gguf_export import FILE_TYPES, export_gguf
from llamaworks.config import ModelConfig
from llamaworks.model import Llama

ATOL = 1e-5
LLAMA32_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Scaled down so that it changes most frequencies within a few dozen positions.
SHORT_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 3.0, "original_max_position_embeddings": 48}
CONFIGS = {
    "mha-untied": ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                              max_seq_len=64),
    "gqa-tied": ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                            hidden_dim=128, tie_embeddings=True, max_seq_len=64),
    "gqa-untied": ModelConfig(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                              hidden_dim=160, max_seq_len=64, norm_eps=1e-6),
    "llama3-rope": ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               hidden_dim=128, rope_scaling=SHORT_SCALING, tie_embeddings=True,
                               max_seq_len=64),
    "llama3.2-rope": ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                 hidden_dim=128, rope_theta=500000.0,
                                 rope_scaling=LLAMA32_SCALING, max_seq_len=64),
    "odd-48-3heads": ModelConfig(vocab_size=101, dim=48, n_layers=2, n_heads=3, n_kv_heads=1,
                                 hidden_dim=80, max_seq_len=64, rope_theta=100000.0),
    "head_dim-24": ModelConfig(vocab_size=90, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=24, hidden_dim=96, max_seq_len=64),
}


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Llama:
    """A random model whose norm weights are not all ones (so their handling is tested too)."""
    g = torch.Generator().manual_seed(seed)
    model = Llama(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(std=std, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(vocab: int, n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, toks: torch.Tensor) -> torch.Tensor:
    out = model(toks)
    return (out.logits if hasattr(out, "logits") else out).float()


def hf_from_pretrained(path: Path, **kw) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


# -- native (HF layout) written by us -> transformers -----------------------------------------
@pytest.mark.parametrize("shard_bytes", [None, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_native_opens_in_transformers_with_equal_logits(tmp_path, name, shard_bytes):
    cfg = CONFIGS[name]
    model = random_model(cfg)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    save_native(tmp_path, cfg, model.state_dict(), **kw)
    index = tmp_path / "model.safetensors.index.json"
    if shard_bytes is None:
        assert (tmp_path / "model.safetensors").exists() and not index.exists()
    else:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    toks = tokens(cfg.vocab_size)
    want = logits(model, toks)
    hf = hf_from_pretrained(tmp_path)
    torch.testing.assert_close(logits(hf, toks), want, atol=ATOL, rtol=0)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    back = load_model(tmp_path)  # and our own loader reads it back bit for bit
    assert back.format == "hf" and back.config.rope_scaling == cfg.rope_scaling
    torch.testing.assert_close(logits(back.model, toks), want, atol=0, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_save_native_over_an_earlier_save_leaves_no_stale_shards(tmp_path):
    cfg = CONFIGS["gqa-untied"]
    sd = random_model(cfg).state_dict()
    save_native(tmp_path, cfg, sd, max_shard_bytes=20_000)
    many = set(tmp_path.glob("model-*.safetensors"))
    save_native(tmp_path, cfg, sd, max_shard_bytes=60_000)
    fewer = set(tmp_path.glob("model-*.safetensors"))
    assert 1 < len(fewer) < len(many)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert {tmp_path / n for n in index["weight_map"].values()} == fewer
    save_native(tmp_path, cfg, sd)
    assert not list(tmp_path.glob("model-*")) and (tmp_path / "model.safetensors").exists()
    assert load_model(tmp_path).config == cfg


def test_llama3_rope_scaling_changes_the_logits():
    """Guard for the test above: the scaling must matter at these sizes, or it tests nothing."""
    cfg = CONFIGS["llama3-rope"]
    model = random_model(cfg)
    plain = Llama(cfg.replace(rope_scaling=None), device="meta")
    plain.load_state_dict(model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.reset_rope()
    toks = tokens(cfg.vocab_size, 48)
    assert (logits(model, toks) - logits(plain, toks)).abs().max() > 1e-3


# -- HF directory written by transformers -> ours ----------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_transformers_save_pretrained_loads_with_equal_logits(tmp_path, tied, shard):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=112,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=20000.0,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    kw = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, **kw)
    if shard is not None:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(tmp_path)
    assert loaded.format == "hf" and loaded.config.tie_embeddings == tied
    toks = tokens(120)
    torch.testing.assert_close(logits(loaded.model, toks), logits(hf, toks), atol=ATOL, rtol=0)


# -- Meta layout: params.json + consolidated.NN.pth --------------------------------------------
def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> Meta's interleaved pairs (inverse of the permutation in
    transformers' convert_llama_weights_to_hf.py), written independently of our code."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    m = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
         "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        m.update({
            f"layers.{i}.attention.wq.weight": hf_to_meta_qk(sd[p + "self_attn.q_proj.weight"],
                                                             cfg.n_heads),
            f"layers.{i}.attention.wk.weight": hf_to_meta_qk(sd[p + "self_attn.k_proj.weight"],
                                                             cfg.n_kv_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    return {k: v.detach().clone().contiguous() for k, v in m.items()}


def split_model_parallel(w: dict[str, torch.Tensor], n: int, vocab_parallel_embed: bool
                         ) -> list[dict[str, torch.Tensor]]:
    """Split like fairscale's model-parallel layers: ColumnParallelLinear (wq/wk/wv/w1/w3/output)
    on dim 0, RowParallelLinear (wo/w2) on dim 1, ParallelEmbedding on dim 1 (Llama 1/2) or
    VocabParallelEmbedding on dim 0 (Llama 3); norms replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in w.items():
        if k.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or \
                k == "output.weight":
            dim = 0
        elif k.endswith(("wo.weight", "w2.weight")):
            dim = 1
        elif k == "tok_embeddings.weight":
            dim = 0 if vocab_parallel_embed else 1
        else:
            dim = None
        parts = [v] * n if dim is None else list(v.chunk(n, dim=dim))
        for s, part in zip(shards, parts, strict=True):
            s[k] = part.clone()
    return shards


def meta_apply_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """meta-llama/llama-models' apply_scaling (Llama 3.1), verbatim in substance."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                      low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


@torch.no_grad()
def meta_forward(w: dict[str, torch.Tensor], params: dict, toks: torch.Tensor) -> torch.Tensor:
    """The forward pass of meta-llama/llama's model.py (2023): complex-number rotary embeddings
    on interleaved pairs, repeat_kv, explicit causal softmax attention, SwiGLU."""
    dim, n_heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    bsz, seqlen = toks.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2]
                                                         .float() / hd))
    if params.get("use_scaled_rope"):
        freqs = meta_apply_scaling(freqs)
    freqs_cis = torch.polar(torch.ones(seqlen, hd // 2),
                            torch.outer(torch.arange(seqlen).float(), freqs))
    freqs_cis = freqs_cis.view(1, seqlen, 1, hd // 2)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
                ).type_as(x) * weight

    def rotary(x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)

    def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
        b, s, kvh, d = x.shape
        return x[:, :, :, None, :].expand(b, s, kvh, n_rep, d).reshape(b, s, kvh * n_rep, d)

    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    h = F.embedding(toks, w["tok_embeddings.weight"])
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        xq = (x @ w[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, hd)
        xk = (x @ w[p + "attention.wk.weight"].T).view(bsz, seqlen, n_kv, hd)
        xv = (x @ w[p + "attention.wv.weight"].T).view(bsz, seqlen, n_kv, hd)
        xq, xk = rotary(xq), rotary(xk)
        keys, values = repeat_kv(xk, n_heads // n_kv), repeat_kv(xv, n_heads // n_kv)
        q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        out = (scores @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + out @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return (rms(h, w["norm.weight"]) @ w["output.weight"].T).float()


META_CASES = {
    # Llama 1/2: MHA, embedding split on its width; hidden = 2/3*4*64 -> multiple of 32 = 192.
    "llama2": ({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
                "vocab_size": -1}, False, 100),
    # Llama 3: GQA, vocabulary-parallel embedding, theta 5e5, scaled rope, ffn multiplier 1.3.
    "llama3": ({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
                "use_scaled_rope": True, "vocab_size": 128}, True, 128),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_consolidated_shards_match_meta_reference_forward(tmp_path, case):
    from transformers import LlamaConfig, LlamaForCausalLM

    params, vocab_parallel, vocab = META_CASES[case]
    ref_cfg = ModelConfig.from_meta_params(params, vocab_size=vocab)
    assert ref_cfg.hidden_dim == (224 if case == "llama3" else 192)
    hf_dict = ref_cfg.to_hf_dict()
    hf_dict.pop("architectures")
    hf_dict.pop("model_type")
    hf_dict["max_position_embeddings"] = 8192  # not in params.json; only silences a warning
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**hf_dict)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.mul_(5.0)  # std 0.1: attention sharp enough for rope details to show
    merged = meta_weights(hf.state_dict(), ref_cfg)
    shards = split_model_parallel(merged, 2, vocab_parallel)
    for i, shard in enumerate(shards):
        if case == "llama2":
            shard["rope.freqs"] = torch.zeros(8)  # Llama 1 checkpoints carry this buffer
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert detect_format(tmp_path) == "meta"

    toks = tokens(vocab, 48)
    want = meta_forward(merged, params, toks)
    if params.get("use_scaled_rope"):  # the scaling must matter here, or it is not tested
        plain = meta_forward(merged, {**params, "use_scaled_rope": False}, toks)
        assert (want - plain).abs().max() > 20 * ATOL
    # The reference itself agrees with transformers (so the Meta layout above is right) ...
    torch.testing.assert_close(logits(hf, toks), want, atol=ATOL, rtol=0)
    # ... and our loader reproduces it.
    loaded = load_model(tmp_path)
    assert loaded.format == "meta"
    assert loaded.config.hidden_dim == ref_cfg.hidden_dim
    assert loaded.config.n_kv_heads == ref_cfg.n_kv_heads
    torch.testing.assert_close(logits(loaded.model, toks), want, atol=ATOL, rtol=0)


# -- GGUF export: round trip through our loader (fast) ---------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_gguf_f32_round_trips_exactly(tmp_path, name):
    cfg = CONFIGS[name]
    model = random_model(cfg)
    path = export_gguf(tmp_path / "m.gguf", cfg, model.state_dict(), None, "F32")
    assert not list(tmp_path.glob(".*.tmp"))
    got_cfg, sd, fmt = load_state_dict(path)
    assert fmt == "gguf"
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
              "rope_theta", "tie_embeddings", "max_seq_len", "rope_scaling"):
        assert getattr(got_cfg, f) == getattr(cfg, f), f
    assert got_cfg.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-6)
    want = {k: v for k, v in model.state_dict().items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert set(sd) == set(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("file_type", ["F16", "BF16", "Q8_0"])
def test_export_gguf_types_store_the_rounded_weights(tmp_path, file_type):
    cfg = CONFIGS["gqa-untied"].replace(dim=128, hidden_dim=96)  # 96: Q8_0 blocks of 32
    model = random_model(cfg)
    path = export_gguf(tmp_path / "m.gguf", cfg, model.state_dict(), None, file_type)
    f = parse_gguf(path)
    kinds = {t.name: t.type_name for t in f.tensors}
    assert all(kinds[n] == "F32" for n in kinds if n.endswith("norm.weight"))
    assert {kinds[n] for n in kinds if not n.endswith("norm.weight")} == {file_type}
    _, sd, _ = load_state_dict(path)
    for k, v in model.state_dict().items():
        if k.endswith("norm.weight"):
            assert torch.equal(sd[k], v)
        elif file_type in ("F16", "BF16"):
            dt = torch.float16 if file_type == "F16" else torch.bfloat16
            assert torch.equal(sd[k], v.to(dt).float()), k
        else:  # Q8_0: blocks of 32 with scale amax/127 -> error at most half a step
            blocks = v.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127
            err = (sd[k].reshape(-1, 32) - blocks).abs()
            # half a step, plus up to 127 steps times the F16 rounding of the scale
            assert (err <= step * (0.5 + 127 * 2**-11) + 1e-9).all(), k


def test_export_gguf_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32(tmp_path):
    cfg = CONFIGS["odd-48-3heads"]
    path = export_gguf(tmp_path / "m.gguf", cfg, random_model(cfg).state_dict(), None, "Q8_0")
    kinds = {t.name: t.type_name for t in parse_gguf(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of hidden_dim 80
    assert kinds["blk.0.attn_q.weight"] == "F16"  # rows of dim 48
    assert load_model(path).config.dim == 48


def test_export_gguf_rejects_bad_input(tmp_path):
    cfg = CONFIGS["mha-untied"]
    sd = random_model(cfg).state_dict()
    with pytest.raises(ValueError, match="file_type"):
        export_gguf(tmp_path / "m.gguf", cfg, sd, None, "Q4_0")
    from llamaworks.errors import CheckpointError

    bad = dict(sd)
    bad.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="up_proj"):
        export_gguf(tmp_path / "m.gguf", cfg, bad, None)
    small = cfg.replace(vocab_size=4)
    with pytest.raises(CheckpointError, match="tokenizer has 5 tokens"):
        export_gguf(tmp_path / "m.gguf", small, random_model(small).state_dict(),
                    {"tokenizer.ggml.tokens": list("abcde")})
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*"))


# -- GGUF export -> llama.cpp ------------------------------------------------------------------
def llama_cpp_logits(llama_cpp, path: Path, toks: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position (F32 KV cache, so F32 files compare tightly)."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=max(64, len(toks)),
                          n_batch=max(64, len(toks)), verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(toks)
    out = np.array(llm.scores[: len(toks)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("name", ["gqa-tied", "llama3-rope", "odd-48-3heads", "head_dim-24"])
def test_exported_gguf_runs_in_llama_cpp_with_equal_logits(tmp_path, name, llama_cpp):
    cfg = CONFIGS[name]
    model = random_model(cfg, std=0.05)
    path = export_gguf(tmp_path / "m.gguf", cfg, model.state_dict(), None, "F32")
    toks = tokens(cfg.vocab_size, 48)
    got = llama_cpp_logits(llama_cpp, path, toks[0].tolist())
    want = logits(model, toks)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("extra_vocab", [0, 64], ids=["exact", "padded"])
def test_exported_gguf_carries_an_spm_vocabulary(tmp_path, vocab_dir, llama_cpp, extra_vocab):
    """SentencePiece vocabulary (tokens, float scores, int token types, bools) copied through
    with the source's GGUF value types; a model vocabulary larger than the tokenizer's is padded
    with [PADn] tokens as llama.cpp's converter does. llama.cpp then tokenizes as with the
    source file and runs the model."""
    src = vocab_dir / "ggml-vocab-llama-spm.gguf"
    md = read_metadata(src)
    n_tok = len(md["tokenizer.ggml.tokens"])
    cfg = ModelConfig(vocab_size=n_tok + extra_vocab, dim=32, n_layers=1, n_heads=2,
                      hidden_dim=64, max_seq_len=64)
    model = random_model(cfg, std=0.05)
    path = export_gguf(tmp_path / "spm.gguf", cfg, model.state_dict(), md, "F32")
    out, ref = parse_gguf(path), parse_gguf(src)
    for k in (k for k in md if k.startswith("tokenizer.")):
        assert out.value_types[k] == ref.value_types[k], k
        n = len(md[k]) if isinstance(md[k], list) else None
        assert (out.metadata[k][:n] if n else out.metadata[k]) == md[k], k
    assert len(out.metadata["tokenizer.ggml.tokens"]) == cfg.vocab_size
    if extra_vocab:
        assert out.metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{cfg.vocab_size - 1}]"
    text = b"Hello world, the 2 quick foxes!"
    want = llama_cpp.Llama(model_path=str(src), vocab_only=True, verbose=False).tokenize(text)
    toks = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(text)
    assert toks == want and toks[0] == 1  # add_bos_token came through
    got = llama_cpp_logits(llama_cpp, path, toks)
    np.testing.assert_allclose(got, logits(model, torch.tensor([toks]))[0].numpy(), atol=1e-4,
                               rtol=0)


@pytest.mark.slow
def test_exported_gguf_with_tokenizer_quantized_by_llama_cpp_matches(tmp_path, smollm_gguf,
                                                                     llama_cpp):
    """F32 export with SmolLM2's vocabulary, then llama.cpp's own quantizer for each type; our
    loader's logits vs llama.cpp's on each file (tolerances in the module docstring)."""
    src_md = read_metadata(smollm_gguf)
    tok_md = {k: v for k, v in src_md.items() if k.startswith("tokenizer.")}
    vocab = len(tok_md["tokenizer.ggml.tokens"])
    cfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=512, max_seq_len=256, tie_embeddings=True, name="tiny-256")
    model = random_model(cfg)
    base = export_gguf(tmp_path / "f32.gguf", cfg, model.state_dict(), tok_md, "F32")
    # The tokenizer keys come through with the source file's values and GGUF value types.
    src_types, out = parse_gguf(smollm_gguf).value_types, parse_gguf(base)
    for k, v in tok_md.items():
        assert out.metadata[k] == v, k
        assert out.value_types[k] == src_types[k], k
    llama_cpp.Llama(model_path=str(base), vocab_only=True, verbose=False).tokenize(b"Hi")

    toks = tokens(vocab, 64)
    want = logits(model, toks)[0].numpy()
    tolerances = {"F32": (1e-5, 1e-6), "F16": (3e-3, 5e-4), "BF16": (2e-2, 3e-3),
                  "Q8_0": (5e-2, 1e-2), "Q4_0": (5e-2, 1e-2), "Q4_1": (5e-2, 1e-2),
                  "Q4_K_S": (6e-2, 1e-2), "Q5_K_S": (6e-2, 1e-2), "Q6_K": (6e-2, 1e-2)}
    report = {}
    for ftype, (max_tol, mean_tol) in tolerances.items():
        path = base
        if ftype != "F32":
            path = tmp_path / f"{ftype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.pure = True  # every 2-D tensor in the requested type, no mixed recipes
            assert llama_cpp.llama_model_quantize(str(base).encode(), str(path).encode(),
                                                  ctypes.byref(params)) == 0
        kind = ftype.removesuffix("_S")
        f = parse_gguf(path)
        assert {t.type_name for t in f.tensors if len(t.shape) == 2} == {kind}, ftype
        ours = load_model(path).model
        got = logits(ours, toks)[0].numpy()
        ref = llama_cpp_logits(llama_cpp, path, toks[0].tolist())
        err = np.abs(got - ref)
        effect = np.abs(ref - want)  # what the weight quantization itself does to the logits
        report[kind] = (float(err.max()), float(err.mean()), float(effect.mean()))
        assert err.max() <= max_tol and err.mean() <= mean_tol, (kind, report[kind])
        if kind[1] in "456":  # so a wrong dequantization could not pass
            assert err.mean() < 0.5 * effect.mean(), (kind, report[kind])
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, kind
        if ftype in FILE_TYPES and ftype != "F32":
            # Our exporter writes the very bytes llama.cpp's quantizer writes.
            ours_path = export_gguf(tmp_path / f"ours-{ftype}.gguf", cfg, model.state_dict(),
                                    tok_md, ftype)
            mine = parse_gguf(ours_path)
            by_name = {t.name: t for t in mine.tensors}
            for t in f.tensors:
                assert mine.data(by_name[t.name]).tobytes() == f.data(t).tobytes(), (ftype,
                                                                                    t.name)
        if ftype == "F32":
            np.testing.assert_allclose(got, want, atol=0, rtol=0)  # F32: our weights exactly
    print("ours vs llama.cpp: (max, mean) |logit diff|, mean effect of quantization:", report)


# -- SmolLM2: ours vs transformers' GGUF loader ------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm_gguf):
    return load_model(smollm_gguf)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2, hf_smollm):
    toks = tokens(smollm2.config.vocab_size, 200, seed=7)
    diff = (logits(smollm2.model, toks) - logits(hf_smollm, toks)).abs().max()
    assert diff <= 1e-3, float(diff)


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers(smollm2, hf_smollm):
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
              7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 504, 3287, 4411]
    n_new = 32
    model = smollm2.model
    cache = model.new_cache(1, len(prompt) + n_new)
    seq = list(prompt)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), torch.arange(len(prompt)), cache)
        for _ in range(n_new):
            nxt = int(out[0, -1].argmax())
            seq.append(nxt)
            if nxt in smollm2.config.eos_token_ids:  # generate() stops there too
                break
            out = model(torch.tensor([[nxt]]), torch.tensor([len(seq) - 1]), cache)
        ref = hf_smollm.generate(torch.tensor([prompt]), do_sample=False,
                                       max_new_tokens=n_new,
                                       attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       pad_token_id=2)
    assert len(seq) > len(prompt) + 8
    assert seq == ref[0].tolist()


@pytest.mark.slow
def test_smollm2_exported_to_f16_runs_in_llama_cpp(tmp_path, smollm2, smollm_gguf, llama_cpp):
    """A real model through our exporter: llama.cpp tokenizes exactly as with the original file
    (the vocabulary came through) and its logits match ours on the exported file."""
    from llamaworks.checkpoint import export_gguf

    sd = smollm2.model.state_dict()
    path = export_gguf(tmp_path / "smollm2-f16.gguf", smollm2.config, sd,
                       read_metadata(smollm_gguf), "F16")
    text = "The printing press was invented in 1440; it changed Europe. Hello, world! 12345"
    vocab = llama_cpp.Llama(model_path=str(smollm_gguf), vocab_only=True, verbose=False)
    toks = vocab.tokenize(text.encode(), add_bos=False)
    got_llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert got_llama.tokenize(text.encode(), add_bos=False) == toks
    ref = llama_cpp_logits(llama_cpp, path, toks)
    got = logits(load_model(path).model, torch.tensor([toks]))[0].numpy()
    err = np.abs(got - ref)
    # F16 activations in llama.cpp over 30 layers: measured max 0.03 (logit std 6).
    assert err.max() <= 0.1 and (got.argmax(-1) == ref.argmax(-1)).all(), float(err.max())


# -- helpers of the GGUF reader ----------------------------------------------------------------
@pytest.mark.parametrize("scaling, head_dim, theta", [
    (LLAMA32_SCALING, 64, 500000.0),  # Llama 3.2
    ({**LLAMA32_SCALING, "factor": 8.0}, 128, 500000.0),  # Llama 3.1
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 64, 10000.0),  # solved from the tensor
])
def test_rope_freqs_from_other_converters_are_recovered(scaling, head_dim, theta):
    """Files from llama.cpp's converter hold only the `rope_freqs` divisors, not the parameters;
    the loader finds parameters that reproduce them."""
    from llamaworks.checkpoint.gguf import _llama3_scaling_from_freqs
    from llamaworks.model import llama3_freq_factors

    cfg = ModelConfig(vocab_size=8, dim=head_dim * 2, n_layers=1, n_heads=2, hidden_dim=8,
                      rope_theta=theta)
    freqs = llama3_freq_factors(head_dim, theta, scaling).numpy()
    got = _llama3_scaling_from_freqs(freqs, cfg, Path("x.gguf"), {})
    assert got == scaling


@pytest.mark.slow
def test_fast_gguf_parser_equals_gguf_reader(vocab_dir):
    """Our parser against the `gguf` package's reader: same key/values, same tensor table."""
    import gguf

    from llamaworks.checkpoint.gguf import _field_value

    path = vocab_dir / "ggml-vocab-llama-spm.gguf"
    reader = gguf.GGUFReader(path)
    ref = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read_metadata(path) == ref


@pytest.mark.slow
def test_fast_gguf_parser_equals_gguf_reader_on_smollm2(smollm_gguf):
    import gguf

    reader = gguf.GGUFReader(smollm_gguf)
    ours = parse_gguf(smollm_gguf)
    assert ours.metadata == read_metadata(reader)
    assert len(ours.tensors) == len(reader.tensors)
    for a, b in zip(ours.tensors, reader.tensors, strict=True):
        assert (a.name, a.type_id, a.offset, a.n_bytes) == (b.name, int(b.tensor_type),
                                                            int(b.data_offset), int(b.n_bytes))
        assert a.shape == tuple(int(x) for x in reversed(b.shape.tolist()))
    t = ours.tensors[-1]
    assert ours.data(t).tobytes() == reader.tensors[-1].data.tobytes()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pytorch_model_bin_loads(tmp_path, legacy):
    cfg = CONFIGS["gqa-untied"]
    model = random_model(cfg)
    save_native(tmp_path, cfg, model.state_dict())
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    toks = tokens(cfg.vocab_size)
    got = load_model(tmp_path)
    torch.testing.assert_close(logits(got.model, toks), logits(model, toks), atol=0, rtol=0)


def assert_same_greedy_up_to_a_near_tie(a, b, margin: float = 0.3) -> None:
    """Two greedy decodes (outputs with top-2 logprobs) of the same weights by two paths whose
    int8 activation rounding differs (the fused step vs the per-op forward: each element of a
    matvec input may round to the other side, ~1e-2 of its size, moving logits by ~0.1): the
    same tokens, except that they may part where both paths saw a near-tie (their two best
    tokens within `margin` in log-probability), and only there; at least 8 tokens agree."""
    ids_a, ids_b = a.token_ids, b.token_ids
    assert len(ids_a) == len(ids_b)
    k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), len(ids_a))
    if k == len(ids_a):
        assert ids_a == ids_b
        return
    assert k >= 8, (k, ids_a, ids_b)
    for lp in (a.logprobs[k], b.logprobs[k]):
        best = sorted(lp.values(), reverse=True)[:2]
        assert best[0] - best[1] <= margin, (k, lp)


@pytest.mark.slow
def test_smollm2_q4_k_m_from_llama_cpp_scores_as_transformers_gguf_loader(smollm2_q4_k_m,
                                                                           smollm_tokenizer):
    """A real Q4_K_M file (Q4_K, Q6_K and Q5_0 tensors) loads; its per-token NLL on held-out text
    equals transformers' GGUF loader (float32 dequantization of the same file) within 2e-3, and
    greedy decoding on the fused step gives the per-op forward's tokens (up to a near-tie)."""
    import transformers

    from llamaworks import LLM, SamplingParams
    from llamaworks.cli import score_ids

    types = {t.type_name for t in parse_gguf(smollm2_q4_k_m).tensors if len(t.shape) == 2}
    assert {"Q4_K", "Q6_K", "Q5_0"} <= types, types
    ours = load_model(smollm2_q4_k_m).model  # float32 dequantization
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_q4_k_m.parent, gguf_file=smollm2_q4_k_m.name, dtype=torch.float32).eval()
    text = (Path(__file__).parent / "data" / "heldout_english.txt").read_text()
    ids = smollm_tokenizer.encode(text, bos=False)[:256]
    nll = np.array(score_ids(ours, ids))
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    ref = -logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert nll.shape == ref.shape
    diff = np.abs(nll - ref)
    assert diff.max() <= 2e-3 and abs(nll.mean() - ref.mean()) <= 2e-3, (diff.max(), diff.mean())

    # as stored (the default): Q4_K / Q6_K / Q5_0 in their own blocks, prompts through float32
    # GEMMs over dequantized tiles: the same scores; decode on the fused step equals per-op
    llm = LLM(smollm2_q4_k_m)
    stored = np.array(score_ids(llm.model, ids))
    assert np.abs(stored - ref).max() <= 2e-3, np.abs(stored - ref).max()
    assert llm.step.fused is not None
    p = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    fused = llm.generate("The capital of France is", p)[0]
    llm.step.fused = None
    per_op = llm.generate("The capital of France is", p)[0]
    assert_same_greedy_up_to_a_near_tie(fused, per_op)


@pytest.mark.slow
def test_smollm2_q4_k_m_greedy_with_bf16_prompt_gemms_equals_float32_up_to_a_near_tie(
        smollm2_q4_k_m, monkeypatch):
    """The engine's prompt chunks may run their GEMMs over quantized weight tiles in bf16
    (`LLAMAWORKS_PROMPT_GEMM`, default on AMX machines): on a real Q4_K_M file the cache they
    write moves the logits (so the bf16 path ran) but not the greedy continuation, except at a
    near-tie."""
    from llamaworks import LLM, SamplingParams

    prompt = ("The history of the city begins with a small fishing village on the river, where "
              "traders from the north and the south met every summer to exchange")
    p = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    out = {}
    for mode in ("fp32", "bf16"):
        monkeypatch.setenv("LLAMAWORKS_PROMPT_GEMM", mode)
        out[mode] = LLM(smollm2_q4_k_m).generate(prompt, p)[0]
    assert out["fp32"].logprobs[0] != out["bf16"].logprobs[0]
    assert_same_greedy_up_to_a_near_tie(out["fp32"], out["bf16"])

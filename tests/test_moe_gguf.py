"""Mixture-of-experts GGUF files: Mixtral (llama.cpp writes it as `llama` with `expert_count`) and
Qwen3-MoE (`qwen3moe`) made by llama.cpp's own converter and quantizer load with transformers' /
llama.cpp's logits, their quantized experts stay in the file's blocks (`GGUFExperts`), and our
export runs in llama.cpp with our logits. Random tiny checkpoints made by transformers."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from family_fixtures import hf_family_model, llama_cpp_logits, load_saved

transformers = pytest.importorskip("transformers")

from llamaworks.checkpoint import export_gguf, load_model  # noqa: E402
from llamaworks.checkpoint.gguf_file import parse_gguf  # noqa: E402
from llamaworks.config import ModelConfig  # noqa: E402
from llamaworks.errors import CheckpointError  # noqa: E402
from llamaworks.infer.experts import GGUFExperts  # noqa: E402
from llamaworks.infer.load import load_as_stored  # noqa: E402
from llamaworks.model import Experts, Llama  # noqa: E402

CONVERTER = Path(__file__).resolve().parents[1] / ".cache" / "convert" / "convert_hf_to_gguf.py"
VOCAB = 49152  # SmolLM2's tokenizer, which llama.cpp's converter knows
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            max_position_embeddings=128, rms_norm_eps=1e-6, num_attention_heads=4,
            num_key_value_heads=2)
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None, tie_word_embeddings=False)),
    "qwen3moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=6, num_experts_per_tok=3,
                                        moe_intermediate_size=64, norm_topk_prob=True,
                                        tie_word_embeddings=True)),
    # llama.cpp's qwen3moe graph always renormalizes the top k: such a file means that
    "qwen3moe-unnormalized": ("Qwen3MoeConfig", dict(
        head_dim=16, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=False, tie_word_embeddings=False)),
}
# K-quants need rows of 256: wider models for the quantizer (weights narrower, std 0.05, so
# llama.cpp's 8-bit activations do not flip the routing of most tokens)
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64)
# (each key only where the case has it: Mixtral's head_dim follows from hidden_size)


def _hf(case: str, wide: bool = False, std: float = 0.25, seed: int = 0):
    cls_name, kw = CASES[case]
    kw = {**BASE, **kw}
    if wide:
        kw.update({k: v for k, v in WIDE.items() if k in kw})
    return hf_family_model(cls_name, kw, seed, std)


def _convert(hf, tok, folder: Path, outtype: str = "f32") -> Path:
    """llama.cpp's convert_hf_to_gguf.py on the checkpoint transformers saved."""
    if not CONVERTER.exists():
        pytest.fail(f"{CONVERTER} missing: run `make test` (it extracts llama.cpp's converter)")
    hf.save_pretrained(folder)
    tok.save(folder)
    out = folder.with_suffix(".gguf")
    run = subprocess.run([sys.executable, str(CONVERTER), str(folder), "--outtype", outtype,
                          "--outfile", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def _quantize(llama_cpp, src: Path, ftype: str) -> Path:
    out = src.with_name(f"{src.stem}-{ftype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    return out


def _tokens(n: int = 20, seed: int = 5) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_converter_made_moe_gguf_loads_with_transformers_logits(case, tmp_path, smollm_tokenizer,
                                                                llama_cpp):
    """An F32 GGUF from llama.cpp's converter: the family, experts and router read from its
    metadata, the 3-D expert tensors stacked as ours, Mixtral's Q/K un-permuted; logits equal
    transformers' (wide weights), through the float32 loader and as stored. A Qwen3-MoE with
    norm_topk_prob=false reads as llama.cpp runs it (renormalized): llama.cpp's logits, and not
    transformers'."""
    hf = _hf(case)
    path = _convert(hf, smollm_tokenizer, tmp_path / "hf")
    ours = load_model(path).model
    cfg = ours.config
    assert cfg.family == ("mixtral" if case == "mixtral" else "qwen3_moe")
    assert (cfg.n_experts, cfg.n_active_experts) == (hf.config.num_local_experts if case ==
                                                     "mixtral" else hf.config.num_experts,
                                                     hf.config.num_experts_per_tok)
    assert cfg.router_norm and cfg.tie_embeddings == hf.config.tie_word_embeddings
    toks = _tokens()
    with torch.no_grad():
        got = ours(torch.tensor([toks]))[0]
        stored = load_as_stored(path).model(torch.tensor([toks]))[0]
        want = hf(torch.tensor([toks])).logits[0]
    assert isinstance(ours.model.layers[0].mlp.experts, Experts)
    torch.testing.assert_close(stored, got, atol=1e-5, rtol=0)
    if case == "qwen3moe-unnormalized":
        assert (got - want).abs().max() > 0.1  # transformers does not renormalize; llama.cpp does
        want = torch.from_numpy(llama_cpp_logits(llama_cpp, path, toks))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


QUANT_CASES = [("mixtral", "Q4_K_M"), ("qwen3moe", "Q4_K_M"), ("qwen3moe", "Q8_0"),
               ("mixtral", "Q4_0"), ("qwen3moe", "Q5_K_M")]


@pytest.mark.slow
@pytest.mark.parametrize("case,ftype", QUANT_CASES, ids=[f"{c}-{f}" for c, f in QUANT_CASES])
def test_llama_cpp_quantized_moe_keeps_its_experts_in_blocks(case, ftype, tmp_path,
                                                            smollm_tokenizer, llama_cpp):
    """A file quantized by llama.cpp's own quantizer loads as stored with every expert tensor in
    its blocks (`GGUFExperts`: the file's bytes), never a float32 copy;
    its logits equal our float32 dequantization of the same file (float32 GEMMs over dequantized
    tiles for experts given many tokens, the integer block kernels for few and for one-token
    steps), and llama.cpp's own logits
    on that file up to llama.cpp's 8-bit activations."""
    f32 = _convert(_hf(case, wide=True, std=0.05), smollm_tokenizer, tmp_path / "hf")
    path = _quantize(llama_cpp, f32, ftype)
    infos = {t.name: t for t in parse_gguf(path).tensors}
    kinds = {infos[f"blk.0.ffn_{p}_exps.weight"].type_name for p in ("gate", "up", "down")}
    assert kinds <= {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0"}, kinds
    stored = load_as_stored(path).model
    assert all(map(stored.config.is_moe, range(stored.config.n_layers)))  # every layer sparse
    _assert_experts_in_blocks(stored, infos, ftype)
    # an expert given fewer than 16 of the tokens runs the block kernels: Q8_0 on int16
    # activations; Q4_0 and the K-quants on int8 ones, as llama.cpp
    # (measured: 0.2-1% of the largest logit per token, 9% at a token whose routing that rounding
    # flips, 1 of 24; one-token decode steps, K-quants: 1.4-4.0%, 4.9% at one step of 12)
    per_token = _close_to_float32_and_llama_cpp(llama_cpp, path, stored)
    # measured: 1-4% of the largest logit at most tokens (llama.cpp's 8-bit activations vs our
    # int16), up to 29% at the odd token whose routing those 8 bits flip (1-2 tokens of 24)
    assert (per_token < 0.05).sum() >= len(per_token) - 3, per_token
    _fused_equals_eager(path)


def _assert_experts_in_blocks(stored: Llama, infos: dict, ftype: str) -> None:
    """Every sparse layer of a file quantized by llama.cpp, loaded as stored, keeps its experts
    in the file's blocks (`GGUFExperts`, uint8 buffers of exactly the file's bytes), never a
    float32 copy. `infos`: the file's tensors by name."""
    for i, layer in enumerate(stored.model.layers):
        if not stored.config.is_moe(i):
            continue
        experts = layer.mlp.experts
        assert isinstance(experts, GGUFExperts), type(experts)
        assert all(b.dtype == torch.uint8 for b in experts.buffers())
        file_bytes = sum(infos[f"blk.{i}.ffn_{p}_exps.weight"].n_bytes
                         for p in ("gate", "up", "down"))
        assert experts.resident_bytes() == file_bytes


def _close_to_float32_and_llama_cpp(llama_cpp, path: Path, stored: Llama) -> torch.Tensor:
    """A quantized file loaded as stored (`stored`) vs its float32 dequantization: the logits of
    a 24-token prompt (`_prompt_close_to_float32`) and of 4 one-token decode steps
    (`_steps_close_to_float32`). Returns llama.cpp's distance from our logits on that prompt, per
    token, over its largest logit, for the test to bound (llama.cpp's 8-bit activations)."""
    from infer_fixtures import decode_logits

    floats = load_model(path).model
    toks = _tokens(24)
    with torch.no_grad():
        got = stored(torch.tensor([toks]))[0]
        ref = floats(torch.tensor([toks]))[0]
    int8 = _int8_activations(path)
    _prompt_close_to_float32(got, ref, int8)
    steps, eager = decode_logits(stored, False, steps=4), decode_logits(floats, False, steps=4)
    _steps_close_to_float32(steps, eager, int8)
    theirs = torch.from_numpy(llama_cpp_logits(llama_cpp, path, toks))
    return (got - theirs).abs().amax(-1) / theirs.abs().max()


# GGUF types whose decode kernels quantize activations to int8 blocks, as llama.cpp's do
INT8_ACTIVATION_TYPES = {"Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1"}


def _int8_activations(path: Path) -> bool:
    """Whether any matrix of the file runs on int8 activations (Q4_0 and the K-quants)."""
    return any(t.type_name in INT8_ACTIVATION_TYPES for t in parse_gguf(path).tensors
               if len(t.shape) >= 2)


def _prompt_close_to_float32(got: torch.Tensor, ref: torch.Tensor, int8: bool) -> None:
    """A prompt's logits on the stored blocks vs the float32 dequantization: int16 activations
    within 1e-3; int8 ones within 2% of the largest logit at all but 2 tokens (routing flips)."""
    if int8:
        per_ref = (got - ref).abs().amax(-1) / ref.abs().max()
        assert (per_ref < 0.02).sum() >= len(got) - 2, per_ref
    else:
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def _steps_close_to_float32(steps: torch.Tensor, eager: torch.Tensor, int8: bool) -> None:
    """One-token decode steps on the stored blocks vs the float32 weights: int16 activations
    within 2e-3 of the largest logit; int8 ones median < 5%, all but 2 steps < 6%."""
    if int8:
        per_step = (steps - eager).abs().amax(-1).flatten() / eager.abs().max()
        assert per_step.median() < 0.05 and (per_step < 0.06).sum() >= per_step.numel() - 2, \
            per_step
    else:
        torch.testing.assert_close(steps, eager, atol=2e-3 * eager.abs().max().item(), rtol=0)


def _fused_equals_eager(path: Path) -> None:
    """Decode steps of the fused C++ step (the chosen experts' block slices only) equal the
    per-op forward's on the same blocks, in every kernel tier this CPU runs (measured: 1-2e-4 of
    the largest logit; the int16 activations round apart where the float sums differ; K-quant
    files, int8 activations: 0 at most steps, 2e-3 where one rounds apart)."""
    from infer_fixtures import decode_logits

    from llamaworks.infer import kernels
    from llamaworks.infer.fused import FusedDecoder
    from llamaworks.infer.step import Step

    for tier in kernels.host_tiers():
        with kernels.using(tier):
            model = load_as_stored(path).model
            assert isinstance(Step(model).fused, FusedDecoder)
            fused = decode_logits(model, True, steps=6)
            eager = decode_logits(model, False, steps=6)
        assert isinstance(model.model.layers[0].mlp.experts, GGUFExperts)
        tol = 5e-3 if _int8_activations(path) else 5e-4
        torch.testing.assert_close(fused, eager, atol=tol * eager.abs().max().item(), rtol=0,
                                   msg=tier)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixtral", "qwen3moe"])
def test_our_moe_gguf_export_runs_in_llama_cpp_with_our_logits(case, tmp_path, llama_cpp):
    """Our export (F32) of Mixtral (as `llama` with experts) and Qwen3-MoE: llama.cpp's logits
    equal ours, and our loader reads the file back exactly; a Q8_0 export keeps the router F32
    and loads back with its experts in blocks."""
    with torch.no_grad():
        ours = load_saved(_hf(case), tmp_path / "hf")
    path = export_gguf(tmp_path / "m.gguf", ours.config, ours.state_dict(), None, "F32")
    arch = "llama" if case == "mixtral" else "qwen3moe"
    from llamaworks.checkpoint.gguf import read_metadata

    md = read_metadata(path)
    assert md["general.architecture"] == arch and md[f"{arch}.expert_count"] == \
        ours.config.n_experts
    toks = _tokens(seed=6)
    theirs = llama_cpp_logits(llama_cpp, path, toks)
    with torch.no_grad():
        want = ours(torch.tensor([toks]))[0].numpy()
        back = load_model(path).model(torch.tensor([toks]))[0].numpy()
    np.testing.assert_allclose(theirs, want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(back, want, atol=1e-5, rtol=0)
    q8 = export_gguf(tmp_path / "q8.gguf", ours.config, ours.state_dict(), None, "Q8_0")
    types = {t.name: t.type_name for t in parse_gguf(q8).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0"
    assert isinstance(load_as_stored(q8).model.model.layers[0].mlp.experts, GGUFExperts)


def _tiny(**kw) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A random tiny Qwen3-MoE (or Mixtral with family="mixtral") config and state dict."""
    fields = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                  head_dim=16, family="qwen3_moe", qk_norm=True, n_experts=4, n_active_experts=2,
                  moe_hidden_dim=64, router_norm=True, tie_embeddings=False, max_seq_len=64)
    fields.update(kw)
    cfg = ModelConfig(**fields)
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    return cfg, model.state_dict()


@pytest.mark.parametrize("change,match", [
    (dict(router_norm=False), "does not renormalize"),
    (dict(moe_layers=[1]), "every layer"),
    (dict(router="sigmoid"), "plain softmax"),
    (dict(router_scale=2.5), "plain softmax"),
    (dict(family="mixtral", qk_norm=False, sliding_window=8), "no sliding window"),
])
def test_export_refuses_routing_llama_cpp_would_run_differently(change, match, tmp_path):
    cfg, sd = _tiny(**change)
    with pytest.raises(CheckpointError, match=match):
        export_gguf(tmp_path / "m.gguf", cfg, sd, None, "F32")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_q8_0_export_loads_as_stored_with_the_dequantized_models_logits(family, tmp_path):
    """Our own Q8_0 export of a random MoE (no llama.cpp): as stored, the experts are Q8_0 blocks
    in `GGUFExperts` and the logits equal the float32 dequantization's (prompt and decode); the
    fused decode step equals the per-op forward on those blocks in every tier."""
    from infer_fixtures import decode_logits

    kw = dict(family="mixtral", qk_norm=False, hidden_dim=64) if family == "mixtral" else {}
    cfg, sd = _tiny(**kw)
    path = export_gguf(tmp_path / "m.gguf", cfg, sd, None, "Q8_0")
    stored, floats = load_as_stored(path).model, load_model(path).model
    assert stored.config.family == family
    assert isinstance(stored.model.layers[1].mlp.experts, GGUFExperts)
    toks = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stored(toks), floats(toks), atol=1e-4, rtol=1e-4)
    a, b = decode_logits(stored, False, steps=4), decode_logits(floats, False, steps=4)
    torch.testing.assert_close(a, b, atol=2e-3 * b.abs().max().item(), rtol=0)
    _fused_equals_eager(path)


def test_gguf_metadata_with_experts_reads_as_llama_cpp_runs_it():
    md = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 2,
          "qwen3moe.embedding_length": 64, "qwen3moe.attention.head_count": 4,
          "qwen3moe.feed_forward_length": 96, "qwen3moe.vocab_size": 64,
          "qwen3moe.attention.key_length": 16, "qwen3moe.expert_count": 8,
          "qwen3moe.expert_used_count": [2, 2]}
    cfg = ModelConfig.from_gguf_metadata(md)
    assert (cfg.family, cfg.n_experts, cfg.n_active_experts) == ("qwen3_moe", 8, 2)
    assert cfg.moe_hidden_dim == 48 and cfg.router_norm and cfg.qk_norm  # 96 / 2: llama.cpp's
    mixtral = ModelConfig.from_gguf_metadata({**{k.replace("qwen3moe", "llama"): v
                                                 for k, v in md.items()},
                                              "general.architecture": "llama"})
    assert (mixtral.family, mixtral.moe_hidden_dim, mixtral.qk_norm) == ("mixtral", 96, False)
    with pytest.raises(CheckpointError, match="differs between layers"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_used_count": [2, 4]})
    with pytest.raises(CheckpointError, match="expert_used_count"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items()
                                        if k != "qwen3moe.expert_used_count"})
    with pytest.raises(CheckpointError, match="expert_count"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items()
                                        if k != "qwen3moe.expert_count"})


def test_convert_requantizes_a_moe_gguf_and_f16_experts_run_fused(tmp_path):
    """`llamaworks convert IN.gguf OUT.gguf --to gguf --gguf-type F16` on a MoE file: the experts
    come back F16, kept as stored (`GGUFExperts` over F16 rows), with the F32 file's logits; the
    fused step runs them (rows decoded, then a float dot) as the per-op forward does."""
    from llamaworks.checkpoint.convert import convert

    cfg, sd = _tiny()
    src = export_gguf(tmp_path / "f32.gguf", cfg, sd, None, "F32")
    out, fmt = convert(src, tmp_path / "f16.gguf", to="gguf", gguf_type="F16")
    assert fmt == "gguf"
    types = {t.name: t.type_name for t in parse_gguf(out).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == "F16"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    stored = load_as_stored(out).model
    assert isinstance(stored.model.layers[0].mlp.experts, GGUFExperts)
    toks = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = stored(toks)
        torch.testing.assert_close(got, load_model(out).model(toks), atol=1e-5, rtol=0)
        # (measured 1.3e-3 from the F32 file's logits of ~1.7: fp16 weights)
        torch.testing.assert_close(got, load_model(src).model(toks), atol=5e-3, rtol=0)
    _fused_equals_eager(out)

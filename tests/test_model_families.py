"""Mistral, Qwen2, Qwen3 and Gemma 3 through the one model definition, against transformers' own
modeling code: random tiny checkpoints made by transformers (weights drawn wide so a wrong detail
shows), loaded from the saved HF directory; logits on sequences longer than the sliding window,
gradients of one training step, and our saved checkpoint opened by transformers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llamaworks.checkpoint import load_model, save_native  # noqa: E402
from llamaworks.config import ModelConfig  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
            max_position_embeddings=64, rms_norm_eps=1e-6)

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
    "qwen3-mqa-head-dim": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=40, tie_word_embeddings=False)),
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=6, sliding_window_pattern=2, rope_theta=20000.0,
        rope_local_base_freq=500.0, tie_word_embeddings=True)),
}
SEQ = 20  # longer than every sliding window above


def _hf_model(case: str, seed: int = 0):
    cls_name, kw = CASES[case]
    cfg = getattr(transformers, cls_name)(**BASE, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    gemma = cls_name.startswith("Gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.25)
            if "norm" in name and not gemma:
                p.add_(1.0)
    return model.float().eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, HF model, our model loaded from the directory transformers saved)."""
    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours = load_model(d).model
    return request.param, hf, ours, d


def _tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, SEQ),
                         generator=torch.Generator().manual_seed(seed))


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
        ref = theirs[name].grad
        assert torch.allclose(p.grad, ref, atol=1e-5, rtol=1e-4), (case, name,
                                                                   (p.grad - ref).abs().max())


def test_our_saved_checkpoint_opens_in_transformers_with_equal_logits(pair, tmp_path):
    case, hf, ours, _ = pair
    save_native(tmp_path, ours.config, ours.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(back) is type(hf)
    tokens = _tokens(seed=3)
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5), case


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
    x = torch.randn(3, BASE["hidden_size"], generator=torch.Generator().manual_seed(4))
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

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return load_model(d).model

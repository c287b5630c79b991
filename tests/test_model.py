"""The model equals transformers' LlamaForCausalLM given the same weights; the KV cache equals
full recomputation."""

import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.model import Llama

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CONFIGS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa_tied": dict(n_kv_heads=1, tie_embeddings=True),
    "llama3_rope_scaling": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "odd_sizes": dict(vocab_size=301, dim=48, n_heads=3, n_kv_heads=1, head_dim=16,
                      hidden_dim=100, n_layers=3),
}


def random_model(name: str, seed: int = 0) -> Llama:
    cfg = get_preset("tiny", **CONFIGS[name])
    m = Llama(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def hf_twin(m: Llama):
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**m.config.to_hf_dict())).eval()
    hf.load_state_dict(m.state_dict(), strict=not m.config.tie_embeddings)
    if m.config.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_llama_with_same_weights(name):
    m = random_model(name)
    hf = hf_twin(m)
    x = torch.randint(0, m.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = m(x), hf(x).logits
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["gqa", "llama3_rope_scaling", "odd_sizes"])
def test_incremental_decoding_with_kv_cache_equals_full_recomputation(name):
    m = random_model(name)
    x = torch.randint(0, m.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(batch_size=2, max_seq_len=128)
        parts = [m(x[:, :37], torch.arange(37), cache)]
        parts.append(m(x[:, 37:50], torch.arange(37, 50), cache))  # a second multi-token chunk
        parts += [m(x[:, i:i + 1], torch.tensor([i]), cache) for i in range(50, 90)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_meta_construction_allocates_nothing_until_init():
    m = Llama(get_preset("llama-7b"), device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == get_preset("llama-7b").num_params()


def test_init_weights_is_deterministic_given_a_seed_and_ties_embeddings():
    a, b = random_model("mqa_tied", seed=5), random_model("mqa_tied", seed=5)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_llama3_rope_scaling_matches_transformers_inverse_frequencies():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llamaworks.model import rope_inv_freq

    cfg = get_preset("llama3.2-1b")
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)


def test_last_only_logits_are_the_full_forwards_last_position():
    """Prompts take the output head for their last position only (`last_only`), with the same
    numbers as the full forward's last position, with and without a cache."""
    model = Llama(get_preset("tiny"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        last = model(tokens, last_only=True)
        cached = model(tokens, cache=model.new_cache(2, 16), last_only=True)
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-5)  # GEMM vs GEMV order
    torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=1e-5)

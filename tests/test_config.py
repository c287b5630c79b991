"""Presets reproduce the published shapes; config readers round-trip HF's own LlamaConfig."""

import pytest

from llamaworks.config import ModelConfig, get_preset, list_presets

# Published parameter counts (papers / model cards).
PUBLISHED = {
    "smollm2-135m": 134.5e6,
    "llama-7b": 6.7e9,
    "llama-13b": 13.0e9,
    "llama-33b": 32.5e9,
    "llama-65b": 65.2e9,
    "llama2-7b": 6.74e9,
    "llama3-8b": 8.03e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,  # Llama 3.2 model card: "3.21B"
    "llama3.1-8b": 8.03e9,  # Llama 3.1 model card
    "llama3.1-70b": 70.6e9,
    "llama3.1-405b": 405.9e9,
    "mistral-7b": 7.25e9,  # Mistral-7B-v0.3 model card
    "qwen2.5-0.5b": 0.49e9,  # Qwen2.5 model cards: "Number of Parameters: 0.49B"
    "qwen2.5-7b": 7.61e9,  # "7.61B"
    "qwen3-0.6b": 0.6e9,  # Qwen3 model cards: "0.6B"
    "qwen3-8b": 8.2e9,  # "8.2B"
    "gemma3-270m": 268e6,  # Gemma 3 270M model card: "268M"
    "gemma3-1b": 1.0e9,  # Gemma 3 model card: "1B"
}
# Non-embedding counts the cards give (input embedding and output projection both left out).
NON_EMBEDDING = {
    "qwen3-0.6b": 0.44e9,  # "Number of Paramaters (Non-Embedding): 0.44B"
    "qwen3-8b": 6.95e9,  # "6.95B"
    "gemma3-270m": 100e6,  # "170M embedding parameters + 100M transformer blocks"
}
# Mixtures of experts: (total, active per token) as the model cards give them.
MOE_PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),  # "46.7B total parameters ... only uses 12.9B per token"
    "qwen3-30b-a3b": (30.5e9, 3.3e9),  # "30.5B in total and 3.3B activated"
    "llama4-scout-17b-16e": (109e9, 17e9),  # "17B active, 109B total" (with vision: 1.1% more)
    "llama4-maverick-17b-128e": (400e9, 17e9),  # "17B active, 400B total"
    "llama4-behemoth": (2e12, 288e9),  # "288B active ... nearly two trillion total"
    "deepseek-v3": (671e9, 37e9),  # "671B total parameters with 37B activated for each token"
}
FAMILY_PRESETS = ["mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b",
                  "gemma3-270m", "gemma3-1b"]
SMALL_PRESETS = ["smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "gemma3-270m", "gemma3-1b",
                 "qwen3-30b-a3b", "mixtral-8x7b", "llama4-scout-17b-16e",
                 "llama4-maverick-17b-128e", "deepseek-v3"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_num_params_matches_published_count_within_one_percent(name):
    n = get_preset(name).num_params()
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n)


@pytest.mark.parametrize("name", list(MOE_PUBLISHED))
def test_moe_presets_have_the_published_total_and_active_counts(name):
    total, active = MOE_PUBLISHED[name]
    cfg = get_preset(name)
    assert abs(cfg.num_params() - total) / total < 0.015, (name, cfg.num_params())
    assert abs(cfg.num_params(active=True) - active) / active < 0.02, (
        name, cfg.num_params(active=True))


def test_active_count_of_a_dense_model_is_its_total():
    cfg = get_preset("llama3-8b")
    assert cfg.num_params(active=True) == cfg.num_params()


def test_paper_hidden_size_rule_gives_metas_ffn_widths():
    # 2/3 * 4d rounded up to a multiple of 256: the widths in Meta's released checkpoints.
    assert [get_preset(n).hidden_dim for n in ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
            ] == [11008, 13824, 17920, 22016]


def test_every_preset_builds_and_tiny_is_listed():
    assert "tiny" in list_presets()
    for name in list_presets():
        cfg = get_preset(name)
        assert cfg.n_heads % cfg.n_kv_heads == 0


def test_num_params_equals_the_instantiated_model():
    from llamaworks.model import Llama

    for cfg in (get_preset("tiny"), get_preset("tiny", tie_embeddings=True)):
        m = Llama(cfg, device="meta")
        assert sum(p.numel() for p in m.parameters()) == cfg.num_params()


def test_hf_config_round_trip_through_transformers():
    import transformers

    cfg = get_preset("llama3.2-1b")
    hf = transformers.LlamaConfig(**cfg.to_hf_dict())
    back = ModelConfig.from_hf_dict(hf.to_dict())
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim",
              "rope_theta", "max_seq_len", "tie_embeddings", "norm_eps"):
        assert getattr(back, f) == getattr(cfg, f), f
    assert back.rope_scaling["factor"] == 32.0
    assert back.rope_scaling["rope_type"] == "llama3"


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="tiny"):
        get_preset("gpt-5")


@pytest.mark.parametrize("name", list(NON_EMBEDDING))
def test_non_embedding_count_matches_the_model_card(name):
    cfg = get_preset(name)
    n = cfg.num_params(include_embeddings=False)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim  # the cards leave the output projection out too
    assert abs(n - NON_EMBEDDING[name]) / NON_EMBEDDING[name] < 0.01, (name, n)


def test_family_presets_carry_the_family_switches():
    q25, q3, m = (get_preset(n) for n in ("qwen2.5-7b", "qwen3-8b", "mistral-7b"))
    assert (q25.family, q25.qkv_bias, q25.o_bias, q25.qk_norm, q25.sliding_window) == (
        "qwen2", True, False, False, None)
    assert (q3.family, q3.qkv_bias, q3.qk_norm, q3.head_dim, q3.sliding_window) == (
        "qwen3", False, True, 128, None)
    assert (m.family, m.vocab_size, m.sliding_window, m.rope_theta) == (
        "mistral", 32768, None, 1e6)
    for name in ("gemma3-270m", "gemma3-1b"):
        g = get_preset(name)
        assert (g.family, g.norm_plus_one, g.sandwich_norm, g.qk_norm, g.activation) == (
            "gemma3_text", True, True, True, "gelu_tanh")
        assert g.sliding_window == 512 and g.tie_embeddings and g.head_dim == 256
        assert g.layer_types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(g.n_layers)]  # 5 local : 1 global
        assert (g.rope_theta, g.rope_local_theta) == (1e6, 1e4)
        assert g.attn_scale == 256 ** -0.5 and g.embed_scale == pytest.approx(g.dim ** 0.5)
    for name in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b"):
        cfg = get_preset(name)
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
        assert cfg.max_seq_len == 131072 and cfg.n_kv_heads == 8


TINY_HF = {  # one small transformers config per family, with the switches that add parameters
    "llama-bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                       attention_bias=True, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      sliding_window=7, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=40,
                                  tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, sliding_window=6, sliding_window_pattern=2,
                                        tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "llama4_text": ("Llama4TextConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size_mlp=40,
        num_local_experts=3, interleave_moe_layer_step=2, attention_bias=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16,
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, attention_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=24, mlp_only_layers=[0])),
}


@pytest.mark.parametrize("case", list(TINY_HF))
def test_num_params_counts_what_transformers_instantiates(case):
    """Biases, q/k norms and Gemma's sandwich norms included: our count equals the parameters of
    transformers' own model of that family."""
    import transformers

    from llamaworks.model import Llama

    cls_name, kw = TINY_HF[case]
    hf_cfg = getattr(transformers, cls_name)(vocab_size=96, hidden_size=64, intermediate_size=80,
                                             num_hidden_layers=3, **kw)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    want = sum(p.numel() for p in model.parameters())
    ours = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert ours.num_params() == want, (case, ours.num_params(), want)
    assert ours.num_params() == sum(p.numel() for p in Llama(ours, device="meta").parameters())


@pytest.mark.parametrize("name", list_presets())
def test_preset_round_trips_through_config_json(name):
    cfg = get_preset(name)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).replace(name=cfg.name) == cfg


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_transformers_accepts_the_preset_and_counts_the_same_parameters(name):
    import torch
    import transformers

    cfg = get_preset(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert hf_cfg.model_type == cfg.family
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params(), name
    if cfg.layer_types is not None:
        assert hf_cfg.layer_types == cfg.layer_types
    back = ModelConfig.from_hf_dict(hf_cfg.to_dict())  # as transformers writes it again
    for f in ("family", "qkv_bias", "o_bias", "qk_norm", "norm_plus_one", "sandwich_norm",
              "activation", "embed_scale", "attn_scale", "sliding_window", "layer_types",
              "rope_theta", "rope_local_theta", "head_dim", "hidden_dim", "tie_embeddings",
              "n_kv_heads", "vocab_size", "max_seq_len"):
        assert getattr(back, f) == getattr(cfg, f), (name, f)

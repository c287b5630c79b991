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
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_num_params_matches_published_count_within_one_percent(name):
    n = get_preset(name).num_params()
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n)


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

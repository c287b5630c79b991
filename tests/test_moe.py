"""Mixture-of-experts models beyond the forward pass (tests/test_model_families.py has the
transformers parity): the router variants against transformers' own routers, `llamaworks score`
and `info` on MoE checkpoints, LoRA fine-tuning of the experts, and clear errors for checkpoints
that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from family_fixtures import hf_family_model
from posttrain_fixtures import TemplateBytes

from llamaworks.checkpoint import load_model, save_native
from llamaworks.cli import main
from llamaworks.config import ModelConfig, get_preset
from llamaworks.errors import CheckpointError
from llamaworks.model import Llama, route

transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
SMALL = dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-6)
MODELS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=24, mlp_only_layers=[0])),
    "llama4_text": ("Llama4TextConfig", dict(head_dim=8, intermediate_size_mlp=40,
                                             num_local_experts=3, interleave_moe_layer_step=2,
                                             attention_chunk_size=8)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10)),
}


@pytest.mark.slow
@pytest.mark.parametrize("norm", [True, False])
def test_softmax_router_picks_and_weighs_as_qwen3_moes_router(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=16, num_attention_heads=2,
                                         num_key_value_heads=2,
                                         num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(50, 16)
    _, w_hf, idx_hf = router(x)
    cfg = ModelConfig.from_hf_dict({**hf_cfg.to_dict(), "num_hidden_layers": 1})
    w, idx, _ = route(torch.nn.functional.linear(x, router.weight), cfg)
    assert torch.equal(idx, idx_hf)
    torch.testing.assert_close(w, w_hf.float(), atol=1e-6, rtol=1e-6)


def test_sigmoid_router_with_correction_bias_chooses_by_the_bias_and_weighs_without_it():
    """DeepSeek-V3's rule (groups aside): scores sigmoid(logits); the bias moves which experts
    win, the weights are the unbiased scores of the winners, renormalized, times the scale."""
    cfg = ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, hidden_dim=8,
                      family="qwen3_moe", n_experts=4, n_active_experts=2, router="sigmoid",
                      router_norm=True, router_scale=2.5, router_bias=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # lifts expert 2 past expert 1
    w, idx, _ = route(logits, cfg, bias)
    assert sorted(idx[0].tolist()) == [0, 2]
    s = logits.sigmoid()[0]
    want = torch.stack([s[0], s[2]]) / (s[0] + s[2]) * 2.5
    torch.testing.assert_close(w[0][idx[0].argsort()], want)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory, smollm_tokenizer):
    cls_name, kw = MODELS[request.param]
    hf = hf_family_model(cls_name, {**SMALL, **kw})
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    smollm_tokenizer.save(d)
    return request.param, hf, d


@pytest.mark.slow
def test_score_on_a_saved_moe_directory_equals_transformers_nll(saved, capsys,
                                                                smollm_tokenizer):
    family, hf, d = saved
    assert main(["score", "--model", str(d), "--text", TEXT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = torch.tensor([smollm_tokenizer.encode(TEXT, bos=None)])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert out["tokens"] == ids.shape[1]
    torch.testing.assert_close(torch.tensor(out["nll"]), -lp, atol=1e-4, rtol=1e-4)


def test_info_reports_total_and_active_parameters_of_a_moe_directory(saved, capsys):
    family, hf, d = saved
    assert main(["info", "--model", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total = sum(p.numel() for p in hf.parameters())
    assert info["params"] == total
    cfg = load_model(d).config
    per_expert = 3 * cfg.dim * cfg.moe_hidden_dim
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.n_layers))
    idle = (cfg.n_experts - cfg.n_active_experts) * per_expert * moe_layers
    assert info["active_params"] == total - idle
    assert info["experts"]["routed"] == cfg.n_experts and info["experts"]["moe_layers"] == \
        moe_layers


def test_info_preset_prints_published_counts_without_weights(capsys):
    assert main(["info", "--preset", "mixtral-8x7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["params"] / 1e9, 1) == 46.7 and round(info["active_params"] / 1e9, 1) == \
        12.9
    assert info["config"]["model_type"] == "mixtral"
    assert main(["info", "--preset", "qwen3-30b-a3b"]) == 0
    text = capsys.readouterr().out
    assert "30.53B parameters (3.35B active)" in text and "8 of 128 routed" in text


def test_a_checkpoint_missing_one_expert_is_refused_by_name(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    family, _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    fused = family == "llama4_text"  # one tensor per layer's experts there
    gone = next(k for k in sd if (".experts.down_proj" if fused else ".experts.2.") in k)
    del sd[gone]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    want = r"missing \['model.layers.1.mlp.experts.down_proj'\]" if fused else \
        r"missing experts \[2\]"
    with pytest.raises(CheckpointError, match=want):
        load_model(tmp_path)


def test_saving_splits_experts_back_to_the_familys_file_names(saved, tmp_path):
    from safetensors import safe_open

    family, _, d = saved
    model = load_model(d).model
    save_native(tmp_path, model.config, model.state_dict())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as ours, \
            safe_open(str(d / "model.safetensors"), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        for k in theirs.keys():  # noqa: SIM118 - safe_open is not a mapping
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k)), k


class _ChatML(TemplateBytes):
    chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                     "assistant\n{% endif %}")
    vocab_size, bos_id, eos_id, stop_ids = 259, None, 2, [2]


def _tiny_moe(seed: int = 0) -> Llama:
    cfg = get_preset("tiny-moe", vocab_size=259)
    m = Llama(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return m.eval()


@pytest.mark.slow
def test_lora_sft_on_a_moe_model_trains_every_experts_update_and_reloads(tmp_path):
    """`finetune` with LoRA on tiny-moe: held-out loss falls, each expert's low-rank update
    moved (the router sends every expert tokens), the adapter stores one pair per expert under
    the HF names, and loading it merged gives the trained model's logits."""
    from safetensors import safe_open

    from llamaworks.posttrain.lora import LoraConfig, load_adapter
    from llamaworks.posttrain.lora_experts import LoRAExperts
    from llamaworks.posttrain.sft import SFTConfig, finetune

    convs = [{"messages": [{"role": "user", "content": f"{a}+{b}"},
                           {"role": "assistant", "content": f"{a + b}"}]}
             for a in range(10) for b in range(10)]
    model = _tiny_moe()
    cfg = SFTConfig(lr=3e-3, batch_size=8, max_steps=30, eval_fraction=0.1, eval_every=15,
                    lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    summary = finetune(model, _ChatML(), convs, cfg, tmp_path / "ad", progress=False)
    assert summary["final_val_loss"] < summary["first_val_loss"] * 0.9
    wrapped = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(wrapped) == 2  # tiny-moe's layers 1 and 2
    for m in wrapped:
        for proj in m.projs:
            moved = m.pair(proj)[1].abs().sum(dim=(1, 2))  # B started at zero, per expert
            assert (moved > 0).all(), proj
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight" in keys
    merged = load_adapter(_tiny_moe(), tmp_path / "ad")
    x = torch.tensor([[3, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)


def test_lora_dropout_on_experts_is_refused_with_the_fix():
    from llamaworks.posttrain.lora import LoraConfig, apply_lora

    with pytest.raises(ValueError, match="dropout 0 for a mixture-of-experts"):
        apply_lora(_tiny_moe(), LoraConfig(r=2, dropout=0.1))
    # attention-only LoRA keeps its dropout: no expert is adapted
    apply_lora(_tiny_moe(), LoraConfig(r=2, dropout=0.1, target_modules=["q_proj", "v_proj"]))


def test_group_limited_router_picks_and_weighs_as_deepseek_v3s_router():
    """Sigmoid scores, the correction bias only for choosing, experts only from the best
    groups (by the sum of each group's two best biased scores), renormalized, x the scale."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = transformers.DeepseekV3Config(hidden_size=16, n_routed_experts=12, n_group=4,
                                           topk_group=2, num_experts_per_tok=3,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    router.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(64, 16)
    _, w_hf, idx_hf = router(x)
    cfg = ModelConfig.from_hf_dict({**hf_cfg.to_dict(), "num_hidden_layers": 4})
    assert (cfg.router_groups, cfg.router_topk_groups, cfg.router_bias) == (4, 2, True)
    w, idx, _ = route(torch.nn.functional.linear(x, router.weight), cfg,
                      router.e_score_correction_bias)
    order_hf, order = idx_hf.sort(-1), idx.sort(-1)  # the same experts, in any order
    assert torch.equal(order.values, order_hf.values)
    torch.testing.assert_close(w.gather(-1, order.indices), w_hf.gather(-1, order_hf.indices))
    groups = idx // 3  # 12 experts in 4 groups of 3
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # from at most topk_group groups


def _deepseek(tmp_path, tokenizer=None, **kw):
    hf = hf_family_model("DeepseekV3Config", {**SMALL, **dict(
        num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16,
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10), **kw})
    hf.save_pretrained(tmp_path)
    if tokenizer is not None:
        tokenizer.save(tmp_path)
    return hf


def test_latent_attention_caches_one_latent_and_one_rope_key_per_token(tmp_path, capsys,
                                                                      smollm_tokenizer):
    """The cache holds kv_lora_rank + qk_rope_head_dim numbers per token and layer (16 + 8
    here, 576 for DeepSeek-V3: 1/57 of its expanded 128 heads x (192 + 128)); `info` says so;
    decoding over it runs absorbed (kv_b folded into q and the output) with the expanded
    forward's logits."""
    from llamaworks.model import LatentAttention

    _deepseek(tmp_path, smollm_tokenizer)
    model = load_model(tmp_path).model
    cache = model.new_cache(batch_size=2, max_seq_len=32)
    assert tuple(cache.k.shape) == (2, 2, 1, 32, 16) and tuple(cache.v.shape) == (2, 2, 1, 32, 8)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_token"]["float32"] == 2 * 24 * 4
    v3 = get_preset("deepseek-v3")
    assert v3.kv_cache_shape == (1, 512, 64)
    calls = []
    real = LatentAttention._absorbed
    LatentAttention._absorbed = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        tokens = torch.randint(0, 1000, (2, 16))
        with torch.no_grad():
            full = model(tokens)
            cache = model.new_cache(batch_size=2, max_seq_len=32)
            model(tokens[:, :12], cache=cache)  # prefill (more than 8 tokens): expanded
            assert not calls
            steps = [model(tokens[:, i:i + 1], input_pos=torch.tensor([i]), cache=cache)
                     for i in range(12, 16)]
    finally:
        LatentAttention._absorbed = real
    assert len(calls) == 4 * 2  # every decode step, both layers
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 12:], atol=1e-5, rtol=1e-5)


def test_deepseek_multi_token_prediction_layer_weights_are_skipped(tmp_path):
    """DeepSeek-V3 files carry the MTP module as one extra layer (model.layers.61 there); the
    model does not use it at inference, and it is skipped on load, as transformers does."""
    from safetensors.torch import load_file, save_file

    hf = _deepseek(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    extra = {k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in sd.items()
             if k.startswith("model.layers.1.")}
    save_file({**sd, **extra}, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path).model
    tokens = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_training_flops_of_latent_attention_count_its_own_head_widths():
    """6 x active non-embedding parameters + 6 L H (qk + v) T: DeepSeek-V3's query/key heads
    are 128 + 64 wide and its values 128 (head_dim is only the RoPE part there)."""
    from llamaworks.train.metrics import flops_per_token

    cfg = get_preset("deepseek-v3")
    n = cfg.num_params(include_embeddings=False, active=True)
    assert flops_per_token(cfg, 4096) == 6 * n + 6 * 61 * 128 * (192 + 128) * 4096
    dense = get_preset("llama3-8b")  # the usual 12 L H d T
    assert flops_per_token(dense, 8192) == 6 * dense.num_params(
        include_embeddings=False) + 12 * 32 * 32 * 128 * 8192


def test_a_router_bias_of_a_family_without_one_survives_config_json(tmp_path):
    """tiny-moe (Qwen3-MoE layout) trained with DeepSeek's correction biases: the saved
    config.json says so (a key of ours), so `load_model` builds the biased routers and
    refuses nothing; the biases route as in training."""
    cfg = get_preset("tiny-moe", router_bias=True, vocab_size=259)
    model = Llama(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(0.1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 1.0)
    save_native(tmp_path, cfg, model.state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["llamaworks_router_bias"] is True
    back = load_model(tmp_path).model
    assert back.config.router_bias
    x = torch.tensor([[3, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))
    assert ModelConfig.from_hf_dict(get_preset("tiny-moe").to_hf_dict()).router_bias is False


def test_deepseek_scoring_func_round_trips_through_config_json():
    """DeepSeek's own configs say how the router scores (V2 softmax, V3 sigmoid); a softmax
    deepseek2 GGUF converted to a directory keeps its routing (transformers' DeepSeek-V3 reads
    no such key and always uses sigmoid)."""
    v3 = get_preset("deepseek-v3")
    assert v3.to_hf_dict()["scoring_func"] == "sigmoid"
    soft = v3.replace(router="softmax")
    assert ModelConfig.from_hf_dict(soft.to_hf_dict()).router == "softmax"

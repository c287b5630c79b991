"""`llamaworks plan` (train/plan.py): exact parameter and memory arithmetic, the layout search's
rules, and calibration against published training runs."""

from __future__ import annotations

import json

import pytest

from llamaworks.cli import main
from llamaworks.config import get_preset
from llamaworks.errors import LlamaworksError
from llamaworks.train import plan as planner
from llamaworks.train.metrics import flops_per_token
from llamaworks.train.plan import GB, GPUS, HEADROOM, Layout, Shape, memory, plan

GIB = 2**30


@pytest.mark.parametrize("preset", ["llama3.1-8b", "mixtral-8x7b", "qwen3-30b-a3b",
                                    "deepseek-v3", "llama4-maverick-17b-128e"])
def test_shape_counts_each_layer_as_the_model_holds_it(preset):
    from llamaworks.model import Llama

    cfg = get_preset(preset)
    model = Llama(cfg, device="meta")
    shape = Shape.of(cfg)
    assert [a + b for a, b, _ in shape.layers] == [
        sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    experts = [sum(p.numel() for p in layer.mlp.experts.parameters())
               if cfg.is_moe(i) else 0 for i, layer in enumerate(model.model.layers)]
    assert [b for _, b, _ in shape.layers] == experts
    assert shape.params == cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_weights_of_an_8b_in_bf16_are_16_gb_and_the_parts_exact():
    cfg = get_preset("llama3.1-8b")
    n = cfg.num_params()
    assert n == 8_030_261_248
    p = plan("llama3.1-8b", 8, "h100-80gb", 8192, global_batch_tokens=16 * 8192)
    assert p["weights_bf16_gb"] == 2 * n / GB == pytest.approx(16.06, abs=0.005)
    shape = Shape.of(cfg)
    lay = Layout(dp=8, tp=1, pp=1, ep=1, micro_batch_rows=2, grad_accum=1,
                 activation_checkpointing=True)
    m = memory(shape, lay, 8192)
    root = 2 * cfg.vocab_size * cfg.dim + cfg.dim  # embedding + output + final norm
    block = shape.layers[0][0]
    assert m["optimizer"] == 8 * n / 8  # AdamW's two fp32 moments, sharded 8 ways: 8.03 GB
    assert m["weights"] == 4 * n / 8 + 2 * (root + 2 * block)  # fp32 shards + bf16 gathered
    assert m["gradients"] == 4 * n / 8 + 2 * root + 6 * block
    tokens = 2 * 8192
    assert m["activations"] == (tokens * 32 * 2 * cfg.dim + tokens * shape.layers[0][2]
                                + tokens * 10 * cfg.dim + 4 * cfg.vocab_size * cfg.dim
                                + 1.5 * (256 << 20))


def test_dense_activations_follow_the_stated_formula():
    cfg = get_preset("llama3.1-8b")
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, 14336
    h = cfg.n_heads
    assert planner.activation_bytes(cfg, 0) == 16 * d + 8 + 2 * (q + 2 * kv) + 2 * q + 4 * h + 8 * f


def _saved_per_layer(cfg, rows: int = 2, seq: int = 256) -> list[float]:
    """Bytes per token each block's forward hands autograd (saved_tensors_hooks; storages
    counted once, parameters not), the model in bf16 on CPU."""
    import torch

    from llamaworks.model import Llama

    torch.manual_seed(0)
    model = Llama(cfg).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    seen: dict[int, tuple[int, int]] = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in params and ptr not in seen:
            seen[ptr] = (current[0], t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, cfg.vocab_size, (rows, seq)), hidden_only=True)
    out = [0.0] * cfg.n_layers
    for layer, nbytes in seen.values():
        out[layer] += nbytes / (rows * seq)
    return out


SMALL = dict(dim=256, vocab_size=512, max_seq_len=512, n_heads=8, n_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("name, cfg, rel", [
    ("llama", lambda: get_preset("llama3.1-8b", **SMALL, n_layers=2, hidden_dim=704,
                                 rope_scaling=None), 0.001),
    ("qwen3 q/k norms", lambda: get_preset("qwen3-8b", **SMALL, n_layers=2, hidden_dim=704),
     0.001),
    ("qwen3-moe", lambda: get_preset("tiny-moe"), 0.002),
    ("mixtral", lambda: get_preset("mixtral-8x7b", **SMALL, n_layers=2, hidden_dim=512,
                                   moe_hidden_dim=384), 0.002),
    # CPU's SDPA returns these layers' output in [B, H, T, D] order, so o_proj gets a copy
    # (2 q per token) that CUDA's kernels, returning [B, T, H, D], do not make
    ("llama 4", lambda: (lambda c: c.replace(n_layers=4, layer_types=c.layer_types[:4],
                                             nope_layers=[3]))(get_preset(
        "llama4-scout-17b-16e", **SMALL, hidden_dim=512, moe_hidden_dim=128,
        shared_hidden_dim=128)), 0.06),
    # q/k and v of one width (as DeepSeek's are not) so CPU runs its flash kernel, not the
    # math fallback with T x T probabilities that CUDA's memory-efficient kernel avoids
    ("deepseek-v3", lambda: get_preset(
        "deepseek-v3", dim=256, vocab_size=512, max_seq_len=512, n_layers=4, moe_layers=[3],
        n_heads=4, n_kv_heads=4, head_dim=16, qk_nope_dim=16, v_head_dim=32, kv_lora_rank=64,
        q_lora_rank=96, hidden_dim=512, moe_hidden_dim=64, shared_hidden_dim=64, n_experts=16,
        router_groups=4, router_topk_groups=2), 0.03),
])
def test_activation_bytes_match_what_autograd_saves(name, cfg, rel):
    cfg = cfg()
    measured = _saved_per_layer(cfg)
    for layer in range(1, cfg.n_layers):  # layer 0 also holds the shared RoPE tables
        assert planner.activation_bytes(cfg, layer) == pytest.approx(measured[layer], rel=rel), \
            (name, layer)


def test_layouts_keep_heads_experts_and_gpus_divisible():
    for preset, gpus in (("llama-33b", 64), ("deepseek-v3", 1024), ("llama4-behemoth", 4096),
                         ("mixtral-8x7b", 96)):
        cfg = get_preset(preset)
        found = planner.layouts(cfg, gpus, batch_rows=4096, checkpointing="auto")
        assert found
        for tp, pp, ep, _ in found:
            dp = gpus // (tp * pp)
            assert dp * tp * pp == gpus and tp <= 8 and cfg.n_heads % tp == 0
            assert cfg.n_kv_heads % tp == 0
            assert (cfg.n_experts or 1) % ep == 0 and (dp * tp) % ep == 0
    assert {t[0] for t in planner.layouts(get_preset("llama-33b"), 64, 4096, "auto")} == {1, 2, 4}
    # simplest first: no pipeline, no TP, no recomputation, then the rest
    assert planner.layouts(get_preset("llama3.1-70b"), 64, 4096, "auto")[0] == (1, 1, 1, False)


def test_pipeline_stages_split_layers_and_the_first_holds_pp_micro_batches():
    assert [len(r) for r in planner.stages(126, 16)] == [8] * 14 + [7] * 2
    shape = Shape.of(get_preset("llama3.1-70b"))
    one = memory(shape, Layout(8, 8, 1, 1, 1, 8, False), 8192)
    two = memory(shape, Layout(4, 8, 2, 1, 1, 8, False), 8192)
    # 1F1B: stage 0 keeps 2 micro-batches of half the layers, as many activations as no PP
    assert two["activations"] == pytest.approx(one["activations"], rel=0.05)
    assert two["optimizer"] == pytest.approx(one["optimizer"], rel=0.05)  # 16 B x P / GPUs


def test_llama_65b_paper_run_21_days():
    """LLaMA (Touvron et al. 2023, section 2.4): "when training a 65B-parameter model, our code
    processes around 380 tokens/sec/GPU on 2048 A100 GPU with 80GB of RAM. This means that
    training over our dataset containing 1.4T tokens takes approximately 21 days." Batch 4M
    tokens of 2048."""
    p = plan("llama-65b", 2048, "a100-80gb", tokens=1.4e12, tokens_per_gpu_s=380)
    assert p["days"] == pytest.approx(21, rel=0.25)
    assert p["days"] == pytest.approx(20.8, abs=0.05)
    assert p["layout"]["gpus"] == 2048 and p["memory_per_gpu_gb"]["total"] <= HEADROOM * 80
    # the MFU that throughput means on the A100's 312 TFLOPS, given back as --mfu: same days
    assert p["mfu"] == pytest.approx(0.494, abs=0.002)
    again = plan("llama-65b", 2048, "a100-80gb", tokens=1.4e12, mfu=p["mfu"])
    assert again["days"] == pytest.approx(p["days"], rel=1e-9)


# torchtitan's benchmarks/llama3_h100_202412_torchtitan.md (torchtitan 9dec370, 2024-12-26),
# Llama 3.1 8B, seq_len 8192 (train_configs/llama3_8b.toml at that commit), local batch 2,
# selective activation checkpointing, on H100s (96 GB HBM2e, 500 W): Table 1, 8 GPUs FSDP:
# 5,762 TPS/GPU at 82.4 GiB (6,667 with torch.compile); Table 3, 128 GPUs: 67.0 GiB. It states
# "33% to 39% MFU" against the SXM peak (989), with torchtitan's FLOPs per token
# 6 N(non-embedding) + 12 L H Q T, the formula train/metrics.flops_per_token uses too.
def test_torchtitan_llama3_8b_throughput_at_its_mfu():
    for mfu, published in ((0.33, 5762), (0.39, 6667)):
        p = plan("llama3.1-8b", 8, "h100-80gb", 8192, global_batch_tokens=16 * 8192, mfu=mfu)
        assert p["tokens_per_gpu_s"] == pytest.approx(published, rel=0.03)
    assert flops_per_token(get_preset("llama3.1-8b"), 8192) == pytest.approx(57.9e9, rel=0.002)


def test_torchtitan_llama3_8b_memory():
    """Selective checkpointing keeps between what full checkpointing and none keep, so the
    measured totals lie between our two estimates; going from 8 to 128 GPUs changes only the
    sharded state, and our 16 bytes/param give that difference within 10%."""
    shape = Shape.of(get_preset("llama3.1-8b"))
    totals = {}
    for dp, measured_gib in ((8, 82.4), (128, 67.0)):
        on, off = (memory(shape, Layout(dp, 1, 1, 1, 2, 1, ac), 8192)["total"]
                   for ac in (True, False))
        assert on < measured_gib * GIB < off
        totals[dp] = on
    assert totals[8] - totals[128] == pytest.approx((82.4 - 67.0) * GIB, rel=0.10)


def test_llama4_behemoth_on_32k_h100s_for_30t_tokens(capsys):
    """Meta's Llama 4 announcement (2025-04-05): Behemoth pre-trained "using FP8 and 32K GPUs,
    we achieved 390 TFLOPs/GPU", on "more than 30 trillion tokens". Our shape is Scout's layout
    scaled to Meta's 288B active / ~2T total (config.py). 390 TFLOPs/GPU as --mfu of the H100's
    bf16 peak; a 32M-token batch (Llama 3 405B used 16M on 16K GPUs) so each of the 4096
    FSDP ranks gets a sequence."""
    args = ["plan", "--preset", "llama4-behemoth", "--gpus", "32768", "--gpu", "h100-80gb",
            "--tokens", "30e12", "--global-batch-tokens", str(32 << 20), "--mfu",
            str(390 / 989)]
    assert main(args + ["--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["total_params"] == pytest.approx(1.99e12, rel=0.01)
    assert p["active_params"] == pytest.approx(288e9, rel=0.01)
    lay = p["layout"]
    assert lay["dp"] * lay["tp"] * lay["pp"] == 32768 and 16 % lay["ep"] == 0 and lay["ep"] > 1
    mem = p["memory_per_gpu_gb"]
    assert set(mem) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert mem["total"] <= HEADROOM * GPUS["h100-80gb"].memory_gb
    tps = 390e12 * 32768 / p["flops_per_token"]
    assert p["tokens_per_s"] == pytest.approx(tps, rel=1e-6)
    assert p["days"] == pytest.approx(30e12 / tps / 86400, rel=1e-6)
    assert 40 < p["days"] < 60  # ~1.9 TFLOPs/token: 6 x 288B + attention at 8192
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "32768 x NVIDIA H100" in text and "30.00T tokens:" in text and "days" in text


def test_errors_exit_2_and_name_the_smallest_gpu_count(capsys):
    base = ["--gpus", "8", "--gpu", "h100-80gb"]
    assert main(["plan", "--preset", "llama-1t", *base]) == 2
    assert "unknown preset 'llama-1t'" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama-7b", "--gpus", "8", "--gpu", "v100"]) == 2
    assert "unknown GPU 'v100'; choose one of: a100-80gb, h100-80gb, h200" in \
        capsys.readouterr().err
    assert main(["plan", "--preset", "llama3.1-405b", *base]) == 2
    err = capsys.readouterr().err
    assert "no layout of llama3.1-405b fits on 8 x" in err and "is 112" in err
    assert plan("llama3.1-405b", 112, "h100-80gb")["layout"]["gpus"] == 112
    with pytest.raises(LlamaworksError, match="raise --global-batch-tokens"):
        plan("llama3.1-8b", 8192, "h100-80gb", global_batch_tokens=4 << 20)


def test_llama31_405b_gpu_hours():
    """The Llama 3 paper (Table 4): 405B pre-trained on 16,384 H100s at 8192 tokens, 16M-token
    batches, 41% bf16 MFU; 15.6T tokens (section 3.1); the Llama 3.1 model card: 30.84M H100
    GPU-hours for 405B. At that MFU we get 28.1M, 9% fewer: the card's hours also hold the
    long-context stage (up to 128K tokens a sequence, costlier per token) and downtime, so 15%."""
    p = plan("llama3.1-405b", 16384, "h100-80gb", 8192, 16 << 20, 15.6e12, mfu=0.41)
    assert p["days"] * 24 * 16384 == pytest.approx(30.84e6, rel=0.15)
    assert p["memory_per_gpu_gb"]["total"] <= HEADROOM * 80

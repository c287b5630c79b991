"""Tensor parallelism (`train/tensor_parallel.py`, applied by `distributed.parallelize`): on 2
gloo ranks every block's heads and MLP units are split, and the gradients, the losses of
`pretrain --tensor-parallel 2` and its saved weights follow one process; its checkpoint resumes
on 2 ranks and on 1; 4 ranks compose FSDP2 x TP as a 2 x 2 mesh; what cannot split is refused."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.checkpoint import load_state_dict
from llamaworks.config import get_preset
from llamaworks.errors import LlamaworksError
from llamaworks.train import distributed as D
from llamaworks.train.loop import train
from llamaworks.train.tensor_parallel import check_splittable

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("tp"))


def _torchrun(args: list[str], n: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _pretrain(data, out, *extra) -> list[str]:
    return ["-m", "llamaworks.cli", "pretrain", "--preset", "tiny", "--data", str(data),
            "--out", str(out), "--lr", "3e-3", "--micro-batch", "2", "--seq-len", "32",
            "--max-steps", "10", "--eval-every", "10", "--eval-rows", "8", "--log-every", "1",
            "--save-every", "5", "--no-progress", "--device", "cpu", *extra]


def _same_run(a, b, steps, rel: float = 1e-4) -> None:
    for s in steps:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= rel * a[s]["loss"], (s, a[s], b[s])


def _same_weights(x, y) -> None:
    _, sd1, _ = load_state_dict(x)
    _, sd2, _ = load_state_dict(y)  # both native checkpoints: full, unsharded tensors
    assert sd1.keys() == sd2.keys()
    assert all(sd1[k].shape == sd2[k].shape for k in sd1)
    worst = max(float((sd1[k] - sd2[k]).abs().max()) for k in sd1)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_tensor_parallel_forward_and_gradients_equal_one_process(tmp_path):
    """Both ranks forward the same batch through their halves of every block (q/k/v biases,
    per-head q/k norms, GQA): the logits and every gradient (the split ones gathered) equal an
    unsplit model's."""
    script = tmp_path / "tp.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from llamaworks.config import get_preset
        from llamaworks.model import Llama
        from llamaworks.train.tensor_parallel import apply_tensor_parallel

        dist.init_process_group("gloo")
        cfg = get_preset("tiny", qk_norm=True, qkv_bias=True, o_bias=True)
        def build():
            m = Llama(cfg, device="meta")
            m.to_empty(device="cpu")
            m.init_weights(0.1, torch.Generator().manual_seed(0))
            for name, p in m.named_parameters():  # biases and norms away from their init
                if p.dim() == 1:
                    p.data += 0.1 * torch.randn(p.shape, generator=torch.Generator()
                                                .manual_seed(len(name)))
            return m.train()
        ref, tp = build(), build()
        apply_tensor_parallel(tp, init_device_mesh("cpu", (2,)))
        attn = tp.model.layers[0].self_attn
        assert (attn.n_heads, attn.n_kv) == (2, 1)
        assert attn.q_proj.weight.to_local().shape == (32, 64)
        assert attn.k_proj.bias.to_local().shape == (16,)
        tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
        def loss(m):
            logits = m(tokens)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                     tokens[:, 1:].flatten()), logits
        (l_ref, y_ref), (l_tp, y_tp) = loss(ref), loss(tp)
        l_ref.backward()
        l_tp.backward()
        worst = (y_ref - y_tp).abs().max().item()
        for (name, p), (_, q) in zip(tp.named_parameters(), ref.named_parameters(), strict=True):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            worst = max(worst, (g - q.grad).abs().max().item())
        worst = torch.tensor(worst)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print("WORST", worst.item(), flush=True)
        dist.destroy_process_group()
    """))
    r = _torchrun([str(script)])
    worst = [float(x) for x in re.findall(r"WORST (\S+)", r.stdout)]
    assert len(worst) == 1 and worst[0] < 1e-5, r.stdout


@pytest.mark.slow
def test_two_tensor_parallel_ranks_follow_one_rank_and_resume_on_two_and_on_one(data, tmp_path):
    """--tensor-parallel 2 on 2 ranks (one data-parallel group: both read the same rows) logs
    1 rank's losses at every step within 1e-4 relative; stopped at step 5 and resumed on 2
    ranks it saves the same final weights (a normal full checkpoint), and the same step-5
    checkpoint resumed on 1 process continues the curve."""
    one = tmp_path / "one"
    train(get_preset("tiny"), small_train_config(micro_batch=2, max_steps=10, eval_every=10,
                                                 save_every=5), data, one)
    two = tmp_path / "two"
    _torchrun(_pretrain(data, two, "--tensor-parallel", "2", "--stop-at", "5"))
    assert (two / "checkpoints" / "step_000005" / "dcp" / ".metadata").exists()
    solo = tmp_path / "solo"
    shutil.copytree(two, solo)
    _torchrun(_pretrain(data, two, "--tensor-parallel", "2", "--resume"))
    a, b = read_metrics(one), read_metrics(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    _same_run(a, b, a)
    _same_weights(one, two)

    r = subprocess.run([sys.executable, *_pretrain(data, solo, "--resume")],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = read_metrics(solo)
    assert sorted(c) == list(range(1, 11))
    _same_run(a, c, range(6, 11), rel=1e-5)
    _same_weights(one, solo)


@pytest.mark.slow
def test_four_ranks_compose_fsdp2_and_tensor_parallel_as_2x2(data, tmp_path):
    """4 ranks = 2 FSDP2 groups x 2 tensor-parallel ranks, each group reading half of the
    batch: the losses and the saved weights of 1 rank on the whole batch."""
    one = tmp_path / "one"
    train(get_preset("tiny"), small_train_config(micro_batch=2, max_steps=10, eval_every=10,
                                                 save_every=10), data, one)
    four = tmp_path / "four"
    _torchrun(_pretrain(data, four, "--tensor-parallel", "2", "--micro-batch", "1",
                        "--save-every", "10"), n=4, timeout=600)
    a, b = read_metrics(one), read_metrics(four)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    _same_run(a, b, a)
    _same_weights(one, four)


@pytest.mark.slow
def test_tensor_parallel_composes_with_activation_checkpointing_or_compile(data, tmp_path):
    """parallelize's order (TP -> activation checkpointing -> compile per block -> FSDP2) runs:
    2 steps with TP and activation checkpointing, and 2 with TP and compile, log 1 rank's
    losses."""
    one = tmp_path / "one"
    train(get_preset("tiny"), small_train_config(micro_batch=2, max_steps=2, eval_every=2,
                                                 save_every=2), data, one)
    a = read_metrics(one)
    for flag in ("--activation-checkpointing", "--compile"):
        two = tmp_path / flag.strip("-")
        _torchrun(_pretrain(data, two, "--tensor-parallel", "2", flag, "--max-steps", "2",
                            "--eval-every", "2", "--save-every", "2"), timeout=900)
        b = read_metrics(two)
        assert sorted(a) == sorted(b) == [1, 2]
        _same_run(a, b, a)


@pytest.mark.parametrize("preset, over, tp, message", [
    ("tiny", {}, 3, "4 attention heads do not split into 3"),
    ("tiny", {}, 4, "2 key/value heads do not split into 4"),
    ("tiny", {"n_kv_heads": 4, "hidden_dim": 170}, 4, "170 MLP hidden units do not split"),
    ("tiny-moe", {}, 2, "does not split mixture-of-experts layers; use --expert-parallel"),
    ("tiny", {"kv_lora_rank": 16, "qk_nope_dim": 8, "v_head_dim": 16}, 2, "latent attention"),
    ("tiny", {}, 0, "must be >= 1"),
])
def test_what_cannot_split_is_refused_by_name(preset, over, tp, message):
    with pytest.raises(ValueError, match=message):
        check_splittable(get_preset(preset, **over), tp)
    check_splittable(get_preset("tiny"), 2)  # what can split passes


@pytest.mark.slow
def test_tensor_parallel_refuses_one_process_uneven_ranks_and_expert_parallel(data, tmp_path):
    with pytest.raises(LlamaworksError, match="needs torchrun with a multiple of 2"):
        train(get_preset("tiny"), small_train_config(tensor_parallel=2, max_steps=1),
              data, tmp_path / "a")
    with pytest.raises(ValueError, match="--tensor-parallel 4 does not divide the 6 ranks"):
        D.world_mesh(D.DistInfo(rank=0, world_size=6), 4)
    with pytest.raises(ValueError, match="do not combine"):
        D.parallelize(None, D.DistInfo(rank=0, world_size=4), tensor_parallel=2,
                      expert_parallel=2)
    with pytest.raises(ValueError, match="use one of the two"):
        D.parallelize(None, D.DistInfo(rank=0, world_size=2), tensor_parallel=2,
                      activation_checkpointing=True, compile=True)


def _generate(model, *extra) -> list[str]:
    return ["-m", "llamaworks.cli", "generate", "--model", str(model), "-p",
            "In the beginning God", "-n", "24", "--json", "--threads", "1", *extra]


@pytest.mark.slow
def test_generate_with_tensor_parallel_gives_one_process_tokens(data, tmp_path):
    """`generate --tensor-parallel 2` under torchrun (2 processes, eager steps over the split
    blocks, per-rank KV caches of 1 key/value head) prints the greedy tokens of one process;
    without torchrun it is refused."""
    import json

    import torch

    from llamaworks.checkpoint.native import save_native
    from llamaworks.model import Llama
    from llamaworks.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(data / "tokenizer")
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=None)
    m = Llama(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(0.1, torch.Generator().manual_seed(3))
    model = save_native(tmp_path / "m", cfg, m.state_dict(), tokenizer=tok, dtype=torch.float32)
    r = subprocess.run([sys.executable, *_generate(model)], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(one["ids"]) >= 8  # up to 24, or a stop token
    r = _torchrun(_generate(model, "--tensor-parallel", "2"))
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 prints, rank 1 only steps
    assert lines[0]["ids"] == one["ids"]
    r = subprocess.run([sys.executable, *_generate(model, "--tensor-parallel", "2")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "needs as many processes: torchrun --nproc-per-node 2" \
        in r.stderr, r.stderr[-2000:]

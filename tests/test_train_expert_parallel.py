"""Expert parallelism (`train/expert_parallel.py`): each of 2 gloo ranks holds half of every MoE
layer's experts and token copies travel by all-to-all. The losses, gradients and the saved
checkpoint follow one process training on the whole batch; the checkpoint reshards (a 2-rank
run resumes on 1 rank); a dense model or a rank count that is not the world is refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.checkpoint import load_state_dict
from llamaworks.config import get_preset
from llamaworks.errors import LlamaworksError
from llamaworks.train.loop import train

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("ep"))


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_expert_parallel_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    """Each rank forwards its half of the batch through its half of the experts; the expert
    gradients (gathered) and the others (averaged, as FSDP does) equal one process's."""
    script = tmp_path / "ep.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from llamaworks.config import get_preset
        from llamaworks.model import Llama
        from llamaworks.train.expert_parallel import ExpertParallelExperts, apply_expert_parallel

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        def build():
            m = Llama(get_preset("tiny-moe"), device="meta")
            m.to_empty(device="cpu")
            m.init_weights(0.1, torch.Generator().manual_seed(0))
            return m.train()
        ref, ep = build(), build()
        apply_expert_parallel(ep, init_device_mesh("cpu", (world,)), world)
        assert isinstance(ep.model.layers[1].mlp.experts, ExpertParallelExperts)
        assert ep.model.layers[1].mlp.experts.gate_proj.to_local().shape[0] == 4
        tokens = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1))
        def loss(m, t):
            logits = m(t)[:, :-1].flatten(0, 1)
            return torch.nn.functional.cross_entropy(logits, t[:, 1:].flatten())
        loss(ref, tokens).backward()
        loss(ep, tokens[2 * rank:2 * rank + 2]).backward()
        worst = 0.0
        for (name, p), (_, q) in zip(ep.named_parameters(), ref.named_parameters(), strict=True):
            if hasattr(p, "placements"):
                g = p.grad.full_tensor()
            else:
                g = p.grad.clone()
                dist.all_reduce(g)
                g /= world
            worst = max(worst, (g - q.grad).abs().max().item())
        # one line, from rank 0, flushed: another rank's buffered stdout can be lost at exit
        worst = torch.tensor(worst)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            print("WORST", worst.item(), flush=True)
        dist.destroy_process_group()
    """))
    r = _torchrun([str(script)])
    worst = [float(x) for x in re.findall(r"WORST (\S+)", r.stdout)]
    assert len(worst) == 1 and worst[0] < 1e-5, r.stdout


def _pretrain(data, out, *extra):
    return ["-m", "llamaworks.cli", "pretrain", "--preset", "tiny-moe", "--data", str(data),
            "--out", str(out), "--lr", "3e-3", "--micro-batch", "2", "--seq-len", "32",
            "--max-steps", "10", "--eval-every", "10", "--eval-rows", "8", "--log-every", "1",
            "--save-every", "5", "--no-progress", "--device", "cpu", *extra]


def test_two_expert_parallel_ranks_follow_one_rank_and_resume_on_one(data, tmp_path):
    """2 ranks x micro-batch 2 with --expert-parallel 2 log the losses of 1 rank x 2
    accumulated micro-batches of 2 at every step (within 1e-4 relative) and save the same
    weights; stopped at step 5, the 2-rank run resumes on 1 rank from its DCP checkpoint and
    continues the curve."""
    one = tmp_path / "one"
    train(get_preset("tiny-moe"), small_train_config(
        micro_batch=2, grad_accum=2, max_steps=10, eval_every=10, save_every=5), data, one)
    two = tmp_path / "two"
    _torchrun(_pretrain(data, two, "--expert-parallel", "2"))
    a, b = read_metrics(one), read_metrics(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4 * a[s]["loss"], (s, a[s], b[s])
    _, sd1, _ = load_state_dict(one)
    _, sd2, _ = load_state_dict(two)
    assert sd1.keys() == sd2.keys()
    assert sd2["model.layers.1.mlp.experts.gate_proj"].shape[0] == 8  # gathered whole
    assert all((sd1[k] - sd2[k]).abs().max() < 1e-4 for k in sd1)

    part = tmp_path / "part"
    _torchrun(_pretrain(data, part, "--expert-parallel", "2", "--stop-at", "5"))
    r = subprocess.run([sys.executable, *_pretrain(data, part, "--resume", "--grad-accum", "2")],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = read_metrics(part)
    assert sorted(c) == list(range(1, 11))
    for s in range(6, 11):
        assert abs(a[s]["loss"] - c[s]["loss"]) <= 1e-4 * a[s]["loss"], (s, a[s], c[s])


def test_expert_parallel_refuses_dense_models_and_other_rank_counts(data, tmp_path):
    with pytest.raises(LlamaworksError, match="needs as many ranks"):
        train(get_preset("tiny-moe"), small_train_config(expert_parallel=2, max_steps=1),
              data, tmp_path / "a")
    args = _pretrain(data, tmp_path / "b", "--expert-parallel", "2")
    args[args.index("tiny-moe")] = "tiny"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", *args], capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert r.returncode != 0
    assert "needs a mixture-of-experts model" in r.stdout + r.stderr

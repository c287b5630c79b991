"""FSDP2 under torchrun on CPU (gloo): 2 ranks with the same global batch follow the 1-rank loss
curve within 1e-4 relative, including a stop and a resume from the DCP sharded checkpoint, and
the run ends in one native checkpoint. On one process: `parallelize` keeps parameter names and
the forward, the mesh coordinates a tensor-parallel group reads data by, and the trainer's
gradient clipping (built for gradients of several meshes) equal to torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.checkpoint import load_state_dict
from llamaworks.config import get_preset
from llamaworks.model import Llama
from llamaworks.train import distributed as D
from llamaworks.train.loop import train


def _torchrun(data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "llamaworks.cli", "pretrain", "--preset", "tiny", "--data", str(data),
           "--out", str(out), "--lr", "3e-3", "--micro-batch", "2", "--seq-len", "32",
           "--max-steps", "20", "--eval-every", "20", "--eval-rows", "8", "--log-every", "1",
           "--save-every", "10", "--no-progress", "--device", "cpu", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch_across_a_resume(tmp_path):
    data = prepare_small(tmp_path)
    one = tmp_path / "one"
    train(get_preset("tiny"), small_train_config(max_steps=20, eval_every=20), data, one)
    two = tmp_path / "two"
    _torchrun(data, two, "--stop-at", "10")
    assert (two / "checkpoints" / "step_000010" / "dcp" / ".metadata").exists()
    _torchrun(data, two, "--resume")
    a, b = read_metrics(one), read_metrics(two)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4 * abs(a[s]["loss"]), s
    _, sd1, _ = load_state_dict(one)
    _, sd2, _ = load_state_dict(two)  # the exported native checkpoint: full, unsharded
    assert sd1.keys() == sd2.keys()
    assert all((sd1[k] - sd2[k]).abs().max() < 1e-4 for k in sd1)


def _tiny(seed: int = 0) -> Llama:
    m = Llama(get_preset("tiny"), device="meta")
    m.to_empty(device="cpu")
    m.init_weights(0.1, torch.Generator().manual_seed(seed))
    return m


def test_parallelize_on_one_process_keeps_names_and_forward():
    ref, m = _tiny(), _tiny()
    D.parallelize(m, D.DistInfo(), activation_checkpointing=True)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(tokens), ref(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs torchrun with a multiple of 2"):
        D.parallelize(_tiny(), D.DistInfo(), tensor_parallel=2)


def test_a_tensor_parallel_group_reads_one_data_slice():
    # ranks 0-3 as a 2 x 2 (dp, tp) mesh: ranks 0, 1 read slice 0 of 2, ranks 2, 3 slice 1
    assert [D.data_rank(D.DistInfo(rank=r, world_size=4), 2) for r in range(4)] == \
        [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert D.data_rank(D.DistInfo(rank=3, world_size=4)) == (3, 4)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and not
def test_clip_grad_norm_equals_torch_on_plain_gradients(max_norm):
    a, b = _tiny(), _tiny()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in (a, b):
        m(tokens).logsumexp(-1).mean().backward()
    n_ours = D.clip_grad_norm_(a.parameters(), max_norm)
    n_torch = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    assert torch.equal(n_ours, n_torch)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters(),
                                                          strict=True))

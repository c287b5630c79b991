"""FSDP2 under torchrun on CPU (gloo): 2 ranks with the same global batch follow the 1-rank loss
curve within 1e-4 relative, including a stop and a resume from the DCP sharded checkpoint, and
the run ends in one native checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.checkpoint import load_state_dict
from llamaworks.config import get_preset
from llamaworks.train.loop import train


def _torchrun(data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "llamaworks.cli", "pretrain", "--preset", "tiny", "--data", str(data),
           "--out", str(out), "--lr", "3e-3", "--micro-batch", "2", "--seq-len", "32",
           "--max-steps", "20", "--eval-every", "20", "--eval-rows", "8", "--log-every", "1",
           "--save-every", "10", "--no-progress", "--device", "cpu", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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

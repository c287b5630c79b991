"""Multi-node pretraining as README documents it: two torchrun launches, each `--nnodes 2
--nproc-per-node 1` and meeting at a c10d rendezvous on 127.0.0.1, act as two nodes of one
FSDP2 job; its losses follow one rank training on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.config import get_preset
from llamaworks.train.loop import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_on_localhost_follow_one_rank(tmp_path):
    data = prepare_small(tmp_path)
    one = tmp_path / "one"
    train(get_preset("tiny"), small_train_config(micro_batch=4, max_steps=5, eval_every=5,
                                                 save_every=5), data, one)
    out, port = tmp_path / "two", _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", "multinode-test", "-m", "llamaworks.cli",
         "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--lr", "3e-3",
         "--micro-batch", "2", "--seq-len", "32", "--max-steps", "5", "--eval-every", "5",
         "--eval-rows", "8", "--log-every", "1", "--save-every", "5", "--no-progress",
         "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=ENV) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    a, b = read_metrics(one), read_metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, 6))
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4 * a[s]["loss"], (s, a[s], b[s])
    import json

    # one job of two ranks, not two jobs of one
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2

"""Packing loader: fixed rows, determinism from (seed, step), rank sharding, restart anywhere."""

from __future__ import annotations

import numpy as np
import torch

from llamaworks.data.loader import PackedLoader, sequential_rows


def _shards() -> list[np.ndarray]:
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(5000, 5333, dtype=np.uint16)]


def test_rows_are_contiguous_targets_shifted_and_never_cross_shards():
    ld = PackedLoader(_shards(), seq_len=16, micro_batch=4, seed=1)
    assert ld.n_rows == 999 // 16 + 332 // 16
    for step in range(30):
        for x, y in ld.batch(step):
            assert x.shape == y.shape == (4, 16)
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert bool(((y - x) == 1).all())  # consecutive tokens of one shard


def test_batches_depend_only_on_seed_and_step_so_a_restart_reproduces_them():
    a = PackedLoader(_shards(), 16, 4, grad_accum=2, seed=7)
    first = [a.batch(s) for s in range(40)]  # crosses an epoch boundary (82 rows)
    b = PackedLoader(_shards(), 16, 4, grad_accum=2, seed=7)
    for s in (33, 5, 39):  # any order, fresh object
        assert all(torch.equal(p[0], q[0]) for p, q in zip(b.batch(s), first[s], strict=True))
    c = PackedLoader(_shards(), 16, 4, grad_accum=2, seed=8)
    assert not torch.equal(c.batch(0)[0][0], first[0][0][0])


def test_an_epoch_visits_every_row_once():
    ld = PackedLoader(_shards(), 16, 1, seed=3)
    seen = [int(ld.batch(s)[0][0][0, 0]) for s in range(ld.n_rows)]
    assert len(set(seen)) == ld.n_rows


def test_ranks_split_the_global_batch_of_one_rank_with_the_same_global_batch():
    one = PackedLoader(_shards(), 16, 4, grad_accum=1, seed=5)
    ranks = [PackedLoader(_shards(), 16, 2, grad_accum=1, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for step in range(10):
        joined = torch.cat([r.batch(step)[0][0] for r in ranks])
        assert torch.equal(joined, one.batch(step)[0][0])


def test_validation_rows_are_sequential_and_limited():
    rows = sequential_rows(_shards(), 16, max_rows=3)
    assert rows.shape == (3, 17) and int(rows[1, 0]) == 16

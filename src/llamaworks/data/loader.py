"""Packing loader: the token stream ([BOS] doc [EOS] [BOS] doc ...) cut into fixed rows of
seq_len + 1 tokens, visited in a seeded permutation per epoch. The batch of a step is a pure
function of (seed, step, rank), so a run restarts at any step with no loader state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llamaworks.errors import LlamaworksError


class PackedLoader:
    """Rows of `seq_len + 1` tokens from `shards` (rows never cross a shard boundary).

    For optimizer step s the global batch is rows [s*G, (s+1)*G) of the permuted row order, with
    G = micro_batch * grad_accum * world_size; rank r takes its contiguous 1/world_size slice and
    splits it into `grad_accum` micro-batches."""

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, micro_batch: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.shards, self.seq_len = list(shards), seq_len
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        rows = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self._starts = np.cumsum([0, *rows])
        self.n_rows = int(self._starts[-1])
        if self.n_rows == 0:
            raise LlamaworksError(f"the data has fewer than {seq_len + 1} tokens; prepare more "
                                  "data or lower seq_len")
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _row(self, r: int) -> np.ndarray:
        s = int(np.searchsorted(self._starts, r, side="right") - 1)
        off = (r - int(self._starts[s])) * self.seq_len
        return np.asarray(self.shards[s][off:off + self.seq_len + 1], dtype=np.int64)

    def _permuted(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n_rows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def batch(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`grad_accum` (inputs, targets) micro-batches of [micro_batch, seq_len] for `step`."""
        per_rank = self.micro_batch * self.grad_accum
        base = step * self.global_batch + self.rank * per_rank
        out = []
        for m in range(self.grad_accum):
            rows = [self._row(self._permuted(base + m * self.micro_batch + j))
                    for j in range(self.micro_batch)]
            t = torch.from_numpy(np.stack(rows))
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out


def sequential_rows(shards: Sequence[np.ndarray], seq_len: int, max_rows: int | None = None
                    ) -> torch.Tensor:
    """Validation rows in order ([n, seq_len + 1]), the same for every run."""
    rows = []
    for s in shards:
        for off in range(0, len(s) - seq_len, seq_len):
            rows.append(np.asarray(s[off:off + seq_len + 1], dtype=np.int64))
            if max_rows is not None and len(rows) >= max_rows:
                return torch.from_numpy(np.stack(rows))
    if not rows:
        raise LlamaworksError(f"the validation split has fewer than {seq_len + 1} tokens; raise "
                              "val_fraction in the recipe or lower seq_len")
    return torch.from_numpy(np.stack(rows))

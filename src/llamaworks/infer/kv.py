"""The engine's KV-cache manager: a pool of cache rows (one sequence each, every row at its own
positions, slot = position) with one growth policy, and the prefix cache beside it.

Rows grow together along the sequence axis in powers of two (from 256, capped at the context),
so the decode step sees few distinct shapes. `PrefixCache` keeps keys/values of token blocks
(`block` tokens, hashed with everything before them, as vLLM's automatic prefix caching does) in a
memory budget with least-recently-used eviction; a new sequence whose prompt starts with cached
blocks copies them into its row instead of recomputing them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import Tensor

from llamaworks.model import KVCache, Llama


class RowView:
    """Some rows of the pool as a cache the model writes into at per-row positions: a contiguous
    range is a view (writes land in the pool); other row sets gather and scatter back."""

    per_row = True

    def __init__(self, pool: KVCache, rows: Sequence[int]):
        self.pool, self.rows = pool, list(rows)
        lo, hi = self.rows[0], self.rows[-1] + 1
        self.contiguous = self.rows == list(range(lo, hi))
        if self.contiguous:
            self.k, self.v = pool.k[:, lo:hi], pool.v[:, lo:hi]
        else:
            self.index = torch.tensor(self.rows, device=pool.k.device)
        self.max_seq_len = pool.max_seq_len

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        if self.contiguous:
            return KVCache.update(self, layer, input_pos, k, v, kv_len)  # type: ignore[arg-type]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        index = input_pos[:, None, :, None].expand_as(k)
        for i, r in enumerate(self.rows):
            pk[r].scatter_(1, index[i], k[i].to(pk.dtype))
            pv[r].scatter_(1, index[i], v[i].to(pv.dtype))
        return pk[self.index, :, :kv_len], pv[self.index, :, :kv_len]


class KVPool:
    """Up to `rows` cache rows of up to `context` tokens for `model`. Memory follows use: rows
    and positions are allocated in powers of two as sequences take rows and grow."""

    def __init__(self, model: Llama, rows: int, context: int, min_len: int = 256):
        self.model, self.rows, self.context = model, rows, context
        self.cache = self._new(1, min(min_len, context))
        self.free = list(range(rows))

    def _new(self, rows: int, length: int, zero: bool = True) -> KVCache:
        return KVCache(self.model.config, rows, length, self.model.dtype,
                       self.model.device, per_row=True, zero=zero)

    @property
    def length(self) -> int:
        return self.cache.max_seq_len

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token in one row, all layers."""
        k = self.cache.k
        return 2 * k.shape[0] * k.shape[2] * k.shape[4] * k.element_size()

    @property
    def allocated(self) -> int:
        return self.cache.k.shape[1]

    def _grow(self, rows: int, length: int) -> None:
        """A bigger pool holding the old one; the new part zeroed (stale but finite keys are
        harmless under a mask, garbage could be NaN), without zeroing what is copied over."""
        old = self.cache
        n, t = old.k.shape[1], old.max_seq_len
        self.cache = self._new(rows, length, zero=False)
        for new, prev in ((self.cache.k, old.k), (self.cache.v, old.v)):
            new[:, :n, :, :t] = prev
            new[:, :n, :, t:] = 0
            new[:, n:] = 0

    @staticmethod
    def _pow2(have: int, need: int, cap: int) -> int:
        while have < need:
            have *= 2
        return min(have, cap)

    def reserve(self) -> None:
        """Allocate every row at the full context now (a server does, as llama.cpp's -c does),
        so no step ever stalls growing the pool."""
        if self.allocated < self.rows or self.length < self.context:
            self._grow(self.rows, self.context)

    def ensure(self, length: int) -> None:
        """Grow every row (powers of two, capped at `context`) to hold `length` positions."""
        if length > self.length:
            self._grow(self.allocated, self._pow2(self.length, length, self.context))

    def take(self, n: int) -> list[int] | None:
        """n free rows (lowest first, so busy rows stay packed at the front), or None."""
        if len(self.free) < n:
            return None
        self.free.sort()
        taken, self.free = self.free[:n], self.free[n:]
        self.ensure_rows(taken[-1] + 1)
        return taken

    def ensure_rows(self, n: int) -> None:
        """Allocate rows 0..n-1 (powers of two, capped at `rows`)."""
        if n > self.allocated:
            self._grow(self._pow2(self.allocated, n, self.rows), self.length)

    def release(self, row: int) -> None:
        if row not in self.free:
            self.free.append(row)

    def view(self, rows: Sequence[int]) -> RowView:
        self.ensure_rows(max(rows) + 1)
        return RowView(self.cache, rows)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Row dst's first n positions := row src's."""
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]


class PrefixCache:
    """Keys/values of prompt blocks, keyed by the hash of all tokens up to the block's end.

    budget_bytes: memory the stored blocks may use; the least recently used blocks go first (a
    chain's later blocks before its earlier ones, so a prefix is never left unreachable)."""

    def __init__(self, budget_bytes: int, block: int = 32):
        self.budget, self.block = budget_bytes, block
        # key -> (the block's own tokens, keys, values); the tokens guard against hash collisions
        self.blocks: collections.OrderedDict[int, tuple[tuple[int, ...], Tensor, Tensor]] = \
            collections.OrderedDict()
        self.used = 0
        self.hits = self.lookups = self.evictions = 0

    def _keys(self, tokens: Sequence[int], n_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        keys, h = [], 0
        for b in range(n_blocks):
            own = tuple(tokens[b * self.block:(b + 1) * self.block])
            h = hash((h, own))
            keys.append((h, own))
        return keys

    def match(self, tokens: Sequence[int], limit: int) -> list[tuple[Tensor, Tensor]]:
        """The stored blocks that begin `tokens`, at most `limit` tokens' worth; marks them used."""
        self.lookups += 1
        found: list[tuple[int, tuple[Tensor, Tensor]]] = []
        for key, own in self._keys(tokens, limit // self.block):
            hit = self.blocks.get(key)
            if hit is None or hit[0] != own:
                break
            found.append((key, hit[1:]))
        for key, _ in reversed(found):  # later blocks older than earlier ones
            self.blocks.move_to_end(key)
        if found:
            self.hits += 1
        return [kv for _, kv in found]

    def insert(self, tokens: Sequence[int], pool: KVPool, row: int, start: int, end: int) -> None:
        """Store the full blocks of `tokens[:end]` from `row` that are not stored yet (those
        wholly before `start` were matched or stored earlier)."""
        keys = self._keys(tokens, end // self.block)
        for b in range(start // self.block, len(keys)):
            key, own = keys[b]
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            lo, hi = b * self.block, (b + 1) * self.block
            k, v = pool.cache.k[:, row, :, lo:hi].clone(), pool.cache.v[:, row, :, lo:hi].clone()
            size = 2 * k.numel() * k.element_size()
            if size > self.budget:
                return
            while self.used + size > self.budget:
                _, (_, old, _) = self.blocks.popitem(last=False)
                self.used -= 2 * old.numel() * old.element_size()
                self.evictions += 1
            self.blocks[key] = (own, k, v)
            self.used += size
        for key, _ in reversed(keys):  # a chain's earlier blocks stay the more recent
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def load(self, blocks: list[tuple[Tensor, Tensor]], pool: KVPool, row: int) -> int:
        """Copy matched blocks into the start of `row`; returns the tokens covered."""
        for b, (k, v) in enumerate(blocks):
            lo = b * self.block
            pool.cache.k[:, row, :, lo:lo + self.block] = k
            pool.cache.v[:, row, :, lo:lo + self.block] = v
        return len(blocks) * self.block

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

RING_SLACK = 512  # tokens one forward may write per row beyond a sliding layer's window


class RowView:
    """Some rows of the pool as a cache the model writes into at per-row positions: a contiguous
    range is a view (writes land in the pool); other row sets gather and scatter back."""

    per_row = True

    def __init__(self, pool: KVCache, rows: Sequence[int]):
        self.pool, self.rows = pool, list(rows)
        self.ring, self.ringed, self.index = pool.ring, pool.ringed, pool.index
        self.window = pool.window
        lo, hi = self.rows[0], self.rows[-1] + 1
        self.contiguous = self.rows == list(range(lo, hi))
        if self.contiguous:
            self.k, self.v = pool.k[:, lo:hi], pool.v[:, lo:hi]
            if self.ring:
                self.rk, self.rv = pool.rk[:, lo:hi], pool.rv[:, lo:hi]
        else:
            self.at = torch.tensor(self.rows, device=pool.k.device)
        self.max_seq_len = pool.max_seq_len

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        assert self.contiguous, "a gathered view has no tensors of its own"
        return KVCache.layer_kv(self, layer)  # type: ignore[arg-type]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        if self.contiguous:
            return KVCache.update(self, layer, input_pos, k, v, kv_len)  # type: ignore[arg-type]
        pk, pv = self.pool.layer_kv(layer)
        if self.ringed[layer]:
            input_pos, kv_len = input_pos % self.ring, self.ring
        index = input_pos[:, None, :, None].expand_as(k)
        for i, r in enumerate(self.rows):
            pk[r].scatter_(1, index[i], k[i].to(pk.dtype))
            pv[r].scatter_(1, index[i], v[i].to(pv.dtype))
        return pk[self.at, :, :kv_len], pv[self.at, :, :kv_len]


class KVPool:
    """Up to `rows` cache rows of up to `context` tokens for `model`. Memory follows use: rows
    and positions are allocated in powers of two as sequences take rows and grow. Sliding layers
    (Mistral, Gemma 3) keep a ring of window + RING_SLACK slots instead (where that is shorter
    than the context), so a long context pays full-length memory only on its global layers;
    every forward then feeds at most `max_feed` tokens per row."""

    def __init__(self, model: Llama, rows: int, context: int, min_len: int = 256):
        self.model, self.rows, self.context = model, rows, context
        window = model.config.sliding_window or 0
        ring = window + RING_SLACK if window else 0
        self.ring = ring if ring < context else 0  # a ring no shorter than the context: none
        self.cache = self._new(1, min(min_len, context))
        self.ring = self.cache.ring  # 0 too where no layer slides
        self.free = list(range(rows))
        self.top = [0] * rows  # per row: 1 + the highest position written (tracked with rings)

    def _new(self, rows: int, length: int, zero: bool = True) -> KVCache:
        return KVCache(self.model.config, rows, length, self.model.dtype,
                       self.model.device, per_row=True, zero=zero, ring=self.ring)

    @property
    def max_feed(self) -> int | None:
        """The most tokens one forward may write per row (None: no limit)."""
        return self.ring - self.cache.window + 1 if self.ring else None

    @property
    def length(self) -> int:
        return self.cache.max_seq_len

    def _parts(self, cache: KVCache | None = None) -> list[Tensor]:
        c = cache or self.cache
        return [t for t in (c.k, c.v, c.rk, c.rv) if t is not None]

    def bytes_at(self, rows: int, length: int) -> int:
        """Memory of `rows` rows of `length` positions (rings at their own length)."""
        total = 0
        for t in self._parts():
            slots = t.shape[3] if t is self.cache.rk or t is self.cache.rv else length
            total += t.shape[0] * rows * t.shape[2] * slots * t.shape[4] * t.element_size()
        return total

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts())

    @property
    def allocated(self) -> int:
        return self.cache.k.shape[1]

    def _grow(self, rows: int, length: int) -> None:
        """A bigger pool holding the old one; the new part zeroed (stale but finite keys are
        harmless under a mask, garbage could be NaN), without zeroing what is copied over."""
        old = self.cache
        n = old.k.shape[1]
        self.cache = self._new(rows, length, zero=False)
        for new, prev in zip(self._parts(), self._parts(old), strict=True):
            s = prev.shape[3]
            new[:, :n, :, :s] = prev
            new[:, :n, :, s:] = 0
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
        for r in taken:
            self.top[r] = 0
        return taken

    def ensure_rows(self, n: int) -> None:
        """Allocate rows 0..n-1 (powers of two, capped at `rows`)."""
        if n > self.allocated:
            self._grow(self._pow2(self.allocated, n, self.rows), self.length)

    def wrote(self, rows: Tensor | Sequence[int], pos: Tensor) -> None:
        """Note that rows[i] was written at pos[i] (pos [N], or [N, T] for several per row):
        with rings, what a row still holds of a position depends on what was written after it
        (`intact`)."""
        if not self.ring:
            return
        flat = pos.reshape(len(rows), -1)[:, -1] if pos.dim() > 1 else pos  # rows ascend in T
        rs = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        top = self.top
        for r, p in zip(rs, flat.tolist(), strict=True):
            if p >= top[r]:
                top[r] = p + 1

    def intact(self, row: int, lo: int) -> bool:
        """Whether positions from `lo` on of `row` are all still in its rings (a position is
        lost once one `ring` later was written, padding and rejected drafts included)."""
        return not self.ring or lo >= self.top[row] - self.ring

    def release(self, row: int) -> None:
        if row not in self.free:
            self.free.append(row)

    def view(self, rows: Sequence[int]) -> RowView:
        self.ensure_rows(max(rows) + 1)
        return RowView(self.cache, rows)

    def copy(self, src: int, dst: int, n: int) -> None:
        """Row dst's first n positions := row src's (src holding exactly n: a ring is copied
        whole)."""
        c = self.cache
        c.k[:, dst, :, :n] = c.k[:, src, :, :n]
        c.v[:, dst, :, :n] = c.v[:, src, :, :n]
        if self.ring:
            c.rk[:, dst] = c.rk[:, src]
            c.rv[:, dst] = c.rv[:, src]
            self.top[dst] = self.top[src]

    def read(self, row: int, lo: int, hi: int, with_ring: bool) -> tuple[Tensor | None, ...]:
        """Copies of positions lo..hi-1 of `row`: (k, v, ring k, ring v); the ring parts only
        if `with_ring` (the caller knows they are still in the ring), else None."""
        c = self.cache
        out: list[Tensor | None] = [c.k[:, row, :, lo:hi].clone(), c.v[:, row, :, lo:hi].clone()]
        if self.ring:
            slots = torch.arange(lo, hi, device=c.rk.device) % self.ring
            out += [c.rk[:, row, :, slots].clone(), c.rv[:, row, :, slots].clone()] \
                if with_ring else [None, None]
        return tuple(out)

    def write(self, row: int, lo: int, parts: tuple[Tensor | None, ...]) -> None:
        """Positions lo.. of `row` := `parts` (as `read` returned them; absent ring parts are
        not written)."""
        c = self.cache
        k, v = parts[0], parts[1]
        assert k is not None and v is not None
        hi = lo + k.shape[2]
        c.k[:, row, :, lo:hi] = k
        c.v[:, row, :, lo:hi] = v
        if self.ring and parts[2] is not None:
            slots = torch.arange(lo, hi, device=c.rk.device) % self.ring
            c.rk[:, row, :, slots] = parts[2]
            c.rv[:, row, :, slots] = parts[3]
        self.top[row] = max(self.top[row], hi)


class PrefixCache:
    """Keys/values of prompt blocks, keyed by the hash of all tokens up to the block's end.

    budget_bytes: memory the stored blocks may use; the least recently used blocks go first (a
    chain's later blocks before its earlier ones, so a prefix is never left unreachable).
    With a pool whose sliding layers are rings, a block keeps those layers' keys only if its
    positions were still in the rings when stored (`KVPool.intact`); a match
    is cut back to where the last window of positions before its end has them, since that is
    all a sliding layer reads later."""

    def __init__(self, budget_bytes: int, block: int = 32):
        self.budget, self.block = budget_bytes, block
        # key -> (the block's own tokens, (k, v, ring k, ring v)); the tokens guard against
        # hash collisions
        self.blocks: collections.OrderedDict[
            int, tuple[tuple[int, ...], tuple[Tensor | None, ...]]] = collections.OrderedDict()
        self.used = 0
        self.hits = self.lookups = self.evictions = 0

    def _keys(self, tokens: Sequence[int], n_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        keys, h = [], 0
        for b in range(n_blocks):
            own = tuple(tokens[b * self.block:(b + 1) * self.block])
            h = hash((h, own))
            keys.append((h, own))
        return keys

    @staticmethod
    def _size(parts: tuple[Tensor | None, ...]) -> int:
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def match(self, tokens: Sequence[int], limit: int, pool: KVPool | None = None
              ) -> list[tuple[Tensor | None, ...]]:
        """The stored blocks that begin `tokens`, at most `limit` tokens' worth (and, for a
        `pool` with rings, only as far as the ring layers' last window is stored); marks them
        used."""
        self.lookups += 1
        found: list[tuple[int, tuple[Tensor | None, ...]]] = []
        for key, own in self._keys(tokens, limit // self.block):
            hit = self.blocks.get(key)
            if hit is None or hit[0] != own:
                break
            found.append((key, hit[1]))
        if pool is not None and pool.ring:
            window = pool.cache.window
            m = len(found)
            while m and any(found[j][1][2] is None for j in range(m)
                            if (j + 1) * self.block > m * self.block - window + 1):
                m -= 1
            found = found[:m]
        for key, _ in reversed(found):  # later blocks older than earlier ones
            self.blocks.move_to_end(key)
        if found:
            self.hits += 1
        return [kv for _, kv in found]

    def insert(self, tokens: Sequence[int], pool: KVPool, row: int, start: int, end: int) -> None:
        """Store the full blocks of `tokens[:end]` from `row` (which holds positions < end) that
        are not stored yet (those wholly before `start` were matched or stored earlier), or are
        stored without the ring layers' keys that the row still has."""
        keys = self._keys(tokens, end // self.block)
        for b in range(start // self.block, len(keys)):
            key, own = keys[b]
            lo, hi = b * self.block, (b + 1) * self.block
            with_ring = bool(pool.ring) and pool.intact(row, lo)
            old = self.blocks.get(key)
            if old is not None and (not with_ring or old[1][2] is not None):
                self.blocks.move_to_end(key)
                continue
            parts = pool.read(row, lo, hi, with_ring)
            size = self._size(parts)
            if size > self.budget:
                return
            if old is not None:  # upgraded with the ring layers' keys
                self.used -= self._size(self.blocks.pop(key)[1])
            while self.used + size > self.budget:
                _, (_, gone) = self.blocks.popitem(last=False)
                self.used -= self._size(gone)
                self.evictions += 1
            self.blocks[key] = (own, parts)
            self.used += size
        for key, _ in reversed(keys):  # a chain's earlier blocks stay the more recent
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def load(self, blocks: list[tuple[Tensor | None, ...]], pool: KVPool, row: int) -> int:
        """Copy matched blocks into the start of `row`, in order (a ring ends up holding the
        last of them); returns the tokens covered."""
        for b, parts in enumerate(blocks):
            pool.write(row, b * self.block, parts)
        return len(blocks) * self.block

"""How the engine runs the model over its cache rows: one choice of decode step, made once, and
one mask/position rule for every forward (slot = position, a query sees the slots up to its own).

Decode (one new token per row) runs on the fused C++ step (`infer.fused`) where the model allows
it, else on a `torch.compile`d forward when asked (falling back to eager with a warning), else on
the eager forward. `--compile` never replaces a fused step: the fused step is the faster one on
CPU (BENCHMARKS.md), so asking for compile with it available only logs which step runs. Several
tokens per row (a prompt chunk, forced tool tokens, draft tokens to verify) always run the eager
forward, whose matmuls are already batched over the tokens; a prompt chunk whose only outputs
are the cache and its last logits runs it under `quantize.fast_prompt()` (bf16 GEMMs over
quantized weights where the CPU has AMX), anything asking for every token's logits in float32.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from llamaworks.infer.kv import KVPool
from llamaworks.infer.quantize import fast_prompt
from llamaworks.model import Llama

log = logging.getLogger(__name__)


def causal_mask(positions: Tensor, kv_len: int) -> Tensor:
    """[B, T, kv_len] bool: query at position p sees slots 0..p of its own row."""
    slots = torch.arange(kv_len, device=positions.device)
    return slots[None, None, :] <= positions[:, :, None]


class Step:
    """The model's forward passes over a `KVPool`. `kind` is "fused", "compiled" or "eager"."""

    def __init__(self, model: Llama, compile: bool = False):
        from llamaworks.infer.fused import FusedDecoder

        self.model = model
        self.fused = FusedDecoder.build(model)
        self.compiled = None
        if compile and self.fused is not None:
            log.info("the fused decode step is faster than a compiled one here; keeping it "
                     "(--compile applies where the fused step cannot run)")
        elif compile:
            cuda = model.device.type == "cuda"
            mode = "reduce-overhead" if cuda else "max-autotune-no-cudagraphs"
            try:
                self.compiled = torch.compile(self._eager_decode, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
                self._give_up(e)

    @property
    def kind(self) -> str:
        return "fused" if self.fused is not None else "compiled" if self.compiled else "eager"

    def _give_up(self, e: Exception) -> None:
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); decoding eagerly",
                      RuntimeWarning, stacklevel=3)
        self.compiled = None

    def _eager_decode(self, tokens: Tensor, pos: Tensor, view, mask: Tensor) -> Tensor:
        return self.model(tokens[:, None], pos[:, None], view, mask[:, None, None],
                          mask.shape[-1], last_only=True)[:, -1]

    @torch.inference_mode()
    def decode(self, pool: KVPool, tokens: Tensor, pos: Tensor, hi: int | None = None) -> Tensor:
        """Logits [hi, vocab] for one token per row of rows 0..hi-1, each written at its
        position. tokens, pos: [allocated rows] (or [hi]); rows that are not really decoding
        pass the next slot they will write anyway, so their write is harmless (the compiled step
        runs every allocated row: one shape per pool size)."""
        hi = hi or tokens.shape[0]
        if self.compiled is not None and tokens.shape[0] == pool.allocated:
            mask = causal_mask(pos[:, None], pool.length)[:, 0]
            pool.wrote(range(pool.allocated), pos)
            try:
                return self.compiled(tokens, pos, pool.view(range(pool.allocated)),
                                     mask)[:hi].clone()
            except Exception as e:  # noqa: BLE001
                self._give_up(e)
        tokens, pos = tokens[:hi], pos[:hi]
        kv_len = int(pos.max()) + 1
        mask = causal_mask(pos[:, None], kv_len)[:, 0]  # [hi, kv_len]
        view = pool.view(range(hi))
        pool.wrote(range(hi), pos)
        if self.fused is not None and pool.cache.k.dtype == torch.float32:
            return self.fused(tokens, pos, pos, view, mask)
        return self._eager_decode(tokens, pos, view, mask)

    @torch.inference_mode()
    def mixed(self, pool: KVPool, tokens: Tensor, pos: Tensor, rows: Tensor,
              head_rows: Tensor) -> Tensor:
        """The fused step over any rows of the pool, one token each (tokens, pos, rows: [N]):
        decoding rows, and prompt chunks as one entry per token sharing their cache row (a
        token sees the earlier ones of its chunk: the step writes every key before attending).
        Logits [len(head_rows), vocab] of the entries in `head_rows`."""
        assert self.fused is not None
        mask = causal_mask(pos[:, None], int(pos.max()) + 1)[:, 0]
        pool.ensure_rows(int(rows.max()) + 1)
        pool.ensure(int(pos.max()) + 1)
        pool.wrote(rows, pos)
        return self.fused(tokens, pos, pos, pool.cache, mask, rows, head_rows)

    @torch.inference_mode()
    def extend(self, pool: KVPool, rows: Sequence[int], chunks: Sequence[Sequence[int]],
               starts: Sequence[int], every: bool = False) -> list[Tensor]:
        """Feed several tokens to each of `rows` (chunk i starting at position starts[i]); per
        row, logits [T_i, vocab] of every fed token if `every`, else [1, vocab] of its last.
        Rows are right-padded to the longest chunk; the padding writes slots past each row's
        tokens, which the row overwrites before it ever attends to them."""
        feed = pool.max_feed
        if feed is not None and max(len(c) for c in chunks) > feed:  # rings: in pieces
            out: list[list[Tensor]] = [[] for _ in rows]
            for a in range(0, max(len(c) for c in chunks), feed):
                part = [(i, c[a:a + feed]) for i, c in enumerate(chunks) if len(c) > a]
                got = self.extend(pool, [rows[i] for i, _ in part], [c for _, c in part],
                                  [starts[i] + a for i, _ in part], every)
                for (i, _), lg in zip(part, got, strict=True):
                    if every or a + feed >= len(chunks[i]):
                        out[i].append(lg)
            return [torch.cat(o) for o in out]
        with contextlib.nullcontext() if every else fast_prompt():
            return self._extend(pool, rows, chunks, starts, every)

    def _extend(self, pool: KVPool, rows: Sequence[int], chunks: Sequence[Sequence[int]],
                starts: Sequence[int], every: bool) -> list[Tensor]:
        model, device = self.model, pool.cache.k.device
        lengths = [len(c) for c in chunks]
        t = max(lengths)
        if len(rows) == 1:  # one row: shared 1-D positions (SDPA's causal kernel from slot 0)
            tokens = torch.tensor([list(chunks[0])], device=device)
            pos = torch.arange(starts[0], starts[0] + t, device=device)
            pool.wrote(rows, pos[None])
            h = model(tokens, pos, pool.view(rows), None, starts[0] + t, hidden_only=True)
        else:
            tokens = torch.tensor([list(c) + [0] * (t - len(c)) for c in chunks], device=device)
            pos = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)
            kv_len = int(pos.max()) + 1
            pool.wrote(rows, pos)  # the padding too
            h = model(tokens, pos, pool.view(rows), causal_mask(pos, kv_len)[:, None], kv_len,
                      hidden_only=True)
        if every:
            return [model.lm_head(h[i, :n]).float() for i, n in enumerate(lengths)]
        last = torch.stack([h[i, n - 1] for i, n in enumerate(lengths)])
        return list(model.lm_head(last).float()[:, None])

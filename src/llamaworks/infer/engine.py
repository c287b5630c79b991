"""The inference engine: the one decode mechanism under `LLM.generate/stream/chat`, the server's
continuous scheduler, GRPO rollouts with tools, speculative decoding and the CLI.

Sequences (`infer.sequence.Sequence`) wait in a queue, take a row of the KV pool
(`infer.kv.KVPool`), and every `step()` advances all of them at once, llama.cpp-server-slot
style:
- rows with one token to feed (the token sampled last step) decode together in one call of the
  decode step (`infer.step.Step`: fused, compiled or eager, chosen once);
- rows with several (a prompt, or tool results forced in by a sequence's turn hook) feed a chunk
  of them: the chunks of one step share a token budget, so a long prompt enters over several
  steps while the other rows keep decoding (chunked prefill). With `max_gap` the budget adapts
  so that a step with a chunk costs at most about `max_gap` plain decode steps;
- with a drafter (`infer.speculative`), decoding rows feed their last token plus drafted ones,
  and keep the drafts the model itself would have produced (speculative decoding).
A prompt's first blocks may come from the prefix cache (`infer.kv.PrefixCache`) instead of being
computed; every prompt chunk computed adds its full blocks to it, and so does a sequence that
ends (its reply is the next turn's prompt prefix).

Sampling, stop ids/strings, logprobs, finish reasons and streaming text are per sequence, so a
sequence's tokens do not depend on what else runs beside it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from llamaworks.infer.kv import KVPool, PrefixCache
from llamaworks.infer.sampling import SamplingParams, apply_penalties, probs_for, sample_row
from llamaworks.infer.sequence import Sequence, TurnHook
from llamaworks.infer.step import Step
from llamaworks.model import Llama

MIX_MAX = 64  # most prompt tokens that ride along in a fused decode step


class Engine:
    """Decode many sequences over one model.

    max_batch: cache rows (sequences decoded together). context: tokens per row (default the
    model's context). cache_mb: prefix-cache budget (0 = no prefix cache). chunk: most prompt
    tokens fed in one step. max_gap: if set, while rows are decoding the chunk shrinks so that a
    step with a chunk takes about `max_gap` times a plain decode step (measured as it runs).
    drafter: a speculative drafter (`infer.speculative.NgramDrafter` / `ModelDrafter`).
    agree: maps each token this process chose to the one every process keeps (tensor
    parallelism: rank 0's, `infer.tensor_parallel.RankZeroTokens`); the steps must then be the
    same on every process, so it refuses `max_gap` (budgets from each process's own timings)."""

    def __init__(self, model: Llama, tokenizer: Any, *, max_batch: int = 16,
                 context: int | None = None, step: Step | None = None, compile: bool = False,
                 cache_mb: float = 256, chunk: int = 512, max_gap: float | None = None,
                 drafter: Any = None, agree: Callable[[int], int] | None = None):
        if max_batch < 1 or chunk < 1:
            raise ValueError("max_batch and chunk must be >= 1")
        if agree is not None and max_gap is not None:
            raise ValueError("max_gap sizes chunks from this process's timings; processes that "
                             "must take the same steps (agree) cannot use it")
        self.agree = agree
        self.model, self.tokenizer = model, tokenizer
        self.step_fn = step or Step(model, compile)
        self.context = min(context or model.config.max_seq_len, model.config.max_seq_len)
        self.pool = KVPool(model, max_batch, self.context)
        self.prefix = PrefixCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self.chunk, self.max_gap, self.drafter = chunk, max_gap, drafter
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.running: list[Sequence] = []
        self._decode_s: float | None = None  # moving averages for the chunk budget: a decode
        self._token_s: float | None = None  # step; a prompt token in an eager chunk; one more
        self._mixed_s: float | None = None  # row of the fused step
        self.steps = 0
        self._grammars: Any = None

    @property
    def max_batch(self) -> int:
        return self.pool.rows

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's stop ids and the config's EOS."""
        return set(self.tokenizer.stop_ids or []) | set(self.model.config.eos_token_ids)

    # -- building and queueing sequences ---------------------------------------------------------
    def sequences(self, prompt_ids: list[int], params: SamplingParams,
                  on_turn_end: TurnHook | None = None, max_turn_hooks: int = 1 << 30,
                  eos_ids: Iterable[int] | None = None) -> list[Sequence]:
        """The `params.n` sequences of one prompt (one shared generator, as `n` rows of one
        request share a seed)."""
        if len(prompt_ids) >= self.context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context is "
                             f"{self.context}")
        gen = None
        if not params.greedy:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed if params.seed is not None
                            else int(torch.randint(2**62, ())))
        eos = self.eos_ids if eos_ids is None else set(eos_ids)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        seqs = [Sequence(prompt_ids, params, stops, i, gen, on_turn_end, max_turn_hooks, decode)
                for i in range(params.n)]
        if params.lazy_grammar is not None:
            self.grammars.compile(grammar=params.lazy_grammar[1])  # refused now, not mid-reply
        if params.json_schema is not None or params.grammar is not None:
            opening = self.tokenizer.encode(params.grammar_prefix, bos=False) \
                if params.grammar_prefix else []
            for s in seqs:  # GrammarError (a ValueError) when it cannot be enforced
                s.constraint = self.grammars.constraint(params.json_schema, params.grammar)
                for t in opening:  # the part of it the prompt already holds
                    s.constraint.advance(t)
        return seqs

    @property
    def grammars(self) -> Any:
        """The constraint compiler for this tokenizer (built on first use)."""
        if self._grammars is None:
            from llamaworks.infer.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    def add(self, group: list[Sequence]) -> None:
        """Queue the sequences of one prompt; they take rows together (their prompt is
        computed once)."""
        if len(group) > self.max_batch:
            raise ValueError(f"n={len(group)} exceeds the batch of {self.max_batch} rows")
        self.waiting.append(group)

    def abort(self, seqs: Iterable[Sequence], reason: str = "cancelled") -> None:
        """End sequences now (queued or running); their rows are free for the next step."""
        gone = set(id(s) for s in seqs)
        for s in [s for g in self.waiting for s in g if id(s) in gone] + \
                [s for s in self.running if id(s) in gone]:
            s.finish = s.finish or reason
        self.waiting = collections.deque(g for g in self.waiting
                                         if not all(s.finish for s in g))
        self._retire()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, groups: Iterable[list[Sequence]]) -> None:
        """Queue `groups` and step until every sequence has finished."""
        for g in groups:
            self.add(g)
        while self.has_work:
            self.step()

    # -- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Advance every running sequence by what fits in one step; returns the sequences that
        produced tokens or finished."""
        self._admit()
        touched: list[Sequence] = []
        decoding = [s for s in self.running if s.pending == 1 and s.leader is None]
        verify = self.drafter.propose(self, decoding) if self.drafter is not None else {}
        decoding = [s for s in decoding if s.id not in verify]
        fused, busy = self.step_fn.fused is not None, bool(decoding or verify)
        mixed = busy and fused and self._budget(True, True) <= MIX_MAX
        chunks = self._chunks(self._budget(busy, mixed))
        if fused and busy:  # decoding rows, drafts and small prompt chunks in one fused call
            touched += self._decode(decoding, chunks if mixed else [], verify)
            if mixed:
                chunks = []
        else:
            if decoding:
                touched += self._decode(decoding, [], {})
            touched += self._verify(verify)
        touched += self._extend(chunks)
        self.steps += 1
        self._retire()
        return list({s.id: s for s in touched}.values())

    def _admit(self) -> None:
        while self.waiting:
            rows = self.pool.take(len(self.waiting[0]))
            if rows is None:
                return
            group = self.waiting.popleft()
            for s, r in zip(group, rows, strict=True):
                s.row = r
                s.leader = group[0] if s is not group[0] else None
            self.running += group

    def _decode(self, seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
                verify: dict[int, Any]) -> list[Sequence]:
        """One token for each of `seqs`; with the fused step, also the prompt `chunks` and the
        drafts to verify (one entry per token, sharing their sequence's cache row)."""
        device = self.pool.cache.k.device
        t0 = time.perf_counter()
        checked = [s for s in self.running if s.id in verify]
        if self.step_fn.fused is not None:
            tokens = [s.tokens[-1] for s in seqs]
            pos, rows = [s.cached for s in seqs], [s.row for s in seqs]
            head = list(range(len(seqs)))
            for s, n in chunks:
                tokens += s.tokens[s.cached:s.cached + n]
                pos += range(s.cached, s.cached + n)
                rows += [s.row] * n
                if s.cached + n == len(s.tokens):
                    head.append(len(tokens) - 1)
            spans = []
            for s in checked:  # the last token and the drafts, logits at every one
                fed = [s.tokens[-1], *verify[s.id][0]]
                spans.append((len(head), len(head) + len(fed)))
                head += range(len(tokens), len(tokens) + len(fed))
                tokens += fed
                pos += range(s.cached, s.cached + len(fed))
                rows += [s.row] * len(fed)
            self.pool.ensure(max(pos) + 1)
            logits = self.step_fn.mixed(self.pool, torch.tensor(tokens, device=device),
                                        torch.tensor(pos, device=device),
                                        torch.tensor(rows, device=device),
                                        torch.tensor(head, device=device))
        else:
            full = [0] * self.pool.allocated
            tokens, pos = list(full), list(full)
            for s in self.running:  # rows not decoding write the next slot they write anyway
                pos[s.row] = min(s.cached, self.context - 1)
            for s in seqs:
                tokens[s.row] = s.tokens[-1]
            self.pool.ensure(max(pos) + 1)
            out = self.step_fn.decode(self.pool, torch.tensor(tokens, device=device),
                                      torch.tensor(pos, device=device),
                                      max(s.row for s in seqs) + 1)
            logits = out[[s.row for s in seqs]]
        took = time.perf_counter() - t0
        n_chunk = sum(n for _, n in chunks)
        if n_chunk == 0 and not checked:
            self._decode_s = _ema(self._decode_s, took)
        elif self._decode_s is not None and not checked:
            self._mixed_s = _ema(self._mixed_s, max(took - self._decode_s, 0.0) / n_chunk)
        if checked:
            self._verify(verify, {s.id: logits[a:b] for s, (a, b) in zip(checked, spans,
                                                                         strict=True)})
        touched = list(seqs)
        for i, s in enumerate(seqs):
            s.cached += 1
            if not s.ids and any(o.leader is s for o in self.running):
                touched += self._prompt_done(s, logits[i])  # a chunk left the last prompt
            else:  # token to decode: n > 1 siblings wait on it
                self._sample(s, logits[i])
        j = len(seqs)
        for s, n in chunks:
            start = s.cached
            s.cached += n
            if self.prefix is not None:
                self.prefix.insert(s.tokens, self.pool, s.row, start, s.cached)
            if s.pending == 0:
                touched += self._prompt_done(s, logits[j])
                j += 1
        return touched

    def _budget(self, decoding: bool, mixed: bool) -> int:
        """Prompt tokens for this step. Nothing decoding, or no `max_gap`: the whole chunk.
        Otherwise what fits in (max_gap - 1) decode steps at the measured cost of a prompt token
        (of the fused mixed step, or of an eager chunk), starting small until measured."""
        if not decoding or self.max_gap is None:
            return self.chunk
        per_token = self._mixed_s if mixed else self._token_s
        if self._decode_s is None or per_token is None:
            return min(self.chunk, 8 if mixed else 16)
        tokens = int((self.max_gap - 1) * self._decode_s / max(per_token, 1e-6))
        return max(1, min(self.chunk, tokens))

    def _chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) of the prompts and forced tokens pending, oldest first,
        within `budget`; a prompt's cached prefix is loaded first (and again just before its
        chunk runs, so a prefix computed earlier this step is found)."""
        out = []
        for s in [s for s in self.running if s.pending > 1 and s.leader is None]:
            if budget <= 0:
                break
            self._load_prefix(s)
            n = min(s.pending, budget, self.pool.max_feed or budget)  # a ring caps a chunk
            budget -= n
            out.append((s, n))
        return out

    def _load_prefix(self, s: Sequence) -> bool:
        """Copy the cached blocks that begin a not yet started prompt into its row (all but its
        last token: that one's logits are needed); True if any were found."""
        if s.cached != 0 or self.prefix is None:
            return False
        blocks = self.prefix.match(s.tokens, len(s.prompt_ids) - 1, self.pool)
        self.pool.ensure(len(blocks) * self.prefix.block + 1)
        s.cached = s.cached_prefix = self.prefix.load(blocks, self.pool, s.row)
        return bool(blocks)

    def _extend(self, chunks: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Feed each chunk on the eager forward (one call per sequence: large chunks batch their
        matmuls over the tokens)."""
        touched = []
        for s, n in chunks:
            if self._load_prefix(s):  # blocks an earlier chunk of this step just stored
                n = min(n, s.pending)
            start = s.cached
            self.pool.ensure(start + n + 1)
            t0 = time.perf_counter()
            (logits,) = self.step_fn.extend(self.pool, [s.row], [s.tokens[start:start + n]],
                                            [start])
            if n >= 16:
                self._token_s = _ema(self._token_s, (time.perf_counter() - t0) / n)
            s.cached += n
            if self.prefix is not None:
                self.prefix.insert(s.tokens, self.pool, s.row, start, s.cached)
            if s.pending == 0:
                touched += self._prompt_done(s, logits[-1])
        return touched

    def _prompt_done(self, s: Sequence, logits: Tensor) -> list[Sequence]:
        """Sample the first token of `s` and of the siblings waiting on its prompt."""
        sibs = [o for o in self.running if o.leader is s]
        for o in sibs:
            self.pool.copy(s.row, o.row, s.cached)
            o.cached, o.cached_prefix, o.leader = s.cached, s.cached_prefix, None
        for o in [s, *sibs]:
            self._sample(o, logits)
        return [s, *sibs]

    def _verify(self, verify: dict[int, Any], outs: dict[int, Tensor] | None = None
                ) -> list[Sequence]:
        """Score each row's last token plus its drafts in one forward (unless `outs` holds
        those logits already); keep the drafts the target itself would have chosen (greedy) or
        accepts by rejection sampling."""
        seqs = [s for s in self.running if s.id in verify]
        given = outs is not None
        outs = outs or {}
        for n in sorted({len(v[0]) for v in verify.values()} if not given else ()):
            group = [s for s in seqs if len(verify[s.id][0]) == n]
            self.pool.ensure(max(s.cached for s in group) + n + 2)
            got = self.step_fn.extend(self.pool, [s.row for s in group],
                                      [[s.tokens[-1], *verify[s.id][0]] for s in group],
                                      [s.cached for s in group], every=True)
            outs.update((s.id, lg) for s, lg in zip(group, got, strict=True))
        for s in seqs:
            logits = outs[s.id]
            drafts, q = verify[s.id]
            s.proposed += len(drafts)
            before = len(s.tokens)
            for j in range(len(drafts) + 1):
                d = drafts[j] if j < len(drafts) else None
                tok, ok = self._judge(s, logits[j], d, q[j] if q is not None and d is not None
                                      else None)
                if self.agree is not None:  # kept where the agreed token is the draft
                    tok = self.agree(tok)
                    ok = tok == d
                self._append(s, tok, logits[j])
                if ok:
                    s.accepted += 1
                if not ok or s.finish:
                    break
            s.cached = len(s.tokens) - 1 if not s.finish else s.cached
            if self.drafter is not None:
                self.drafter.accepted(s, before)
        return seqs

    def _judge(self, s: Sequence, logits: Tensor, draft: int | None, q: Tensor | None
               ) -> tuple[int, bool]:
        """The token at one verified position: the draft if kept (True), else the target's."""
        p = s.params
        logits = apply_penalties(logits.float(), p, s.prompt_ids, s.ids)
        if p.greedy:
            tok = int(logits.argmax())
            return tok, draft is not None and tok == draft
        probs = probs_for(logits, p)
        if draft is None:
            return int(torch.multinomial(probs, 1, generator=s.gen)), False
        qd = q[draft] if q is not None else torch.tensor(1.0)  # n-gram drafts: a point mass
        if bool(torch.rand((), generator=s.gen) < probs[draft] / qd):
            return draft, True
        residual = (probs - (q if q is not None else torch.nn.functional.one_hot(
            torch.tensor(draft), probs.shape[-1]).float())).clamp(min=0)
        pick = residual if residual.sum() > 0 else probs
        return int(torch.multinomial(pick / pick.sum(), 1, generator=s.gen)), False

    # -- per-sequence bookkeeping ----------------------------------------------------------------
    def _sample(self, s: Sequence, logits: Tensor) -> None:
        if s.finish:
            return
        c = s.constraint
        allowed = logits if c is None else c.apply(logits)
        tok = sample_row(allowed, s.params, s.gen, s.prompt_ids, s.ids)
        if self.agree is not None:
            tok = self.agree(tok)
        self._append(s, tok, logits)
        if s.finish:
            return
        if c is not None:
            c.advance(tok)
            if c.done and s.params.lazy_grammar is not None:  # the call is complete: free
                s.constraint, s.lazy_from = None, len(s.text)
            elif c.done:
                s.finish = "stop"
        elif s.params.lazy_grammar is not None:
            self._trigger(s)

    def _trigger(self, s: Sequence) -> None:
        """Switch the lazy grammar on once the output holds its trigger, fed with the text
        already written after it (any tokenization of those bytes gives the same state)."""
        from llamaworks.infer.grammar import GrammarError

        trigger, grammar = s.params.lazy_grammar  # type: ignore[misc]
        text = s.text
        at = text.find(trigger, s.lazy_from)
        if at < 0:
            return
        s.lazy_from = at + len(trigger)
        c = self.grammars.constraint(grammar=grammar)
        try:
            for t in self.tokenizer.encode(text[at + len(trigger):], bos=False):
                c.advance(t)
        except GrammarError:  # it already left the call syntax: leave it free
            return
        s.constraint = None if c.done else c

    def _append(self, s: Sequence, tok: int, logits: Tensor) -> None:
        """Record a sampled token: logprobs, text, stop strings and ids, turn hooks, length."""
        p = s.params
        s.tokens.append(tok)
        s.ids.append(tok)
        s.sampled.append(1)
        if s.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            entry = {tok: float(lp[tok])}
            if p.logprobs:
                top = torch.topk(lp, p.logprobs)
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=False))
            s.logprobs.append(entry)
            s.cum += entry[tok]
        if p.stop:
            text = s.text
            hits = [(h, x) for x in p.stop if (h := text.find(x, max(0, s.emitted - len(x))))
                    >= 0]
            if hits:
                at, s.stop_reason = min(hits)
                s.cut = text[:at]
                s.finish = "stop"
                return
        if tok in s.stop_ids:
            if s.on_turn_end is None:
                s.finish, s.stop_reason = "stop", tok
                return
            turn = self.tokenizer.decode(s.ids[s.turn_start:], skip_special_tokens=True)
            s.turns.append(turn)
            extra = s.on_turn_end(turn) if s.turn_hooks < s.max_turn_hooks else None
            if extra is None:
                s.finish = "stop"
                return
            s.turn_hooks += 1
            self._force(s, self.tokenizer.encode(extra, bos=False))
        if len(s.ids) >= p.max_tokens or len(s.tokens) >= self.context:
            s.finish = "length"

    def _force(self, s: Sequence, ids: list[int]) -> None:
        """Append tokens the model did not choose (tool results); fed as a chunk next step."""
        room = min(s.params.max_tokens - len(s.ids), self.context - len(s.tokens))
        ids = ids[:max(room, 0)]
        s.tokens += ids
        s.ids += ids
        s.sampled += [0] * len(ids)
        s.turn_start = len(s.ids)
        if s.params.lazy_grammar is not None:  # a trigger in a tool's result is not a call
            s.lazy_from = len(s.text)

    def _retire(self) -> None:
        """Free the rows of finished sequences (storing their blocks in the prefix cache)."""
        keep = []
        for s in self.running:
            if not s.finish:
                keep.append(s)
                continue
            if s.row is not None:
                if self.prefix is not None and s.leader is None and s.cached > 0:
                    self.prefix.insert(s.tokens, self.pool, s.row, 0, s.cached)
                if self.drafter is not None:
                    self.drafter.release(s)
                self.pool.release(s.row)
                s.row = None
        self.running = keep


def _ema(old: float | None, new: float, a: float = 0.3) -> float:
    return new if old is None else (1 - a) * old + a * new

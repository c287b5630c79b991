"""The vLLM-shaped Python API: `LLM(model).generate(prompts, SamplingParams(...))`.

Requests are grouped into batches of up to `max_batch_size` rows (a request with n > 1 takes n
rows), decoded together over one static KV cache (`batch.decode_batch`), and each row stops on its
own: EOS (from the tokenizer/config, unless `ignore_eos`), a stop token id, a stop string (matched
in the decoded text, so across token boundaries, and cut from the text), or `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaworks.infer.batch import DecodeStep, decode_batch
from llamaworks.infer.sampling import SamplingParams, sample_row
from llamaworks.model import Llama

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    """One generated sequence. `logprobs[i]` maps token id -> log-probability for output token i
    (the sampled one plus the requested top alternatives)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """All sequences for one prompt; `text`, `token_ids`, `finish_reason` are the first one's."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


class _Row:
    """Decoding state of one output sequence."""

    def __init__(self, req: int, index: int, prompt_ids: list[int], params: SamplingParams,
                 gen: torch.Generator | None, stop_ids: set[int]):
        self.req, self.index, self.prompt_ids, self.params, self.gen = req, index, prompt_ids, \
            params, gen
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters already streamed
        self.finish: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cum = 0.0

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, self.ids, self.finish, self.logprobs,
                                self.cum if self.logprobs is not None else None)


class LLM:
    """A model, its tokenizer and a decode engine.

    model: a checkpoint path (GGUF, HF/native or Meta), a `checkpoint.Loaded`, or a `Llama`
    (then pass `tokenizer`). quant: None, "bf16", "int8" or "int4" (weight-only, applied to a
    copy of the model). compile: compile the decode step (falls back to eager with a warning)."""

    def __init__(self, model: str | Path | Any, tokenizer: Any = None, quant: str | None = None,
                 compile: bool = False, group_size: int = 32, max_batch_size: int = 16):
        from llamaworks.checkpoint import load_tokenizer
        from llamaworks.infer.load import load_for_use

        if isinstance(model, (str, Path)):  # the file's own weight types unless `quant`
            path = Path(model)
            model = load_for_use(path, quant=quant, group_size=group_size)
            tokenizer, quant = tokenizer or load_tokenizer(path), None
        if not isinstance(model, Llama):  # a Loaded
            tokenizer = tokenizer or load_tokenizer(model.path)
            model = model.model
        if tokenizer is None:
            raise ValueError("pass `tokenizer` together with a bare Llama model")
        if quant is not None:
            from llamaworks.infer.quantize import quantize_model

            model = quantize_model(model, quant, group_size)
        self.model: Llama = model.eval()
        self.tokenizer = tokenizer
        self.quant = quant
        self.max_batch_size = max_batch_size
        self.step = DecodeStep(model, compile)
        if compile:
            self.generate([[self._bos]], SamplingParams(max_tokens=3))  # warm-up / fallback

    @property
    def _bos(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's stop ids and the config's EOS."""
        ids = set(self.tokenizer.stop_ids or [])
        return ids | set(self.model.config.eos_token_ids)

    # -- public API ------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); one result per prompt."""
        prompts = self._as_list(prompts)
        plist = self._params_list(params, len(prompts))
        results = [RequestOutput(p if isinstance(p, str) else None, self._encode(p))
                   for p in prompts]
        rows = self._rows(results, plist)
        for batch in self._batches(rows):
            for _ in self._run(batch):
                pass
        for row in rows:
            results[row.req].outputs.append(row.output())
        return results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it grows (n = 1; stop strings never appear)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() produces one sequence; use n=1")
        res = RequestOutput(prompt if isinstance(prompt, str) else None, self._encode(prompt))
        (row,) = self._rows([res], [params])
        for _ in self._run([row]):
            delta = self._releasable(row)
            if delta:
                yield delta

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"}) or to a list of them."""
        convs = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True), bos=False)
            for c in convs]
        return self.generate(prompts, params)

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if prompts and isinstance(prompts[0], int):
            return [list(prompts)]
        return list(prompts)

    @staticmethod
    def _params_list(params: SamplingParams | Sequence[SamplingParams] | None,
                     n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt, bos=None) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("a prompt is empty and the model adds no BOS token")
        if len(ids) >= self.model.config.max_seq_len:
            raise ValueError(f"a prompt has {len(ids)} tokens; the model's context is "
                             f"{self.model.config.max_seq_len}")
        return ids

    def _rows(self, results: list[RequestOutput], plist: list[SamplingParams]) -> list[_Row]:
        rows: list[_Row] = []
        for r, (res, p) in enumerate(zip(results, plist, strict=True)):
            gen = None
            if not p.greedy:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ())))
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
            rows += [_Row(r, i, res.prompt_token_ids, p, gen, stops) for i in range(p.n)]
        return rows

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        for s in range(0, len(rows), self.max_batch_size):
            yield rows[s:s + self.max_batch_size]

    def _run(self, rows: list[_Row]) -> Iterator[None]:
        """Decode `rows` together; yields after every step (row state updated in place)."""
        ctx = self.model.config.max_seq_len
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt_ids))
        rows = [rows[i] for i in order]  # longest first: row 0 defines the cache slots
        longest = len(rows[0].prompt_ids)
        max_new = min(max(r.params.max_tokens for r in rows), ctx - longest)
        steps = decode_batch(self.model, [r.prompt_ids for r in rows], max_new, self.step)
        logits = next(steps)
        for i in range(max_new):
            chosen = [self._advance(row, logits[b], i, ctx) for b, row in enumerate(rows)]
            yield
            if all(r.finish for r in rows) or i == max_new - 1:
                break
            logits = steps.send(torch.tensor(chosen))
        steps.close()
        for r in rows:  # the context ran out
            r.finish = r.finish or "length"

    def _advance(self, row: _Row, logits: torch.Tensor, i: int, ctx: int) -> int:
        """Pick row's next token, update its text and finish state; returns the token fed next."""
        if row.finish:
            return row.ids[-1] if row.ids else 0
        p = row.params
        tok = sample_row(logits, p, row.gen, row.prompt_ids, row.ids)
        row.ids.append(tok)
        if row.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            entry = {tok: float(lp[tok])}
            if p.logprobs:
                top = torch.topk(lp, p.logprobs)
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=False))
            row.logprobs.append(entry)
            row.cum += entry[tok]
        row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if p.stop:
            hits = [row.text.find(s, max(0, row.emitted - len(s))) for s in p.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                row.text = row.text[:min(hits)]
                row.finish = "stop"
                return tok
        if tok in row.stop_ids:
            row.finish = "stop"
        elif len(row.ids) >= p.max_tokens or len(row.prompt_ids) + len(row.ids) >= ctx:
            row.finish = "length"
        return tok

    def _releasable(self, row: _Row) -> str:
        """Text that can be streamed now: not a possible stop-string prefix, no partial UTF-8."""
        end = len(row.text)
        if not row.finish:
            hold = max((len(s) - 1 for s in row.params.stop), default=0)
            end -= hold
            while end > row.emitted and row.text[end - 1] == "\ufffd":
                end -= 1
        if end <= row.emitted:
            return ""
        delta = row.text[row.emitted:end]
        row.emitted = end
        return delta

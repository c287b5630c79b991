"""The vLLM-shaped Python API: `LLM(model).generate(prompts, SamplingParams(...))`, on the engine.

Each prompt becomes `n` sequences of the one engine (`infer.engine.Engine`), which decodes up to
`max_batch_size` of them together and stops each on its own: EOS (from the tokenizer/config,
unless `ignore_eos`), a stop token id, a stop string (matched in the decoded text, so across
token boundaries, and cut from the text), or `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llamaworks.infer.engine import Engine
from llamaworks.infer.sampling import SamplingParams
from llamaworks.infer.sequence import CompletionOutput, RequestOutput
from llamaworks.model import Llama

Prompt = str | Sequence[int]

__all__ = ["LLM", "CompletionOutput", "Prompt", "RequestOutput"]


class LLM:
    """A model, its tokenizer and the engine that decodes it.

    model: a checkpoint path (GGUF, HF/native or Meta), a `checkpoint.Loaded`, or a `Llama`
    (then pass `tokenizer`). quant: None, "bf16", "int8" or "int4" (weight-only, applied to a
    copy of the model). compile: compile the decode step where the fused step cannot run (falls
    back to eager with a warning). cache_mb: the prefix cache's budget (0 = off). draft: a
    speculative drafter (`infer.speculative.ModelDrafter` / `NgramDrafter`)."""

    def __init__(self, model: str | Path | Any, tokenizer: Any = None, quant: str | None = None,
                 compile: bool = False, group_size: int = 32, max_batch_size: int = 16,
                 cache_mb: float = 256, draft: Any = None):
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
        self.engine = Engine(self.model, tokenizer, max_batch=max_batch_size, compile=compile,
                             cache_mb=cache_mb, drafter=draft)
        self.step = self.engine.step_fn
        if self.step.compiled is not None:
            self.generate([[self._bos]], SamplingParams(max_tokens=3))  # warm-up / fallback

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch

    @property
    def _bos(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a sequence: the tokenizer's stop ids and the config's EOS."""
        return self.engine.eos_ids

    # -- public API ------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); one result per prompt."""
        prompts = self._as_list(prompts)
        plist = self._params_list(params, len(prompts))
        results = [RequestOutput(p if isinstance(p, str) else None, self.encode(p))
                   for p in prompts]
        groups = [self.engine.sequences(r.prompt_token_ids, p)
                  for r, p in zip(results, plist, strict=True)]
        self.engine.run(groups)
        for res, group in zip(results, groups, strict=True):
            res.outputs = [s.output() for s in group]
            res.num_cached_tokens = group[0].cached_prefix
        return results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it grows (n = 1; stop strings never appear)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() produces one sequence; use n=1")
        (seq,) = group = self.engine.sequences(self.encode(prompt), params)
        self.engine.add(group)
        try:
            while not seq.finish:
                self.engine.step()
                delta = seq.releasable()
                if delta:
                    yield delta
        finally:  # a consumer that stops early frees the row
            self.engine.abort(group)

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"}) or to a list of them."""
        convs = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True), bos=False)
            for c in convs]
        return self.generate(prompts, params)

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt ids (text encoded with the tokenizer's BOS rule); ValueError if empty or
        longer than the context."""
        ids = self.tokenizer.encode(prompt, bos=None) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("a prompt is empty and the model adds no BOS token")
        if len(ids) >= self.model.config.max_seq_len:
            raise ValueError(f"a prompt has {len(ids)} tokens; the model's context is "
                             f"{self.model.config.max_seq_len}")
        return ids

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

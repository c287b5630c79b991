"""llamaworks as an lm-evaluation-harness model: `lm_eval --model llamaworks`.

`LlamaworksLM` implements lm-eval's three request types on our engine: `loglikelihood` and
`loglikelihood_rolling` through `eval.loglik` (lm-eval's own request encoding and rolling windows,
our batched scorer), `generate_until` through `infer.LLM` (greedy unless `do_sample`).

lm-eval 0.4 only knows models registered in its process and has no plugin entry point, so the
command line goes through `python -m llamaworks.eval.lm_eval ...` (or `llamaworks eval lm-eval
...`), which registers this class and hands the arguments to lm-eval's own CLI. In Python,
importing this module registers it: `lm_eval.simple_evaluate(model="llamaworks", ...)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llamaworks.eval.loglik import continuation_span, score_spans
from llamaworks.eval.mc import prefix_token_id


@register_model("llamaworks")
class LlamaworksLM(TemplateLM):
    """model_args: pretrained=PATH (GGUF file, HF/native or Meta dir; default SmolLM2),
    adapter=DIR (LoRA, merged), quant=bf16|int8|int4, group_size=N, threads=N, max_length=N."""

    def __init__(self, pretrained: str | tuple[Any, Any] | None = None, adapter: str | None = None,
                 quant: str | None = None, group_size: int = 32, batch_size: int | str = 16,
                 max_length: int | None = None, threads: int | None = None,
                 max_batch_size: int | None = None, device: str | None = None,
                 **_: Any) -> None:
        super().__init__()
        import torch

        from llamaworks.eval.runner import load_for_eval

        if threads:
            torch.set_num_threads(int(threads))
        if isinstance(pretrained, tuple):  # (model, tokenizer) already loaded: from_model
            self.model, self.tokenizer = pretrained
        else:
            self.model, self.tokenizer = load_for_eval(pretrained, adapter, quant,
                                                       int(group_size))
        # lm-eval's CLI passes device="cuda" by default: honour it only where CUDA exists
        if device and device != "cpu" and (not device.startswith("cuda")
                                           or torch.cuda.is_available()):
            self.model.to(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length or self.model.config.max_seq_len)
        self._llm: Any = None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 16) -> LlamaworksLM:
        """Wrap an already loaded model and tokenizer (pass it as simple_evaluate's `model`)."""
        return cls(pretrained=(model, tokenizer), batch_size=batch_size)

    # -- tokenization --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Our tokenizer; BOS per the model's flag unless lm-eval says no."""
        return self.tokenizer.encode(string, bos=None if add_special_tokens is not False
                                     else False)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # -- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        spans = [continuation_span(ctx, cont, self.max_length) for _, ctx, cont in requests]
        out = []
        for (key, _, _), s in zip(requests, score_spans(self.model, spans, self.batch_size),
                                  strict=True):
            res = (s.total, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Log-likelihood of whole texts in lm-eval's disjoint windows (first token given
        the prefix token)."""
        windows: list[tuple[int, list[int], list[int]]] = []
        for r, req in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((r, ctx, cont))
        scores = self._loglikelihood_tokens([(None, c, x) for _, c, x in windows])
        totals = [0.0] * len(requests)
        for (r, _, _), (ll, _) in zip(windows, scores, strict=True):
            totals[r] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) completions cut at the `until` strings."""
        from llamaworks.infer.llm import LLM
        from llamaworks.infer.sampling import SamplingParams

        if self._llm is None:
            self._llm = LLM(self.model, tokenizer=self.tokenizer, max_batch_size=self.batch_size)
        prompts, params = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.get("max_gen_toks", 256))
            sample = bool(kw.get("do_sample", False))
            temp = float(kw.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            prompts.append(ids)
            params.append(SamplingParams(temperature=temp, max_tokens=max_gen,
                                         stop=[u for u in until if u] or None,
                                         seed=kw.get("seed")))
        outs = self._llm.generate(prompts, params)
        texts = [o.outputs[0].text for o in outs]
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts


def task_yaml(name: str, data_file: str | Path, kind: str = "mc",
              until: tuple[str, ...] = ("\n\n", "Question:"), max_gen_toks: int = 256) -> str:
    """An lm-eval task YAML for a local llamaworks task file (no download: `dataset_path:
    json`). kind: "mc" ({"context", "choices", "gold"}), "gen" ({"prompt", "answer"}) or
    "rolling" (JSONL {"text"}; word/byte perplexity and bits per byte)."""
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(Path(data_file).resolve()))}\ntest_split: test\n")
    if kind == "mc":
        return head + ("output_type: multiple_choice\ndoc_to_text: context\n"
                       "doc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: \"\"\n"
                       "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    if kind == "gen":
        stops = "".join(f"    - {json.dumps(u)}\n" for u in until)
        return head + ("output_type: generate_until\ndoc_to_text: prompt\n"
                       "doc_to_target: answer\ntarget_delimiter: \"\"\n"
                       f"generation_kwargs:\n  until:\n{stops}  do_sample: false\n"
                       f"  max_gen_toks: {max_gen_toks}\nmetric_list:\n  - metric: exact_match\n")
    if kind == "rolling":
        return head + ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                       "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n"
                       "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    raise ValueError(f"kind must be mc, gen or rolling, got {kind!r}")

"""Load a model for evaluation (LoRA adapter, quantization) and run one task of any kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError
from llamaworks.eval.tasks import Task


def load_for_eval(path: str | Path | None = None, adapter: str | Path | None = None,
                  quant: str | None = None, group_size: int = 32) -> tuple[Any, Any]:
    """(model, tokenizer): the checkpoint at `path` (default: the SmolLM2 GGUF), with a LoRA
    adapter merged in and/or weight-only quantization applied, in eval mode."""
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.checkpoint.discovery import model_path
    from llamaworks.infer.load import load_for_use

    path = model_path(path)
    model = load_for_use(Path(path), () if adapter is None else (adapter,), quant, group_size)
    return model, load_tokenizer(Path(path))


def run_task(task: Task, model: Any, tok: Any, num_fewshot: int = 0, limit: int | None = None,
             batch_size: int = 16, seed: int = 1234, window: int | None = None,
             stride: int | None = None, chat: bool = False, max_tokens: int = 256
             ) -> dict[str, Any]:
    """{"task", "kind", "n", <metrics>}; generative results also carry "items"."""
    items = task.items
    if task.kind == "mc":
        from llamaworks.eval.mc import evaluate_mc

        res = evaluate_mc(model, tok, items, num_fewshot, seed, batch_size,  # type: ignore[arg-type]
                          limit)
        return {"task": task.name, "kind": "mc", **res.metrics}
    if task.kind == "gen":
        from llamaworks.eval.generative import evaluate_gen
        from llamaworks.infer.llm import LLM

        llm = LLM(model, tokenizer=tok, max_batch_size=batch_size)
        res = evaluate_gen(llm, items, num_fewshot, seed, max_tokens, chat,  # type: ignore[arg-type]
                           limit)
        return {"task": task.name, "kind": "gen", **res["metrics"], "items": res["items"]}
    from llamaworks.eval.bpb import text_bpb

    if num_fewshot:
        raise LlamaworksError("--num-fewshot applies to multiple-choice and generative tasks")
    try:
        res = text_bpb(model, tok, task.text, window, stride, batch_size)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    return {"task": task.name, "kind": "bpb", "n": res.pop("tokens"), **res}

"""Accuracy on the procedural arithmetic problems, with or without the calculator tool.

Greedy rollouts (see `rollout`), batched; a problem counts as solved when the last number of the
final assistant turn equals the exact answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from llamaworks.model import Llama
from llamaworks.posttrain.rollout import (
    Rollout,
    calculator_runner,
    conversation_step,
    per_prompt,
    rollout,
)
from llamaworks.posttrain.tasks import Problem, calculator_schemas, is_correct


def prompt_messages(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def prompt_ids(tokenizer: Any, p: Problem, tools: bool) -> list[int]:
    from llamaworks.chat.formats import render

    text = render(tokenizer, prompt_messages(p), calculator_schemas() if tools else None,
                  add_generation_prompt=True)
    return tokenizer.encode(text, bos=False)


def solve(model: Llama, tokenizer: Any, problems: Sequence[Problem], tools: bool, *,
          temperature: float = 0.0, seed: int | None = None, max_new: int = 96,
          max_tool_calls: int = 2) -> list[Rollout]:
    """One rollout per problem (callers repeat problems for groups)."""
    step = None
    if tools:
        schemas = calculator_schemas()
        step = per_prompt([conversation_step(tokenizer, prompt_messages(p), schemas,
                                             calculator_runner) for p in problems])
    prompts = [prompt_ids(tokenizer, p, tools) for p in problems]
    return rollout(model, tokenizer, prompts, max_new=max_new, temperature=temperature,
                   seed=seed, tool_step=step, max_tool_calls=max_tool_calls)


def accuracy(model: Llama, tokenizer: Any, problems: Sequence[Problem], tools: bool,
             batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Greedy accuracy on `problems`: {"n", "correct", "accuracy", "tool_call_rate", ...}."""
    model.eval()
    correct = calls = finished = 0
    examples = []
    for s in tqdm(range(0, len(problems), batch_size), desc="arithmetic", disable=not progress):
        chunk = problems[s:s + batch_size]
        for p, r in zip(chunk, solve(model, tokenizer, chunk, tools), strict=True):
            ok = is_correct(r.final_text, p.answer)
            correct += ok
            calls += r.tool_calls > 0
            finished += r.finished
            if len(examples) < 3:
                examples.append({"question": p.question, "answer": p.answer,
                                 "turns": r.turns, "correct": ok})
    n = len(problems)
    return {"n": n, "correct": correct, "accuracy": correct / n, "tool_call_rate": calls / n,
            "finished_rate": finished / n, "examples": examples}

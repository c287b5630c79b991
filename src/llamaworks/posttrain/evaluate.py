"""Accuracy on the procedural problems: the legacy arithmetic templates (batched rollouts) and
the generalization suite (through the agent loop, per family and kind).

`accuracy` / `solve`: greedy rollouts (see `rollout`), batched; a problem counts as solved when
its final assistant turn answers it exactly (`is_correct` for a legacy problem, the kind's
checker for a suite problem). A suite problem is offered both suite tools (calculator and
python, run in the sandbox), a legacy one the calculator alone, as each was trained. `solve`
(GRPO's rollouts) can sample the calls under the lazy tool-call grammar of those tools
(`grammar=True`, `chat.calls.lazy_call_grammar`); each rollout counts its calls run, its
malformed calls (the turn's calls not run, the errors shown to the model) and invalid ones.

`suite_accuracy`: each suite problem through `tools.agent.run_agent`, optionally under the lazy
tool-call grammar (`grammar=True`); returns accuracy per family, kind and side of the family
split, each family's tool-use rate, and tool-call validity (the fraction of attempted calls that
parsed). `grammar_comparison` runs it with and without the grammar."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from llamaworks.model import Llama
from llamaworks.posttrain.rollout import (
    ConversationStep,
    Rollout,
    calculator_runner,
    cut_call,
    per_prompt,
    rollout,
)
from llamaworks.posttrain.tasks import (
    Problem,
    SuiteProblem,
    calculator_schemas,
    check,
    is_correct,
    report,
    suite_schemas,
)


def prompt_messages(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def tool_schemas(p: Problem) -> list[dict]:
    """The tools a problem is offered: both suite tools for a suite problem, the calculator for a
    legacy one (as the shipped adapter was trained)."""
    return suite_schemas() if isinstance(p, SuiteProblem) else calculator_schemas()


@functools.cache
def _suite_registry() -> Any:
    from llamaworks.tools.registry import default_registry

    return default_registry(["calculator", "python"])  # python: the sandbox, strict by default


def suite_runner(name: str, arguments: dict) -> str:
    """Run a suite tool (calculator or python); errors come back as text."""
    return _suite_registry().call(name, arguments)


def correct(p: Problem, text: str) -> bool:
    """Whether `text` answers `p` exactly: its kind's checker for a suite problem, else
    `is_correct`."""
    return check(p, text) if isinstance(p, SuiteProblem) else is_correct(text, p.answer)


def needs_tool(p: Problem) -> bool:
    """Whether the canonical solution of `p` calls a tool: every legacy problem (the calculator),
    a suite problem unless it is of kind no_tool."""
    return not isinstance(p, SuiteProblem) or bool(p.calls)


def prompt_ids(tokenizer: Any, p: Problem, tools: bool) -> list[int]:
    from llamaworks.chat.formats import render

    text = render(tokenizer, prompt_messages(p), tool_schemas(p) if tools else None,
                  add_generation_prompt=True)
    return tokenizer.encode(text, bos=False)


def solve(model: Llama, tokenizer: Any, problems: Sequence[Problem], tools: bool, *,
          temperature: float = 0.0, seed: int | None = None, max_new: int = 96,
          max_tool_calls: int = 2, grammar: bool = False) -> list[Rollout]:
    """One rollout per problem (callers repeat problems for groups). With `tools`, each
    rollout's `tool_calls`, `malformed_calls` and `invalid_calls` count its calls (see
    `rollout.ConversationStep`) and `cut_call` says whether `max_new` cut its last turn inside a
    call; `grammar`: sample the calls under the lazy tool-call grammar of the problem's tools
    (then every call of a turn the model ended parses)."""
    from llamaworks.chat.calls import schema_functions, tool_call_grammar
    from llamaworks.chat.formats import detect_format

    if grammar and not tools:
        raise ValueError("grammar=True holds tool calls to the offered tools: pass tools=True")
    steps: list[ConversationStep] = []
    grammars = None
    if tools:
        fmt = detect_format(tokenizer)
        steps = [ConversationStep(
            tokenizer, prompt_messages(p), tool_schemas(p),
            suite_runner if isinstance(p, SuiteProblem) else calculator_runner, fmt)
            for p in problems]
        if grammar:  # one per tool set (suite problems: both tools; legacy: the calculator)
            built: dict[bool, tuple[str, str]] = {}
            for kind in {isinstance(p, SuiteProblem) for p in problems}:
                schemas = tool_schemas(next(p for p in problems
                                            if isinstance(p, SuiteProblem) == kind))
                built[kind] = tool_call_grammar(tokenizer, schema_functions(schemas), fmt)
            grammars = [built[isinstance(p, SuiteProblem)] for p in problems]
    prompts = [prompt_ids(tokenizer, p, tools) for p in problems]
    outs = rollout(model, tokenizer, prompts, max_new=max_new, temperature=temperature,
                   seed=seed, tool_step=per_prompt(steps) if tools else None,
                   max_tool_calls=max_tool_calls, lazy_grammars=grammars)
    for r, st in zip(outs, steps, strict=False):
        r.tool_calls, r.malformed_calls, r.invalid_calls = st.calls, st.malformed, st.invalid
        r.cut_call = not r.finished and cut_call(r.final_text, st.fmt)
    return outs


def accuracy(model: Llama, tokenizer: Any, problems: Sequence[Problem], tools: bool,
             batch_size: int = 16, progress: bool = True, max_new: int | None = None
             ) -> dict[str, Any]:
    """Greedy accuracy on `problems`: {"n", "correct", "accuracy", "tool_call_rate", ...}; with
    suite problems also "report" (`tasks.report`: per family, kind and family split). Suite
    problems get room for a plan and up to their number of calls plus one (`max_new` default
    320 tokens, else 96 as before)."""
    model.eval()
    suite_calls = [len(p.calls) for p in problems if isinstance(p, SuiteProblem)]
    max_tool_calls = max(2, max(suite_calls, default=0) + 1)
    max_new = max_new or (320 if suite_calls else 96)
    n_ok = calls = finished = 0
    examples = []
    oks, used = [], []
    for s in tqdm(range(0, len(problems), batch_size), desc="arithmetic", disable=not progress):
        chunk = problems[s:s + batch_size]
        outs = solve(model, tokenizer, chunk, tools, max_new=max_new,
                     max_tool_calls=max_tool_calls)
        for p, r in zip(chunk, outs, strict=True):
            ok = correct(p, r.final_text)
            n_ok += ok
            calls += r.tool_calls > 0
            finished += r.finished
            oks.append(ok)
            used.append(r.tool_calls > 0)
            if len(examples) < 3:
                examples.append({"question": p.question, "answer": p.answer,
                                 "turns": r.turns, "correct": ok})
    n = len(problems)
    out = {"n": n, "correct": n_ok, "accuracy": n_ok / n, "tool_call_rate": calls / n,
           "finished_rate": finished / n, "examples": examples}
    if problems and all(isinstance(p, SuiteProblem) for p in problems):
        out["report"] = report(problems, oks, used)  # type: ignore[arg-type]
    return out


def suite_accuracy(llm: Any, problems: Sequence[SuiteProblem], *, grammar: bool = False,
                   registry: Any = None, max_steps: int = 4, params: Any = None,
                   progress: bool = False) -> dict[str, Any]:
    """Run each problem through the agent loop (`llm`: an `LLM`, or a `complete(messages,
    tools)` callable) with the suite tools, and score its final answer with the kind's checker.
    `grammar`: the LLM samples its calls under the lazy tool-call grammar of the registry's tools
    (`run_agent(grammar=True)`). Returns `tasks.report` (accuracy per
    family, kind and family split, with tool-use rates) plus call counts: "calls" (run),
    "malformed_calls", "invalid_calls", "call_validity" (run / (run + malformed)), the same per
    kind, "finish_reasons" and up to 5 failed "examples"."""
    from llamaworks.infer.sampling import SamplingParams
    from llamaworks.tools.agent import run_agent

    registry = registry if registry is not None else _suite_registry()
    if params is None and hasattr(llm, "tokenizer"):
        params = SamplingParams(temperature=0.0, max_tokens=192)
    oks, used = [], []
    per_kind: dict[str, dict[str, int]] = {}
    finishes: dict[str, int] = {}
    examples = []
    for p in tqdm(problems, desc="suite", disable=not progress):
        res = run_agent(llm, prompt_messages(p), registry, max_steps=max_steps, params=params,
                        grammar=grammar)
        ok = check(p, res.answer)
        oks.append(ok)
        used.append(res.tool_calls > 0)
        cell = per_kind.setdefault(p.kind, {"calls": 0, "malformed_calls": 0,
                                            "invalid_calls": 0})
        cell["calls"] += res.tool_calls
        cell["malformed_calls"] += res.malformed_calls
        cell["invalid_calls"] += res.invalid_calls
        finishes[res.finish_reason] = finishes.get(res.finish_reason, 0) + 1
        if not ok and len(examples) < 5:
            examples.append({"family": p.family, "question": p.question, "answer": p.answer,
                             "reply": res.answer, "steps": res.steps})
    out = report(problems, oks, used)

    def validity(c: dict[str, int]) -> float:
        tried = c["calls"] + c["malformed_calls"]
        return c["calls"] / tried if tried else 1.0

    total = {k: sum(c[k] for c in per_kind.values())
             for k in ("calls", "malformed_calls", "invalid_calls")}
    for kind, c in per_kind.items():
        out["per_kind"][kind].update(c, call_validity=validity(c))
    return out | total | {"call_validity": validity(total), "grammar": grammar,
                          "finish_reasons": finishes, "examples": examples}


def grammar_comparison(llm: Any, problems: Sequence[SuiteProblem], **kwargs: Any
                       ) -> dict[str, Any]:
    """`suite_accuracy` on the same problems without and with the lazy tool-call grammar:
    {"free": ..., "grammar": ...}."""
    return {"free": suite_accuracy(llm, problems, grammar=False, **kwargs),
            "grammar": suite_accuracy(llm, problems, grammar=True, **kwargs)}

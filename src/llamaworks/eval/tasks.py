"""Task files and few-shot prompts.

Three kinds, told apart by the file:
- multiple choice, JSONL lines `{"context": str, "choices": [str], "gold": int}`: each choice is
  appended to the context as is (put the separating space at the start of the choices or at the
  end of the context; lm-eval moves trailing context whitespace into the continuation);
- generative, JSONL lines `{"prompt": str, "answer": str}` plus optional `"stop": [str]` and
  `"target"` (the full worked answer shown when the item is a few-shot example);
- bits per byte, any other file read as UTF-8 text (`.txt`, `.md`, ...).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llamaworks.errors import LlamaworksError

FEWSHOT_DELIMITER = "\n\n"
DEFAULT_STOP = ["\n\n", "Question:"]


class TaskError(LlamaworksError):
    """A task file or task name cannot be used."""


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class GenItem:
    prompt: str
    answer: str
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    target: str | None = None  # the worked answer, for few-shot examples

    @property
    def shown_answer(self) -> str:
        return self.target if self.target is not None else " " + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "mc" | "gen" | "bpb"
    items: list[MCItem] | list[GenItem] = field(default_factory=list)
    text: str = ""


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); errors name the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TaskError(f"cannot read task file {p}: {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{p}:{n}: each line must be a JSON object")
        out.append(obj)
    if not out:
        raise TaskError(f"{p}: no items")
    return out


def _mc_item(obj: dict, where: str) -> MCItem:
    ctx, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
    if not isinstance(ctx, str) or not isinstance(choices, list) or not choices or \
            not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: a multiple-choice item needs \"context\" (str) and "
                        "\"choices\" (non-empty strings)")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: \"gold\" must be an index into the {len(choices)} choices, "
                        f"got {gold!r}")
    return MCItem(ctx, list(choices), gold)


def _gen_item(obj: dict, where: str) -> GenItem:
    prompt, answer = obj.get("prompt"), obj.get("answer")
    if not isinstance(prompt, str) or not prompt or not isinstance(answer, (str, int, float)):
        raise TaskError(f"{where}: a generative item needs \"prompt\" (non-empty str) and "
                        "\"answer\"")
    stop = obj.get("stop", DEFAULT_STOP)
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TaskError(f"{where}: \"stop\" must be a list of non-empty strings")
    target = obj.get("target")
    return GenItem(prompt, str(answer), list(stop), target if isinstance(target, str) else None)


def load_task_file(path: str | Path) -> Task:
    """A task from a file: JSONL with MC or generative items, otherwise text for bpb."""
    p = Path(path)
    if p.suffix != ".jsonl":
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise TaskError(f"cannot read task file {p}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise TaskError(f"{p} is not UTF-8 text (bits-per-byte needs text; multiple-choice "
                            "and generative tasks are .jsonl)") from None
        if not text:
            raise TaskError(f"{p} is empty")
        return Task(p.stem, "bpb", text=text)
    objs = read_jsonl(p)
    if "choices" in objs[0]:
        return Task(p.stem, "mc", [_mc_item(o, f"{p}:{i + 1}") for i, o in enumerate(objs)])
    if "prompt" in objs[0]:
        return Task(p.stem, "gen", [_gen_item(o, f"{p}:{i + 1}") for i, o in enumerate(objs)])
    raise TaskError(f"{p}: cannot tell the task kind; lines need {{\"context\", \"choices\", "
                    "\"gold\"}} (multiple choice) or {\"prompt\", \"answer\"} (generative); "
                    "`llamaworks eval convert` converts published dataset layouts")


def fewshot_indices(n_items: int, k: int, seed: int) -> list[list[int]]:
    """For each item, k other items (never itself) as examples, drawn with a fixed seed."""
    if k <= 0:
        return [[] for _ in range(n_items)]
    if k >= n_items:
        raise TaskError(f"--num-fewshot {k} needs more than {k} items; the task has {n_items}")
    rnd = random.Random(seed)
    out = []
    for i in range(n_items):
        pick = rnd.sample(range(n_items - 1), k)
        out.append([j if j < i else j + 1 for j in pick])
    return out


def mc_contexts(items: list[MCItem], k: int = 0, seed: int = 1234) -> list[str]:
    """Each item's context preceded by k solved examples (context + gold choice)."""
    shots = fewshot_indices(len(items), k, seed)
    return ["".join(items[j].context + items[j].choices[items[j].gold] + FEWSHOT_DELIMITER
                    for j in js) + it.context for it, js in zip(items, shots, strict=True)]


def gen_prompts(items: list[GenItem], k: int = 0, seed: int = 1234) -> list[str]:
    """Each item's prompt preceded by k solved examples (prompt + worked answer)."""
    shots = fewshot_indices(len(items), k, seed)
    return ["".join(items[j].prompt + items[j].shown_answer + FEWSHOT_DELIMITER
                    for j in js) + it.prompt for it, js in zip(items, shots, strict=True)]


def arithmetic_task(n: int = 50, seed: int = 0) -> Task:
    """The post-training arithmetic word problems (held-out "test" split) as a generative
    task: "Question: ...\nAnswer:" -> the integer answer."""
    from llamaworks.posttrain.tasks import problems

    return Task("arithmetic", "gen", [GenItem(f"Question: {p.question}\nAnswer:", str(p.answer))
                                      for p in problems(n, split="test", seed=seed)])


def load_task(name: str, n: int | None = None, seed: int = 0) -> Task:
    """A named built-in task (today: `arithmetic`, the post-training word problems)."""
    if name == "arithmetic":
        return arithmetic_task(n or 50, seed)
    raise TaskError(f"unknown task {name!r}; known: arithmetic (or pass --task-file F.jsonl)")

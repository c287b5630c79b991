"""The seven original arithmetic templates (the "legacy" family group) and the API the shipped
tool-use adapter was trained and scored with: `problems`, `tool_conversation`, `write_split`.
Kept byte for byte in what they generate, so the adapter's numbers stay comparable.

Numbers are three-digit times two-digit products plus or minus more terms, large enough that a
small model's mental arithmetic fails and a calculator call is the reliable route. Every problem
carries the canonical calculator expression. Splits are disjoint by construction: a problem
belongs to the held-out split iff a hash of its question text falls in one tenth of the space.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaworks.atomic import atomic_write_text

NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Lena", "Carlos", "Priya", "Omar", "Sofia", "Ivan",
         "Grace", "Mateo", "Yuki", "Noah", "Fatima", "Liam")


@dataclass(frozen=True)
class Problem:
    """One word problem: its text, the calculator expression that solves it, the exact answer
    (an int for every arithmetic problem; a word for a few suite problems) and its template."""

    question: str
    expression: str  # what a calculator call should evaluate
    answer: int | str
    template: str


def _boxes(r: random.Random) -> Problem:
    a, b = r.randint(120, 999), r.randint(12, 99)
    c = r.randint(100, a * b // 2)
    item, box = r.choice([("bottles", "box"), ("apples", "crate"), ("books", "carton"),
                          ("cans", "case")])
    q = (f"A warehouse has {a} {box}es with {b} {item} in each {box}. It ships {c} {item}. "
         f"How many {item} are left in the warehouse?")
    return Problem(q, f"{a} * {b} - {c}", a * b - c, "boxes")


def _savings(r: random.Random) -> Problem:
    a, b = r.randint(150, 990), r.randint(13, 52)
    c = r.randint(500, a * b // 2)
    name, thing = r.choice(NAMES), r.choice(["a car", "a piano", "a trip", "a computer"])
    q = (f"{name} earns {a} dollars every week. After {b} weeks, {name} spends {c} dollars on "
         f"{thing}. How many dollars does {name} have left?")
    return Problem(q, f"{a} * {b} - {c}", a * b - c, "savings")


def _orchard(r: random.Random) -> Problem:
    a, b, c, d = r.randint(21, 99), r.randint(21, 99), r.randint(11, 99), r.randint(11, 99)
    t1, t2 = r.sample(["apple", "pear", "plum", "cherry", "orange", "lemon"], 2)
    q = (f"A farm has {a} rows of {b} {t1} trees and {c} rows of {d} {t2} trees. "
         f"How many trees are on the farm in total?")
    return Problem(q, f"{a} * {b} + {c} * {d}", a * b + c * d, "orchard")


def _sharing(r: random.Random) -> Problem:
    c, k = r.randint(12, 48), r.randint(25, 250)
    total = c * k
    b = r.choice([d for d in range(10, 61) if total % d == 0 and total // d >= 10])
    item = r.choice(["pencils", "stickers", "markers", "cookies"])
    q = (f"A school buys {total // b} packs of {b} {item} and shares them equally among {c} "
         f"classes. How many {item} does each class get?")
    return Problem(q, f"{total // b} * {b} / {c}", k, "sharing")


def _train(r: random.Random) -> Problem:
    a, b, c = r.randint(120, 950), r.randint(11, 60), r.randint(101, 999)
    vehicle = r.choice(["train", "truck", "ship", "bus"])
    q = (f"A {vehicle} travels {a} kilometers each day for {b} days, then {c} more kilometers. "
         f"How many kilometers does it travel in all?")
    return Problem(q, f"{a} * {b} + {c}", a * b + c, "travel")


def _library(r: random.Random) -> Problem:
    a, b, c = r.randint(1000, 9999), r.randint(12, 80), r.randint(15, 95)
    d = r.randint(100, 999)
    q = (f"A library had {a} books. It bought {b} crates of {c} books each and gave away {d} "
         f"books. How many books does the library have now?")
    return Problem(q, f"{a} + {b} * {c} - {d}", a + b * c - d, "library")


def _store(r: random.Random) -> Problem:
    a, b, c, d = r.randint(101, 899), r.randint(12, 99), r.randint(101, 899), r.randint(12, 99)
    x, y = r.sample(["shirts", "hats", "lamps", "mugs", "chairs", "kites"], 2)
    q = (f"A store sells {a} {x} at {b} dollars each and {c} {y} at {d} dollars each. "
         f"How many dollars does the store make?")
    return Problem(q, f"{a} * {b} + {c} * {d}", a * b + c * d, "store")


TEMPLATES = (_boxes, _savings, _orchard, _sharing, _train, _library, _store)


def _is_heldout(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] < 26  # ~10% of the space


def problems(n: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "test"), deterministic in `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    r = random.Random(f"{split}:{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        p = r.choice(TEMPLATES)(r)
        if _is_heldout(p.question) == (split == "test") and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


CALCULATOR_CALL = "calculator"


def tool_conversation(p: Problem, call_id: str = "call_0") -> list[dict]:
    """question -> calculator call -> tool result -> final answer, in OpenAI message format."""
    args = json.dumps({"expression": p.expression})
    return [
        {"role": "user", "content": p.question},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": CALCULATOR_CALL, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "name": CALCULATOR_CALL,
         "content": str(p.answer)},
        {"role": "assistant", "content": f"The answer is {p.answer}."},
    ]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The last number in `text` (GSM8K's `#### N` wins if present), commas removed, a
    trailing `.0` dropped."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else _NUMBER.findall(text)
    if not nums:
        return None
    s = nums[-1].replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def is_correct(text: str, answer: int | str) -> bool:
    """Whether `text` ends on `answer`: its last number for a numeric answer (as always), else
    the word after the last "answer is" (or the last word), case-insensitively."""
    if isinstance(answer, int) or re.fullmatch(r"-?\d+", str(answer)):
        return extract_answer(text) == str(answer)
    m = re.findall(r"answer is\W*([A-Za-z]+)", text, re.I) or re.findall(r"[A-Za-z]+", text)
    return bool(m) and m[-1].lower() == str(answer).lower()


def iter_jsonl(items: list[Problem]) -> Iterator[str]:
    for p in items:
        yield json.dumps(asdict(p))


def write_split(path: str | Path, n: int, split: str, seed: int = 0, tools: bool = False) -> Path:
    """Write `n` problems as JSONL: the problems themselves, or (tools=True) SFT conversations
    `{"messages": [...], "tools": [calculator schema]}`."""
    items = problems(n, split, seed)
    if tools:
        schemas = calculator_schemas()
        lines = [json.dumps({"messages": tool_conversation(p), "tools": schemas}) for p in items]
    else:
        lines = list(iter_jsonl(items))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def calculator_schemas() -> list[dict]:
    """The OpenAI `tools` list offering just the calculator."""
    from llamaworks.tools import calculator

    return [{"type": "function", "function": {"name": calculator.NAME,
                                              "description": calculator.DESCRIPTION,
                                              "parameters": calculator.PARAMETERS}}]

"""The generalization suite: procedurally generated, verifiable problems in template families of
four kinds, split so that held-out accuracy measures generalization, not template memory.

Two splits at once:
- by family: the families in `HELDOUT` (about 27% of each kind) never appear in "train" or
  "test"; `suite(n, "heldout")` draws only from them. Their wording is their own: the tests
  check that no sentence of a held-out question (numbers and quoted text masked) occurs in any
  training family.
- by numbers: within the training families, "train" and "test" are disjoint by a hash of the
  question text (as the legacy `problems` split), so "test" measures new numbers in known
  wordings.

The canonical SFT conversation thinks, then acts: the first assistant turn states a short plan
inside `<think>...</think>` (the tags `chat.reasoning.split_reasoning` splits off, so a server
with reasoning on returns the plan as reasoning_content), then the call; a multi-call problem has
one assistant turn per call, each later one with a note quoting the result it uses; the final
turn is exactly "The answer is N." Every conversation offers both tools (`suite_schemas`), so
the choice of tool, or of none, is the model's.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llamaworks.atomic import atomic_write_text
from llamaworks.chat.reasoning import CLOSE as THINK_CLOSE
from llamaworks.chat.reasoning import OPEN as THINK_OPEN
from llamaworks.chat.reasoning import split_reasoning
from llamaworks.posttrain.tasks import (  # noqa: F401 (importing them registers the families)
    arithmetic,
    legacy,
    multi,
    notool,
    programs,
)
from llamaworks.posttrain.tasks.base import FAMILIES, KINDS, Family, SuiteProblem, calc

SPLITS = ("train", "test", "heldout")

# The held-out families, per kind: fixed, never used for training. Chosen so each tests a skill
# the training families teach (a quotient, a remainder, a percentage, a rounded-up count, an
# order statistic, a Python-then-calculator chain, ...) in a wording none of them uses.
HELDOUT: dict[str, tuple[str, ...]] = {
    "arithmetic": ("chair_rows", "manuscript_sections", "take_home_pay", "overdraft",
                   "parking_fee", "paint_cans", "library_fines", "food_drive", "bike_shops",
                   "track_laps", "pencils_left", "cargo_weight"),
    "python": ("kth_largest", "lcm_three", "distinct_letters", "multiples_sum"),
    "multi_call": ("hotel_nights", "carton_sales", "battery_packs"),
    "no_tool": ("count_listed",),
}
HELDOUT_FAMILIES = frozenset(name for names in HELDOUT.values() for name in names)
for _kind, _names in HELDOUT.items():
    for _name in _names:
        if _name not in FAMILIES or FAMILIES[_name].kind != _kind:
            raise RuntimeError(f"HELDOUT names {_name!r} as a {_kind} family; there is none")

# The seven original templates, as the family group "legacy" (`legacy_suite`).
LEGACY_FAMILIES = tuple(f"legacy_{t(random.Random(0)).template}" for t in legacy.TEMPLATES)


def _kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    ks = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in ks if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    return ks


def families(split: str | None = None, kinds: str | Iterable[str] | None = None) -> list[Family]:
    """The suite's families of `kinds` (default all), in definition order: the held-out ones for
    split "heldout", the others for "train" and "test", all of them for None."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    ks = _kinds(kinds)
    return [f for f in FAMILIES.values() if f.kind in ks and (
        split is None or (f.name in HELDOUT_FAMILIES) == (split == "heldout"))]


def _draw(f: Family, count: int, split: str, seed: int) -> list[SuiteProblem]:
    """`count` distinct problems of family `f` on `split`'s side of the question-hash split."""
    r = random.Random(f"{split}:{seed}:{f.name}")
    out: list[SuiteProblem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 1000 + 200 * count:
            raise ValueError(f"family {f.name!r} gave only {len(out)} distinct {split} problems "
                             f"of the {count} asked for; ask for fewer")
        p = f.problem(r)
        if split != "heldout" and legacy._is_heldout(p.question) != (split == "test"):
            continue
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _shares(n: int, k: int, r: random.Random) -> list[int]:
    """`n` split over `k` parts as evenly as possible; which parts get one more is drawn."""
    extra = set(r.sample(range(k), n % k))
    return [n // k + (i in extra) for i in range(k)]


def suite(n: int, split: str = "train", kinds: str | Iterable[str] | None = None, seed: int = 0,
          names: Iterable[str] | None = None, balance: str = "family") -> list[SuiteProblem]:
    """`n` problems of `split` ("train", "test" or "heldout"), deterministic in `seed`, from the
    families of `kinds` (default all four; `names` narrows to given families of that split).
    `balance="family"`: every family equally often (when `n` does not divide evenly, which get
    one more is drawn from `seed`); "kind": every kind equally often, then every family within
    it. Interleaved family by family, so any prefix is balanced too."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if balance not in ("family", "kind"):
        raise ValueError(f"balance must be 'family' or 'kind', got {balance!r}")
    fams = families(split, kinds)
    if names is not None:
        wanted = set(names)
        unknown = wanted - {f.name for f in fams}
        if unknown:
            raise ValueError(f"no {split} families named {sorted(unknown)} among these kinds")
        fams = [f for f in fams if f.name in wanted]
    if not fams:
        raise ValueError(f"no {split} families of kinds {_kinds(kinds)}")
    r = random.Random(f"shares:{split}:{seed}")
    if balance == "family":
        counts = dict(zip((f.name for f in fams), _shares(n, len(fams), r), strict=True))
    else:
        present = [k for k in KINDS if any(f.kind == k for f in fams)]
        counts = {}
        for k, share in zip(present, _shares(n, len(present), r), strict=True):
            fk = [f for f in fams if f.kind == k]
            counts.update(zip((f.name for f in fk), _shares(share, len(fk), r), strict=True))
    drawn = {f.name: _draw(f, counts[f.name], split, seed) for f in fams}
    return [drawn[f.name][i] for i in range(max(counts.values())) for f in fams
            if i < len(drawn[f.name])]


def legacy_suite(n: int, split: str = "test", seed: int = 0) -> list[SuiteProblem]:
    """The legacy `problems(n, split, seed)` (the same problems, in the same order) as suite
    problems of family group "legacy" (`legacy_boxes`, ...), for reports that put the old
    templates beside the new families."""
    return [SuiteProblem(p.question, p.expression, p.answer, p.template,
                         family=f"legacy_{p.template}", kind="arithmetic",
                         calls=(calc(p.expression, int(p.answer)),),
                         plan=f"Compute {p.expression} with the calculator.")
            for p in legacy.problems(n, split, seed)]


# -- conversations --------------------------------------------------------------------------------
def answer_text(answer: int | str) -> str:
    """The canonical final answer: "The answer is N."."""
    return f"The answer is {answer}."


def think(text: str) -> str:
    """`text` as a reasoning block, in the tags `chat.reasoning` splits off."""
    return f"{THINK_OPEN}{text}{THINK_CLOSE}"


def think_conversation(p: SuiteProblem) -> list[dict]:
    """The think-then-act SFT conversation of `p` (OpenAI format): the question; per call an
    assistant turn (the plan, or the call's note, in `<think>`, then the call) and its tool
    result; then "The answer is N.". A no-tool problem is the plan and the answer in one turn."""
    msgs: list[dict] = [{"role": "user", "content": p.question}]
    if not p.calls:
        msgs.append({"role": "assistant", "content": think(p.plan) + "\n" + answer_text(p.answer)})
        return msgs
    for i, c in enumerate(p.calls):
        thought = p.plan if i == 0 else c.note
        cid = f"call_{i}"
        msgs.append({"role": "assistant", "content": think(thought) if thought else "",
                     "tool_calls": [c.to_openai(cid)]})
        msgs.append({"role": "tool", "tool_call_id": cid, "name": c.tool, "content": c.result})
    msgs.append({"role": "assistant", "content": answer_text(p.answer)})
    return msgs


def tool_conversation(p: legacy.Problem, call_id: str = "call_0") -> list[dict]:
    """The canonical conversation of any problem: the legacy one-call form for a legacy
    `Problem` (unchanged), the think-then-act form for a `SuiteProblem`."""
    if isinstance(p, SuiteProblem):
        return think_conversation(p)
    return legacy.tool_conversation(p, call_id)


def suite_schemas() -> list[dict]:
    """The OpenAI `tools` list every suite conversation offers: the calculator and python, as
    `default_registry("calculator,python").schemas()` gives them (built without probing the
    sandbox, so data can be written where the python tool cannot run)."""
    import inspect

    from llamaworks.tools.registry import PYTHON_PARAMETERS, Tool, python_tool

    python = Tool("python", inspect.getdoc(python_tool).replace("\n", " "), PYTHON_PARAMETERS,
                  python_tool)
    return legacy.calculator_schemas() + [python.schema()]


def write_suite(path: str | Path, n: int, split: str = "train",
                kinds: str | Iterable[str] | None = None, seed: int = 0,
                conversations: bool = True) -> Path:
    """Write `suite(n, split, kinds, seed)` as JSONL: SFT conversations `{"messages": [...],
    "tools": suite_schemas()}` (the format `write_split(tools=True)` writes), or with
    `conversations=False` the problems themselves."""
    items = suite(n, split, kinds, seed)
    if conversations:
        schemas = suite_schemas()
        lines = [json.dumps({"messages": think_conversation(p), "tools": schemas})
                 for p in items]
    else:
        lines = [json.dumps(asdict(p)) for p in items]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


# -- checkers -------------------------------------------------------------------------------------
_ANSWER_IS = re.compile(r"answer is\s*[:*$]*\s*(-?\d[\d,]*(?:\.\d+)?|[A-Za-z]+)", re.I)


def _number(s: str) -> str:
    s = s.replace(",", "")
    return s.split(".")[0] if re.fullmatch(r"-?\d+\.0+", s) else s


def final_answer(text: str) -> str | None:
    """The final answer of a reply: with any `<think>` block dropped, the number or word after
    the last "answer is", else the last number (`extract_answer`)."""
    _, text = split_reasoning(text)
    found = _ANSWER_IS.findall(text)
    return _number(found[-1]) if found else legacy.extract_answer(text)


def check_number(text: str, answer: int | str) -> bool:
    """Exact integer match of `final_answer(text)`."""
    return final_answer(text) == str(answer)


def check_python(text: str, answer: int | str) -> bool:
    """Python problems: an integer answer as `check_number`; a word answer (a weekday) the word
    after the last "answer is", else the last word, case-insensitively."""
    if isinstance(answer, int) or re.fullmatch(r"-?\d+", str(answer)):
        return check_number(text, answer)
    _, text = split_reasoning(text)
    found = _ANSWER_IS.findall(text) or re.findall(r"[A-Za-z]+", text)
    return bool(found) and found[-1].lower() == str(answer).lower()


CHECKERS = {"arithmetic": check_number, "python": check_python, "multi_call": check_number,
            "no_tool": check_number}


def check(p: SuiteProblem, text: str) -> bool:
    """Whether the reply `text` answers `p` exactly (its kind's checker)."""
    return CHECKERS[p.kind](text, p.answer)


# -- reports --------------------------------------------------------------------------------------
def _side(family: str) -> str:
    """"heldout", "legacy" or "train": which side of the family split `family` is on."""
    if family in HELDOUT_FAMILIES:
        return "heldout"
    return "legacy" if family in LEGACY_FAMILIES else "train"


def _cell(n: int, correct: int) -> dict[str, Any]:
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}


def report(problems: Sequence[SuiteProblem], correct: Sequence[bool],
           used_tools: Sequence[bool] | None = None) -> dict[str, Any]:
    """Accuracy overall, per family (with its kind and side of the family split), per kind and
    per side ("train families", "heldout families", "legacy families"); with `used_tools`
    (whether each reply ran a tool), also each family's tool-use rate (it should be ~1, and ~0
    for no_tool)."""
    if len(problems) != len(correct) or (used_tools is not None and
                                         len(used_tools) != len(problems)):
        raise ValueError("report needs one outcome per problem")
    fam: dict[str, list[int]] = {}
    kind: dict[str, list[int]] = {}
    side: dict[str, list[int]] = {}
    for i, (p, ok) in enumerate(zip(problems, correct, strict=True)):
        tool = int(bool(used_tools[i])) if used_tools is not None else 0
        where = _side(p.family) + " families"
        for table, key in ((fam, p.family), (kind, p.kind), (side, where)):
            cell = table.setdefault(key, [0, 0, 0])
            cell[0] += 1
            cell[1] += int(bool(ok))
            cell[2] += tool
    by_kind = {p.family: p.kind for p in problems}

    def rows(table: dict[str, list[int]], extra: Any = None) -> dict[str, dict]:
        out = {}
        for key, (n, c, t) in table.items():
            row = _cell(n, c) | (extra(key) if extra else {})
            if used_tools is not None:
                row["tool_use"] = t / n
            out[key] = row
        return out

    n, c = len(problems), sum(bool(x) for x in correct)
    top = _cell(n, c)
    if used_tools is not None:
        top["tool_use"] = sum(bool(x) for x in used_tools) / n if n else 0.0
    return top | {
        "per_family": rows(fam, lambda k: {"kind": by_kind[k], "split": _side(k)}),
        "per_kind": rows(kind), "per_split": rows(side)}


def format_report(rep: dict[str, Any]) -> str:
    """`report(...)` as a plain-text table: one line per family, then per kind and split."""
    tool = any("tool_use" in r for r in rep["per_family"].values())
    head = f"{'family':<24} {'kind':<11} {'split':<8} {'n':>4} {'acc':>6}" + \
        (f" {'tools':>6}" if tool else "")
    lines = [head]

    def line(name: str, kind: str, split: str, r: dict) -> str:
        s = f"{name:<24} {kind:<11} {split:<8} {r['n']:>4} {r['accuracy']:>6.1%}"
        return s + (f" {r.get('tool_use', 0):>6.1%}" if tool else "")

    fams = sorted(rep["per_family"].items(), key=lambda kv: (KINDS.index(kv[1]["kind"]),
                                                             kv[1]["split"], kv[0]))
    for name, r in fams:
        lines.append(line(name, r["kind"], r["split"], r))
    lines.append("")
    for name, r in rep["per_kind"].items():
        lines.append(line(name, "", "", r))
    for name, r in rep["per_split"].items():
        lines.append(line(name, "", "", r))
    lines.append(line("all", "", "", rep))
    return "\n".join(lines)

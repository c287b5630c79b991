"""What every suite family is made of: the problem record with its canonical tool calls, and the
registry the family modules add themselves to (`@family(kind)`).

A family is a function `make(r: random.Random) -> Draft` that draws its numbers from `r` and
returns the question, the exact answer, the plan (the short `<think>` text of its canonical
conversation) and the canonical calls, each with the exact text its tool returns. The answer and
every tool result are computed here in Python, independently of the tools; the tests run the
real calculator and python tool on every call and compare.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llamaworks.posttrain.tasks.legacy import NAMES, Problem

KINDS = ("arithmetic", "python", "multi_call", "no_tool")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
PEOPLE = NAMES + ("Amara", "Jonas", "Mei", "Ravi", "Elena", "Samuel", "Nadia", "Hugo", "Zara",
                  "Tariq", "Ingrid", "Diego")


@dataclass(frozen=True)
class Call:
    """One canonical tool call: the tool's name, its JSON arguments, the exact text the tool
    returns, and `note`: the short thought written before it when it is not the first call (the
    first follows the problem's plan)."""

    tool: str
    arguments: dict[str, Any] = field(hash=False)
    result: str
    note: str = ""

    def to_openai(self, call_id: str) -> dict:
        """The call as an OpenAI `tool_calls` entry."""
        return {"id": call_id, "type": "function",
                "function": {"name": self.tool, "arguments": json.dumps(self.arguments)}}


@dataclass(frozen=True)
class SuiteProblem(Problem):
    """A suite problem: a `Problem` (so GRPO and `is_correct` take it as they are; `template` is
    the family, `expression` the calculator expression of an arithmetic problem, else "") plus its
    family, kind, canonical calls and plan."""

    family: str = ""
    kind: str = "arithmetic"
    calls: tuple[Call, ...] = ()
    plan: str = ""

    @property
    def tools(self) -> tuple[str, ...]:
        """The tools its canonical solution uses, in order of first use."""
        return tuple(dict.fromkeys(c.tool for c in self.calls))


class Draft(NamedTuple):
    """What a family function returns; the registry adds family and kind."""

    question: str
    answer: int | str
    plan: str
    calls: list[Call]


def calc(expression: str, value: int, note: str = "") -> Call:
    """A calculator call of `expression`, which evaluates to the integer `value`."""
    return Call("calculator", {"expression": expression}, str(value), note)


def py(code: str, value: int | str, note: str = "") -> Call:
    """A python call of `code`, which prints `value` (and nothing else)."""
    return Call("python", {"code": code}, str(value), note)


@dataclass(frozen=True)
class Family:
    """A template family: its name, kind, generator and group ("suite" or "legacy")."""

    name: str
    kind: str
    make: Callable[[random.Random], Draft]
    group: str = "suite"

    def problem(self, r: random.Random) -> SuiteProblem:
        """One problem of this family with numbers drawn from `r`."""
        d = self.make(r)
        expr = d.calls[0].arguments["expression"] if self.kind == "arithmetic" else ""
        return SuiteProblem(d.question, expr, d.answer, self.name, family=self.name,
                            kind=self.kind, calls=tuple(d.calls), plan=d.plan)


FAMILIES: dict[str, Family] = {}


def family(kind: str) -> Callable[[Callable[[random.Random], Draft]],
                                  Callable[[random.Random], Draft]]:
    """Register `make` (named `_name`) as family `name` of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(make: Callable[[random.Random], Draft]) -> Callable[[random.Random], Draft]:
        name = make.__name__.lstrip("_")
        if name in FAMILIES:
            raise ValueError(f"family {name!r} is defined twice")
        FAMILIES[name] = Family(name, kind, make)
        return make

    return deco


def pick(r: random.Random, options: tuple | list) -> Any:
    """`r.choice`, spelled short for the family modules."""
    return r.choice(options)


def date_text(y: int, m: int, d: int) -> str:
    """"March 3, 2021"."""
    return f"{MONTHS[m - 1]} {d}, {y}"


def number_list(xs: list[int]) -> str:
    """"412, 87 and 930"."""
    return ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"

"""No-tool families: questions a model answers without any tool (one-digit arithmetic, a small
count, a number the text already states). Their canonical conversation is a short plan and the
answer, no call: they teach when not to reach for a tool."""

from __future__ import annotations

import random

from llamaworks.posttrain.tasks.base import PEOPLE, Draft, family, pick

# (things, what they have, how many each)
FACTS = (("spiders", "legs", 8), ("tricycles", "wheels", 3), ("cars", "wheels", 4),
         ("hexagons", "sides", 6), ("triangles", "sides", 3), ("squares", "corners", 4),
         ("hands", "fingers", 5), ("ants", "legs", 6), ("octopuses", "arms", 8),
         ("bicycles", "wheels", 2), ("dice", "faces", 6), ("pentagons", "sides", 5))
ITEMS = ("tent", "lamp", "map", "compass", "kettle", "blanket", "rope", "knife", "camera",
         "notebook", "hat", "towel", "flashlight", "pillow", "stove", "whistle", "jacket", "book")
LABELS = ("house number", "locker number", "ticket number", "badge number", "room number",
          "seat number")


@family("no_tool")
def _tiny_arithmetic(r: random.Random) -> Draft:
    op, sym = pick(r, (("+", "+"), ("-", "-"), ("*", "times")))
    a, b = r.randint(1, 9 if op == "*" else 20), r.randint(1, 9)
    if op == "-" and b > a:
        a, b = b, a
    ans = a + b if op == "+" else a - b if op == "-" else a * b
    ask = pick(r, ("What is {}?", "How much is {}?", "Quick one: what is {}?"))
    return Draft(ask.format(f"{a} {sym} {b}"), ans,
                 f"{a} {sym} {b} is small enough to work out directly: {ans}. No tool needed.", [])


@family("no_tool")
def _stated_number(r: random.Random) -> Draft:
    name, label = pick(r, PEOPLE), pick(r, LABELS)
    n, k = r.randint(100, 9999), r.randint(2, 9)
    pet = pick(r, ("cats", "dogs", "goldfish", "parrots"))
    facts = [f"{name}'s {label} is {n}.", f"{name} has {k} {pet}."]
    r.shuffle(facts)
    return Draft(f"{' '.join(facts)} What is {name}'s {label}?", n,
                 f"The text states the {label} directly: {n}. The {k} {pet} do not matter. No "
                 f"tool needed.", [])


@family("no_tool")
def _small_count(r: random.Random) -> Draft:
    name, (things, part, per), k = pick(r, PEOPLE), pick(r, FACTS), r.randint(2, 5)
    return Draft(f"{name} looks at {k} {things}. How many {part} do they have altogether?",
                 k * per,
                 f"Each of the {k} {things} has {per} {part}, and {k} times {per} is {k * per}. "
                 f"Small enough to do without a tool.", [])


# -- held-out family (see suite.HELDOUT) ----------------------------------------------------------
@family("no_tool")
def _count_listed(r: random.Random) -> Draft:
    name, items = pick(r, PEOPLE), r.sample(ITEMS, r.randint(2, 6))
    listed = ", ".join(f"a {x}" for x in items[:-1]) + f" and a {items[-1]}"
    return Draft(f"For the camping trip, {name} packed {listed}. How many things did {name} pack?",
                 len(items),
                 f"Count the items listed: {len(items)}. No tool needed.", [])

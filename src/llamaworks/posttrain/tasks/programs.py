"""Python-tool families: counting with conditions, digit sums, medians and order statistics of a
listed set, dates (days between two, the weekday of one), letters and words in a given text. Each
has one python call: a few lines that print the answer and nothing else. Answers are ints except
the weekday (a word)."""

from __future__ import annotations

import datetime
import math
import random

from llamaworks.posttrain.tasks.base import Draft, date_text, family, number_list, py

WORDS = ("river", "garden", "yellow", "planet", "quiet", "window", "basket", "morning", "silver",
         "forest", "pepper", "bottle", "letter", "summer", "banana", "coffee", "market", "little",
         "tunnel", "mirror", "orange", "purple", "rabbit", "kettle", "jungle", "anchor", "valley",
         "button", "pillow", "harbor", "meadow", "cinnamon", "engineer", "parallel", "committee",
         "balloon", "necessary", "strawberry", "umbrella", "dolphin", "bicycle", "elephant",
         "tomorrow", "address", "possession", "bookkeeper", "the", "and", "over", "under", "with",
         "near", "seven", "green", "happy", "tall", "small", "cat", "sea", "sky", "blue", "old")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ORDINALS = {2: "second", 3: "third", 4: "fourth", 5: "fifth"}


def _sentence(r: random.Random) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(6, 10)))


def _date(r: random.Random, lo: int, hi: int) -> datetime.date:
    return datetime.date(lo, 1, 1) + datetime.timedelta(
        days=r.randrange((datetime.date(hi, 12, 31) - datetime.date(lo, 1, 1)).days + 1))


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _one(q: str, code: str, value: int | str, plan: str) -> Draft:
    return Draft(q, value, plan, [py(code, value)])


# -- train families -------------------------------------------------------------------------------
@family("python")
def _divisible_count(r: random.Random) -> Draft:
    while True:
        a, b, k, m = r.randint(100, 999), r.randint(1000, 9999), r.randint(3, 19), r.randint(2, 12)
        if m != k and k % m:
            break
    n = sum(1 for x in range(a, b + 1) if x % k == 0 and x % m != 0)
    return _one(f"How many integers from {a} to {b}, inclusive, are divisible by {k} but not by "
                f"{m}?",
                f"print(sum(1 for n in range({a}, {b} + 1) if n % {k} == 0 and n % {m} != 0))", n,
                f"Loop over {a}..{b} in Python and count numbers divisible by {k} but not by "
                f"{m}.")


@family("python")
def _digit_sum_power(r: random.Random) -> Draft:
    b, e = r.randint(2, 19), r.randint(20, 90)
    return _one(f"What is the sum of the digits of {b} to the power {e}?",
                f"print(sum(int(d) for d in str({b} ** {e})))", sum(map(int, str(b ** e))),
                f"{b}^{e} has too many digits to add by hand: compute it in Python and sum its "
                f"digits.")


@family("python")
def _median_list(r: random.Random) -> Draft:
    xs = r.sample(range(10, 1000), r.choice((7, 9, 11)))
    return _one(f"Here are {len(xs)} measurements: {number_list(xs)}. What is their median?",
                f"xs = {xs}\nprint(sorted(xs)[len(xs) // 2])", sorted(xs)[len(xs) // 2],
                f"Sort the {len(xs)} numbers in Python and take the middle one.")


@family("python")
def _days_between(r: random.Random) -> Draft:
    a, b = sorted((_date(r, 1990, 2030), _date(r, 1990, 2030)))
    if a == b:
        b += datetime.timedelta(days=1)
    return _one(f"How many days are there from {date_text(a.year, a.month, a.day)} to "
                f"{date_text(b.year, b.month, b.day)}?",
                f"from datetime import date\nprint((date({b.year}, {b.month}, {b.day}) - "
                f"date({a.year}, {a.month}, {a.day})).days)", (b - a).days,
                f"Subtract {a.isoformat()} from {b.isoformat()} with Python's datetime and "
                f"print the days.")


@family("python")
def _weekday(r: random.Random) -> Draft:
    d = _date(r, 1900, 2099)
    return _one(f"On which day of the week is {date_text(d.year, d.month, d.day)}?",
                f"from datetime import date\n"
                f"print(date({d.year}, {d.month}, {d.day}).strftime('%A'))",
                WEEKDAYS[d.weekday()],
                f"Build the date {d.year}-{d.month}-{d.day} in Python and print its weekday name.")


@family("python")
def _letter_count(r: random.Random) -> Draft:
    s = _sentence(r)
    c = r.choice(sorted(set(s) - {" "}))
    return _one(f"Count the letter {c!r} in this text: {s!r}. How many times does it appear?",
                f"print({s!r}.count({c!r}))", s.count(c),
                f"Let Python count {c!r} in the text instead of counting by eye.")


@family("python")
def _prime_count(r: random.Random) -> Draft:
    a = r.randint(100, 5000)
    b = a + r.randint(100, 2000)
    n = sum(1 for x in range(a, b + 1) if _is_prime(x))
    return _one(f"How many prime numbers are there from {a} to {b}, inclusive?",
                f"print(sum(1 for n in range({a}, {b} + 1) "
                f"if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))))", n,
                f"Test each number from {a} to {b} for primality in Python and count.")


@family("python")
def _collatz_steps(r: random.Random) -> Draft:
    n = start = r.randint(100, 99999)
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return _one(f"Start from {start}. If the number is even, halve it; if it is odd, triple it and "
                f"add one. How many such steps does it take to reach 1?",
                f"n, steps = {start}, 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1"
                f"\n    steps += 1\nprint(steps)", steps,
                f"Simulate the halve-or-triple rule from {start} in a Python loop, counting steps.")


@family("python")
def _fibonacci_term(r: random.Random) -> Draft:
    x, y, k = r.randint(1, 20), r.randint(1, 20), r.randint(20, 70)
    a, b = x, y
    for _ in range(k - 2):
        a, b = b, a + b
    return _one(f"A sequence starts {x}, {y}, and every later term is the sum of the two terms "
                f"before it. What is term number {k}?",
                f"a, b = {x}, {y}\nfor _ in range({k} - 2):\n    a, b = b, a + b\nprint(b)", b,
                f"Iterate the add-the-last-two rule from {x}, {y} in Python up to term {k}.")


@family("python")
def _long_words(r: random.Random) -> Draft:
    s, k = _sentence(r), r.randint(4, 7)
    n = sum(1 for w in s.split() if len(w) > k)
    return _one(f"In the text {s!r}, how many words are longer than {k} letters?",
                f"print(sum(1 for w in {s!r}.split() if len(w) > {k}))", n,
                f"Split the text into words in Python and count those with more than {k} "
                f"letters.")


# -- held-out families (see suite.HELDOUT) --------------------------------------------------------
@family("python")
def _kth_largest(r: random.Random) -> Draft:
    xs, k = r.sample(range(100, 10000), r.randint(8, 12)), r.randint(2, 5)
    return _one(f"Which number is the {ORDINALS[k]} largest among {number_list(xs)}?",
                f"xs = {xs}\nprint(sorted(xs, reverse=True)[{k - 1}])",
                sorted(xs, reverse=True)[k - 1],
                f"Sort the list from largest to smallest in Python and take position {k}.")


@family("python")
def _lcm_three(r: random.Random) -> Draft:
    a, b, c = (r.randint(12, 240) for _ in range(3))
    return _one(f"Find the least common multiple of {a}, {b} and {c}.",
                f"import math\nprint(math.lcm({a}, {b}, {c}))", math.lcm(a, b, c),
                f"Python's math.lcm gives the least common multiple of {a}, {b} and {c}.")


@family("python")
def _distinct_letters(r: random.Random) -> Draft:
    s = " ".join(r.sample(WORDS, r.randint(2, 3)))
    n = len(set(s.replace(" ", "")))
    return _one(f"Ignoring spaces, how many different letters are used in the phrase {s!r}?",
                f"print(len(set({s!r}.replace(' ', ''))))", n,
                f"Put the letters of {s!r}, without spaces, into a Python set and count it.")


@family("python")
def _multiples_sum(r: random.Random) -> Draft:
    k, n = r.randint(3, 29), r.randint(500, 9999)
    return _one(f"Add up every positive multiple of {k} that is smaller than {n}. What total do "
                f"you get?",
                f"print(sum(range({k}, {n}, {k})))", sum(range(k, n, k)),
                f"Sum range({k}, {n}, {k}) in Python: the multiples of {k} below {n}.")

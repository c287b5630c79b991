"""Multi-call families: two or three tool calls where each later call uses the result of the
one before (a subtotal, then a percentage of it; a Python count or date difference, then a
calculator step). The canonical conversation has one assistant turn per call, each answered by
its tool, and each later call is preceded by a short note that quotes the result it builds on."""

from __future__ import annotations

import datetime
import random

from llamaworks.posttrain.tasks.base import Draft, calc, date_text, family, number_list, py


def _date(r: random.Random) -> datetime.date:
    return datetime.date(2015, 1, 1) + datetime.timedelta(days=r.randrange(365 * 12))


# -- train families -------------------------------------------------------------------------------
@family("multi_call")
def _bulk_discount(r: random.Random) -> Draft:
    while True:
        n, p, k = r.randint(12, 95), r.randint(45, 890), r.randint(5, 40)
        if n * p * k % 100 == 0:
            break
    s = n * p
    ans = s - s * k // 100
    return Draft(f"A school orders {n} desks at {p} dollars each. Because the order is large, the "
                 f"supplier takes {k}% off the total. How many dollars does the school pay?", ans,
                 f"First the subtotal: {n} desks times {p} dollars. Then take {k}% off that "
                 f"subtotal.",
                 [calc(f"{n} * {p}", s),
                  calc(f"{s} - {s} * {k} / 100", ans,
                       f"The subtotal is {s}; now subtract {k}% of it.")])


@family("multi_call")
def _tip_split(r: random.Random) -> Draft:
    while True:
        g, t, b = r.randint(4, 16), r.choice((10, 12, 15, 18, 20, 25)), r.randint(120, 2400)
        total = b * (100 + t)
        if total % 100 == 0 and total // 100 % g == 0:
            break
    total //= 100
    return Draft(f"A dinner for {g} friends costs {b} dollars before the tip. They add a {t}% tip "
                 f"and split the total equally. How many dollars does each friend pay?",
                 total // g,
                 f"First add the {t}% tip to {b} dollars, then divide the total by {g}.",
                 [calc(f"{b} + {b} * {t} / 100", total),
                  calc(f"{total} / {g}", total // g,
                       f"With the tip the bill is {total}; now split it {g} ways.")])


@family("multi_call")
def _compound_growth(r: random.Random) -> Draft:
    while True:
        p, k, years = r.randint(100, 990) * 10, r.randint(2, 40), r.choice((2, 3))
        values = [p]
        for _ in range(years):
            if values[-1] * (100 + k) % 100:
                break
            values.append(values[-1] * (100 + k) // 100)
        if len(values) == years + 1:
            break
    calls = [calc(f"{values[i]} * {100 + k} / 100", values[i + 1],
                  f"After year {i} there are {values[i]}; grow that by {k}% again." if i else "")
             for i in range(years)]
    return Draft(f"A town of {p} people grows by {k}% every year. How many people live there after "
                 f"{years} years?", values[-1],
                 f"Grow {p} by {k}% once per year, {years} times: each year multiply by "
                 f"{100 + k} and divide by 100.", calls)


@family("multi_call")
def _digit_sum_times(r: random.Random) -> Draft:
    b, e, m = r.randint(2, 19), r.randint(20, 70), r.randint(120, 980)
    s = sum(map(int, str(b ** e)))
    return Draft(f"Let S be the sum of the digits of {b}^{e}. What is S multiplied by {m}?", s * m,
                 f"First get the digit sum of {b}^{e} with Python, then multiply it by {m}.",
                 [py(f"print(sum(int(d) for d in str({b} ** {e})))", s),
                  calc(f"{s} * {m}", s * m, f"S is {s}; now multiply by {m}.")])


@family("multi_call")
def _multiples_points(r: random.Random) -> Draft:
    k, a, b, p = r.randint(3, 17), r.randint(100, 999), r.randint(1000, 9999), r.randint(12, 95)
    c = sum(1 for x in range(a, b + 1) if x % k == 0)
    return Draft(f"In a game, every multiple of {k} from {a} to {b} is worth {p} points. How many "
                 f"points are all of those multiples worth together?", c * p,
                 f"Count the multiples of {k} between {a} and {b} with Python, then multiply the "
                 f"count by {p}.",
                 [py(f"print(sum(1 for n in range({a}, {b} + 1) if n % {k} == 0))", c),
                  calc(f"{c} * {p}", c * p, f"There are {c} multiples; times {p} points.")])


@family("multi_call")
def _median_raise(r: random.Random) -> Draft:
    xs = [x * 100 for x in r.sample(range(30, 150), r.choice((5, 7, 9)))]
    k = r.randint(2, 15)
    m = sorted(xs)[len(xs) // 2]
    new = m + m * k // 100
    return Draft(f"The salaries on a small team are {number_list(xs)} dollars. The median salary "
                 f"goes up by {k}%. What is the new median salary, in dollars?", new,
                 f"Find the median of the {len(xs)} salaries with Python, then add {k}% to it.",
                 [py(f"xs = {xs}\nprint(sorted(xs)[len(xs) // 2])", m),
                  calc(f"{m} + {m} * {k} / 100", new, f"The median is {m}; now add {k}%.")])


@family("multi_call")
def _average_gap(r: random.Random) -> Draft:
    a, b = r.randint(60, 140), r.randint(60, 140)
    c = r.randint(62, 140)
    c -= (a + b + c) % 3
    avg = (a + b + c) // 3
    d = r.randint(avg - 40, avg - 1)
    return Draft(f"Team Red scored {a}, {b} and {c} points in three games, while Team Blue "
                 f"averaged {d} points per game. By how many points per game does Team Red's "
                 f"average beat Team Blue's?", avg - d,
                 f"First Team Red's average: ({a} + {b} + {c}) / 3. Then subtract Team Blue's "
                 f"{d}.",
                 [calc(f"({a} + {b} + {c}) / 3", avg),
                  calc(f"{avg} - {d}", avg - d, f"Team Red averages {avg}; subtract {d}.")])


# -- held-out families (see suite.HELDOUT) --------------------------------------------------------
@family("multi_call")
def _hotel_nights(r: random.Random) -> Draft:
    a, rate = _date(r), r.randint(65, 390)
    b = a + datetime.timedelta(days=r.randint(3, 60))
    n = (b - a).days
    return Draft(f"A hotel charges {rate} dollars per night. A guest checks in on "
                 f"{date_text(a.year, a.month, a.day)} and checks out on "
                 f"{date_text(b.year, b.month, b.day)}. How many dollars is the bill?", n * rate,
                 f"Count the nights between the two dates with Python, then multiply by {rate}.",
                 [py(f"from datetime import date\nprint((date({b.year}, {b.month}, {b.day}) - "
                     f"date({a.year}, {a.month}, {a.day})).days)", n),
                  calc(f"{n} * {rate}", n * rate, f"That is {n} nights; times {rate} dollars.")])


@family("multi_call")
def _carton_sales(r: random.Random) -> Draft:
    while True:
        e, k, p = r.randint(1000, 9999), r.choice((6, 10, 12, 18, 24, 30)), r.randint(3, 15)
        if e % k:
            break
    c = e // k
    return Draft(f"A farm packs {e} eggs into cartons of {k}, and every full carton sells for {p} "
                 f"dollars. How many dollars do the full cartons bring in?", c * p,
                 f"Full cartons: integer-divide {e} by {k}. Then multiply by {p} dollars.",
                 [calc(f"{e} // {k}", c),
                  calc(f"{c} * {p}", c * p, f"{c} cartons are full; times {p} dollars.")])


@family("multi_call")
def _battery_packs(r: random.Random) -> Draft:
    a, x = r.randint(4, 12), r.randint(60, 250)
    b, y = a * r.randint(3, 8), r.randint(30, x - 10)
    p, q = a * x, b * y
    return Draft(f"A pack of {a} batteries costs {p} cents and a pack of {b} batteries costs {q} "
                 f"cents. How many cents more does one battery cost in the small pack than in the "
                 f"big pack?", x - y,
                 f"First the small pack's price per battery, {p} / {a}; then subtract the big "
                 f"pack's, {q} / {b}.",
                 [calc(f"{p} / {a}", x),
                  calc(f"{x} - {q} / {b}", x - y, f"One battery in the small pack costs {x} "
                       f"cents; now subtract {q} / {b}.")])

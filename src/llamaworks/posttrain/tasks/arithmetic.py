"""Arithmetic word-problem families: one calculator call each, 2-4 digit numbers, one to four
operations. They differ in wording, not just in nouns: verbs, units, the order of the facts,
distractor numbers the answer does not use, the question asked first or last, division asked as
an exact quotient, a whole-number quotient (`//`), a remainder (`%`) or a rounded-up count
(`ceil`), and percentages with whole-number results. Which of them are held out is decided in
`suite.HELDOUT`, not here."""

from __future__ import annotations

import random

from llamaworks.posttrain.tasks.base import PEOPLE, Draft, calc, family, pick


def _percent(r: random.Random, lo: int, hi: int, klo: int, khi: int) -> tuple[int, int]:
    """(amount, percent) with amount * percent divisible by 100: a whole-number percentage."""
    while True:
        a, k = r.randint(lo, hi), r.randint(klo, khi)
        if a * k % 100 == 0:
            return a, k


def _not_multiple(r: random.Random, lo: int, hi: int, klo: int, khi: int) -> tuple[int, int]:
    """(n, k) with n not a multiple of k, so a quotient or remainder question has a remainder."""
    while True:
        n, k = r.randint(lo, hi), r.randint(klo, khi)
        if n % k:
            return n, k


def _one(q: str, expr: str, value: int, plan: str) -> Draft:
    return Draft(q, value, plan, [calc(expr, value)])


# -- train families -------------------------------------------------------------------------------
@family("arithmetic")
def _warehouse_shipping(r: random.Random) -> Draft:
    a, b, t = r.randint(120, 980), r.randint(12, 96), r.randint(3, 29)
    c = r.randint(200, a * b // 2)
    items = pick(r, ("jars", "tins", "bottles", "cartons of juice"))
    return _one(f"A warehouse stores {a} crates, each holding {b} {items}. {t} trucks carry away "
                f"{c} {items} in total. How many {items} remain in the warehouse?",
                f"{a} * {b} - {c}", a * b - c,
                f"Multiply {a} crates by {b} {items} each, then subtract the {c} carried away. "
                f"The {t} trucks do not change the count.")


@family("arithmetic")
def _fuel_left(r: random.Random) -> Draft:
    a, b = r.randint(5000, 9800), r.randint(12, 85)
    c = r.randint(25, min(60, (a - 100) // b))
    return _one(f"How many liters of fuel are left in the tanker? It began the day with {a} liters "
                f"and then filled {b} cars with {c} liters each.",
                f"{a} - {b} * {c}", a - b * c,
                f"Start from {a} liters and subtract {b} cars times {c} liters.")


@family("arithmetic")
def _concert_revenue(r: random.Random) -> Draft:
    a, p, b, q = r.randint(120, 950), r.randint(25, 95), r.randint(110, 900), r.randint(12, 48)
    seats = r.randint(a + b, a + b + 2000)
    return _one(f"A concert hall with {seats} seats sold {a} tickets at {p} dollars and {b} "
                f"tickets at {q} dollars. What was the total ticket revenue, in dollars?",
                f"{a} * {p} + {b} * {q}", a * p + b * q,
                f"Add {a} tickets times {p} dollars to {b} tickets times {q} dollars. The {seats} "
                f"seats are not needed.")


@family("arithmetic")
def _booklets_quotient(r: random.Random) -> Draft:
    n, k = _not_multiple(r, 1000, 9999, 12, 64)
    return _one(f"A copy shop prints {n} pages and binds them into booklets of {k} pages each. How "
                f"many complete booklets can it bind?",
                f"{n} // {k}", n // k,
                f"Only whole booklets count: integer-divide {n} pages by {k}.")


@family("arithmetic")
def _teams_remainder(r: random.Random) -> Draft:
    n, k = _not_multiple(r, 1000, 9999, 12, 48)
    return _one(f"{n} volunteers are split into teams of {k}. After as many full teams as possible "
                f"are formed, how many volunteers are left without a team?",
                f"{n} % {k}", n % k,
                f"The volunteers left over are the remainder of {n} divided by {k}.")


@family("arithmetic")
def _voters_percent(r: random.Random) -> Draft:
    p, k = _percent(r, 1000, 9999, 11, 89)
    return _one(f"{p} people live in a town, and {k} percent of them voted in the election. How "
                f"many people voted?",
                f"{p} * {k} / 100", p * k // 100,
                f"Take {k}% of {p}: multiply {p} by {k} and divide by 100.")


@family("arithmetic")
def _sale_price(r: random.Random) -> Draft:
    p, k = _percent(r, 120, 4999, 5, 60)
    item = pick(r, ("sofa", "bicycle", "television", "guitar", "laptop", "washing machine"))
    return _one(f"A {item} is priced at {p} dollars. During a sale its price is cut by {k}%. How "
                f"many dollars does the {item} cost in the sale?",
                f"{p} - {p} * {k} / 100", p - p * k // 100,
                f"Subtract {k}% of {p} from {p}.")


@family("arithmetic")
def _staff_growth(r: random.Random) -> Draft:
    a, k = _percent(r, 1000, 9999, 3, 45)
    return _one(f"Last year a company employed {a} people. This year its staff grew by {k} "
                f"percent. How many people does the company employ now?",
                f"{a} + {a} * {k} / 100", a + a * k // 100,
                f"Add {k}% of {a} to {a}.")


@family("arithmetic")
def _trip_hours(r: random.Random) -> Draft:
    v, t = r.randint(45, 180), r.randint(12, 60)
    return _one(f"A freight train covers {v * t} kilometers at a steady {v} kilometers per hour. "
                f"How many hours does the journey take?",
                f"{v * t} / {v}", t,
                f"Time is distance over speed: divide {v * t} kilometers by {v}.")


@family("arithmetic")
def _flour_to_buy(r: random.Random) -> Draft:
    g, n = r.randint(180, 650), r.randint(12, 95)
    w = r.randint(500, g * n - 100)
    return _one(f"A baker needs {g} grams of flour for each cake and has orders for {n} cakes. The "
                f"pantry already holds {w} grams. How many more grams of flour must the baker "
                f"buy?",
                f"{n} * {g} - {w}", n * g - w,
                f"Flour needed is {n} cakes times {g} grams; subtract the {w} grams already there.")


@family("arithmetic")
def _festival_minutes(r: random.Random) -> Draft:
    n, m, b = r.randint(12, 40), r.randint(85, 175), r.randint(10, 45)
    return _one(f"A film festival screens {n} films, each {m} minutes long, with a {b}-minute "
                f"break between one film and the next. How many minutes does the whole programme "
                f"last?",
                f"{n} * {m} + ({n} - 1) * {b}", n * m + (n - 1) * b,
                f"{n} films of {m} minutes, plus {n} - 1 breaks of {b} minutes.")


@family("arithmetic")
def _overtime_pay(r: random.Random) -> Draft:
    name = pick(r, PEOPLE)
    rate = r.randint(18, 65)
    o, h, x = rate + r.randint(8, 30), r.randint(380, 520), r.randint(12, 95)
    return _one(f"{name} is paid {rate} dollars an hour for regular work and {o} dollars an hour "
                f"for overtime. Last quarter {name} worked {h} regular hours and {x} overtime "
                f"hours. What was {name}'s pay for the quarter, in dollars?",
                f"{h} * {rate} + {x} * {o}", h * rate + x * o,
                f"Regular pay is {h} hours times {rate}, overtime pay is {x} hours times {o}; add "
                f"them.")


@family("arithmetic")
def _depot_compare(r: random.Random) -> Draft:
    a = r.randint(3000, 9999)
    b = r.randint(1000, a - 100)
    return _one(f"The north depot holds {a} pallets and the south depot holds {b} pallets. How "
                f"many more pallets are in the north depot?",
                f"{a} - {b}", a - b,
                f"Subtract the south depot's {b} from the north depot's {a}.")


@family("arithmetic")
def _museum_visitors(r: random.Random) -> Draft:
    a, b, c = (r.randint(1000, 9999) for _ in range(3))
    return _one(f"On Friday a museum counted {a} visitors, on Saturday {b}, and on Sunday {c}. How "
                f"many visitors came over the three days?",
                f"{a} + {b} + {c}", a + b + c,
                f"Add the three days: {a}, {b} and {c}.")


@family("arithmetic")
def _runner_average(r: random.Random) -> Draft:
    a, b, c = (r.randint(2000, 9999) for _ in range(3))
    d = r.randint(2003, 9999)
    d -= (a + b + c + d) % 4
    return _one(f"Over four training sessions a runner covered {a}, {b}, {c} and {d} meters. What "
                f"was the average distance per session, in meters?",
                f"({a} + {b} + {c} + {d}) / 4", (a + b + c + d) // 4,
                f"Add the four distances {a}, {b}, {c} and {d}, then divide by 4.")


@family("arithmetic")
def _field_area(r: random.Random) -> Draft:
    w, ln, t = r.randint(45, 380), r.randint(60, 990), r.randint(2, 9)
    return _one(f"A farmer who owns {t} tractors has a rectangular field measuring {w} meters by "
                f"{ln} meters. What is the area of the field in square meters?",
                f"{w} * {ln}", w * ln,
                f"Area is width times length: {w} times {ln}. The {t} tractors do not matter.")


@family("arithmetic")
def _fence_gate(r: random.Random) -> Draft:
    w, ln, g = r.randint(25, 450), r.randint(30, 900), r.randint(2, 9)
    return _one(f"How many meters of fence are needed to enclose a rectangular yard {w} meters "
                f"wide and {ln} meters long, if a {g}-meter opening is left for the gate?",
                f"2 * ({w} + {ln}) - {g}", 2 * (w + ln) - g,
                f"The perimeter is 2 times ({w} + {ln}); leave out the {g} meters of the gate.")


@family("arithmetic")
def _tank_minutes(r: random.Random) -> Draft:
    rate, t, s = r.randint(12, 95), r.randint(15, 120), r.randint(100, 3000)
    c = s + rate * t
    return _one(f"A pump delivers {rate} liters per minute into a tank that holds {c} liters and "
                f"already contains {s} liters. How many minutes until the tank is full?",
                f"({c} - {s}) / {rate}", t,
                f"The tank still needs {c} - {s} liters; divide that by {rate} liters per minute.")


@family("arithmetic")
def _notebook_change(r: random.Random) -> Draft:
    name, n, p = pick(r, PEOPLE), r.randint(12, 48), r.randint(65, 399)
    b = (n * p // 1000 + 1) * 1000
    return _one(f"{name} buys {n} notebooks at {p} cents each and pays with {b} cents. How many "
                f"cents of change does {name} get back?",
                f"{b} - {n} * {p}", b - n * p,
                f"The notebooks cost {n} times {p} cents; subtract that from the {b} paid.")


@family("arithmetic")
def _shop_week_stock(r: random.Random) -> Draft:
    a, b, c, e = r.randint(1000, 4000), r.randint(3, 12), r.randint(120, 480), r.randint(5, 7)
    d = r.randint(110, min(400, (a + b * c) // e - 1))
    return _one(f"At the start of the week a shop had {a} cans of soup. It then received {b} "
                f"deliveries of {c} cans each and sold {d} cans a day for {e} days. How many cans "
                f"does it have at the end?",
                f"{a} + {b} * {c} - {d} * {e}", a + b * c - d * e,
                f"Start with {a}, add {b} deliveries times {c} cans, subtract {d} cans times {e} "
                f"days.")


@family("arithmetic")
def _loan_installment(r: random.Random) -> Draft:
    n, pay = pick(r, (12, 18, 24, 36, 48, 60)), r.randint(85, 990)
    return _one(f"A loan of {n * pay} dollars is paid back in {n} equal monthly installments. How "
                f"many dollars is each installment?",
                f"{n * pay} / {n}", pay,
                f"Divide the {n * pay} dollars by {n} installments.")


@family("arithmetic")
def _pizza_split(r: random.Random) -> Draft:
    while True:
        k, n, p = r.randint(6, 24), r.randint(8, 40), r.randint(11, 29)
        if n * p % k == 0:
            break
    return _one(f"{k} coworkers order {n} pizzas at {p} dollars each and split the bill evenly. "
                f"How many dollars does each coworker pay?",
                f"{n} * {p} / {k}", n * p // k,
                f"The bill is {n} pizzas times {p} dollars; divide it by the {k} coworkers.")


@family("arithmetic")
def _hiker_altitude(r: random.Random) -> Draft:
    a, b = r.randint(200, 2500), r.randint(300, 1900)
    c = r.randint(100, a + b - 50)
    return _one(f"A hiker starts at {a} meters above sea level, climbs {b} meters, and then "
                f"descends {c} meters. At what altitude, in meters, does the hike end?",
                f"{a} + {b} - {c}", a + b - c,
                f"Start at {a}, add the {b} climbed, subtract the {c} descended.")


@family("arithmetic")
def _honey_sales(r: random.Random) -> Draft:
    name, age, h = pick(r, PEOPLE), r.randint(23, 71), r.randint(4, 38)
    a, p = r.randint(120, 950), r.randint(7, 24)
    return _one(f"{name} is {age} years old and keeps {h} beehives. This season {name} sold {a} "
                f"jars of honey at {p} dollars per jar. How many dollars did the honey bring in?",
                f"{a} * {p}", a * p,
                f"Multiply {a} jars by {p} dollars. The age {age} and the {h} hives are not "
                f"needed.")


@family("arithmetic")
def _factory_output(r: random.Random) -> Draft:
    s, u, d = r.randint(2, 4), r.randint(120, 890), r.randint(12, 90)
    return _one(f"A factory runs {s} shifts a day, and each shift assembles {u} units. How many "
                f"units does it assemble in {d} days?",
                f"{s} * {u} * {d}", s * u * d,
                f"Multiply {s} shifts by {u} units by {d} days.")


@family("arithmetic")
def _bus_count(r: random.Random) -> Draft:
    s, c = _not_multiple(r, 150, 2400, 28, 64)
    return _one(f"{s} students are going on a field trip, and each bus seats {c} students. How "
                f"many buses are needed so that every student has a seat?",
                f"ceil({s} / {c})", -(-s // c),
                f"Divide {s} students by {c} seats and round up: a partly full bus is still "
                f"needed.")


@family("arithmetic")
def _original_price(r: random.Random) -> Draft:
    while True:
        o, k = r.randint(40, 2000), pick(r, (10, 15, 20, 25, 30, 40, 50, 60, 75))
        if o * (100 - k) % 100 == 0:
            break
    p = o * (100 - k) // 100
    item = pick(r, ("jacket", "lamp", "camera", "tent", "printer"))
    return _one(f"After a {k}% discount, a {item} costs {p} dollars. What was its price before the "
                f"discount, in dollars?",
                f"{p} * 100 / (100 - {k})", o,
                f"{p} dollars is {100 - k}% of the old price: multiply by 100 and divide by "
                f"100 - {k}.")


@family("arithmetic")
def _profit_ratio(r: random.Random) -> Draft:
    x, y = r.sample(range(2, 10), 2)
    unit = r.randint(120, 1500)
    a = unit * (x + y)
    return _one(f"Two partners split a profit of {a} dollars in the ratio {x} to {y}. How many "
                f"dollars does the partner with the larger share receive?",
                f"{a} * {max(x, y)} / ({x} + {y})", unit * max(x, y),
                f"The larger share is {max(x, y)} parts of {x} + {y}: {a} times {max(x, y)} "
                f"divided by {x + y}.")


@family("arithmetic")
def _vineyard_bunches(r: random.Random) -> Draft:
    rows, v, g, s = r.randint(12, 60), r.randint(15, 80), r.randint(6, 25), r.randint(50, 900)
    return _one(f"A vineyard has {rows} rows of {v} vines. Every vine yields {g} bunches of "
                f"grapes, and {s} bunches spoil before harvest. How many bunches are left to "
                f"sell?",
                f"{rows} * {v} * {g} - {s}", rows * v * g - s,
                f"Multiply {rows} rows by {v} vines by {g} bunches, then subtract the {s} "
                f"spoiled.")


@family("arithmetic")
def _coin_jar(r: random.Random) -> Draft:
    q, d = r.randint(120, 990), r.randint(110, 990)
    return _one(f"A jar contains {q} quarters and {d} dimes. How many cents is that altogether?",
                f"{q} * 25 + {d} * 10", q * 25 + d * 10,
                f"A quarter is 25 cents and a dime 10: {q} times 25 plus {d} times 10.")


@family("arithmetic")
def _simple_interest(r: random.Random) -> Draft:
    p, rate, t = r.randint(10, 99) * 100, r.randint(2, 9), r.randint(2, 15)
    return _one(f"{p} dollars are deposited at {rate} percent simple interest per year. How many "
                f"dollars of interest does the deposit earn in {t} years?",
                f"{p} * {rate} * {t} / 100", p * rate * t // 100,
                f"Interest is {p} times {rate}% times {t} years: {p} * {rate} * {t} / 100.")


@family("arithmetic")
def _essay_grading(r: random.Random) -> Draft:
    a, b = r.randint(110, 480), r.randint(100, 600)
    return _one(f"A teacher grades {a} essays on Monday, twice as many on Tuesday, and {b} on "
                f"Wednesday. How many essays does the teacher grade in those three days?",
                f"{a} + 2 * {a} + {b}", 3 * a + b,
                f"Monday {a}, Tuesday 2 times {a}, Wednesday {b}; add them.")


@family("arithmetic")
def _pages_per_day(r: random.Random) -> Draft:
    name, d, per = pick(r, PEOPLE), r.randint(12, 45), r.randint(14, 60)
    return _one(f"{name} wants to finish a {d * per}-page novel in {d} days, reading the same "
                f"number of pages every day. How many pages a day is that?",
                f"{d * per} / {d}", per,
                f"Divide the {d * per} pages evenly over {d} days.")


# -- held-out families (see suite.HELDOUT): the same skills in wordings training never shows ----
@family("arithmetic")
def _chair_rows(r: random.Random) -> Draft:
    s, k = _not_multiple(r, 1000, 9999, 14, 60)
    return _one(f"How many full rows of chairs can an event planner set out with {s} chairs, "
                f"putting {k} chairs in each row?",
                f"{s} // {k}", s // k,
                f"Only full rows count: integer-divide {s} chairs by {k}.")


@family("arithmetic")
def _manuscript_sections(r: random.Random) -> Draft:
    n, k = _not_multiple(r, 1000, 9999, 12, 75)
    return _one(f"A writer divides a {n}-page manuscript into sections of {k} pages, and the final "
                f"section holds whatever pages remain. How many pages are in the final section?",
                f"{n} % {k}", n % k,
                f"The final section is the remainder of {n} divided by {k}.")


@family("arithmetic")
def _take_home_pay(r: random.Random) -> Draft:
    name = pick(r, PEOPLE)
    s, t = _percent(r, 1800, 9800, 8, 35)
    return _one(f"{name}'s gross monthly salary is {s} dollars, and {t}% of it is withheld for "
                f"taxes. How many dollars does {name} take home each month?",
                f"{s} - {s} * {t} / 100", s - s * t // 100,
                f"Subtract {t}% of {s} from {s}.")


@family("arithmetic")
def _overdraft(r: random.Random) -> Draft:
    a, b = r.randint(300, 2500), r.randint(800, 2500)
    c = r.randint(max(150, a - b + 1), 1900 + max(0, a - b))
    return _one(f"A checking account holds {a} dollars. Its owner pays a rent check of {b} dollars "
                f"and a repair bill of {c} dollars. What is the balance now, in dollars, if it may "
                f"go below zero?",
                f"{a} - {b} - {c}", a - b - c,
                f"Subtract both payments, {b} and {c}, from {a}; the result is negative.")


@family("arithmetic")
def _parking_fee(r: random.Random) -> Draft:
    f, g, h = r.randint(12, 35), r.randint(6, 19), r.randint(10, 72)
    return _one(f"A parking garage charges {f} dollars for the first hour and {g} dollars for "
                f"every hour after that. What does it cost to park there for {h} hours?",
                f"{f} + ({h} - 1) * {g}", f + (h - 1) * g,
                f"The first hour is {f}; the other {h} - 1 hours cost {g} each.")


@family("arithmetic")
def _paint_cans(r: random.Random) -> Draft:
    while True:
        c, w, h = r.randint(11, 40), r.randint(12, 95), r.randint(3, 12)
        if w * h % c:
            break
    return _one(f"One can of paint covers {c} square meters. How many cans must be bought to paint "
                f"a wall that measures {w} by {h} meters?",
                f"ceil({w} * {h} / {c})", -(-w * h // c),
                f"The wall is {w} times {h} square meters; divide by {c} and round up.")


@family("arithmetic")
def _library_fines(r: random.Random) -> Draft:
    f, k, d = r.randint(15, 75), r.randint(12, 95), r.randint(3, 40)
    return _one(f"A library charges {f} cents for each day a book is late. {k} books come back {d} "
                f"days late each. How many cents are owed in fines?",
                f"{f} * {k} * {d}", f * k * d,
                f"Multiply {f} cents by {k} books by {d} days.")


@family("arithmetic")
def _food_drive(r: random.Random) -> Draft:
    a, b, k = r.randint(200, 1999), r.randint(200, 1999), r.randint(3, 12)
    c = r.randint(212, 1999)
    c -= (a + b + c) % k
    return _one(f"Three classes collected {a}, {b} and {c} cans for a food drive. The cans are "
                f"shared equally among {k} shelters. How many cans does each shelter receive?",
                f"({a} + {b} + {c}) / {k}", (a + b + c) // k,
                f"Add {a}, {b} and {c}, then divide by {k} shelters.")


@family("arithmetic")
def _bike_shops(r: random.Random) -> Draft:
    while True:
        a, p, b, q = (r.randint(120, 900), r.randint(150, 990), r.randint(100, 900),
                      r.randint(150, 990))
        if a * p > b * q:
            break
    return _one(f"By how many dollars does the first shop's revenue exceed the second's? The first "
                f"shop sold {a} bikes at {p} dollars each, and the second sold {b} bikes at {q} "
                f"dollars each.",
                f"{a} * {p} - {b} * {q}", a * p - b * q,
                f"First shop {a} times {p}, second shop {b} times {q}; subtract the second from "
                f"the first.")


@family("arithmetic")
def _track_laps(r: random.Random) -> Draft:
    length, n, m = r.randint(180, 480), r.randint(12, 60), r.randint(100, 999)
    return _one(f"A running track is {length} meters around. A runner completes {n} laps and then "
                f"jogs {m} more meters to cool down. How many meters does the runner cover?",
                f"{length} * {n} + {m}", length * n + m,
                f"{n} laps of {length} meters, plus the {m} meters of cool-down.")


@family("arithmetic")
def _pencils_left(r: random.Random) -> Draft:
    while True:
        a, b, c, d = r.randint(20, 90), r.randint(12, 48), r.randint(10, 60), r.randint(6, 24)
        e, f = r.randint(15, 60), r.randint(8, 30)
        if a * b > e * f:
            break
    return _one(f"A school buys {a} boxes of {b} pencils and {c} boxes of {d} erasers, then hands "
                f"out {e} pencils to each of {f} classrooms. How many pencils are left?",
                f"{a} * {b} - {e} * {f}", a * b - e * f,
                f"Pencils bought: {a} times {b}; handed out: {e} times {f}; subtract. The erasers "
                f"do not matter.")


@family("arithmetic")
def _cargo_weight(r: random.Random) -> Draft:
    a, b, c = r.randint(12, 90), r.randint(120, 900), r.randint(20, 150)
    d, e = r.randint(25, 80), r.randint(150, 900)
    return _one(f"What is the total weight, in kilograms? A cargo plane carries {a} crates of {b} "
                f"kilograms each, {c} sacks of {d} kilograms each, and a {e}-kilogram pallet "
                f"jack.",
                f"{a} * {b} + {c} * {d} + {e}", a * b + c * d + e,
                f"Crates {a} times {b}, sacks {c} times {d}, plus the {e}-kilogram jack.")

"""Arithmetic and algebra question-answer pairs in the style of DeepMind Mathematics (Saxton et al., 2019).

The default corpus needs a mathematics domain and nothing but package managers is reachable, so the problems are
generated: a few modules of the original (arithmetic, algebra, polynomials, calculus, numbers, comparison,
measurement) with their question wordings, expressions written as Python reads them (`3*x**2 - 4`), and answers
computed exactly (integers and `fractions.Fraction`, never floats). A seed fixes the whole stream.

    mixtral data math --seed 0 --documents 3 --problems 4
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from mixtral.errors import InputError
from mixtral.io.files import atomic_open

VARIABLES = "abcdfghjklmnpqrstuvwxyz"  # no e (Euler), i (imaginary), o (looks like 0)


@dataclass(frozen=True)
class Problem:
    module: str  # DeepMind's module name, e.g. "algebra__linear_1d"
    question: str
    answer: str


# ---- formatting ------------------------------------------------------------------------------------------------

def number(x: int | Fraction) -> str:
    """An exact number as text: 7, -3, 2.25 (a terminating decimal), or 2/3."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    twos = fives = 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    places = max(twos, fives)
    digits = str(abs(x.numerator) * 10 ** places // x.denominator).rjust(places + 1, "0")
    return f"{'-' if x < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def polynomial(coefficients: list[int], var: str) -> str:
    """[c0, c1, c2] -> "c2*x**2 + c1*x + c0", highest power first, zero terms left out ("0" if all are zero)."""
    terms = []
    for power in range(len(coefficients) - 1, -1, -1):
        c = coefficients[power]
        if c == 0:
            continue
        body = "" if power == 0 else var if power == 1 else f"{var}**{power}"
        magnitude = str(abs(c)) if power == 0 or abs(c) != 1 else ""
        term = f"{magnitude}*{body}" if magnitude and body else magnitude or body
        terms.append((c < 0, term))
    if not terms:
        return "0"
    first_negative, first = terms[0]
    text = f"-{first}" if first_negative else first
    for negative, term in terms[1:]:
        text += f" - {term}" if negative else f" + {term}"
    return text


def _decimal(rng: random.Random, places: int, limit: int) -> Fraction:
    return Fraction(rng.randint(-limit * 10 ** places, limit * 10 ** places), 10 ** places)


def _operand(rng: random.Random) -> Fraction:
    """An integer most of the time, sometimes a decimal with one or two places."""
    kind = rng.random()
    if kind < 0.6:
        return Fraction(rng.randint(-999, 999))
    if kind < 0.85:
        return _decimal(rng, 1, 99)
    return _decimal(rng, 2, 9)


def _paren(x: Fraction) -> str:
    return f"({number(x)})" if x < 0 else number(x)


# ---- modules ---------------------------------------------------------------------------------------------------

def arithmetic_add_or_sub(rng: random.Random) -> Problem:
    a, b = _operand(rng), _operand(rng)
    if rng.random() < 0.5:
        question = rng.choice([f"What is {number(a)} + {_paren(b)}?", f"Add {number(a)} and {number(b)}.",
                               f"Calculate {number(a)} + {_paren(b)}.", f"Sum {number(a)} and {number(b)}."])
        return Problem("arithmetic__add_or_sub", question, number(a + b))
    question = rng.choice([f"What is {number(a)} - {_paren(b)}?", f"Subtract {number(b)} from {number(a)}.",
                           f"Calculate {number(a)} - {_paren(b)}.", f"What is {number(b)} less than {number(a)}?"])
    return Problem("arithmetic__add_or_sub", question, number(a - b))


def arithmetic_mul(rng: random.Random) -> Problem:
    a = _operand(rng) if rng.random() < 0.5 else Fraction(rng.randint(-99, 99))
    b = Fraction(rng.randint(-99, 99))
    question = rng.choice([f"What is {number(a)} times {number(b)}?", f"Multiply {number(a)} and {number(b)}.",
                           f"Calculate {number(a)}*{_paren(b)}.", f"Product of {number(a)} and {number(b)}."])
    return Problem("arithmetic__mul", question, number(a * b))


def arithmetic_div(rng: random.Random) -> Problem:
    divisor = rng.choice([d for d in range(-60, 61) if d not in (0, 1)])
    quotient = rng.randint(-400, 400)
    a = divisor * quotient
    question = rng.choice([f"Divide {a} by {divisor}.", f"What is {a} divided by {divisor}?",
                           f"Calculate {a}/{_paren(Fraction(divisor))}.", f"{a} divided by {divisor}"])
    return Problem("arithmetic__div", question, str(quotient))


def _expression(rng: random.Random, depth: int) -> tuple[str, Fraction]:
    """(text, value) of a random expression of small integers with + - * / and parentheses."""
    if depth == 0 or rng.random() < 0.3:
        value = Fraction(rng.randint(-20, 20))
        return _paren(value), value
    left, a = _expression(rng, depth - 1)
    right, b = _expression(rng, depth - 1)
    op = rng.choice("+-*/" if b != 0 else "+-*")
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
    return f"({left} {op} {right})" if depth < 3 else f"{left} {op} {right}", value


def arithmetic_mixed(rng: random.Random) -> Problem:
    while True:
        text, value = _expression(rng, 3)
        if value.denominator == 1 and " " in text and abs(value) < 10 ** 6:  # integer, at least one operator
            break
    question = rng.choice([f"Evaluate {text}.", f"What is the value of {text}?", f"Calculate {text}.",
                           f"What is {text}?"])
    return Problem("arithmetic__mixed", question, number(value))


def algebra_linear_1d(rng: random.Random) -> Problem:
    x = rng.choice(VARIABLES)
    solution = rng.randint(-30, 30)
    a = rng.choice([c for c in range(-12, 13) if c != 0])
    b, c = rng.randint(-99, 99), rng.choice([c for c in range(-9, 10) if c != a])
    # a*x + b = c*x + d with the solution built in.
    d = a * solution + b - c * solution
    left = polynomial([b, a], x)
    right = polynomial([d, c], x)
    question = rng.choice([f"Solve {left} = {right} for {x}.", f"Solve {right} = {left} for {x}."])
    return Problem("algebra__linear_1d", question, str(solution))


def algebra_linear_2d(rng: random.Random) -> Problem:
    x, y = rng.sample(VARIABLES, 2)
    sx, sy = rng.randint(-20, 20), rng.randint(-20, 20)
    while True:
        a, b, c, d = (rng.choice([v for v in range(-9, 10) if v != 0]) for _ in range(4))
        if a * d - b * c != 0:
            break
    first = f"{polynomial([0, a], x)} {'-' if b < 0 else '+'} {polynomial([0, abs(b)], y)} = {a * sx + b * sy}"
    second = f"{polynomial([0, c], x)} {'-' if d < 0 else '+'} {polynomial([0, abs(d)], y)} = {c * sx + d * sy}"
    target, value = rng.choice([(x, sx), (y, sy)])
    return Problem("algebra__linear_2d", f"Solve {first}, {second} for {target}.", str(value))


def polynomials_evaluate(rng: random.Random) -> Problem:
    f, x = rng.choice("fghjklmnpqrsuvw"), rng.choice(VARIABLES)
    coefficients = [rng.randint(-12, 12) for _ in range(rng.randint(2, 4))]
    coefficients[-1] = coefficients[-1] or 1
    at = rng.randint(-8, 8)
    value = sum(c * at ** p for p, c in enumerate(coefficients))
    question = rng.choice([f"Let {f}({x}) = {polynomial(coefficients, x)}. What is {f}({at})?",
                           f"Let {f}({x}) = {polynomial(coefficients, x)}. Calculate {f}({at}).",
                           f"Let {f}({x}) = {polynomial(coefficients, x)}. Give {f}({at})."])
    return Problem("polynomials__evaluate", question, str(value))


def polynomials_expand(rng: random.Random) -> Problem:
    x = rng.choice(VARIABLES)
    factors = [[rng.randint(-9, 9), rng.choice([c for c in range(-5, 6) if c != 0])] for _ in range(2)]
    product = [0, 0, 0]
    for i, p in enumerate(factors[0]):
        for j, q in enumerate(factors[1]):
            product[i + j] += p * q
    left, right = (polynomial(f, x) for f in factors)
    question = rng.choice([f"Expand ({left})*({right}).", f"Multiply out ({left})*({right})."])
    return Problem("polynomials__expand", question, polynomial(product, x))


def calculus_differentiate(rng: random.Random) -> Problem:
    x = rng.choice(VARIABLES)
    coefficients = [rng.randint(-20, 20) for _ in range(rng.randint(2, 6))]
    coefficients[-1] = coefficients[-1] or 1
    derivative = [p * c for p, c in enumerate(coefficients)][1:]
    expr = polynomial(coefficients, x)
    question = rng.choice([f"Differentiate {expr} with respect to {x}.", f"What is the derivative of {expr}?",
                           f"Find the first derivative of {expr} wrt {x}."])
    return Problem("calculus__differentiate", question, polynomial(derivative, x))


def numbers_gcd(rng: random.Random) -> Problem:
    g = rng.randint(1, 60)
    a, b = g * rng.randint(1, 80), g * rng.randint(1, 80)
    question = rng.choice([f"What is the greatest common divisor of {a} and {b}?",
                           f"Calculate the highest common factor of {a} and {b}.",
                           f"What is the highest common divisor of {a} and {b}?"])
    return Problem("numbers__gcd", question, str(math.gcd(a, b)))


def numbers_lcm(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 200), rng.randint(2, 200)
    question = rng.choice([f"What is the lowest common multiple of {a} and {b}?",
                           f"Calculate the least common multiple of {a} and {b}.",
                           f"Find the common denominator of 1/{a} and 1/{b}."])
    return Problem("numbers__lcm", question, str(a * b // math.gcd(a, b)))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def numbers_is_prime(rng: random.Random) -> Problem:
    n = rng.randint(2, 20000)
    if rng.random() < 0.4:  # primes are rare among random numbers; keep both answers common
        while not _is_prime(n):
            n += 1
    question = rng.choice([f"Is {n} a prime number?", f"Is {n} prime?", f"Is {n} composite?"])
    answer = _is_prime(n) != ("composite" in question)
    return Problem("numbers__is_prime", question, str(answer))


def numbers_div_remainder(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 100000), rng.randint(2, 500)
    question = rng.choice([f"What is the remainder when {a} is divided by {b}?",
                           f"Calculate the remainder when {a} is divided by {b}.",
                           f"What is {a} modulo {b}?"])
    return Problem("numbers__div_remainder", question, str(a % b))


def numbers_list_prime_factors(rng: random.Random) -> Problem:
    n = 1
    for _ in range(rng.randint(2, 5)):
        n *= rng.choice([2, 2, 3, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])
    factors, m, p = [], n, 2
    while m > 1:
        if m % p == 0:
            factors.append(p)
            while m % p == 0:
                m //= p
        p += 1
    return Problem("numbers__list_prime_factors", f"List the prime factors of {n}.",
                   ", ".join(map(str, factors)))


def numbers_round_number(rng: random.Random) -> Problem:
    places = {10: "ten", 100: "one hundred", 1000: "one thousand", 10000: "ten thousand", 1000000: "one million"}
    unit = rng.choice(list(places))
    while True:
        n = rng.randint(-10 ** 8, 10 ** 8)
        if n % unit * 2 != unit:  # no ties: the answer does not depend on a rounding convention
            break
    answer = round(Fraction(n, unit)) * unit
    return Problem("numbers__round_number", f"Round {n} to the nearest {places[unit]}.", str(answer))


def comparison_sort(rng: random.Random) -> Problem:
    values: list[Fraction] = []
    count = rng.randint(3, 6)
    while len(values) < count:
        v = Fraction(rng.randint(-50, 50)) if rng.random() < 0.7 else _decimal(rng, 1, 9)
        if v not in values:
            values.append(v)
    descending = rng.random() < 0.5
    listed = ", ".join(number(v) for v in values)
    order = "decreasing" if descending else "increasing"
    question = rng.choice([f"Sort {listed} in {order} order.", f"Put {listed} in {order} order."])
    return Problem("comparison__sort", question, ", ".join(number(v) for v in sorted(values, reverse=descending)))


def comparison_kth_biggest(rng: random.Random) -> Problem:
    values = rng.sample(range(-200, 200), rng.randint(3, 6))
    ordinals = ["biggest", "second biggest", "third biggest"]
    k = rng.randrange(min(3, len(values)))
    smallest = rng.random() < 0.3
    word = ordinals[k].replace("biggest", "smallest") if smallest else ordinals[k]
    answer = sorted(values, reverse=not smallest)[k]
    return Problem("comparison__kth_biggest",
                   f"What is the {word} value in {', '.join(map(str, values))}?", str(answer))


def comparison_pair(rng: random.Random) -> Problem:
    a, b = _operand(rng), _operand(rng)
    while a == b:
        b = _operand(rng)
    kind = rng.choice(["bigger", "smaller", "greater", "less"])
    if kind in ("bigger", "smaller"):
        question = f"Which is {kind}: {number(a)} or {number(b)}?"
        answer = number(max(a, b) if kind == "bigger" else min(a, b))
    else:
        question = f"Is {number(a)} {kind} than {number(b)}?"
        answer = str(a > b if kind == "greater" else a < b)
    return Problem("comparison__pair", question, answer)


# (name, plural, factor to the base unit) per quantity; conversions stay within one quantity.
UNITS = {
    "length": [("millimetre", "millimetres", 1), ("centimetre", "centimetres", 10), ("metre", "metres", 1000),
               ("kilometre", "kilometres", 1000000)],
    "mass": [("milligram", "milligrams", 1), ("gram", "grams", 1000), ("kilogram", "kilograms", 1000000),
             ("tonne", "tonnes", 1000000000)],
    "volume": [("millilitre", "millilitres", 1), ("litre", "litres", 1000)],
    "time": [("second", "seconds", 1), ("minute", "minutes", 60), ("hour", "hours", 3600), ("day", "days", 86400)],
}


def measurement_conversion(rng: random.Random) -> Problem:
    units = UNITS[rng.choice(list(UNITS))]
    (_, from_plural, from_factor), (_, to_plural, to_factor) = rng.sample(units, 2)
    amount = abs(_decimal(rng, rng.choice([0, 1, 2]), 500)) or Fraction(1)
    if number(amount * from_factor / to_factor).count("/"):
        # A larger unit into a smaller one is an integer factor, so the answer is a terminating decimal again.
        (from_plural, from_factor), (to_plural, to_factor) = (to_plural, to_factor), (from_plural, from_factor)
    question = rng.choice([f"How many {to_plural} are there in {number(amount)} {from_plural}?",
                           f"Convert {number(amount)} {from_plural} to {to_plural}.",
                           f"What is {number(amount)} {from_plural} in {to_plural}?"])
    return Problem("measurement__conversion", question, number(amount * from_factor / to_factor))


MODULES: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic__add_or_sub": arithmetic_add_or_sub,
    "arithmetic__mul": arithmetic_mul,
    "arithmetic__div": arithmetic_div,
    "arithmetic__mixed": arithmetic_mixed,
    "algebra__linear_1d": algebra_linear_1d,
    "algebra__linear_2d": algebra_linear_2d,
    "polynomials__evaluate": polynomials_evaluate,
    "polynomials__expand": polynomials_expand,
    "calculus__differentiate": calculus_differentiate,
    "numbers__gcd": numbers_gcd,
    "numbers__lcm": numbers_lcm,
    "numbers__is_prime": numbers_is_prime,
    "numbers__div_remainder": numbers_div_remainder,
    "numbers__list_prime_factors": numbers_list_prime_factors,
    "numbers__round_number": numbers_round_number,
    "comparison__sort": comparison_sort,
    "comparison__kth_biggest": comparison_kth_biggest,
    "comparison__pair": comparison_pair,
    "measurement__conversion": measurement_conversion,
}


# ---- streams and files -----------------------------------------------------------------------------------------

def problems(seed: int, modules: list[str] | None = None) -> Iterator[Problem]:
    """An endless stream of problems, modules drawn uniformly from `modules` (default: all); fixed by `seed`."""
    names = list(MODULES) if modules is None else modules
    unknown = sorted(set(names) - set(MODULES))
    if unknown or not names:
        raise InputError(f"unknown math module(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(MODULES)}")
    rng = random.Random(seed)
    while True:
        yield MODULES[rng.choice(names)](rng)


def format_document(batch: list[Problem]) -> str:
    """Problems as one training document: "Question: ...\\nAnswer: ...", separated by blank lines."""
    return "\n\n".join(f"Question: {p.question}\nAnswer: {p.answer}" for p in batch) + "\n"


def documents(seed: int, problems_per_document: int = 20) -> Iterator[str]:
    """An endless stream of documents of `problems_per_document` problems each (a worksheet per document)."""
    stream = problems(seed)
    while True:
        yield format_document([next(stream) for _ in range(problems_per_document)])


def write_jsonl(path: str | os.PathLike, seed: int, *, max_bytes: int | None = None,
                max_documents: int | None = None, problems_per_document: int = 20) -> tuple[int, int]:
    """Write documents as JSONL ({"text": ...} per line) until `max_bytes` of text or `max_documents`.

    Returns (documents, bytes of text). Written to a temporary file and renamed, so `path` is whole or absent.
    """
    if max_bytes is None and max_documents is None:
        raise InputError("write_jsonl needs max_bytes or max_documents")
    count = size = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for text in documents(seed, problems_per_document):
            if (max_documents is not None and count >= max_documents) or (max_bytes is not None and size >= max_bytes):
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
            size += len(text.encode("utf-8"))
    return count, size

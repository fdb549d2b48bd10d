"""Instruction-tuning data for the default model: questions with exact answers, built from the corpus's own
sources (the arithmetic generator `mathgen`, the system's man pages), as conversations for SFT, preference pairs for
DPO and held-out tasks for `mixtral eval chat`.

    mixtral data tasks --out data/tasks

writes (each file atomically)

    sft_train.jsonl  sft_val.jsonl    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    dpo_train.jsonl  dpo_val.jsonl    {"messages": [{"role": "user", ...}], "chosen": ..., "rejected": ...}
    eval_val.jsonl                    {"messages": [...], "answer": ..., "checker": "exact", "task": ...}
    manifest.json                     counts per task and split, the seed, the split rule

The tasks (`TASKS`, with their default shares of the SFT data):
- add_sub: "What is 37 + 45?", "Subtract 18 from 91.", ... with both operands from 0 to 99; the answer the plain
  number (negative results included);
- add_sub_3: the same with operands from 100 to 999;
- math: short-answer questions of `mathgen` (primality, comparisons, remainders, rounding, greatest common divisors),
  worded as in the pretraining corpus;
- command: "What does the command `ls` do?" -> "list directory contents", from the NAME line of the man pages in
  sections 1 and 8 of --man-dir;
- function: "What does the function `fopen` do?" -> "stream open functions", from sections 2 and 3 (the system
  calls and C library pages the pretraining corpus holds, so this asks what the model read).

The split is by content, never by draw: a question's key (the operands and operation; the mathgen question text; the
command or function name) is hashed (SHA-256) and a key falls in the held-out split when its hash is below
`VAL_SHARE`. So no held-out question, operand pair or command is ever trained on, in SFT or in DPO, and held-out
accuracy measures generalisation. Everything else is drawn from `random.Random(seed)`.

DPO's rejected replies are plausible mistakes: for arithmetic the answer off by one or ten, with two digits
swapped, or the other operation's result; for the other tasks the opposite truth value, a nearby number, or another
page's description.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixtral.data import mathgen
from mixtral.errors import InputError
from mixtral.io.files import atomic_open, write_json

VAL_SHARE = 0.05
TASKS = {"add_sub": 0.55, "add_sub_3": 0.10, "math": 0.15, "command": 0.10, "function": 0.10}
MATH_MODULES = ("numbers__is_prime", "comparison__pair", "numbers__div_remainder", "numbers__round_number",
                "numbers__gcd")
ADD = ("What is {a} + {b}?", "Calculate {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}.",
       "What is the sum of {a} and {b}?")
SUB = ("What is {a} - {b}?", "Calculate {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}.",
       "What is {b} less than {a}?")


@dataclass(frozen=True)
class Question:
    task: str
    key: str  # what decides the split
    question: str
    answer: str
    wrong: tuple[str, ...]  # plausible wrong answers for DPO, none equal to the answer


def held_out(key: str) -> bool:
    """Whether `key` belongs to the held-out split: its SHA-256 below VAL_SHARE of the range."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest < VAL_SHARE * 2 ** 64


# ---- arithmetic ------------------------------------------------------------------------------------------------

def _wrong_numbers(answer: int, other: int) -> tuple[str, ...]:
    text = str(abs(answer))
    swapped = int(text[::-1]) * (1 if answer >= 0 else -1) if len(text) > 1 and text[0] != text[-1] else None
    candidates = [answer + 1, answer - 1, answer + 10, answer - 10, swapped, other]
    return tuple(dict.fromkeys(str(c) for c in candidates if c is not None and c != answer))


def add_sub(rng: random.Random, low: int, high: int, task: str) -> Question:
    a, b = rng.randint(low, high), rng.randint(low, high)
    if rng.random() < 0.5:
        return Question(task, f"{a}+{b}", rng.choice(ADD).format(a=a, b=b), str(a + b), _wrong_numbers(a + b, a - b))
    return Question(task, f"{a}-{b}", rng.choice(SUB).format(a=a, b=b), str(a - b), _wrong_numbers(a - b, a + b))


def math_question(rng: random.Random) -> Question:
    module = rng.choice(MATH_MODULES)
    problem = mathgen.MODULES[module](rng)
    answer = problem.answer
    if answer in ("True", "False"):
        wrong: tuple[str, ...] = ("False" if answer == "True" else "True",)
    else:
        try:
            value = int(answer)
            wrong = tuple(str(v) for v in (value + 1, value - 1, value * 2 + 1) if v != value)
        except ValueError:  # a decimal or a fraction: another question's answer is wrong enough
            wrong = (str(mathgen.MODULES[module](rng).answer),)
            wrong = tuple(w for w in wrong if w != answer) or (answer + "0",)
    return Question("math", problem.question, problem.question, answer, wrong)


# ---- man pages -------------------------------------------------------------------------------------------------

# Replacements are functions so that a backslash in them is taken literally (re.sub parses string templates);
# `\e` (a literal backslash) goes last so that the backslash it leaves is not read as another escape.
ROFF_ESCAPES = [(r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d", ""), (r"\\\(em|\\\(en", "-"), (r"\\-", "-"),
                (r"\\&", ""), (r"\\\(aq", "'"), (r'\\\(lq|\\\(rq|\\\(dq', '"'), (r"\\ ", " "), (r"\\e", "\\")]
ROFF_ESCAPES = [(re.compile(pattern), lambda m, r=replacement: r) for pattern, replacement in ROFF_ESCAPES]


def unroff(text: str) -> str:
    """roff escapes out of one line: fonts, sizes, dashes, quotes, escaped spaces."""
    for pattern, replacement in ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def name_line(source: str) -> tuple[list[str], str] | None:
    """(names, description) of a man page's NAME section, or None when it has none in the usual form
    `name1, name2 \\- what they do` (possibly over several lines, with macros such as .B in between)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.match(r'^\.S[Hh]\s+"?(NAME|Name)"?\s*$', line.strip()):
            body = []
            for following in lines[i + 1:]:
                if following.startswith(".SH") or following.startswith(".Sh"):
                    break
                if following.startswith(".\\\""):
                    continue
                body.append(re.sub(r"^\.\w+\s*", "", following) if following.startswith(".") else following)
            text = unroff(" ".join(body))
            if " - " not in text:
                return None
            names, description = text.split(" - ", 1)
            names_list = [n.strip() for n in names.split(",") if n.strip()]
            description = description.strip().rstrip(".").strip()
            if not names_list or not description or any(" " in n for n in names_list):
                return None
            return names_list, description
    return None


def read_man_pages(man_dir: Path, sections: tuple[str, ...]) -> dict[str, str]:
    """{name: description} of the pages in man_dir/manN (the English ones: no locale subdirectories), each name
    of a page with several; names with more than one description are left out (ambiguous questions)."""
    found: dict[str, set[str]] = {}
    for section in sections:
        directory = man_dir / f"man{section}"
        for path in sorted(directory.glob("*")) if directory.is_dir() else []:
            try:
                raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError):
                continue
            parsed = name_line(raw.decode("utf-8", errors="replace"))
            if parsed is None:
                continue
            names, description = parsed
            for name in names:
                found.setdefault(name, set()).add(description)
    return {name: next(iter(d)) for name, d in sorted(found.items()) if len(d) == 1}


def page_question(rng: random.Random, pages: dict[str, str], names: list[str], task: str, noun: str) -> Question:
    name = rng.choice(names)
    answer = pages[name]
    others = [pages[n] for n in rng.sample(names, min(4, len(names))) if pages[n] != answer]
    wrong = [w.strip() for w in others[:2] + ([answer.rsplit(" ", 1)[0]] if " " in answer else [])]
    wrong = [w for w in wrong if w and w != answer.strip()]  # DPO refuses a pair that prefers nothing
    return Question(task, name, f"What does the {noun} `{name}` do?", answer, tuple(dict.fromkeys(wrong)))


# ---- the files -------------------------------------------------------------------------------------------------

def generators(man_dir: Path) -> dict[str, Callable[[random.Random], Question]]:
    made: dict[str, Callable[[random.Random], Question]] = {
        "add_sub": lambda rng: add_sub(rng, 0, 99, "add_sub"),
        "add_sub_3": lambda rng: add_sub(rng, 100, 999, "add_sub_3"),
        "math": math_question,
    }
    for task, sections, noun in (("command", ("1", "8"), "command"), ("function", ("2", "3"), "function")):
        pages = read_man_pages(man_dir, sections)
        if len(pages) >= 10:
            names = sorted(pages)
            made[task] = lambda rng, p=pages, n=names, t=task, w=noun: page_question(rng, p, n, t, w)
    return made


def draw(rng: random.Random, made: dict, shares: dict[str, float], count: int, val: bool,
         seen: set[str]) -> list[Question]:
    """`count` questions of the split `val`, tasks drawn by `shares`, without repeating a question in `seen`
    (which it extends). Gives up on a task after many draws that only repeat (a small held-out space)."""
    tasks = [t for t in shares if t in made]
    weights = [shares[t] for t in tasks]
    out: list[Question] = []
    misses = 0
    while len(out) < count and misses < 50 * count + 1000:
        q = made[rng.choices(tasks, weights)[0]](rng)
        if held_out(q.key) != val or q.question in seen or not q.wrong:
            misses += 1
            continue
        seen.add(q.question)
        out.append(q)
    return out


def _user(q: Question) -> list[dict]:
    return [{"role": "user", "content": q.question}]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(out: str | Path, seed: int = 0, sft_train: int = 40000, sft_val: int = 500, dpo_train: int = 8000,
          dpo_val: int = 400, eval_val: int = 1000, man_dir: str | Path = "/usr/share/man") -> dict:
    """Write the files of the module docstring into `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    made = generators(Path(man_dir))
    shares = {t: s for t, s in TASKS.items() if t in made}
    if not shares:
        raise InputError("no task could be made")
    counts: dict[str, Counter] = {}
    seen_train: set[str] = set()
    seen_val: set[str] = set()

    def conversations(questions: list[Question]) -> list[dict]:
        return [{"messages": _user(q) + [{"role": "assistant", "content": q.answer}]} for q in questions]

    def pairs(questions: list[Question]) -> list[dict]:
        return [{"messages": _user(q), "chosen": q.answer, "rejected": rng.choice(q.wrong)} for q in questions]

    # Training draws may repeat a question (seen is per file); held-out files never repeat one.
    files = {
        "sft_train.jsonl": (conversations, draw(rng, made, shares, sft_train, False, set())),
        "sft_val.jsonl": (conversations, draw(rng, made, shares, sft_val, True, seen_val)),
        "dpo_train.jsonl": (pairs, draw(rng, made, shares, dpo_train, False, seen_train)),
        "dpo_val.jsonl": (pairs, draw(rng, made, shares, dpo_val, True, seen_val)),
    }
    # The accuracy set: mostly the headline task, with every other task present.
    eval_shares = {t: (0.5 if t == "add_sub" else 0.5 / (len(shares) - 1)) for t in shares}
    eval_questions = draw(rng, made, eval_shares, eval_val, True, seen_val)
    for name, (encode, questions) in files.items():
        write_jsonl(out / name, encode(questions))
        counts[name] = Counter(q.task for q in questions)
    write_jsonl(out / "eval_val.jsonl", [{"messages": _user(q), "answer": q.answer, "checker": "exact",
                                          "task": q.task} for q in eval_questions])
    counts["eval_val.jsonl"] = Counter(q.task for q in eval_questions)
    manifest = {"seed": seed, "val_share": VAL_SHARE, "shares": shares, "man_dir": str(man_dir),
                "split": "a question's key (operands and operation; mathgen question; man page name) hashed with "
                         "SHA-256: below val_share of the range is held out",
                "counts": {name: dict(sorted(c.items())) for name, c in counts.items()}}
    write_json(out / "manifest.json", manifest)
    return manifest

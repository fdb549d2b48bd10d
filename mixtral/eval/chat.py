"""Chat task accuracy: ask an Instruct model questions in its chat format and check each greedy reply.

A task file is JSONL, one task a line:

    {"messages": [{"role": "user", "content": "What is 6 * 7?"}], "answer": "42", "checker": "number"}

`messages` is an OpenAI-style conversation ending with a user turn, encoded by `Tokenizer.encode_chat` (the
instruct format `mixtral chat` uses). The reply is decoded greedily through the KV cache (`mixtral.generate`),
batched, until </s> or `max_new_tokens`. `checker` says how the reply is compared with `answer` (CHECKERS).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from mixtral.errors import InputError
from mixtral.finetune.data import read_jsonl
from mixtral.generate import complete
from mixtral.model import Transformer

# A number as people write it: sign, thousands separators, decimals ("-1,234.5", "42", ".5").
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def first_number(text: str) -> float | None:
    """The first number written in `text` (thousands separators allowed), or None."""
    for match in NUMBER.finditer(text):
        digits = match.group().replace(",", "")
        if any(c.isdigit() for c in digits):
            return float(digits)
    return None


def check_exact(reply: str, answer: str) -> bool:
    return reply.strip() == answer.strip()


def check_number(reply: str, answer: str) -> bool:
    value, expected = first_number(reply), first_number(answer)
    return value is not None and expected is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=0.0)


def check_contains(reply: str, answer: str) -> bool:
    return answer.strip().lower() in reply.lower()


# "exact": the stripped reply is the answer; "number": the first number in the reply equals the answer's
# numerically ("42.0" and "The answer is 42." both match "42"); "contains": the answer appears in the reply,
# ignoring case.
CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "exact": check_exact, "number": check_number, "contains": check_contains,
}
DEFAULT_CHECKER = "exact"


@dataclass(frozen=True)
class ChatTask:
    messages: list[dict[str, Any]]  # the conversation, ending with a user turn
    answer: str
    checker: str = DEFAULT_CHECKER
    source: str = ""  # "path:line" of a task read from a file, for error messages


@dataclass(frozen=True)
class ChatRecord:
    task: ChatTask
    reply: str
    correct: bool


@dataclass(frozen=True)
class ChatResult:
    records: list[ChatRecord] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.records)

    @property
    def accuracy(self) -> float:
        """The share of tasks answered correctly (nan for no tasks)."""
        return self.correct / len(self.records) if self.records else float("nan")


def make_task(record: dict[str, Any], source: str = "") -> ChatTask:
    """A ChatTask from one parsed JSONL record; raises InputError (prefixed with `source`) for a bad field."""
    where = f"{source}: " if source else ""
    messages, answer = record.get("messages"), record.get("answer")
    checker = record.get("checker", DEFAULT_CHECKER)
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InputError(f"{where}\"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    if messages[-1].get("role") != "user":
        raise InputError(f"{where}\"messages\" must end with a user turn, not {messages[-1].get('role')!r}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise InputError(f"{where}\"answer\" must be a string, got {type(answer).__name__}")
    if checker not in CHECKERS:
        raise InputError(f"{where}unknown checker {checker!r} (checkers: {', '.join(CHECKERS)})")
    if checker == "number" and first_number(answer) is None:
        raise InputError(f"{where}checker \"number\" needs a number as the answer, got {answer!r}")
    return ChatTask(messages=messages, answer=answer, checker=checker, source=source)


def read_chat_tasks(path: str | os.PathLike) -> list[ChatTask]:
    """Every task of a JSONL task file (module docstring). Raises InputError naming the file and line of the first
    malformed one, or the file when it has no task."""
    tasks = [make_task(record, f"{path}:{line}") for line, record in read_jsonl(path, ["messages", "answer"])]
    if not tasks:
        raise InputError(f"{path} has no tasks")
    return tasks


def encode_task(tokenizer, task: ChatTask) -> list[int]:
    """The prompt ids of a task; the InputError of a conversation the tokenizer rejects names the task's source."""
    try:
        return tokenizer.encode_chat(task.messages)
    except InputError as e:
        raise InputError(f"{task.source or 'task'}: {e}") from None


@torch.no_grad()
def evaluate_chat(model: Transformer, tokenizer, tasks: Sequence[ChatTask], max_new_tokens: int = 32,
                  batch_size: int = 16, progress: bool = False) -> ChatResult:
    """Reply to each task greedily and check the reply with the task's checker.

    Prompts are encoded first (an error names the task before any decoding), then decoded `batch_size` at a time,
    similar lengths together (less padding in prefill). Returns a ChatResult whose records are in the order of
    `tasks`. Raises InputError for a bad batch size or a conversation the tokenizer rejects, and
    ContextLengthError for a prompt that leaves no room for `max_new_tokens`.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [encode_task(tokenizer, task) for task in tasks]
    order = sorted(range(len(tasks)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(tasks)
    for first in tqdm(range(0, len(order), batch_size), desc="chat tasks", unit="batch", disable=not progress):
        batch = order[first:first + batch_size]
        texts = complete(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, temperature=0.0,
                         eos_id=tokenizer.eos_id)
        for i, text in zip(batch, texts):
            replies[i] = text
    records = [ChatRecord(task, reply, CHECKERS[task.checker](reply, task.answer))
               for task, reply in zip(tasks, replies)]
    return ChatResult(records)

"""Fine-tuning data: conversations in OpenAI's `messages` format, encoded in the model's instruct format by the
same encoder as `mixtral chat` and `mixtral serve` (mistral-common, `Tokenizer.encode_chat`), with the assistant's
replies as the only learned tokens.

A conversation `[user, assistant, user, assistant, ...]` (a system message first is allowed) becomes
    ids     = encode_chat(messages up to each assistant turn) + reply + </s>, turn by turn
    targets = the next token where it belongs to a reply (its text and the </s> that ends it), else IGNORE
so the loss (`losses.sft_loss`) teaches the replies and their end, never the prompts. Each prompt is what
`encode_chat` gives for the conversation so far, and every earlier turn must be a prefix of it (true of
mistral-common's formats for Mixtral; checked, since a format that moved the system message would break it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch

from mixtral.data.prepare import json_lines
from mixtral.errors import InputError
from mixtral.finetune.losses import IGNORE


class Example(NamedTuple):
    ids: list[int]  # the conversation's tokens
    targets: list[int]  # per position, the next token where it is learned, else IGNORE


def encode_conversation(tokenizer, messages: Sequence[Mapping[str, Any]]) -> Example:
    """The ids and targets of one conversation (module docstring). Raises InputError for one without an
    assistant turn, an assistant turn not preceded by a user turn, or malformed messages (named by index)."""
    assistant = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"]
    if not assistant:
        raise InputError("a conversation without an assistant turn: nothing to learn")
    ids: list[int] = []
    learned: list[bool] = []
    for i in assistant:
        if i == 0 or messages[i - 1].get("role") != "user":
            raise InputError(f"message {i}: an assistant turn must follow a user turn")
        content = messages[i].get("content")
        if not isinstance(content, str):
            raise InputError(f"message {i}: field 'content' must be a str, got {type(content).__name__}")
        prompt = tokenizer.encode_chat(messages[:i])
        if prompt[:len(ids)] != ids:
            raise InputError(f"message {i}: the instruct format does not extend the conversation so far (this "
                             f"tokenizer's chat format rewrites earlier turns); cannot mask its replies")
        reply = tokenizer.encode(content, bos=False) + [tokenizer.eos_id]
        learned += [False] * (len(prompt) - len(ids)) + [True] * len(reply)
        ids = prompt + reply
    targets = [ids[t + 1] if learned[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets)


def read_jsonl(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file, each a JSON object with the `required`
    fields. Raises InputError naming the file and line for anything else."""
    for number, record in json_lines(Path(path)):
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        missing = [field for field in required if field not in record]
        if missing:
            raise InputError(f"{path}:{number}: missing field {missing[0]!r}")
        yield number, record


def read_conversations(path: str | os.PathLike, tokenizer) -> list[Example]:
    """Every conversation of a JSONL file of `{"messages": [...]}` records, encoded. Raises InputError naming the
    file and line of the first bad one."""
    examples = []
    for n, record in read_jsonl(path, ["messages"]):
        try:
            examples.append(encode_conversation(tokenizer, record["messages"]))
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}") from None
    return examples


class Packed(NamedTuple):
    """Rows of several examples each, for `Transformer.forward(ids, documents=documents)`."""
    ids: torch.Tensor  # [rows, seq_len] long; padding 0
    targets: torch.Tensor  # [rows, seq_len] long; IGNORE on prompts and padding
    documents: torch.Tensor  # [rows, seq_len] long: which example of its row each token is (padding: its own)
    truncated: int  # examples cut to seq_len


def pack(examples: Sequence[Example], seq_len: int) -> Packed:
    """Fill rows of `seq_len` tokens with whole examples, in order, first fit: an example goes in the first row
    with room for it, else a new row. An example longer than a row is cut to it (counted in `truncated`). Each
    token's document keeps attention and positions inside its own example."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    rows: list[list[Example]] = []
    room: list[int] = []
    truncated = 0
    for ex in examples:
        if len(ex.ids) > seq_len:
            ex = Example(ex.ids[:seq_len], ex.targets[:seq_len - 1] + [IGNORE])
            truncated += 1
        row = next((r for r, free in enumerate(room) if free >= len(ex.ids)), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(ex)
        room[row] -= len(ex.ids)
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    documents = torch.full((len(rows), seq_len), len(examples), dtype=torch.long)  # padding: a document of its own
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            ids[r, at:at + len(ex.ids)] = torch.tensor(ex.ids)
            targets[r, at:at + len(ex.ids)] = torch.tensor(ex.targets)
            documents[r, at:at + len(ex.ids)] = d
            at += len(ex.ids)
    return Packed(ids, targets, documents, truncated)

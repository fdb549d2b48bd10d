"""Fine-tuning data (mixtral.finetune.data): conversations encoded as `mixtral chat` encodes them, learned tokens
exactly the replies and their </s>, and bad files named by line."""
from __future__ import annotations

import json

import pytest
import torch

from mixtral.errors import InputError
from mixtral.finetune.data import Example, encode_conversation, pack, read_conversations
from mixtral.finetune.losses import IGNORE
from mixtral.io.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer()  # the Mixtral tokenizer shipped with mistral-common
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}]


def test_replies_and_their_end_are_the_only_learned_tokens():
    ex = encode_conversation(TOKENIZER, TALK)
    assert len(ex.ids) == len(ex.targets)
    # the prompt of the last turn is exactly what mixtral chat would send
    prompt = TOKENIZER.encode_chat(TALK[:4])
    assert ex.ids[:len(prompt)] == prompt
    learned = [ex.ids[t + 1] for t, target in enumerate(ex.targets) if target != IGNORE]
    assert ex.targets[-1] == IGNORE
    assert all(target in (IGNORE, ex.ids[t + 1]) for t, target in enumerate(ex.targets[:-1]))
    reply = lambda text: TOKENIZER.encode(text, bos=False) + [TOKENIZER.eos_id]  # noqa: E731
    assert learned == reply("4") + reply("6")
    assert TOKENIZER.decode(ex.ids).endswith("[/INST] 6")


def test_bad_conversations_are_named_by_line(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"messages": TALK}), "", json.dumps({"messages": TALK[:2]})]
    path.write_text("\n".join(lines))
    with pytest.raises(InputError, match=r"train.jsonl:3: a conversation without an assistant turn"):
        read_conversations(path, TOKENIZER)
    path.write_text(json.dumps({"messages": TALK}) + "\n{oops\n")
    with pytest.raises(InputError, match=r"train.jsonl:2: not valid JSON"):
        read_conversations(path, TOKENIZER)
    path.write_text(json.dumps({"conversation": TALK}))
    with pytest.raises(InputError, match=r"train.jsonl:1: missing field 'messages'"):
        read_conversations(path, TOKENIZER)
    path.write_text(json.dumps({"messages": [TALK[0], TALK[2]]}))
    with pytest.raises(InputError, match=r"train.jsonl:1: message 1: an assistant turn must follow a user turn"):
        read_conversations(path, TOKENIZER)
    path.write_text(json.dumps({"messages": TALK}))
    assert len(read_conversations(path, TOKENIZER)) == 1


def test_packing_keeps_examples_whole_and_apart():
    examples = [Example([1, 2, 3], [IGNORE, 3, IGNORE]), Example([4, 5], [5, IGNORE]),
                Example([6, 7, 8, 9, 10, 11], [7, 8, 9, 10, 11, IGNORE]), Example([12], [IGNORE])]
    packed = pack(examples, 5)
    assert packed.truncated == 1  # the 6-token example, cut to 5 (its last target dropped: past the row)
    assert packed.ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [12, 0, 0, 0, 0]]
    assert packed.targets.tolist() == [[IGNORE, 3, IGNORE, 5, IGNORE], [7, 8, 9, 10, IGNORE],
                                       [IGNORE] * 5]
    assert packed.documents.tolist() == [[0, 0, 0, 1, 1], [0] * 5, [0, 4, 4, 4, 4]]
    # the packed row's loss equals each example's on its own: the model sees them apart (tests/test_model.py)
    assert torch.equal(packed.targets != IGNORE, torch.tensor(
        [[False, True, False, True, False], [True] * 4 + [False], [False] * 5]))

"""`mixtral data tasks` (mixtral.data.tasks): answers are right, the held-out split never leaks into training,
the output is deterministic, every file parses with the readers that train and evaluate on it."""
from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from mixtral import load_tokenizer
from mixtral.cli import main
from mixtral.data import tasks
from mixtral.eval.chat import read_chat_tasks
from mixtral.finetune.data import read_conversations
from mixtral.finetune.trainer import read_pairs

PAGES = {
    "man1/ls.1.gz": '.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n.B ls\n',
    "man1/cp.1": '.TH CP 1\n.SH "NAME"\n\\fBcp\\fR \\- copy files and directories\n.SH DESCRIPTION\n',
    "man1/tar.1": ".TH TAR 1\n.SH NAME\ntar \\- an archiving utility\n.SH SYNOPSIS\n",
    "man8/mount.8": ".TH MOUNT 8\n.SH NAME\nmount \\- mount a filesystem\n.SH SYNOPSIS\n",
    "man1/noname.1": ".TH X 1\n.SH SYNOPSIS\nnothing here\n",
    "man3/fopen.3": ".TH FOPEN 3\n.SH NAME\nfopen, fdopen, freopen \\- stream open functions\n.SH SYNOPSIS\n",
}
for i in range(12):  # both tasks need ten pages at least
    PAGES[f"man1/tool{i}.1"] = f".TH T 1\n.SH NAME\ntool{i} \\- does thing number {i}\n"
    PAGES[f"man3/call{i}.3"] = f".TH C 3\n.SH NAME\ncall{i} \\- calls thing number {i}\n"


@pytest.fixture(scope="module")
def man_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("man")
    for name, text in PAGES.items():
        path = root / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, man_dir):
    out = tmp_path_factory.mktemp("tasks")
    manifest = tasks.build(out, seed=1, sft_train=600, sft_val=40, dpo_train=200, dpo_val=30, eval_val=80,
                           man_dir=man_dir)
    return out, manifest


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_man_pages_name_lines_are_read(man_dir):
    commands = tasks.read_man_pages(man_dir, ("1", "8"))
    assert commands["ls"] == "list directory contents" and commands["cp"] == "copy files and directories"
    assert commands["mount"] == "mount a filesystem" and "noname" not in commands
    functions = tasks.read_man_pages(man_dir, ("2", "3"))
    assert functions["fopen"] == functions["fdopen"] == "stream open functions" and "ls" not in functions
    assert tasks.unroff(r"\fBgrep\fR \(em print lines\e \(aqmatching\(aq") == "grep - print lines\\ 'matching'"


def test_arithmetic_answers_are_right_and_rejected_ones_wrong():
    rng = random.Random(0)
    for _ in range(300):
        q = tasks.add_sub(rng, 0, 99, "add_sub")
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", q.key).groups()
        assert int(q.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert a in q.question and b in q.question
        assert q.wrong and q.answer not in q.wrong


def test_held_out_questions_never_reach_training(built):
    out, manifest = built
    train = {r["messages"][0]["content"] for name in ("sft_train", "dpo_train") for r in _lines(out / f"{name}.jsonl")}
    held = {r["messages"][0]["content"] for name in ("sft_val", "dpo_val", "eval_val")
            for r in _lines(out / f"{name}.jsonl")}
    assert held and not train & held
    for record in _lines(out / "eval_val.jsonl"):
        if record["task"] in ("add_sub", "add_sub_3"):
            a, b = map(int, re.findall(r"\d+", record["messages"][0]["content"]))
            # "Subtract b from a" names b first: the key is one of the two orders
            assert any(tasks.held_out(f"{x}{op}{y}") for x, y in ((a, b), (b, a)) for op in "+-")
    assert set(manifest["counts"]["sft_train.jsonl"]) == set(tasks.TASKS)  # every task made, man pages included


def test_files_parse_with_the_training_and_evaluation_readers(built):
    out, manifest = built
    tokenizer = load_tokenizer("default")
    assert len(read_conversations(out / "sft_train.jsonl", tokenizer)) == 600
    pairs, _ = read_pairs(str(out / "dpo_train.jsonl"), tokenizer, 256)
    assert len(pairs) == 200
    assert all(r["chosen"] != r["rejected"] for r in _lines(out / "dpo_val.jsonl"))
    evals = read_chat_tasks(out / "eval_val.jsonl")
    assert len(evals) == 80 == sum(manifest["counts"]["eval_val.jsonl"].values())


def test_the_same_seed_writes_the_same_files(built, man_dir, tmp_path):
    out, _ = built
    tasks.build(tmp_path, seed=1, sft_train=600, sft_val=40, dpo_train=200, dpo_val=30, eval_val=80,
                man_dir=man_dir)
    for name in ("sft_train.jsonl", "dpo_val.jsonl", "eval_val.jsonl", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_the_command_writes_and_counts(tmp_path, man_dir, capsys):
    assert main(["data", "tasks", "--out", str(tmp_path), "--sft-train", "50", "--sft-val", "5", "--dpo-train", "20",
                 "--dpo-val", "5", "--eval-val", "10", "--man-dir", str(man_dir)]) == 0
    assert "sft_train.jsonl: 50" in capsys.readouterr().out
    assert len(_lines(tmp_path / "eval_val.jsonl")) == 10

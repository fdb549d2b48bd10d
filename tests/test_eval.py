"""mixtral.eval: sliding-window perplexity against plain cross-entropy and a per-token oracle, per domain and file;
chat tasks (reading, checkers, replies equal to generate's) and the `mixtral eval` commands."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtral.cli import main
from mixtral.config import PRESETS
from mixtral.errors import InputError
from mixtral.eval import (ChatTask, PerplexityResult, combine, corpus_perplexity, evaluate_chat, perplexity,
                          read_chat_tasks, score_rows, sliding_windows, text_perplexity)
from mixtral.eval.chat import CHECKERS, first_number
from mixtral.generate import generate
from mixtral.io.loading import load_tokenizer
from mixtral.model import random_model


@pytest.fixture(scope="module")
def model():
    # std 0.3, not 0.02: near-uniform logits would hide a token scored with the wrong context.
    return random_model(replace(PRESETS["tiny"], vocab_size=512), seed=3, std=0.3)


@pytest.fixture(scope="module")
def chat_model():
    return random_model(PRESETS["tiny"], seed=5, std=0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def random_ids(n: int, vocab: int = 512, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def logprob_of_last(model, ids: list[int]) -> float:
    """log p(ids[-1] | ids[:-1]) from one plain forward pass: the oracle."""
    logits = model(torch.tensor([ids[:-1]]))[0, -1].float()
    return float(torch.log_softmax(logits, -1)[ids[-1]])


# ---- perplexity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,window,stride", [(30, 8, 3), (30, 8, 8), (9, 8, 2), (2, 5, 1), (40, 7, 1)])
def test_sliding_windows_score_every_token_once_with_enough_context(n, window, stride):
    scored = []
    for start, stop, n_scored in sliding_windows(n, window, stride):
        assert stop - start <= window + 1 and 1 <= n_scored < stop - start
        for position in range(stop - n_scored, stop):
            context = position - start
            assert context <= window
            assert context >= min(position, window - stride + 1)
            scored.append(position)
    assert scored == list(range(1, n))


def test_stride_equal_to_window_is_cross_entropy_over_non_overlapping_windows(model):
    ids = random_ids(45)
    window = 8
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):  # the last window is short: 44 = 5 * 8 + 4
            chunk = torch.tensor(ids[start:start + window + 1])
            logits = model(chunk[None, :-1])[0].float()
            total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += len(chunk) - 1
    result = perplexity(model, ids, window=window, stride=window, batch_size=2)
    assert result.tokens == count == 44
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_overlapping_windows_equal_a_per_token_oracle(model):
    ids, window, stride = random_ids(33, seed=1), 8, 3
    nll = []
    for p in range(1, len(ids)):
        first = max(0, math.ceil((p - window) / stride))  # the first window that reaches token p scores it
        nll.append(-logprob_of_last(model, ids[first * stride:p + 1]))
    result = perplexity(model, ids, window=window, stride=stride, batch_size=3)
    assert result.tokens == len(nll)
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # The context matters in this model, so the test would see a wrong one.
    assert abs(result.loss - perplexity(model, ids, window=window, stride=window).loss) > 1e-3


def test_batch_size_and_input_type_do_not_change_the_result(model):
    ids = random_ids(50, seed=2)
    one = perplexity(model, ids, window=10, stride=4, batch_size=1)
    for other in (perplexity(model, np.array(ids, dtype=np.uint16), window=10, stride=4, batch_size=5),
                  perplexity(model, torch.tensor(ids), window=10, stride=4, batch_size=64)):
        assert other.tokens == one.tokens
        assert other.loss == pytest.approx(one.loss, rel=1e-6)


@pytest.mark.parametrize("ids,window,stride,batch,message", [
    ([1, 2, 3], 600, 1, 1, "window must be in"),
    ([1, 2, 3], 4, 5, 1, "stride must be in"),
    ([1, 2, 3], 4, 0, 1, "stride must be in"),
    ([1, 2, 3], 4, 2, 0, "batch_size"),
    ([1], 4, 2, 1, "at least 2 tokens"),
])
def test_perplexity_errors(model, ids, window, stride, batch, message):
    with pytest.raises(InputError, match=message):
        perplexity(model, ids, window, stride, batch)


def test_score_rows_matches_plain_forward_for_ragged_rows(model):
    rows = [random_ids(12, seed=4), random_ids(5, seed=5), random_ids(9, seed=6)]
    scores = score_rows(model, rows, [4, 1, 8])
    for row, score in zip(rows, scores):
        n = len(score.logprobs)
        with torch.no_grad():
            logits = model(torch.tensor([row[:-1]]))[0, -n:].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(row[-n:])[:, None])[:, 0]
        torch.testing.assert_close(score.logprobs, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(score.greedy, logits.argmax(-1) == torch.tensor(row[-n:]))


def _write_corpus(directory, streams: dict[str, list[int]]) -> None:
    (directory / "val").mkdir(parents=True)
    splits = {}
    for domain, ids in streams.items():
        np.array(ids, dtype="<u2").tofile(directory / "val" / f"{domain}.bin")
        splits[domain] = {"file": f"val/{domain}.bin", "tokens": len(ids)}
    (directory / "manifest.json").write_text(json.dumps({
        "format": "mixtral-token-shards", "version": 1, "dtype": "uint16", "splits": {"val": splits},
        "tokenizer": {"bos_id": 1, "eos_id": 2}}))


def test_corpus_perplexity_per_domain_and_token_weighted_all(model, tmp_path):
    streams = {"code": random_ids(40, seed=7), "web": random_ids(21, seed=8)}
    _write_corpus(tmp_path / "corpus", streams)
    results = corpus_perplexity(model, tmp_path / "corpus", "val", window=8, stride=4, batch_size=4)
    assert set(results) == {"code", "web", "all"}
    for domain, ids in streams.items():
        alone = perplexity(model, ids, 8, 4)
        assert results[domain].tokens == alone.tokens == len(ids) - 1
        assert results[domain].loss == pytest.approx(alone.loss, rel=1e-6)
    weighted = (results["code"].loss * 39 + results["web"].loss * 20) / 59
    assert results["all"].tokens == 59 and results["all"].loss == pytest.approx(weighted, rel=1e-9)
    capped = corpus_perplexity(model, tmp_path / "corpus", "val", window=8, stride=4, max_tokens=10)
    assert capped["code"].tokens == capped["web"].tokens == 9
    with pytest.raises(InputError, match="manifest.json is missing"):
        corpus_perplexity(model, tmp_path, "val", window=8, stride=4)


def test_combine_of_nothing_is_nan():
    assert combine({}).tokens == 0 and math.isnan(combine({}).loss)
    assert combine({"a": PerplexityResult(2.0, 1), "b": PerplexityResult(5.0, 2)}).loss == pytest.approx(4.0)


def test_text_perplexity_tokenizes_each_file(chat_model, tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The mixture of experts routes each token to two of eight experts.")
    b.write_text("Sparse models are fast.")
    results = text_perplexity(chat_model, tokenizer, [a, b], window=6, stride=3)
    for path in (a, b):
        alone = perplexity(chat_model, tokenizer.encode(path.read_text()), 6, 3)
        assert results[str(path)].loss == pytest.approx(alone.loss, rel=1e-6)
    assert results["all"].tokens == results[str(a)].tokens + results[str(b)].tokens
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(InputError, match="bad.txt"):
        text_perplexity(chat_model, tokenizer, [tmp_path / "bad.txt"], window=6, stride=3)


# ---- chat tasks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checker,reply,answer,correct", [
    ("exact", "  42\n", "42", True),
    ("exact", "42.", "42", False),
    ("exact", "The answer is 42", "42", False),
    ("number", "The answer is 42.", "42", True),
    ("number", "It is 42.0 apples, not 7", "42", True),
    ("number", "7 then 42", "42", False),
    ("number", "a total of 1,234 km", "1234", True),
    ("number", "-3.5 degrees", "-3.5", True),
    ("number", "no number here", "42", False),
    ("contains", "I think PARIS is right", "Paris", True),
    ("contains", "I think Lyon", "Paris", False),
])
def test_checkers(checker, reply, answer, correct):
    assert CHECKERS[checker](reply, answer) is correct


def test_first_number():
    assert first_number("x = -12,345.25 and 3") == -12345.25
    assert first_number("version 2, then 3") == 2
    assert first_number("none") is None


def _write_tasks(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


USER = [{"role": "user", "content": "What is 6 * 7?"}]


@pytest.mark.parametrize("record,message", [
    ("{not json", r"tasks.jsonl:2: "),
    ({"messages": USER}, r"tasks.jsonl:2: missing field 'answer'"),
    ({"messages": USER, "answer": "42", "checker": "fuzzy"}, r"tasks.jsonl:2: unknown checker 'fuzzy'"),
    ({"messages": USER + [{"role": "assistant", "content": "42"}], "answer": "42"},
     r"tasks.jsonl:2: \"messages\" must end with a user turn"),
    ({"messages": [], "answer": "42"}, r"tasks.jsonl:2: \"messages\" must be a non-empty list"),
    ({"messages": USER, "answer": "forty-two", "checker": "number"}, r"tasks.jsonl:2: checker \"number\" needs"),
])
def test_read_chat_tasks_errors_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "tasks.jsonl"
    _write_tasks(path, [{"messages": USER, "answer": "42"}, record])
    with pytest.raises(InputError, match=message):
        read_chat_tasks(path)


def test_read_chat_tasks_defaults_and_numbers(tmp_path):
    path = tmp_path / "tasks.jsonl"
    _write_tasks(path, [{"messages": USER, "answer": 42, "checker": "number"}, {"messages": USER, "answer": "x"}])
    tasks = read_chat_tasks(path)
    assert [(t.answer, t.checker, t.source) for t in tasks] == [("42", "number", f"{path}:1"),
                                                                 ("x", "exact", f"{path}:2")]
    path.write_text("\n")
    with pytest.raises(InputError, match="has no tasks"):
        read_chat_tasks(path)


def _conversations() -> list[list[dict]]:
    return [USER,
            [{"role": "user", "content": "Name a colour."}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Count from one to five, please, in words."}]]


def test_evaluate_chat_replies_are_generates_and_checked(chat_model, tokenizer):
    conversations = _conversations()
    prompts = [tokenizer.encode_chat(m) for m in conversations]
    outputs = generate(chat_model, prompts, 6, eos_id=tokenizer.eos_id)
    expected = [tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids) for ids in outputs]
    tasks = [ChatTask(conversations[0], expected[0]),  # exact and right
             ChatTask(conversations[1], expected[1] + " and more"),  # exact and wrong
             ChatTask(conversations[2], expected[2].strip()[:3] or "x", "contains")]
    for batch_size in (1, 2):
        result = evaluate_chat(chat_model, tokenizer, tasks, max_new_tokens=6, batch_size=batch_size)
        assert [r.reply for r in result.records] == expected
        assert [r.correct for r in result.records] == [True, False, bool(expected[2].strip())]
        assert result.accuracy == pytest.approx(result.correct / 3)
        assert [r.task for r in result.records] == tasks


def test_evaluate_chat_errors(chat_model, tokenizer):
    with pytest.raises(InputError, match="batch_size"):
        evaluate_chat(chat_model, tokenizer, [ChatTask(USER, "42")], batch_size=0)
    bad = ChatTask([{"role": "user", "content": 3}], "42", source="t.jsonl:7")
    with pytest.raises(InputError, match="t.jsonl:7"):
        evaluate_chat(chat_model, tokenizer, [bad])
    assert math.isnan(evaluate_chat(chat_model, tokenizer, []).accuracy)


# ---- the commands ----------------------------------------------------------------------------------------------

def test_eval_chat_command_writes_results(tmp_path, capsys):
    tasks, out = tmp_path / "tasks.jsonl", tmp_path / "results.jsonl"
    _write_tasks(tasks, [{"messages": USER, "answer": "42", "checker": "number"},
                         {"messages": _conversations()[1], "answer": "red", "checker": "contains"}])
    assert main(["eval", "chat", "--model", "tiny", str(tasks), "-n", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == [f"{tasks}:1", f"{tasks}:2"]
    assert all(set(r) >= {"reply", "correct", "answer", "checker", "messages"} for r in records)


def test_eval_perplexity_command(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("Mixtral has eight experts per layer and routes each token to two of them.")
    assert main(["eval", "perplexity", "--model", "tiny", str(text), "--window", "8", "--stride", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["window"], report["stride"]) == (8, 4)
    assert set(report["results"]) == {str(text), "all"}
    assert report["results"]["all"]["ppl"] == pytest.approx(math.exp(report["results"]["all"]["loss"]))


def test_eval_command_errors(tmp_path, capsys):
    assert main(["eval", "perplexity", "--model", "tiny"]) == 1
    assert "either text FILEs or --corpus" in capsys.readouterr().err
    (tmp_path / "t.jsonl").write_text('{"messages": [], "answer": "1"}\n')
    assert main(["eval", "chat", "--model", "tiny", str(tmp_path / "t.jsonl")]) == 1
    assert "t.jsonl:1:" in capsys.readouterr().err
    assert main(["eval", "harness"]) == 1
    for kind in ("perplexity", "chat", "harness"):
        assert main(["eval", kind, "--help"]) == 0
        assert "examples:" in capsys.readouterr().out

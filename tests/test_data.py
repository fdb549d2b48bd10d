"""mixtral.data: prepare round trips text -> shards -> text, the split and batches are deterministic, the reader
and the CLI report every bad input, and the math generator's answers are right."""
from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral.cli import main
from mixtral.data import Source, TokenShards, prepare, read_manifest
from mixtral.data import mathgen
from mixtral.data.prepare import split_hash
from mixtral.data.shards import FORMAT, VERSION
from mixtral.errors import InputError
from mixtral.io.tokenizer import load_tokenizer

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _corpus(root: Path) -> dict[str, list[str]]:
    """Write a small corpus of three domains under `root`; returns domain -> documents in prepare's order."""
    en = {"a.txt": "The mixture of experts routes each token to two of eight experts.\n",
          "b.md": "# Title\n\n  Indented line, trailing spaces  \n\n\nand \ttabs, <s> [INST] not control.",
          "sub/c.txt": "Ünïcödé: 中文, emoji 🙂, nbsp\u00a0here, CRLF\r\nend"}
    code = {"x.py": "def f(x):\n    return x * 2\n", "pkg/y.py": "import os\n\nprint(os.sep)\n"}
    chat = [f"line {i}: {'é' * (i % 3)} {i * 'word '}" for i in range(1, 13)]
    for name, text in en.items():
        _write(root / "en" / name, text)
    for name, text in code.items():
        _write(root / "code" / name, text)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(chat)]
    lines.insert(3, "")  # blank lines are skipped
    _write(root / "chat" / "data.jsonl", "\n".join(lines) + "\n")
    return {"en": [en[k] for k in sorted(en, key=lambda k: str(root / "en" / k))],
            "code": [code[k] for k in sorted(code, key=lambda k: str(root / "code" / k))],
            "chat": chat}


def _sources(root: Path) -> list[Source]:
    return [Source.parse(f"en={root}/en/**/*.*"), Source.parse(f"code={root}/code/**/*.py"),
            Source.parse(f"chat={root}/chat/*.jsonl")]


def _documents(stream: np.ndarray) -> list[list[int]]:
    """Split a shard's stream into documents; each must be BOS ... EOS with no BOS/EOS inside."""
    ids = stream.tolist()
    starts = [i for i, t in enumerate(ids) if t == BOS]
    assert starts and starts[0] == 0
    docs = []
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        doc = ids[start:end]
        assert doc[-1] == EOS and EOS not in doc[1:-1]
        docs.append(doc[1:-1])
    return docs


def _decoded(directory: Path, split: str, tokenizer) -> dict[str, list[str]]:
    shards = TokenShards(directory, split)
    return {d: [tokenizer.decode(doc) for doc in _documents(shards.stream(d))] for d in shards.domains}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """(raw root, expected documents, output directory, manifest) of the small corpus with val_fraction 0.3."""
    root = tmp_path_factory.mktemp("raw")
    expected = _corpus(root)
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    manifest = prepare(_sources(root), out, tokenizer, val_fraction=0.3)
    return root, expected, out, manifest


# ---- prepare ---------------------------------------------------------------------------------------------------

def test_round_trip_text_tokens_text(prepared, tokenizer):
    _, expected, out, _ = prepared
    train, val = _decoded(out, "train", tokenizer), _decoded(out, "val", tokenizer)
    for domain, docs in expected.items():
        got_train, got_val = train.get(domain, []), val.get(domain, [])
        assert sorted(got_train + got_val) == sorted(docs)
        # Each split keeps the input order.
        assert got_train == [d for d in docs if d in got_train]
        assert got_val == [d for d in docs if d in got_val]
    assert val, "val_fraction 0.3 of 17 documents puts some in validation"


def test_manifest_counts(prepared):
    root, expected, out, manifest = prepared
    assert read_manifest(out) == manifest
    assert manifest["format"] == FORMAT and manifest["version"] == VERSION and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["n_words"] == 32000 and manifest["tokenizer"]["bos_id"] == BOS
    assert [s["files"] for s in manifest["sources"]] == [3, 2, 1]
    for domain, docs in expected.items():
        counts = manifest["domains"][domain]
        assert counts["documents"] == len(docs)
        assert counts["bytes"] == sum(len(d.encode()) for d in docs)
        per_split = [manifest["splits"][s].get(domain) for s in ("train", "val")]
        for key in ("documents", "bytes", "tokens"):
            assert counts[key] == sum(entry[key] for entry in per_split if entry)
        for split, entry in zip(("train", "val"), per_split):
            if entry:
                assert (out / entry["file"]).stat().st_size == 2 * entry["tokens"]
                assert TokenShards(out, split).tokens(domain) == entry["tokens"]
    assert manifest["totals"]["documents"] == sum(map(len, expected.values()))
    assert manifest["totals"]["tokens"] == sum(c["tokens"] for c in manifest["domains"].values())


def test_prepare_is_deterministic_and_split_is_stable(prepared, tmp_path, tokenizer):
    root, _, out, manifest = prepared
    again = prepare(_sources(root), tmp_path / "again", tokenizer, val_fraction=0.3)
    assert again == manifest
    for split in ("train", "val"):
        for name in (out / split).iterdir():
            assert (tmp_path / "again" / split / name.name).read_bytes() == name.read_bytes()
    # Adding documents moves none of the others between splits.
    before = _decoded(out, "val", tokenizer)
    _write(root / "en" / "new.txt", "A new document.")
    with open(root / "chat" / "data.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "appended line"}) + "\n")
    try:
        prepare(_sources(root), tmp_path / "more", tokenizer, val_fraction=0.3)
    finally:
        (root / "en" / "new.txt").unlink()
        lines = (root / "chat" / "data.jsonl").read_text().splitlines()
        (root / "chat" / "data.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    after_val = _decoded(tmp_path / "more", "val", tokenizer)
    after_train = _decoded(tmp_path / "more", "train", tokenizer)
    for domain, docs in before.items():
        assert set(docs) <= set(after_val[domain])
    old_train = _decoded(out, "train", tokenizer)
    for domain, docs in old_train.items():
        assert set(docs) <= set(after_train[domain])


def test_split_seed_and_fraction(tmp_path, tokenizer):
    for i in range(200):
        _write(tmp_path / "raw" / f"{i:03d}.txt", f"document {i}")
    manifest = prepare([Source("d", str(tmp_path / "raw" / "*.txt"))], tmp_path / "a", tokenizer, val_fraction=0.1)
    val = manifest["splits"]["val"]["d"]["documents"]
    assert 5 <= val <= 40  # 20 expected
    other = prepare([Source("d", str(tmp_path / "raw" / "*.txt"))], tmp_path / "b", tokenizer, val_fraction=0.1,
                    split_seed=1)
    assert _decoded(tmp_path / "a", "val", tokenizer) != _decoded(tmp_path / "b", "val", tokenizer)
    assert split_hash(0, "x.txt", 0) == split_hash(0, "x.txt", 0) != split_hash(0, "x.txt", 1)


def test_every_domain_with_two_documents_gets_a_val_document(tmp_path, tokenizer):
    _write(tmp_path / "two" / "a.txt", "first")
    _write(tmp_path / "two" / "b.txt", "second")
    _write(tmp_path / "one" / "a.txt", "only")
    sources = [Source("two", str(tmp_path / "two" / "*.txt")), Source("one", str(tmp_path / "one" / "*.txt"))]
    manifest = prepare(sources, tmp_path / "out", tokenizer, val_fraction=1e-12)
    assert manifest["splits"]["val"] == {"two": {"file": "val/two.bin", "documents": 1,
                                                 "bytes": manifest["splits"]["val"]["two"]["bytes"],
                                                 "tokens": manifest["splits"]["val"]["two"]["tokens"]}}
    assert manifest["splits"]["train"]["one"]["documents"] == 1
    assert TokenShards(tmp_path / "out", "val").domains == ["two"]
    none = prepare(sources, tmp_path / "none", tokenizer, val_fraction=0.0)
    assert none["splits"]["val"] == {} and TokenShards(tmp_path / "none", "val").domains == []


def test_jsonl_text_field_gzip_and_blank_documents(tmp_path, tokenizer):
    import gzip

    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "zipped one"}) + "\n\n" + json.dumps({"content": "  "}) + "\n")
    _write(tmp_path / "blank.txt", " \n\t")
    manifest = prepare([Source("z", str(tmp_path / "*.jsonl.gz")), Source("z", str(tmp_path / "blank.txt"))],
                       tmp_path / "out", tokenizer, val_fraction=0.0, text_field="content")
    assert manifest["domains"]["z"]["documents"] == 1  # whitespace-only documents are skipped
    assert _decoded(tmp_path / "out", "train", tokenizer) == {"z": ["zipped one"]}


def test_force_replaces_only_a_prepared_corpus(tmp_path, tokenizer):
    _write(tmp_path / "in" / "a.txt", "text")
    source = [Source("d", str(tmp_path / "in" / "*.txt"))]
    prepare(source, tmp_path / "out", tokenizer)
    with pytest.raises(InputError, match="--force"):
        prepare(source, tmp_path / "out", tokenizer)
    prepare(source, tmp_path / "out", tokenizer, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary directories left
    _write(tmp_path / "mine" / "notes.txt", "precious")
    with pytest.raises(InputError, match="without manifest.json"):
        prepare(source, tmp_path / "mine", tokenizer, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("content, match", [
    ("{\"text\": \"ok\"}\n{\"text\": \"ok\"\n", r"bad\.jsonl:2: not valid JSON"),
    ("{\"text\": \"ok\"}\n[1, 2]\n", r"bad\.jsonl:2: expected a JSON object with a string field 'text'"),
    ("{\"body\": \"no text field\"}\n", r"bad\.jsonl:1: expected a JSON object"),
    ("{\"text\": 3}\n", r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, content, match):
    _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(InputError, match=match):
        prepare([Source("d", str(tmp_path / "bad.jsonl"))], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(InputError, match=r"no files matched '.*nothing/\*\.txt' \(source of domain 'd'\)"):
        prepare([Source("d", str(tmp_path / "nothing" / "*.txt"))], tmp_path / "out", tokenizer)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        prepare([Source("d", str(tmp_path / "latin1.txt"))], tmp_path / "out", tokenizer)
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match=r"cannot read .*broken\.txt\.gz"):
        prepare([Source("d", str(tmp_path / "broken.txt.gz"))], tmp_path / "out", tokenizer)
    _write(tmp_path / "ok.txt", "fine")
    with pytest.raises(InputError, match="val fraction"):
        prepare([Source("d", str(tmp_path / "ok.txt"))], tmp_path / "out", tokenizer, val_fraction=1.0)
    with pytest.raises(InputError, match="no sources"):
        prepare([], tmp_path / "out", tokenizer)
    for spec, match in [("no-equals-sign", "DOMAIN=GLOB"), ("en=", "DOMAIN=GLOB"), ("a/b=x", "domain name")]:
        with pytest.raises(InputError, match=match):
            Source.parse(spec)


def test_source_root_names_documents_relative_to_the_glob():
    assert Source("d", "raw/en/**/*.txt").root() == Path("raw/en")
    assert Source("d", "raw/file.jsonl").root() == Path("raw")
    assert Source("d", "*.txt").root() == Path(".")


# ---- the reader ------------------------------------------------------------------------------------------------

def _shards(directory: Path, streams: dict[str, np.ndarray], split: str = "train") -> Path:
    """Write a prepared corpus by hand (the reader's tests do not depend on the tokenizer)."""
    (directory / split).mkdir(parents=True)
    entries = {}
    for domain, tokens in streams.items():
        tokens.astype("<u2").tofile(directory / split / f"{domain}.bin")
        entries[domain] = {"file": f"{split}/{domain}.bin", "documents": 1, "bytes": 0, "tokens": len(tokens)}
    manifest = {"format": FORMAT, "version": VERSION, "dtype": "uint16", "tokenizer": {"bos_id": 1, "eos_id": 2},
                "domains": {d: {} for d in streams}, "splits": {split: entries}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture
def two_domains(tmp_path) -> TokenShards:
    # Token ids say which domain and position they came from: a = 1000 + i, b = 5000 + i.
    return TokenShards(_shards(tmp_path / "c", {"a": 1000 + np.arange(300), "b": 5000 + np.arange(900)}), "train")


def test_batch_shapes_targets_and_windows_come_from_the_streams(two_domains):
    inputs, targets = two_domains.batch(step=0, batch_size=16, seq_len=32, seed=0)
    assert inputs.shape == targets.shape == (16, 32) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # Consecutive ids within a row: each row is one contiguous window of one domain.
    rows = torch.cat([inputs, targets[:, -1:]], dim=1)
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(16, 32, dtype=torch.int64))
    assert ((rows >= 1000) & (rows < 1300) | (rows >= 5000) & (rows < 5900)).all()


def test_batch_is_a_function_of_its_arguments(two_domains, tmp_path):
    first = two_domains.batch(step=7, batch_size=8, seq_len=16, seed=3)
    two_domains.batch(step=1, batch_size=8, seq_len=16, seed=3)  # no hidden state advances
    fresh = TokenShards(two_domains.directory, "train")
    for again in (two_domains.batch(step=7, batch_size=8, seq_len=16, seed=3),
                  fresh.batch(step=7, batch_size=8, seq_len=16, seed=3)):
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], two_domains.batch(step=8, batch_size=8, seq_len=16, seed=3)[0])
    assert not torch.equal(first[0], two_domains.batch(step=7, batch_size=8, seq_len=16, seed=4)[0])
    # Pinned values: a change of the sampling scheme would silently change resumed runs.
    pinned = two_domains.batch(step=0, batch_size=4, seq_len=4, seed=0)[0][:, 0].tolist()
    assert pinned == [5457, 1084, 1277, 1164]


def test_batch_weights(two_domains):
    inputs, _ = two_domains.batch(step=0, batch_size=4000, seq_len=8, seed=0)
    share_b = (inputs[:, 0] >= 5000).float().mean().item()
    assert abs(share_b - 900 / 1200) < 0.03  # default: proportional to tokens
    inputs, _ = two_domains.batch(step=0, batch_size=4000, seq_len=8, seed=0, weights={"a": 3, "b": 1})
    assert abs((inputs[:, 0] >= 5000).float().mean().item() - 0.25) < 0.03
    inputs, _ = two_domains.batch(step=0, batch_size=64, seq_len=8, seed=0, weights={"a": 1})
    assert (inputs < 5000).all()
    # Window starts cover the whole stream, the last start included.
    inputs, _ = two_domains.batch(step=0, batch_size=4000, seq_len=8, seed=0, weights={"a": 1})
    assert inputs[:, 0].min().item() == 1000 and inputs[:, 0].max().item() == 1000 + 300 - 9
    # A domain shorter than a window is not drawn.
    inputs, _ = two_domains.batch(step=0, batch_size=64, seq_len=500, seed=0)
    assert (inputs >= 5000).all()


def test_batch_errors(two_domains):
    with pytest.raises(InputError, match="'c'"):
        two_domains.batch(0, 4, 8, 0, weights={"c": 1.0})
    with pytest.raises(InputError, match=">= 0"):
        two_domains.batch(0, 4, 8, 0, weights={"a": -1.0})
    with pytest.raises(InputError, match="seq_len=900"):
        two_domains.batch(0, 4, 900, 0)
    with pytest.raises(InputError, match="step"):
        two_domains.batch(-1, 4, 8, 0)


def test_windows(two_domains):
    windows = list(two_domains.windows("a", seq_len=64))
    assert len(windows) == (300 - 1) // 64
    for i, (inputs, targets) in enumerate(windows):
        assert inputs.tolist() == list(range(1000 + 64 * i, 1000 + 64 * (i + 1)))
        assert targets.tolist() == list(range(1001 + 64 * i, 1001 + 64 * (i + 1)))
    assert len(list(two_domains.windows("b", 64, max_windows=3))) == 3
    assert list(two_domains.windows("a", 299)) and not list(two_domains.windows("a", 300))
    with pytest.raises(InputError, match="'z'"):
        next(two_domains.windows("z", 8))


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TokenShards(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"manifest\.json is missing"):
        TokenShards(tmp_path / "empty", "train")
    directory = _shards(tmp_path / "c", {"a": np.arange(100)})
    with pytest.raises(InputError, match="split must be"):
        TokenShards(directory, "test")
    with open(directory / "train" / "a.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(InputError, match=r"train/a\.bin has 150 bytes but the manifest says 100 tokens"):
        TokenShards(directory, "train")
    (directory / "train" / "a.bin").unlink()
    with pytest.raises(InputError, match=r"train/a\.bin is missing"):
        TokenShards(directory, "train")
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"cannot read .*manifest\.json"):
        TokenShards(directory, "train")
    (directory / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a manifest of prepared token shards"):
        TokenShards(directory, "train")


# ---- the command line ------------------------------------------------------------------------------------------

def test_cli_help(capsys):
    assert main(["data", "prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--source DOMAIN=GLOB" in out and "examples:" in out and "mixtral data prepare --source" in out
    assert main(["data", "--help"]) == 0


def test_cli_prepare_and_errors(tmp_path, capsys, prepared, tokenizer):
    root, expected, _, _ = prepared
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--source", f"code={root}/code/**/*.py", "--source",
                 f"chat={root}/chat/*.jsonl", "--out", str(out), "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "chat" in printed and "total" in printed and f"wrote {out}" in printed
    assert _decoded(out, "train", tokenizer) == {"chat": expected["chat"], "code": expected["code"]}
    assert main(["data", "prepare", "--source", f"code={root}/nothing/*.py", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no files matched")


# ---- the math generator ----------------------------------------------------------------------------------------

NUM = r"-?\d+(?:\.\d+)?(?:/\d+)?"
UNIT_FACTORS = {"millimetres": 1, "centimetres": 10, "metres": 1000, "kilometres": 10 ** 6, "milligrams": 1,
                "grams": 1000, "kilograms": 10 ** 6, "tonnes": 10 ** 9, "millilitres": 1, "litres": 1000,
                "seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
ROUND_UNITS = {"ten": 10, "one hundred": 100, "one thousand": 1000, "ten thousand": 10 ** 4, "one million": 10 ** 6}


def value(text: str) -> Fraction:
    return Fraction(text.strip())


def evaluate(expr: str, **variables: Fraction) -> Fraction:
    """Exact value of a generated expression (numbers become Fractions; `**` powers, single-letter variables)."""
    exact = re.sub(r"(?<![\w.*])(\d+(?:\.\d+)?)", r"Fraction('\1')", expr)
    return eval(exact, {"__builtins__": {}, "Fraction": Fraction}, variables)  # our own generated text


def _numbers(text: str) -> list[Fraction]:
    return [value(n) for n in re.findall(NUM, text)]


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def check(p: mathgen.Problem) -> bool:
    """Recompute the answer of `p` from its question alone."""
    q, a = p.question, p.answer
    module = p.module
    if module == "arithmetic__add_or_sub":
        if m := re.fullmatch(rf"Subtract ({NUM}) from ({NUM})\.", q):
            return value(a) == value(m[2]) - value(m[1])
        if m := re.fullmatch(rf"What is ({NUM}) less than ({NUM})\?", q):
            return value(a) == value(m[2]) - value(m[1])
        if m := re.fullmatch(rf"(?:Add|Sum) ({NUM}) and ({NUM})\.", q):
            return value(a) == value(m[1]) + value(m[2])
        m = re.fullmatch(r"(?:What is|Calculate) (.*)[?.]", q)
        return value(a) == evaluate(m[1])
    if module == "arithmetic__mul":
        if m := re.fullmatch(rf"(?:What is|Multiply|Product of) ({NUM}) (?:times|and) ({NUM})[?.]", q):
            return value(a) == value(m[1]) * value(m[2])
        return value(a) == evaluate(re.fullmatch(r"Calculate (.*)\.", q)[1])
    if module == "arithmetic__div":
        if m := re.fullmatch(rf"(?:Divide|What is)? ?({NUM}) (?:by|divided by) ({NUM})\??\.?", q):
            return value(a) == value(m[1]) / value(m[2])
        return value(a) == evaluate(re.fullmatch(r"Calculate (.*)\.", q)[1])
    if module == "arithmetic__mixed":
        m = re.fullmatch(r"(?:Evaluate|What is the value of|Calculate|What is) (.*)[?.]", q)
        return value(a) == evaluate(m[1])
    if module == "algebra__linear_1d":
        left, right, x = re.fullmatch(r"Solve (.*) = (.*) for (\w)\.", q).groups()
        return evaluate(left, **{x: value(a)}) == evaluate(right, **{x: value(a)})
    if module == "algebra__linear_2d":
        e1, c1, e2, c2, target = re.fullmatch(rf"Solve (.*) = ({NUM}), (.*) = ({NUM}) for (\w)\.", q).groups()
        names = sorted(set(re.findall(r"[a-z]", e1)))
        assert len(names) == 2 and target in names

        def coefficients(expr: str) -> tuple[Fraction, Fraction]:
            return (evaluate(expr, **{names[0]: Fraction(1), names[1]: Fraction(0)}),
                    evaluate(expr, **{names[0]: Fraction(0), names[1]: Fraction(1)}))

        (p1, q1), (p2, q2) = coefficients(e1), coefficients(e2)
        det = p1 * q2 - q1 * p2
        solution = {names[0]: (value(c1) * q2 - q1 * value(c2)) / det,
                    names[1]: (p1 * value(c2) - value(c1) * p2) / det}
        return value(a) == solution[target]
    if module == "polynomials__evaluate":
        x, body, at = re.fullmatch(rf"Let \w\((\w)\) = (.*)\. (?:What is|Calculate|Give) \w\(({NUM})\)[?.]",
                                   q).groups()
        return value(a) == evaluate(body, **{x: value(at)})
    if module == "polynomials__expand":
        product = re.fullmatch(r"(?:Expand|Multiply out) (.*)\.", q)[1]
        x = re.findall(r"[a-z]", product)[0]
        return all(evaluate(product, **{x: Fraction(t)}) == evaluate(a, **{x: Fraction(t)}) for t in range(-3, 4))
    if module == "calculus__differentiate":
        m = re.fullmatch(r"(?:Differentiate|What is the derivative of|Find the first derivative of) (.*?)"
                         r"(?: with respect to \w| wrt \w)?[?.]", q)
        expr = m[1]
        x = re.findall(r"[a-z]", expr)[0]
        h = Fraction(1, 10 ** 6)
        for t in range(-3, 4):
            slope = (evaluate(expr, **{x: t + h}) - evaluate(expr, **{x: t - h})) / (2 * h)
            if abs(slope - evaluate(a, **{x: Fraction(t)})) > Fraction(1, 10 ** 3):
                return False
        return True
    if module == "numbers__gcd":
        x, y = _numbers(q)
        return int(a) == math.gcd(int(x), int(y))
    if module == "numbers__lcm":
        x, y = map(int, re.search(r"(\d+) and (?:1/)?(\d+)[?.]$", q).groups())
        return int(a) == math.lcm(x, y)
    if module == "numbers__is_prime":
        n = int(_numbers(q)[0])
        expected = not _is_prime(n) if "composite" in q else _is_prime(n)
        return a == str(expected)
    if module == "numbers__div_remainder":
        x, y = _numbers(q)
        return int(a) == int(x) % int(y)
    if module == "numbers__list_prime_factors":
        n = int(_numbers(q)[0])
        factors = [int(f) for f in a.split(", ")]
        return (factors == sorted(set(factors)) and all(_is_prime(f) and n % f == 0 for f in factors)
                and math.prod(f ** _multiplicity(n, f) for f in factors) == n)
    if module == "numbers__round_number":
        n, unit = re.fullmatch(rf"Round ({NUM}) to the nearest (.*)\.", q).groups()
        unit = ROUND_UNITS[unit]
        return int(a) % unit == 0 and abs(int(a) - int(n)) * 2 < unit
    if module == "comparison__sort":
        listed, order = re.fullmatch(r"(?:Sort|Put) (.*) in (increasing|decreasing) order\.", q).groups()
        values = [value(v) for v in listed.split(", ")]
        return [value(v) for v in a.split(", ")] == sorted(values, reverse=order == "decreasing")
    if module == "comparison__kth_biggest":
        word, listed = re.fullmatch(r"What is the (.*) value in (.*)\?", q).groups()
        k = {"": 0, "second ": 1, "third ": 2}[re.sub(r"(biggest|smallest)$", "", word)]
        values = sorted((value(v) for v in listed.split(", ")), reverse="biggest" in word)
        return value(a) == values[k]
    if module == "comparison__pair":
        if m := re.fullmatch(rf"Which is (bigger|smaller): ({NUM}) or ({NUM})\?", q):
            pair = (value(m[2]), value(m[3]))
            return value(a) == (max(pair) if m[1] == "bigger" else min(pair))
        m = re.fullmatch(rf"Is ({NUM}) (greater|less) than ({NUM})\?", q)
        x, y = value(m[1]), value(m[3])
        return a == str(x > y if m[2] == "greater" else x < y)
    if module == "measurement__conversion":
        m = (re.fullmatch(rf"How many (\w+) are there in ({NUM}) (\w+)\?", q)
             or re.fullmatch(rf"(?:Convert|What is) ({NUM}) (\w+) (?:to|in) (\w+)[?.]", q))
        if q.startswith("How many"):
            to, amount, frm = m.groups()
        else:
            amount, frm, to = m.groups()
        return value(a) == value(amount) * UNIT_FACTORS[frm] / UNIT_FACTORS[to]
    raise AssertionError(f"no check for module {module}")


def _multiplicity(n: int, p: int) -> int:
    k = 0
    while n % p == 0:
        n //= p
        k += 1
    return k


def test_math_answers_are_correct():
    seen = set()
    for _, problem in zip(range(3000), mathgen.problems(seed=0)):
        assert check(problem), problem
        seen.add(problem.module)
    assert seen == set(mathgen.MODULES)


def test_math_is_deterministic_by_seed(tmp_path):
    first = [p for _, p in zip(range(50), mathgen.problems(seed=5))]
    assert first == [p for _, p in zip(range(50), mathgen.problems(seed=5))]
    assert first != [p for _, p in zip(range(50), mathgen.problems(seed=6))]
    count, size = mathgen.write_jsonl(tmp_path / "m.jsonl", seed=1, max_documents=3, problems_per_document=4)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert count == len(lines) == 3
    texts = [json.loads(line)["text"] for line in lines]
    assert size == sum(len(t.encode()) for t in texts)
    assert texts[0].count("Question: ") == 4 and texts[0].count("\nAnswer: ") == 4
    with pytest.raises(InputError, match="unknown math module"):
        next(mathgen.problems(0, ["algebra__quantum"]))


@pytest.mark.parametrize("x, text", [(Fraction(7), "7"), (Fraction(-3), "-3"), (Fraction(9, 4), "2.25"),
                                     (Fraction(-1, 20), "-0.05"), (Fraction(2, 3), "2/3"), (Fraction(0), "0")])
def test_math_number_format(x, text):
    assert mathgen.number(x) == text


def test_math_polynomial_format():
    assert mathgen.polynomial([-12, -5, 2], "x") == "2*x**2 - 5*x - 12"
    assert mathgen.polynomial([0, 1], "y") == "y"
    assert mathgen.polynomial([3, 0, -1], "t") == "-t**2 + 3"
    assert mathgen.polynomial([0, 0], "t") == "0"


def test_math_command_prints_or_writes_the_seeded_stream(tmp_path, capsys):
    assert main(["data", "math", "--seed", "3", "--documents", "2", "--problems", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed == "\n".join(t for _, t in zip(range(2), mathgen.documents(3, 2)))
    out = tmp_path / "math.jsonl"
    assert main(["data", "math", "--seed", "3", "--documents", "2", "--problems", "2", "--jsonl", str(out)]) == 0
    lines = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert lines == [t for _, t in zip(range(2), mathgen.documents(3, 2))]

"""`mixtral data prepare`: text, markdown, code and JSONL files -> memory-mapped token shards, one stream per domain.

Each source is DOMAIN=GLOB. A file is one document, except JSONL (`.jsonl`, `.jsonl.gz`), where every non-blank
line is a JSON object and its text field (default "text") one document; `.gz` files are read through gzip. Every
document is written as BOS + tokens + EOS to DIR/<split>/<domain>.bin (the layout is in `mixtral.data.shards`).

The train/validation split is decided per document by a hash of (split seed, path relative to the glob's root,
line number), so adding or removing files never moves other documents between splits. A domain whose documents all
hash into train still gives its lowest-hash document to validation when it has at least two.

Two passes over the inputs, neither holding more than one document in memory: the first reads and checks every
document (a bad JSONL line fails in seconds, not after an hour of tokenizing) and counts them; the second tokenizes
and appends to the shards. Output goes to a temporary directory renamed into place at the end.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from mixtral.data.shards import DTYPES, FORMAT, MANIFEST, SPLITS, VERSION
from mixtral.errors import InputError
from mixtral.io.files import atomic_directory
from mixtral.io.tokenizer import Tokenizer, load_tokenizer

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TEXT_FIELD = "text"
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """One --source: the files of `pattern` (a glob, `**` recursive) are documents of `domain`."""
    domain: str
    pattern: str

    @classmethod
    def parse(cls, spec: str) -> Source:
        """'en=docs/**/*.txt' -> Source('en', 'docs/**/*.txt'); raises InputError for a malformed spec."""
        domain, sep, pattern = spec.partition("=")
        if not sep or not pattern:
            raise InputError(f"source {spec!r} must be DOMAIN=GLOB, e.g. en='docs/**/*.txt'")
        if not DOMAIN_NAME.fullmatch(domain):
            raise InputError(f"domain name {domain!r} in source {spec!r} must be letters, digits, '_', '.' or '-' "
                             f"(it names the shard file)")
        return cls(domain, pattern)

    def files(self) -> list[Path]:
        """The matching files, sorted; raises InputError when there are none."""
        pattern = os.path.expanduser(self.pattern)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"no files matched {self.pattern!r} (source of domain {self.domain!r})")
        return files

    def root(self) -> Path:
        """The glob's fixed prefix: paths relative to it name documents for the split hash."""
        parts = Path(os.path.expanduser(self.pattern)).parts
        fixed = []
        for part in parts:
            if WILDCARD.search(part):
                break
            fixed.append(part)
        if len(fixed) == len(parts):  # a plain file name
            fixed = fixed[:-1]
        return Path(*fixed) if fixed else Path(".")


@dataclass(frozen=True)
class Document:
    source: int  # index into the sources
    key: str  # path relative to the source's root: with `index`, the document's identity for the split
    index: int  # line number in a JSONL file, 0 for a whole file
    text: str


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    suffixes = path.suffixes
    return bool(suffixes) and (suffixes[-1] == ".jsonl" or suffixes[-2:] == [".jsonl", ".gz"])


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})") from None


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file (gzipped or not). Raises InputError
    naming the file and line when the file cannot be read, is not UTF-8, or a line is not valid JSON."""
    try:
        with _open(path) as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, f"{path}:{number}")
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def read_documents(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[int, str]]:
    """(index, text) of each document of one file: the whole file (index 0), or each JSONL line (its number).

    Raises InputError naming the file (and line) when the file cannot be read, is not UTF-8, or a JSONL line is
    not an object with a string `text_field`.
    """
    if _is_jsonl(path):
        for number, record in json_lines(path):
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{number}: expected a JSON object with a string field {text_field!r} "
                                 f"(set another with --text-field)")
            yield number, record[text_field]
        return
    try:
        with _open(path) as f:
            yield 0, _decode(f.read(), str(path))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def iter_documents(sources: Sequence[Source], files: Sequence[Sequence[Path]],
                   text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    """Every non-blank document of `sources` (whose files are `files`, as `Source.files` lists them), in order:
    source by source, files sorted, lines in order."""
    for i, (source, paths) in enumerate(zip(sources, files)):
        root = source.root()
        for path in paths:
            key = os.path.relpath(path, root).replace(os.sep, "/")
            for index, text in read_documents(path, text_field):
                if text.strip():
                    yield Document(i, key, index, text)


def split_hash(split_seed: int, key: str, index: int) -> float:
    """A document's place in [0, 1): it goes to validation when below the val fraction."""
    digest = hashlib.blake2b(f"{split_seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _new_counts() -> dict[str, int]:
    return {"documents": 0, "bytes": 0, "tokens": 0}


def _add(counts: dict[str, int], nbytes: int, ntokens: int) -> None:
    counts["documents"] += 1
    counts["bytes"] += nbytes
    counts["tokens"] += ntokens


def check_destination(out: Path, force: bool) -> None:
    """Refuse an OUT that holds something other than an older prepared corpus; raises InputError naming it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        # Even with --force: replacing a directory that is not a prepared corpus would delete someone's files.
        raise InputError(f"output {out} is a non-empty directory without {MANIFEST}; choose an empty or new one")
    if not force:
        raise InputError(f"output {out} already holds a prepared corpus; pass --force to replace it")


def _scan(sources: Sequence[Source], files: Sequence[Sequence[Path]], text_field: str, val_fraction: float,
          split_seed: int, progress: bool) -> tuple[int, set[tuple[int, str, int]]]:
    """Read every document once: (total bytes of text, the fallback validation documents as (source, key, index)).

    A domain with at least two documents none of which hashes below the val fraction gives its lowest-hash
    document to validation, so that every domain can be evaluated.
    """
    domains = sorted({s.domain for s in sources})
    total_bytes = 0
    n_docs = dict.fromkeys(domains, 0)
    n_val = dict.fromkeys(domains, 0)
    lowest: dict[str, tuple[float, int, str, int]] = {}
    for doc in tqdm(iter_documents(sources, files, text_field), desc="checking", unit=" docs", disable=not progress):
        domain = sources[doc.source].domain
        total_bytes += len(doc.text.encode("utf-8"))
        h = split_hash(split_seed, doc.key, doc.index)
        n_docs[domain] += 1
        n_val[domain] += h < val_fraction
        lowest[domain] = min(lowest.get(domain, (2.0,)), (h, doc.source, doc.key, doc.index))
    fallback = {lowest[d][1:] for d in domains if val_fraction > 0 and n_docs[d] >= 2 and n_val[d] == 0}
    return total_bytes, fallback


def prepare(sources: Sequence[Source], out: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike | None = None,
            *, val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = 0,
            text_field: str = DEFAULT_TEXT_FIELD, force: bool = False, progress: bool = False) -> dict:
    """Tokenize the documents of `sources` into token shards in `out`; returns the manifest written there.

    `tokenizer` is a Tokenizer, a path or preset for `load_tokenizer`, or None for the Mixtral tokenizer.
    Raises InputError for a bad source (no match, unreadable file, bad JSONL line), a bad val_fraction, an `out`
    that is not replaceable (see `check_destination`), and TokenizerError for a tokenizer that cannot be loaded.
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"val fraction must be in [0, 1), got {val_fraction}")
    if not sources:
        raise InputError("no sources given: pass at least one --source DOMAIN=GLOB")
    out = Path(out)
    check_destination(out, force)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype_name = "uint16" if tok.n_words <= 2 ** 16 else "uint32"
    dtype = DTYPES[dtype_name]
    files = [s.files() for s in sources]

    # Pass 1: read and check everything before writing anything.
    total_bytes, fallback = _scan(sources, files, text_field, val_fraction, split_seed, progress)

    # Pass 2: tokenize into a temporary directory beside `out`, then rename it into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    shards: dict[tuple[str, str], BinaryIO] = {}
    by_source = [_new_counts() for _ in sources]
    by_domain = {d: _new_counts() for d in sorted({s.domain for s in sources})}
    by_split: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    with atomic_directory(out) as tmp:
        try:
            for split in SPLITS:
                (tmp / split).mkdir(parents=True)
            bar = tqdm(total=total_bytes, desc="tokenizing", unit="B", unit_scale=True, disable=not progress)
            for doc in iter_documents(sources, files, text_field):
                domain = sources[doc.source].domain
                is_val = (split_hash(split_seed, doc.key, doc.index) < val_fraction
                          or (doc.source, doc.key, doc.index) in fallback)
                split = "val" if is_val else "train"
                ids = np.asarray(tok.encode(doc.text, bos=True, eos=True), dtype=dtype)
                if (split, domain) not in shards:
                    shards[split, domain] = open(tmp / split / f"{domain}.bin", "wb")
                ids.tofile(shards[split, domain])
                nbytes = len(doc.text.encode("utf-8"))
                for counts in (by_source[doc.source], by_domain[domain],
                               by_split[split].setdefault(domain, _new_counts())):
                    _add(counts, nbytes, len(ids))
                bar.update(nbytes)
            bar.close()
        finally:
            for f in shards.values():
                f.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype_name,
            "tokenizer": {"path": str(tok.path), "n_words": tok.n_words, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
            "val_fraction": val_fraction, "split_seed": split_seed, "text_field": text_field,
            "sources": [{"domain": s.domain, "glob": s.pattern, "files": len(paths), **counts}
                        for s, paths, counts in zip(sources, files, by_source)],
            "domains": by_domain,
            "splits": {split: {d: {"file": f"{split}/{d}.bin", **counts} for d, counts in sorted(entries.items())}
                       for split, entries in by_split.items()},
            "totals": {k: sum(c[k] for c in by_domain.values()) for k in ("documents", "bytes", "tokens")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def format_summary(manifest: dict) -> str:
    """A table of documents, bytes and tokens per domain and split."""
    lines = [f"{'domain':<12} {'documents':>10} {'bytes':>13} {'train tokens':>13} {'val tokens':>11}"]
    splits = manifest["splits"]
    for domain, c in manifest["domains"].items():
        train = splits["train"].get(domain, {}).get("tokens", 0)
        val = splits["val"].get(domain, {}).get("tokens", 0)
        lines.append(f"{domain:<12} {c['documents']:>10} {c['bytes']:>13} {train:>13} {val:>11}")
    t = manifest["totals"]
    train = sum(c["tokens"] for c in splits["train"].values())
    val = sum(c["tokens"] for c in splits["val"].values())
    lines.append(f"{'total':<12} {t['documents']:>10} {t['bytes']:>13} {train:>13} {val:>11}")
    return "\n".join(lines)

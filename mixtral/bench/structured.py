"""`mixtral bench structured`: the grammar libraries that could constrain `response_format`, side by side on
Mixtral's tokenizer (the sentencepiece model mistral-common ships, 32000 tokens).

For each of llguidance, xgrammar and outlines-core that is installed, from one run:
- import: seconds to import it (in a fresh interpreter that has imported torch, as the server has);
- install: its installed size and the packages it requires;
- tokenizer: seconds to build its view of the vocabulary from the token bytes (`structured.token_bytes`);
- compile: seconds to compile three schemas cold (a small object; a nested one with arrays, enums, anyOf; the
  `json_object` schema), median of --repeats;
- walk: one valid document per schema, tokenized as sentencepiece does, fed token by token: the microseconds
  to compute each step's mask and to accept the token, whether every token of the document was allowed, EOS
  allowed at the end and not before, and BOS/UNK never;
- coverage: JSON Schema features, each compiled and sampled --samples times (random logits, masked), every
  output parsed and validated with `jsonschema`; and invalid schemas, which should be refused.
Ours (`mixtral.serve.structured`, on llguidance) is timed through `Matcher.mask_`: the mask applied to a float32
logits row, as the engine calls it.

    pip install llguidance xgrammar outlines-core jsonschema    # the peers; llguidance is a dependency
    mixtral bench structured
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mixtral.errors import InputError
from mixtral.io.tokenizer import load_tokenizer
from mixtral.serve.structured import SentencePieceVocabulary, compile_response_format, token_bytes

# The three schemas timed, each with a valid document walked token by token (properties in the schema's order).
SCHEMAS: dict[str, tuple[dict, Any]] = {
    "small": ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                "member": {"type": "boolean"}},
               "required": ["name", "age", "member"], "additionalProperties": False},
              {"name": "Ada Lovelace", "age": 36, "member": True}),
    "nested": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "status": {"enum": ["draft", "review", "published"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "authors": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "role": {"enum": ["lead", "editor"]}},
            "required": ["name", "role"], "additionalProperties": False}},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "meta": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"pages": {"type": "integer"}},
                                              "required": ["pages"], "additionalProperties": False}]}},
        "required": ["title", "status", "tags", "authors", "score", "meta"], "additionalProperties": False},
        {"title": "Mixture of Experts", "status": "review", "tags": ["moe", "sparse"],
         "authors": [{"name": "Albert", "role": "lead"}, {"name": "Marie", "role": "editor"}], "score": 8.5,
         "meta": {"pages": 12}}),
    "json_object": ({"type": "object"},
                    {"answer": 42, "items": [1, 2.5, "x", None, True], "nested": {"k": "v", "list": []}}),
}

_OBJ = {"type": "object"}
# JSON Schema features, one small schema each: compiled, sampled, and every sample validated.
FEATURES: dict[str, dict] = {
    "types": {**_OBJ, "properties": {"s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
                                     "b": {"type": "boolean"}, "z": {"type": "null"}},
              "required": ["s", "i", "n", "b", "z"], "additionalProperties": False},
    "enum, const": {**_OBJ, "properties": {"e": {"enum": ["red", "green", 3, None]}, "c": {"const": "fixed"}},
                    "required": ["e", "c"], "additionalProperties": False},
    "integer bounds": {"type": "integer", "minimum": -5, "maximum": 1000},
    "exclusive bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 7, "minimum": 1},
    "string length": {"type": "string", "minLength": 3, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format date": {"type": "string", "format": "date"},
    "format uuid": {"type": "string", "format": "uuid"},
    "array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "optional properties": {**_OBJ, "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                            "required": ["a"], "additionalProperties": False},
    "additionalProperties": {**_OBJ, "additionalProperties": {"type": "integer"}},
    "patternProperties": {**_OBJ, "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
    "min/maxProperties": {**_OBJ, "additionalProperties": {"type": "integer"}, "minProperties": 1,
                          "maxProperties": 2},
    "type list": {"type": ["string", "null"]},
    "anyOf": {"anyOf": [{"type": "integer"}, {**_OBJ, "properties": {"x": {"type": "string"}}, "required": ["x"],
                                              "additionalProperties": False}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {"allOf": [{**_OBJ, "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "$ref, $defs": {"$defs": {"p": {**_OBJ, "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                    "additionalProperties": False}},
                    "type": "array", "items": {"$ref": "#/$defs/p"}, "maxItems": 3},
    "recursive $ref": {"$defs": {"node": {**_OBJ, "properties": {
        "v": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["v", "children"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "minItems": 2},
    "not": {"type": "integer", "not": {"minimum": 1}},
    "if/then/else": {"type": "integer", "if": {"minimum": 10}, "then": {"multipleOf": 2}, "else": {"maximum": 3}},
}
# Schemas no library should accept.
INVALID: dict[str, dict] = {
    "unknown type": {"type": "foo"},
    "minimum not a number": {"type": "integer", "minimum": "zero"},
    "dangling $ref": {"$ref": "#/$defs/missing"},
    "bad pattern": {"type": "string", "pattern": "("},
    "properties not an object": {"type": "object", "properties": 3},
}

MAX_SAMPLE_TOKENS = 200
CLOSING_BONUS = 4.0  # added to the logits of '"', ']', '}' and EOS while sampling, so samples end


# ---- the libraries, one small adapter each ------------------------------------------------------------------

class Vocab:
    """The tokenizer as the adapters need it: pieces (for xgrammar), bytes and special ids, EOS."""

    def __init__(self, tokenizer):
        sp = tokenizer.sentencepiece
        if sp is None:
            raise InputError(f"mixtral bench structured needs a sentencepiece tokenizer; {tokenizer.path} is a "
                             f"tokenizer.json")
        self.tokenizer, self.n, self.eos = tokenizer, tokenizer.n_words, tokenizer.eos_id
        self.pieces = [sp.id_to_piece(i) for i in range(self.n)]
        self.tokens, self.special = token_bytes(sp)
        self.wrapper = SentencePieceVocabulary(tokenizer)


class LLGuidance:
    package, module = "llguidance", "llguidance"

    def __init__(self):
        import llguidance
        self.llg = llguidance

    def tokenizer(self, vocab: Vocab):
        return self.llg.LLTokenizer(self.llg.TokenizerWrapper(vocab.wrapper))

    def compile(self, info, schema: dict):
        options = {"whitespace_flexible": False, "key_separator": ": ?", "item_separator": ", ?"}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        matcher = self.llg.LLMatcher(info, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error().splitlines()[0])
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    package, module = "xgrammar", "xgrammar"

    def __init__(self):
        import xgrammar
        self.xgr = xgrammar

    def tokenizer(self, vocab: Vocab):
        # An empty string is how xgrammar's constructor marks a special token; given "<s>", it lets "<s>" stand
        # for text inside JSON strings.
        special = set(vocab.special)
        pieces = ["" if i in special else piece for i, piece in enumerate(vocab.pieces)]
        return self.xgr.TokenizerInfo(pieces, self.xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab.n,
                                      stop_token_ids=[vocab.eos], add_prefix_space=True)

    def compile(self, info, schema: dict):
        # One thread, as the others compile (and this machine's two cores are shared); no cache, to time a cold
        # compile. strict_mode off: JSON Schema's meaning (additional properties allowed unless refused).
        compiler = self.xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(torch.from_numpy(bitmask).view(1, -1))

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    package, module = "outlines-core", "outlines_core"

    def __init__(self):
        import outlines_core
        self.oc = outlines_core

    def tokenizer(self, vocab: Vocab):
        by_bytes: dict[bytes, list[int]] = {}
        special = set(vocab.special)
        for i, b in enumerate(vocab.tokens):
            if i not in special:
                by_bytes.setdefault(b, []).append(i)
        self.eos = vocab.eos
        return self.oc.Vocabulary(vocab.eos, by_bytes)

    def compile(self, info, schema: dict):
        # outlines-core's default whitespace is "[ ]?" everywhere, the closest to the others' separators.
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema)), info)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        matcher.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(self, matcher, token: int) -> bool:
        if token == self.eos:  # the Guide has no state after EOS: EOS is accepted where it is allowed
            return self.eos in matcher.get_tokens()
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False


LIBRARIES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


# ---- measurements --------------------------------------------------------------------------------------------

def import_seconds(module: str) -> float:
    code = (f"import time, torch; t = time.perf_counter(); import {module}; "
            f"print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def installed(package: str) -> dict:
    """{"mb": the package's installed size, "requires": [(name, MB if installed else None)]}."""
    def size(dist) -> float:
        return sum((f.size or 0) for f in dist.files or ()) / 1e6

    dist = importlib.metadata.distribution(package)
    requires = []
    for line in dist.requires or ():
        if "extra ==" in line:
            continue
        name = line.split(";")[0].split("[")[0]
        for sep in "<>=!~ (":
            name = name.split(sep)[0]
        try:
            requires.append((name, round(size(importlib.metadata.distribution(name)), 1)))
        except importlib.metadata.PackageNotFoundError:
            requires.append((name, None))
    return {"version": dist.version, "mb": round(size(dist), 1), "requires": requires}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _allowed(bitmask: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bitmask.view(np.uint8), count=n, bitorder="little").view(np.bool_)


def walk(lib, compiled, vocab: Vocab, ids: list[int], repeats: int) -> dict:
    """Feed `ids` (a valid document) then EOS through fresh matchers; time each step's mask and accept."""
    bitmask = np.zeros((vocab.n + 31) // 32, dtype=np.int32)
    fills, accepts, first = [], [], []
    canonical = eos_ok = specials_ok = True
    counts = []
    for r in range(repeats):
        matcher = lib.matcher(compiled)
        for step, token in enumerate([*ids, vocab.eos]):
            start = time.perf_counter_ns()
            lib.fill(matcher, bitmask)
            elapsed = time.perf_counter_ns() - start
            (first if step == 0 else fills).append(elapsed / 1e3)
            allowed = _allowed(bitmask, vocab.n)
            if r == 0:
                counts.append(int(allowed.sum()))
                canonical &= bool(allowed[token])
                eos_ok &= bool(allowed[vocab.eos]) == (token == vocab.eos)
                specials_ok &= not any(allowed[i] for i in vocab.special if i != vocab.eos)
            if not allowed[token]:
                break
            start = time.perf_counter_ns()
            ok = lib.accept(matcher, token)
            accepts.append((time.perf_counter_ns() - start) / 1e3)
            if not ok:
                canonical = False
                break
    return {"tokens": len(ids), "mask_us": statistics.median(fills) if fills else None,
            "mask_max_us": max(fills) if fills else None, "first_mask_us": statistics.median(first),
            "accept_us": statistics.median(accepts) if accepts else None, "all_allowed": canonical,
            "eos_only_at_end": eos_ok, "specials_never": specials_ok,
            "mean_allowed": round(statistics.mean(counts), 1) if counts else None}


def closing_bias(vocab: Vocab) -> torch.Tensor:
    """[n] logits bonus of the tokens that close a string, an array or an object, and of EOS."""
    bias = torch.zeros(vocab.n)
    for i, b in enumerate(vocab.tokens):
        if b and i not in vocab.special and set(b.decode("utf-8", "replace")) <= set('"]}'):
            bias[i] = CLOSING_BONUS
    bias[vocab.eos] = CLOSING_BONUS
    return bias


def sample(lib, compiled, vocab: Vocab, bias: torch.Tensor, generator: torch.Generator) -> list[int] | None:
    """Token ids of one document sampled greedily from random logits under the grammar (EOS excluded), or None
    when it did not end within MAX_SAMPLE_TOKENS or the library refused its own choice."""
    matcher = lib.matcher(compiled)
    bitmask = np.zeros((vocab.n + 31) // 32, dtype=np.int32)
    ids = []
    for _ in range(MAX_SAMPLE_TOKENS):
        lib.fill(matcher, bitmask)
        logits = torch.randn(vocab.n, generator=generator) + bias
        logits.masked_fill_(~torch.from_numpy(_allowed(bitmask, vocab.n)), float("-inf"))
        token = int(logits.argmax())
        if not torch.isfinite(logits[token]) or not lib.accept(matcher, token):
            return None
        if token == vocab.eos:
            return ids
        ids.append(token)
    return None


def coverage(lib, info, vocab: Vocab, samples: int, seed: int) -> dict:
    """{feature: "ok k/k" | "refused" | "INVALID i/k" | ...} and {invalid schema: "refused" | "ACCEPTED"}."""
    import jsonschema

    bias = closing_bias(vocab)
    formats = jsonschema.FormatChecker()
    # jsonschema checks date-time only with rfc3339-validator installed. RFC 3339: ISO 8601 with a time zone, "T"
    # and "Z" in either case.
    formats.checks("date-time", ValueError)(
        lambda s: not isinstance(s, str) or datetime.datetime.fromisoformat(s.upper()).tzinfo is not None)
    features = {}
    for name, schema in FEATURES.items():
        try:
            compiled = lib.compile(info, schema)
        except Exception:  # every library has its own error types; a refusal is what is measured
            features[name] = "refused"
            continue
        generator = torch.Generator().manual_seed(seed)
        valid = unfinished = 0
        for _ in range(samples):
            ids = sample(lib, compiled, vocab, bias, generator)
            if ids is None:
                unfinished += 1
                continue
            try:
                jsonschema.validate(json.loads(vocab.tokenizer.decode(ids)), schema, format_checker=formats)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        invalid = samples - valid - unfinished
        features[name] = (f"INVALID {invalid}/{samples}" if invalid else f"ok {valid}/{samples}") + (
            f", {unfinished} unfinished" if unfinished else "")
    refused = {}
    for name, schema in INVALID.items():
        try:
            lib.compile(info, schema)
            refused[name] = "ACCEPTED"
        except Exception:  # as above: any error is a refusal
            refused[name] = "refused"
    return {"features": features, "invalid": refused}


def ours(vocab: Vocab, ids_by_schema: dict[str, list[int]], repeats: int) -> dict:
    """Microseconds of `Matcher.mask_` (mask computed and applied to float32 logits), median over the walk."""
    out = {}
    for name, (schema, _) in SCHEMAS.items():
        grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
                                          vocab.tokenizer)
        times = []
        for _ in range(repeats):
            matcher = grammar.matcher()
            for token in [*ids_by_schema[name], vocab.eos]:
                logits = torch.zeros(vocab.n)
                start = time.perf_counter_ns()
                matcher.mask_(logits)
                times.append((time.perf_counter_ns() - start) / 1e3)
                matcher.accept(token)
        out[name] = statistics.median(times)
    return out


def run(*, tokenizer: str | None = None, libraries: list[str] | None = None, samples: int = 3, repeats: int = 3,
        seed: int = 0) -> dict:
    """Measure each installed library of `libraries` (default: all of LIBRARIES) on `tokenizer` (a preset, file or
    directory; default: Mixtral's); prints the tables. Returns {"benchmark": "structured", "libraries": {...},
    "ours_mask_us": {...}}. Raises InputError for an unknown library."""
    unknown = sorted(set(libraries or ()) - set(LIBRARIES))
    if unknown:
        raise InputError(f"--libraries: unknown {', '.join(unknown)}; known: {', '.join(LIBRARIES)}")
    if importlib.util.find_spec("jsonschema") is None:
        raise InputError("mixtral bench structured validates samples with jsonschema, which is not installed: "
                         "pip install -e '.[test]' (or pip install jsonschema)")
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    vocab = Vocab(tok)
    vocab_s = time.perf_counter() - start
    docs = {name: vocab.wrapper(json.dumps(doc)) for name, (_, doc) in SCHEMAS.items()}
    print(f"# tokenizer {tok.path.name} ({tok.n_words} tokens); token bytes in {vocab_s:.3f} s; torch threads "
          f"{torch.get_num_threads()}; documents of {', '.join(f'{k} {len(v)}' for k, v in docs.items())} tokens")
    results = {}
    for name in libraries or LIBRARIES:
        try:
            lib = LIBRARIES[name]()
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        r: dict[str, Any] = {"install": installed(lib.package), "import_s": import_seconds(lib.module)}
        start = time.perf_counter()
        info = lib.tokenizer(vocab)
        r["tokenizer_s"] = time.perf_counter() - start
        r["compile_s"], r["walk"] = {}, {}
        for schema_name, (schema, _) in SCHEMAS.items():
            r["compile_s"][schema_name] = _median_seconds(lambda: lib.compile(info, schema), repeats)
            r["walk"][schema_name] = walk(lib, lib.compile(info, schema), vocab, docs[schema_name], repeats)
        r.update(coverage(lib, info, vocab, samples, seed))
        results[name] = r
        print_library(name, r)
    mask_us = ours(vocab, docs, repeats)
    print("ours (mixtral.serve.structured, llguidance) Matcher.mask_ on float32 logits, median us: "
          + ", ".join(f"{k} {v:.0f}" for k, v in mask_us.items()))
    if results:
        print_coverage(results)
    return {"benchmark": "structured", "tokenizer": str(tok.path), "token_bytes_s": vocab_s, "libraries": results,
            "ours_mask_us": mask_us}


def print_library(name: str, r: Mapping[str, Any]) -> None:
    install = r["install"]
    requires = ", ".join(f"{n} ({'%.0f MB' % mb if mb is not None else 'not installed'})"
                         for n, mb in install["requires"]) or "nothing"
    print(f"\n== {name} {install['version']}: {install['mb']:.1f} MB installed; requires {requires}")
    print(f"import {r['import_s']:.2f} s; tokenizer info {r['tokenizer_s']:.3f} s")
    print(f"{'schema':<12}{'compile ms':>11}{'tokens':>7}{'mask us':>9}{'max us':>8}{'1st us':>8}{'accept us':>10}"
          f"{'allowed':>9}  checks")
    for schema, w in r["walk"].items():
        checks = [label for label, ok in (("a document token refused", w["all_allowed"]),
                                          ("EOS misplaced", w["eos_only_at_end"]),
                                          ("BOS/UNK allowed", w["specials_never"])) if not ok]
        mask = f"{w['mask_us']:>9.0f}{w['mask_max_us']:>8.0f}" if w["mask_us"] is not None else f"{'-':>17}"
        accept = f"{w['accept_us']:>10.0f}" if w["accept_us"] is not None else f"{'-':>10}"
        print(f"{schema:<12}{r['compile_s'][schema] * 1e3:>11.1f}{w['tokens']:>7}{mask}{w['first_mask_us']:>8.0f}"
              f"{accept}{w['mean_allowed'] or 0:>9.0f}  {'; '.join(checks) or 'ok'}")


def print_coverage(results: Mapping[str, Any]) -> None:
    names = list(results)
    print(f"\n{'JSON Schema feature':<34}" + "".join(f"{n:>24}" for n in names))
    for feature in FEATURES:
        print(f"{feature:<34}" + "".join(f"{results[n]['features'][feature]:>24}" for n in names))
    for bad in INVALID:
        print(f"{'invalid: ' + bad:<34}" + "".join(f"{results[n]['invalid'][bad]:>24}" for n in names))

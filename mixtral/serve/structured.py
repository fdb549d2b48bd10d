"""Structured output: OpenAI's `response_format` as a grammar that sampling follows, one token at a time.

    {"type": "text"}                                   no constraint
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}
                                                       an instance of `schema` (JSON Schema)

`compile_response_format` turns a format into a `Grammar`; each generated sequence takes its own
`Grammar.matcher()`, whose `mask_` sets to -inf the logit of every token the grammar does not allow next and whose
`accept` advances it by the token sampled. Once the document is complete only EOS is allowed, so the sequence ends
the usual way. Both caches are per tokenizer: its vocabulary is prepared once, each distinct format compiled once
(LRU), so a repeated request costs a dictionary lookup and a copy of the compiled matcher.

The grammar engine is llguidance, chosen by measurement against xgrammar and outlines-core on Mixtral's tokenizer
(`mixtral bench structured`; the numbers and the reasons are in docs/performance.md). What the grammar allows
beyond the schema itself:
- one optional space before the document: Mistral's models begin a reply with a "▁"-prefixed token ("▁{"), and a
  chat reply's text drops that space when it is decoded;
- at most one space after each ":" and ",", and no other whitespace: with whitespace free, a weak model can fill
  max_tokens with newlines and never close the document;
- properties in the order the schema lists them (llguidance's rule).

Threads: compiling may run on any thread (the server compiles on a worker thread, off its event loop); a Matcher
belongs to one sequence and is used by one thread at a time (the engine's).
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import llguidance
import numpy as np
import torch

from mixtral.errors import InputError, TokenizerError

MAX_GRAMMARS = 64  # compiled formats kept per tokenizer (least recently used dropped first)

# llguidance's JSON options: compact JSON, one optional space after ":" and "," (see the module docstring). A
# schema's own top-level "x-guidance" object (llguidance's extension) overrides them key by key.
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ?", "item_separator": ", ?"}


def compile_response_format(response_format: Mapping[str, Any] | None, tokenizer) -> Grammar | None:
    """The grammar of an OpenAI `response_format` for `tokenizer` (a `mixtral.io.tokenizer.Tokenizer`), or None
    when sampling is free: no format, or `{"type": "text"}`.

    A `json_schema` without "schema" (or with null) allows any JSON value. Raises InputError naming the field at fault
    ("response_format.json_schema.schema: ...") for a malformed format, an invalid schema or a JSON Schema
    feature llguidance does not support (uniqueItems, if/then/else, look-around in a pattern, ...), and
    TokenizerError for a tokenizer whose vocabulary cannot be used.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InputError(f"response_format must be an object with a 'type', got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiler(tokenizer).compile({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise InputError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InputError(f"response_format.json_schema: expected an object with 'name' and 'schema', got "
                         f"{type(spec).__name__}")
    schema = spec.get("schema")
    if schema is None:
        schema = {}
    where = "response_format.json_schema.schema"
    if not isinstance(schema, Mapping):
        raise InputError(f"{where}: expected a JSON Schema object, got {type(schema).__name__}")
    return _compiler(tokenizer).compile(schema, where)


class Grammar:
    """A compiled format. `matcher()` gives each generated sequence its own state; the grammar itself never
    changes, so one Grammar serves any number of sequences on any thread."""

    def __init__(self, template: llguidance.LLMatcher, n_words: int, eos_id: int):
        self._template = template  # never advanced: only copied
        self.n_words, self.eos_id = n_words, eos_id

    def matcher(self) -> Matcher:
        """A fresh Matcher at the start of the document (a copy of the compiled one: microseconds)."""
        return Matcher(self._template.deep_copy(), self.n_words, self.eos_id)


class Matcher:
    """Where one sequence stands in its grammar: `mask_` the logits before sampling, `accept` the token after.

    `finished` turns True once EOS is accepted; from the moment the document is complete, EOS is the only token
    `mask_` lets through.
    """

    def __init__(self, matcher: llguidance.LLMatcher, n_words: int, eos_id: int):
        self._matcher = matcher
        self.n_words, self.eos_id = n_words, eos_id
        # [words]: bit j of word w allows token 32 * w + j (little-endian: byte w * 4 + j // 8, bit j % 8)
        self._bitmask = np.zeros((n_words + 31) // 32, dtype=np.int32)
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def mask_(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, the logits of every token the grammar does not allow next.

        `logits`: float32 [vocab] on the CPU; a model's vocab may be larger than the tokenizer's (padded
        embeddings): the ids past the tokenizer's are never text, so they are masked too. Raises InputError if
        the matcher is in an error state (a token it refused was forced on it).
        """
        assert logits.dim() == 1 and logits.shape[0] >= self.n_words and logits.device.type == "cpu", (
            f"logits must be [vocab >= {self.n_words}] on the CPU, got {tuple(logits.shape)} on {logits.device}")
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self._matcher.is_error():
            raise InputError(f"response_format: {_one_line(self._matcher.get_error())}")
        # numpy's unpackbits: the fastest unpacking measured (45 us for 32000 tokens, torch shifts 60-75 us).
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=self.n_words, bitorder="little")
        allowed = torch.from_numpy(bits.view(np.bool_))  # [n_words]
        logits[:self.n_words].masked_fill_(~allowed, float("-inf"))
        logits[self.n_words:] = float("-inf")

    def accept(self, token: int) -> None:
        """Advance by `token`, the one sampled; raises InputError if the grammar does not allow it here."""
        token = int(token)
        if self._finished and token == self.eos_id:
            return  # already over: a repeated EOS changes nothing
        if not 0 <= token < self.n_words or not self._matcher.consume_token(token):
            reason = _one_line(self._matcher.get_error()) if self._matcher.is_error() else "the document is over"
            raise InputError(f"response_format: token {token} is not allowed here ({reason})")
        if token == self.eos_id:
            self._finished = True


# ---- the compilers, one per tokenizer -------------------------------------------------------------------------

class _Compiler:
    """llguidance's view of one tokenizer, and the formats compiled for it (an LRU of MAX_GRAMMARS)."""

    def __init__(self, tokenizer):
        self.ll_tokenizer = llguidance_tokenizer(tokenizer)
        self.n_words, self.eos_id = tokenizer.n_words, tokenizer.eos_id
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, schema: Mapping[str, Any], where: str) -> Grammar:
        try:
            # Not sort_keys: llguidance generates properties in the schema's order, so order is part of the key.
            key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: not JSON: {e}") from None
        with self.lock:
            grammar = self.grammars.get(key)
            if grammar is not None:
                self.grammars.move_to_end(key)
                return grammar
        # Compiled outside the lock (llguidance releases the GIL while it builds): a slow schema holds up nobody.
        # Two threads compiling the same schema at once both succeed; the second result replaces the first.
        grammar = Grammar(self._matcher(schema, where), self.n_words, self.eos_id)
        with self.lock:
            self.grammars[key] = grammar
            if len(self.grammars) > MAX_GRAMMARS:
                self.grammars.popitem(last=False)
        return grammar

    def _matcher(self, schema: Mapping[str, Any], where: str) -> llguidance.LLMatcher:
        options = schema.get("x-guidance", {})
        if not isinstance(options, Mapping):
            raise InputError(f"{where}.x-guidance: expected an object of llguidance's JSON options, got "
                             f"{type(options).__name__}")
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **options}}
        lark = 'start: " "? document\ndocument: %json ' + json.dumps(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
            matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a Rust panic arrives as pyo3's PanicException, a BaseException
            raise InputError(f"{where}: llguidance cannot compile this schema ({type(e).__name__}: {e})") from None
        if matcher.is_error():
            raise InputError(f"{where}: {_schema_error(matcher.get_error())}")
        return matcher


_compilers: weakref.WeakKeyDictionary[Any, _Compiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler(tokenizer) -> _Compiler:
    # Under the lock: the vocabulary is prepared once per tokenizer (~0.1 s), however many requests arrive at once.
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = _Compiler(tokenizer)
        return compiler


def _schema_error(message: str) -> str:
    # llguidance reports a schema error inside our Lark grammar: "at 2(7): failed to compile JSON schema: WHAT",
    # then the Lark source with a caret under the %json. Keep WHAT.
    message = message.split("failed to compile JSON schema: ", 1)[-1]
    return _one_line("\n".join(line for line in message.splitlines() if not _LARK_SOURCE.match(line)))


_LARK_SOURCE = re.compile(r"\s*(\d+ \|.*|\^+)\s*$")


def _one_line(message: str) -> str:
    # llguidance appends its parser state (many lines) to some messages, and spreads a regex error over three.
    message = " ".join(message.split("<state>")[0].split())
    return message or "unknown error"


# ---- the vocabulary as llguidance sees it ---------------------------------------------------------------------

def llguidance_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a `mixtral.io.tokenizer.Tokenizer`: a tokenizer.json is read by llguidance
    itself; a sentencepiece model is handed over as `SentencePieceVocabulary`."""
    if tokenizer.hf is not None:
        try:
            return llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.n_words,
                                          eos_token=tokenizer.eos_id)
        except ValueError as e:
            raise TokenizerError(f"structured output cannot use {tokenizer.path}: llguidance cannot read it ({e})")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(SentencePieceVocabulary(tokenizer)))


def token_bytes(sp) -> tuple[list[bytes], list[int]]:
    """(the bytes each token of the sentencepiece model `sp` adds to the text, the ids of its special tokens).

    "▁" is a space; a byte-fallback token "<0xE2>" is that one byte; control and unknown tokens (<s>, </s>, <unk>,
    and the [INST]-style control tokens of the v3 vocabulary) are special: their name stands in for their bytes,
    and llguidance never lets them stand for text.
    """
    tokens, special = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special.append(i)
            tokens.append(piece.encode())
        elif sp.is_byte(i):
            tokens.append(bytes([int(piece[3:-1], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class SentencePieceVocabulary:
    """A sentencepiece tokenizer in the shape of llguidance's `TokenizerWrapper`: `tokens` (bytes per id),
    `special_token_ids`, `eos_token_id`, `bos_token_id`, and calling it encodes text in the middle of a sequence.

    llguidance encodes the text a grammar forces (`{"name": "` before a property) to allow only its canonical
    tokens, so that encoding must be right: sentencepiece prepends "▁" to whatever it encodes (its dummy prefix),
    which would turn '{"' into '▁{"' and allow a token the grammar then refuses. Encoding after a newline and
    dropping the newline's ids gives the mid-sequence tokens, since no piece spans a newline; the constructor
    checks that on a few strings and raises TokenizerError for a model where it does not hold.
    """

    def __init__(self, tokenizer):
        sp = tokenizer.sentencepiece
        if sp is None:
            raise TokenizerError(f"{tokenizer.path} is not a sentencepiece model")
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens, self.special_token_ids = token_bytes(sp)
        self._sp = sp
        self._prefix = sp.encode("\n")
        for probe in ('{"a": 1}', " x", "  y", "\u00e9\u20ac"):
            ids = sp.encode("\n" + probe)
            if ids[:len(self._prefix)] != self._prefix or b"".join(
                    self.tokens[i] for i in ids[len(self._prefix):]) != probe.encode():
                raise TokenizerError(f"structured output cannot use {tokenizer.path}: its sentencepiece model "
                                     f"merges a newline with the text after it (probe {probe!r})")

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")  # llguidance hands over complete UTF-8 prefixes
        return self._sp.encode("\n" + text)[len(self._prefix):]

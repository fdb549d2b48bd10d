"""Text <-> token ids: sentencepiece for encode/decode, mistral-common for the chat format.

Mixtral's tokenizer is a 32000-token sentencepiece BPE model with byte fallback; mistral-common ships it, so the
presets work with no download. Encoding and decoding call sentencepiece directly (it is the reference and fast);
`encode_chat` hands the messages to mistral-common, which owns the instruct format (`<s>[INST] ... [/INST]`), so
the prompt is exactly what Mistral's own code produces. A Hugging Face `tokenizer.json` is read with `tokenizers`
for checkpoints that ship no sentencepiece file.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece

from mixtral.errors import InputError, TokenizerError

# Preset name -> tokenizer file inside mistral-common's data folder.
PRESETS: dict[str, str] = {
    "mixtral": "tokenizer.model.v1",
    "mixtral-8x7b": "tokenizer.model.v1",
    "mistral-7b": "tokenizer.model.v1",
    # 8x22B has 32768 tokens (see config.PRESETS): the v3 vocabulary, where [INST] and [/INST] are control tokens.
    # mistral-common maps "open-mixtral-8x22b-2404" to this file.
    "mixtral-8x22b": "mistral_instruct_tokenizer_240323.model.v3",
}
DEFAULT_PRESET = "mixtral"

# What a checkpoint directory is searched for, in this order.
DIR_CANDIDATES = ("tokenizer.model", "tokenizer.model.v*", "tokenizer.json")

CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """One tokenizer file: a sentencepiece model, or a Hugging Face tokenizer.json (chosen by the `.json` suffix).

    Attributes: `path` (the file), `n_words` (vocabulary size), `bos_id`, `eos_id`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Load the tokenizer file at `path`; raises TokenizerError if it is missing or cannot be parsed."""
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist or is not a file")
        self._sp: sentencepiece.SentencePieceProcessor | None = None
        self._hf: Any = None  # tokenizers.Tokenizer, imported only when a tokenizer.json is used
        if self.path.suffix == ".json":
            self._hf = _load_hf(self.path)
            self.n_words = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = _hf_token_id(self._hf, "<s>", self.path)
            self.eos_id = _hf_token_id(self._hf, "</s>", self.path)
        else:
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            except (RuntimeError, OSError) as e:
                raise TokenizerError(f"cannot read {self.path} as a sentencepiece model: {e}") from e
            self.n_words = self._sp.vocab_size()
            self.bos_id = self._sp.bos_id()
            self.eos_id = self._sp.eos_id()
            if self.bos_id < 0 or self.eos_id < 0:
                raise TokenizerError(f"sentencepiece model {self.path} defines no BOS/EOS token (bos_id={self.bos_id}, "
                                     f"eos_id={self.eos_id})")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, n_words={self.n_words})"

    @property
    def sentencepiece(self) -> sentencepiece.SentencePieceProcessor | None:
        """The sentencepiece model underneath (None for a tokenizer.json): its pieces, byte and control tokens."""
        return self._sp

    @property
    def hf(self) -> Any:
        """The `tokenizers.Tokenizer` underneath a tokenizer.json (None for a sentencepiece model)."""
        return self._hf

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS prepended / EOS appended as asked.

        Special-token strings in the text ("<s>", "[INST]") are encoded as plain text, never as control ids, so
        user text cannot inject them.
        """
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, skipping BOS/EOS and other control tokens.

        Raises InputError for an id outside the vocabulary.
        """
        ids = [int(i) for i in ids]  # accepts numpy/torch integers too
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise InputError(f"token id {bad} is outside the vocabulary of {self.path} ({self.n_words} tokens)")
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        """A fresh StreamDecoder for printing generated ids as they come."""
        return StreamDecoder(self)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids for a conversation, in the instruct format of this tokenizer's version (v1 for Mixtral-8x7B:
        `<s>[INST] user [/INST] assistant</s>[INST] ...`), produced by mistral-common.

        `messages` is a list of `{"role": "system" | "user" | "assistant", "content": str}`; a system message is
        merged into a user turn by mistral-common, as Mistral does. Raises InputError naming the message index and
        field for malformed messages (or mistral-common's reason, e.g. a conversation not ending with a user turn),
        and TokenizerError if this tokenizer has no mistral-common equivalent (a tokenizer.json, or a sentencepiece
        file not named tokenizer.model[.vN]).
        """
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest(messages=_chat_messages(messages))
        try:
            return self._mistral.encode_chat_completion(request).tokens
        except MistralCommonException as e:
            raise InputError(f"chat messages rejected by mistral-common: {e}") from e

    @cached_property
    def _mistral(self) -> Any:
        # Built once per tokenizer: mistral-common reloads the sentencepiece file and precomputes its vocabulary.
        # Imported here because mistral-common takes ~0.6 s to import and plain encode/decode never need it.
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece

        if self._sp is None:
            raise TokenizerError(f"chat encoding needs a sentencepiece tokenizer file (tokenizer.model[.vN]) that "
                                 f"mistral-common can read; {self.path} is a Hugging Face tokenizer.json")
        # mistral-common picks the instruct format (v1, v2, v3, ...) from the file name, so it must follow its scheme.
        if not is_sentencepiece(self.path):
            raise TokenizerError(f"chat encoding needs the sentencepiece file to be named tokenizer.model or "
                                 f"tokenizer.model.vN (mistral-common reads the chat format version from the name); "
                                 f"got {self.path}")
        return MistralTokenizer.from_file(str(self.path))


class StreamDecoder:
    """Incremental detokenization: push generated ids one at a time, get back the text each one adds.

    Decoding each id alone is wrong twice over: sentencepiece drops the leading "▁" (space) of the first piece it
    decodes, and byte-fallback pieces (`<0xE2><0x82><0xAC>`) only make a character together. So each push decodes a
    short window that starts at the previously emitted chunk and returns how much the window's text grew, holding
    text back while it ends in U+FFFD (an unfinished UTF-8 character) -- the method of vLLM and HF's TextStreamer.
    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`; flush() is "" unless the ids end mid-character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the window: the last emitted chunk, then ids not yet emitted
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" while a character or a leading space is pending)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any held-back text (an unfinished UTF-8 character at the end of the stream, shown as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        # Both decodes start at the same id, so sentencepiece treats the window's first piece the same way in each.
        done = self.tokenizer.decode(self._ids[:self._read])
        text = self.tokenizer.decode(self._ids)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return text[len(done):]


def load_tokenizer(path_or_preset: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from a preset name, a tokenizer file or a checkpoint directory.

    - None or a preset name (see PRESETS): the tokenizer shipped inside mistral-common. Preset names win over a
      same-named path in the working directory (write "./mixtral" for the directory).
    - a file: a sentencepiece model (tokenizer.model, tokenizer.model.v3, ...) or a Hugging Face tokenizer.json.
    - a directory: the first of tokenizer.model, tokenizer.model.v* (exactly one), tokenizer.json found in it.
    Returns a Tokenizer; raises TokenizerError naming the path (or name) and what was looked for.
    """
    if path_or_preset is None:
        path_or_preset = DEFAULT_PRESET
    name = os.fspath(path_or_preset)
    if name.lower() in PRESETS:
        return Tokenizer(_preset_file(name.lower()))
    path = Path(name).expanduser()
    if path.is_dir():
        return Tokenizer(_find_in_dir(path))
    if path.exists():
        return Tokenizer(path)
    if os.sep in name or (os.altsep and os.altsep in name):
        raise TokenizerError(f"tokenizer path {name} does not exist")
    raise TokenizerError(f"{name!r} is neither an existing tokenizer file/directory nor a preset "
                         f"(known presets: {', '.join(PRESETS)})")


def _preset_file(name: str) -> Path:
    # Locate the package without importing it (the import is slow and not needed for encode/decode).
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"preset {name!r} needs the mistral-common package, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / PRESETS[name]
    if not path.is_file():
        raise TokenizerError(f"preset {name!r}: {path} is missing from the installed mistral-common")
    return path


def _find_in_dir(directory: Path) -> Path:
    if (directory / "tokenizer.model").is_file():
        return directory / "tokenizer.model"
    versioned = sorted(p for p in directory.glob("tokenizer.model.v*") if p.is_file())
    if len(versioned) > 1:
        # Which one the checkpoint was trained with cannot be guessed; mistral-inference refuses too.
        raise TokenizerError(f"{directory} holds several tokenizer files ({', '.join(p.name for p in versioned)}); "
                             f"keep only one or pass the file itself")
    if versioned:
        return versioned[0]
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    raise TokenizerError(f"no tokenizer in directory {directory}: looked for {', '.join(DIR_CANDIDATES)}")


def _load_hf(path: Path) -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise TokenizerError(f"reading {path} needs the 'tokenizers' package, which is not installed") from e
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise TokenizerError(f"cannot read {path} as a Hugging Face tokenizer.json: {e}") from e
    # Match sentencepiece: "<s>" or "</s>" typed in the text is text, not a control token.
    hf.encode_special_tokens = True
    return hf


def _hf_token_id(hf: Any, token: str, path: Path) -> int:
    token_id = hf.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer.json {path} has no {token!r} token in its vocabulary")
    return token_id


def _chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """mistral-common message objects for `messages`, after checking each one so errors name the index and field."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InputError("chat messages are empty: need at least one {'role': 'user', 'content': ...} message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat message {i}: expected a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise InputError(f"chat message {i}: missing field {field!r}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InputError(f"chat message {i}: unknown field(s) {', '.join(map(repr, extra))} "
                             f"(only 'role' and 'content' are supported)")
        role, content = message["role"], message["content"]
        if role not in classes:
            raise InputError(f"chat message {i}: field 'role' is {role!r}, expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"chat message {i}: field 'content' must be a str, got {type(content).__name__}")
        out.append(classes[role](content=content))
    return out

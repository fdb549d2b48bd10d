"""Tokenizer: parity with sentencepiece and mistral-common (the oracles), round trips, streaming, every error path."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import sentencepiece

from mixtral.errors import InputError, TokenizerError
from mixtral.io.tokenizer import PRESETS, Tokenizer, load_tokenizer

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
V1 = DATA / "tokenizer.model.v1"

TEXTS = [
    "Hello world",
    "Le cœur a ses raisons que la raison ne connaît point. Élève, où est-ce ?",
    "def f(x):\n\tif x:\n        return 'ok'  # done\n",
    "🦀🔥 日本語のテキスト 한국어 €",  # byte fallback for the emoji and some CJK
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces\n\n\n",
    "",
    "<s> [INST] </s> are just text here",
]

CHATS = {
    "one-user": [{"role": "user", "content": "What is a mixture of experts?"}],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain top-2 routing."},
    ],
    "system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is a router?"},
    ],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(V1))


def _reference_chat(mistral: MistralTokenizer, messages: list[dict]) -> list[int]:
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


def _streamed(tokenizer: Tokenizer, ids: list[int]) -> str:
    stream = tokenizer.stream()
    return "".join(stream.push(i) for i in ids) + stream.flush()


# ---- presets and parity with sentencepiece -----------------------------------------------------------------------

def test_default_is_mixtral_v1(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.path == V1
    for name in ("mixtral", "mixtral-8x7b", "mistral-7b", "Mixtral-8x7B"):
        assert load_tokenizer(name).path == V1


def test_8x22b_preset_is_v3_vocab():
    # Matches config.PRESETS["mixtral-8x22b"].vocab_size.
    tok = load_tokenizer("mixtral-8x22b")
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32768, 1, 2)
    assert tok.path.name == PRESETS["mixtral-8x22b"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(tok, sp, text):
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.encode(text, bos=False, eos=True) == [*sp.encode(text), 2]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, eos=True)) == text  # BOS/EOS are skipped


def test_decode_rejects_out_of_vocab_id(tok):
    with pytest.raises(InputError, match=r"token id 32000 .*32000 tokens"):
        tok.decode([1, 22557, 32000])
    with pytest.raises(InputError, match="token id -1"):
        tok.decode([-1])


# ---- streaming -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_stream_joins_to_decode(tok, text):
    for ids in (tok.encode(text, bos=False), tok.encode(text), tok.encode(text, eos=True)):
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids)
        assert stream.flush() == ""


def test_stream_keeps_spaces_and_holds_partial_characters(tok):
    stream = tok.stream()
    assert [stream.push(i) for i in tok.encode("Hello world again", bos=False)] == ["Hello", " world", " again"]
    # "🦀" is four byte-fallback pieces: nothing comes out until the character is complete.
    ids = tok.encode("a🦀", bos=False)
    stream = tok.stream()
    out = [stream.push(i) for i in ids]
    assert out[-1] == "🦀" and all(piece == "" for piece in out[1:-1]) and "".join(out) == "a🦀"


def test_stream_random_ids_match_decode(tok):
    # Random generations: byte pieces that never finish a character, lone "▁", BOS/EOS/unk mid-stream.
    rng = random.Random(0)
    special = [0, 1, 2, 28705, 259]
    for _ in range(300):
        ids = [rng.choice([rng.randrange(tok.n_words), rng.randrange(3, 259), rng.choice(special)])
               for _ in range(rng.randint(1, 16))]
        assert _streamed(tok, ids) == tok.decode(ids), ids


# ---- chat ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral_v1() -> MistralTokenizer:
    return MistralTokenizer.v1()


@pytest.mark.parametrize("name", CHATS)
def test_encode_chat_matches_mistral_common(tok, mistral_v1, name):
    ids = tok.encode_chat(CHATS[name])
    assert ids == _reference_chat(mistral_v1, CHATS[name])
    assert ids[0] == tok.bos_id


def test_encode_chat_v1_format(tok):
    ids = tok.encode_chat(CHATS["multi-turn"])
    assert ids[0] == 1 and ids.count(2) == 1  # one BOS, EOS after the assistant turn
    assert tok.decode(ids) == "[INST] Hi [/INST] Hello! How can I help? [INST] Explain top-2 routing. [/INST]"


def test_encode_chat_8x22b_matches_mistral_common():
    messages = CHATS["multi-turn"]
    assert load_tokenizer("mixtral-8x22b").encode_chat(messages) == _reference_chat(MistralTokenizer.v3(), messages)


@pytest.mark.parametrize("messages, pattern", [
    ([], "empty"),
    ("hello", "must be a list"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], r"message 1: field 'role' is 'bot'"),
    ([{"role": "user"}], r"message 0: missing field 'content'"),
    ([{"content": "hi"}], r"message 0: missing field 'role'"),
    ([{"role": "user", "content": 3}], r"message 0: field 'content' must be a str"),
    ([{"role": "user", "content": "hi"}, "oops"], r"message 1: expected a dict"),
    ([{"role": "user", "content": "hi", "name": "x"}], r"message 0: unknown field\(s\) 'name'"),
    ([{"role": "assistant", "content": "hi"}], r"mistral-common: Conversation must start with a user"),
])
def test_encode_chat_rejects_bad_messages(tok, messages, pattern):
    with pytest.raises(InputError, match=pattern):
        tok.encode_chat(messages)


# ---- files and directories -------------------------------------------------------------------------------------

def test_load_from_directory_and_file(tmp_path, tok):
    shutil.copy(V1, tmp_path / "tokenizer.model")
    from_dir = load_tokenizer(tmp_path)
    assert from_dir.path == tmp_path / "tokenizer.model"
    assert load_tokenizer(str(tmp_path / "tokenizer.model")).path == from_dir.path
    for text in TEXTS:
        assert from_dir.encode(text) == tok.encode(text)
    assert from_dir.encode_chat(CHATS["system"]) == tok.encode_chat(CHATS["system"])


def test_directory_with_versioned_file(tmp_path, tok):
    shutil.copy(V1, tmp_path / "tokenizer.model.v1")
    assert load_tokenizer(tmp_path).encode("Hello world") == tok.encode("Hello world")
    shutil.copy(V1, tmp_path / "tokenizer.model.v3")
    with pytest.raises(TokenizerError, match=r"several tokenizer files \(tokenizer.model.v1, tokenizer.model.v3\)"):
        load_tokenizer(tmp_path)


def test_chat_needs_mistral_common_file_name(tmp_path, tok):
    shutil.copy(V1, tmp_path / "spm.bin")
    other = load_tokenizer(tmp_path / "spm.bin")
    assert other.encode("Hello world") == tok.encode("Hello world")  # plain encode works with any name
    with pytest.raises(TokenizerError, match=r"named tokenizer.model.*spm.bin"):
        other.encode_chat(CHATS["one-user"])


# ---- Hugging Face tokenizer.json -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_and_merges(sp):
    tu = pytest.importorskip("transformers.tokenization_utils_base")
    if not hasattr(tu, "generate_merges"):
        pytest.skip("needs transformers >= 5 (generate_merges) to build a tokenizer.json without protobuf")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    return vocab, tu.generate_merges(vocab, scores)  # the merge order transformers' converter uses


def _hub_style_tokenizer_json(path: Path, vocab: dict, merges: list) -> None:
    # The layout of the tokenizer.json in mistralai's Mixtral repos: Prepend+Replace normalizer, no pre-tokenizer.
    tk = pytest.importorskip("tokenizers")
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")])
    hf.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
                                       tk.decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf.save(str(path))


def test_hub_style_tokenizer_json_matches_sentencepiece(tmp_path, tok, vocab_and_merges):
    _hub_style_tokenizer_json(tmp_path / "tokenizer.json", *vocab_and_merges)
    hf = load_tokenizer(tmp_path)  # a directory with only tokenizer.json
    assert hf.path.name == "tokenizer.json"
    assert (hf.n_words, hf.bos_id, hf.eos_id) == (32000, 1, 2)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
        assert _streamed(hf, ids) == text
    with pytest.raises(TokenizerError, match=r"needs a sentencepiece.*tokenizer.json"):
        hf.encode_chat(CHATS["one-user"])


def test_transformers_converted_tokenizer_json(tmp_path, tok, vocab_and_merges):
    # transformers 5 writes a Metaspace pre-tokenizer (prepend_scheme="first") instead of the hub layout. Known
    # difference: it adds no "▁" prefix when the text already starts with a space, so text with leading whitespace
    # gets one space fewer than sentencepiece gives ("  a" -> ["▁", "▁a"], sentencepiece ["▁▁", "▁a"]). Same ids
    # for everything else.
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("LlamaTokenizer(vocab=..., merges=...) is the transformers 5 API")
    transformers.LlamaTokenizer(vocab=vocab_and_merges[0], merges=vocab_and_merges[1]).save_pretrained(tmp_path)
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    for text in TEXTS:
        if text[:1].isspace():
            assert hf.decode(hf.encode(text)) == text[1:]
        else:
            assert hf.encode(text) == tok.encode(text), text


# ---- errors ----------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match=f"{missing} does not exist"):
        load_tokenizer(missing)


def test_unknown_preset():
    with pytest.raises(TokenizerError, match=r"'mixtral-9x9b' is neither .* \(known presets: mixtral, mixtral-8x7b"):
        load_tokenizer("mixtral-9x9b")


def test_empty_directory(tmp_path):
    with pytest.raises(TokenizerError, match=rf"no tokenizer in directory {tmp_path}: looked for tokenizer.model, "
                                             r"tokenizer.model.v\*, tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(TokenizerError, match=f"cannot read {tmp_path / 'tokenizer.model'} as a sentencepiece"):
        load_tokenizer(tmp_path)
    bad_json = tmp_path / "other" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"model": ')
    with pytest.raises(TokenizerError, match=f"cannot read {bad_json} as a Hugging Face tokenizer.json"):
        load_tokenizer(bad_json.parent)


def test_preset_name_wins_over_same_named_directory(tmp_path, monkeypatch):
    # The repo root holds a "mixtral" package directory; the name must still mean the preset there.
    (tmp_path / "mixtral").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("mixtral").path == V1
    with pytest.raises(TokenizerError, match="no tokenizer in directory mixtral"):
        load_tokenizer("./mixtral")

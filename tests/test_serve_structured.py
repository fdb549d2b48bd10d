"""Structured output (`response_format`): the grammar module on Mixtral's real tokenizer, then the server.

Oracles: `jsonschema` validates every document sampled under a schema; the finite set of documents an enum allows
says exactly which first tokens may be allowed; the tokenizer's own pieces say which ids are bytes, spaces and
control tokens.
"""
from __future__ import annotations

import json
import threading

import pytest
import torch

from mixtral.errors import InputError
from mixtral.io.tokenizer import load_tokenizer
from mixtral.serve import structured
from mixtral.serve.structured import SentencePieceVocabulary, compile_response_format, token_bytes
from test_serve import start_server, stop_servers, wait_for_url

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {  # every one of them ends: bounded strings, numbers and arrays, no additional properties
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "member": {"type": "boolean"}},
               "required": ["name", "age", "member"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "status": {"enum": ["draft", "review", "published"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "authors": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "role": {"enum": ["lead", "editor"]}},
            "required": ["name", "role"], "additionalProperties": False}},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["status", "tags", "authors", "score", "note"], "additionalProperties": False},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 99,
                                                                        "minimum": 0},
                                                                  "y": {"const": 0}},
                                 "required": ["x", "y"], "additionalProperties": False}},
             "type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 3},
    "choice": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                         {"type": "string", "pattern": "^[a-c]{2}$"}, {"type": "boolean"}]},
}


def json_schema(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # the bundled default model's tokenizer is this file too


@pytest.fixture(scope="module")
def vocab(tok):
    return token_bytes(tok.sentencepiece)


def allowed_ids(matcher, n: int = 32000) -> set[int]:
    logits = torch.zeros(n)
    matcher.mask_(logits)
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def closing_bias(tok, vocab) -> torch.Tensor:
    """A logits bonus for tokens that close a string, array or object, and for EOS, so random walks end."""
    tokens, special = vocab
    bias = torch.zeros(tok.n_words)
    for i, b in enumerate(tokens):
        if b and i not in special and set(b.decode("utf-8", "replace")) <= set('"]}'):
            bias[i] = 4.0
    bias[tok.eos_id] = 4.0
    return bias


def random_walk(grammar, tok, bias: torch.Tensor, seed: int, max_tokens: int = 300) -> list[int]:
    """Greedy tokens (EOS left out) from random logits under the grammar, as the engine samples: mask, then accept."""
    generator = torch.Generator().manual_seed(seed)
    matcher = grammar.matcher()
    ids = []
    for _ in range(max_tokens):
        logits = torch.randn(tok.n_words, generator=generator) * 2 + bias
        matcher.mask_(logits)
        token = int(logits.argmax())
        assert torch.isfinite(logits[token])
        matcher.accept(token)
        if token == tok.eos_id:
            assert matcher.finished
            return ids
        ids.append(token)
    raise AssertionError(f"no EOS in {max_tokens} tokens: {tok.decode(ids)!r}")


# ---- the module ------------------------------------------------------------------------------------------------

def test_free_text_has_no_grammar(tok):
    assert compile_response_format(None, tok) is None
    assert compile_response_format({"type": "text"}, tok) is None


def test_token_bytes_of_the_real_vocabulary(tok, vocab):
    tokens, special = vocab
    sp = tok.sentencepiece
    assert len(tokens) == tok.n_words == 32000
    assert special == [0, 1, 2] and {tok.bos_id, tok.eos_id} <= set(special)  # <unk>, <s>, </s>
    assert tokens[sp.piece_to_id("<0x7B>")] == b"{" and tokens[sp.piece_to_id("<0xE2>")] == b"\xe2"
    assert tokens[sp.piece_to_id("\u2581{")] == b" {" and tokens[sp.piece_to_id("\u2581")] == b" "
    # Mid-sequence encoding: no "▁" added in front, and the bytes of the ids are the text's.
    encode = SentencePieceVocabulary(tok)
    for text in ('{"a": 1}', " x", "  y", "caf\u00e9 \u20ac", "\n\n"):
        ids = encode(text)
        assert b"".join(tokens[i] for i in ids) == text.encode()
    assert encode('{"') == [sp.piece_to_id('{"')]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_walks_parse_and_validate(tok, vocab, name):
    schema = SCHEMAS[name]
    grammar = compile_response_format(json_schema(schema), tok)
    bias = closing_bias(tok, vocab)
    for seed in range(4):
        text = tok.decode(random_walk(grammar, tok, bias, seed))
        jsonschema.validate(json.loads(text), schema)


def test_json_object_yields_an_object(tok, vocab):
    grammar = compile_response_format({"type": "json_object"}, tok)
    bias = closing_bias(tok, vocab)
    for seed in range(4):
        assert isinstance(json.loads(tok.decode(random_walk(grammar, tok, bias, seed))), dict)


def test_mask_allows_only_valid_continuations(tok, vocab):
    tokens, _ = vocab
    # The documents of this enum: an optional space, then "yes" or "no" in quotes.
    documents = [b'"yes"', b'"no"', b' "yes"', b' "no"']
    matcher = compile_response_format(json_schema({"enum": ["yes", "no"]}), tok).matcher()
    done = b""
    while True:
        allowed = allowed_ids(matcher)
        if any(d == done for d in documents):
            assert allowed == {tok.eos_id}
            break
        assert allowed and tok.eos_id not in allowed
        for i in allowed:
            assert any(d.startswith(done + tokens[i]) for d in documents), (done, tokens[i])
        token = min(allowed)  # the byte-fallback tokens come first: the walk goes byte by byte where it can
        matcher.accept(token)
        done += tokens[token]
    matcher.accept(tok.eos_id)
    assert matcher.finished


def test_eos_only_when_complete_and_refusals(tok):
    grammar = compile_response_format(json_schema(SCHEMAS["person"]), tok)
    matcher = grammar.matcher()
    ids = SentencePieceVocabulary(tok)('{"name": "Ada", "age": 36, "member": true}')
    for token in ids:
        allowed = allowed_ids(matcher)
        assert token in allowed and tok.eos_id not in allowed
        assert not matcher.finished
        matcher.accept(token)
    assert allowed_ids(matcher) == {tok.eos_id}  # complete: only EOS
    space = tok.sentencepiece.piece_to_id("\u2581")
    with pytest.raises(InputError, match=f"response_format: token {space} is not allowed here"):
        matcher.accept(space)
    other = grammar.matcher()  # matchers are independent: this one is at the start
    with pytest.raises(InputError, match="not allowed"):
        other.accept(tok.eos_id)  # EOS before any text
    fresh = grammar.matcher()
    for token in ids:
        fresh.accept(token)
    fresh.accept(tok.eos_id)
    assert fresh.finished


def test_control_tokens_are_never_text(tok):
    # Inside a free string almost every token is allowed, but never <unk> or <s>; </s> only where it ends.
    matcher = compile_response_format(json_schema({"type": "string"}), tok).matcher()
    ids = SentencePieceVocabulary(tok)('"<s> and <unk> are text here')
    for token in ids:
        allowed = allowed_ids(matcher)
        assert not allowed & {0, 1, tok.eos_id}
        matcher.accept(token)
    assert len(allowed) > 30000


def test_whitespace_is_bounded(tok):
    sp = tok.sentencepiece
    space, brace = sp.piece_to_id("\u2581"), sp.piece_to_id("\u2581{")
    matcher = compile_response_format(json_schema(SCHEMAS["person"]), tok).matcher()
    start = allowed_ids(matcher)
    assert {brace, sp.piece_to_id('\u2581{"'), sp.piece_to_id('{"')} <= start  # a reply may begin "▁{" or "{"
    for token in SentencePieceVocabulary(tok)('{"name":'):
        matcher.accept(token)
    assert space in allowed_ids(matcher)  # one space after ":"
    matcher.accept(space)
    assert space not in allowed_ids(matcher)  # not two
    assert sp.piece_to_id("<0x0A>") not in allowed_ids(matcher)  # no newlines


def test_model_vocab_larger_than_the_tokenizer(tok):
    grammar = compile_response_format({"type": "json_object"}, tok)
    small, large = torch.randn(32000), torch.randn(32768)
    large[:32000] = small
    grammar.matcher().mask_(small)
    grammar.matcher().mask_(large)
    assert torch.equal(large[:32000], small)
    assert torch.isneginf(large[32000:]).all()
    with pytest.raises(AssertionError, match="vocab >= 32000"):
        grammar.matcher().mask_(torch.zeros(31999))


@pytest.mark.parametrize("response_format,match", [
    (json_schema({"type": "foo"}), r"^response_format\.json_schema\.schema: Invalid type: foo$"),
    (json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}}),
     r"^response_format\.json_schema\.schema: .*/\$defs/b"),
    (json_schema({"type": "array", "uniqueItems": True}),
     r"^response_format\.json_schema\.schema: Unimplemented keys: \[\"uniqueItems\"\]$"),
    (json_schema({"type": "string", "pattern": "(?=a)b"}), r"^response_format\.json_schema\.schema: .*look-around"),
    (json_schema({"type": "string", "format": "shoe-size"}), r"^response_format\.json_schema\.schema: .*shoe-size"),
    (json_schema({"type": "integer", "minimum": "zero"}), r"^response_format\.json_schema\.schema: "),
    (json_schema([1]), r"^response_format\.json_schema\.schema: expected a JSON Schema object, got list$"),
    (json_schema({"type": "string", "x-guidance": 3}), r"^response_format\.json_schema\.schema\.x-guidance: "),
    ({"type": "json_schema"}, r"^response_format\.json_schema: expected an object"),
    ({"type": "xml"}, r"^response_format\.type: expected 'text', 'json_object' or 'json_schema', got 'xml'$"),
    ("json", r"^response_format must be an object"),
])
def test_invalid_formats_are_input_errors(tok, response_format, match):
    with pytest.raises(InputError, match=match):
        compile_response_format(response_format, tok)


def test_no_schema_allows_any_json(tok, vocab):
    grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": "any", "schema": None}}, tok)
    assert grammar is compile_response_format({"type": "json_schema", "json_schema": {"name": "x"}}, tok)
    json.loads(tok.decode(random_walk(grammar, tok, closing_bias(tok, vocab), seed=0)))


def test_compiled_formats_are_cached(tok, monkeypatch):
    first = compile_response_format(json_schema(SCHEMAS["person"], name="a"), tok)
    # The name, description and strict do not change the grammar; property order does (it is generated).
    spec = {"name": "b", "schema": SCHEMAS["person"], "strict": True, "description": "someone"}
    assert compile_response_format({"type": "json_schema", "json_schema": spec}, tok) is first
    reordered = {**SCHEMAS["person"], "properties": dict(reversed(SCHEMAS["person"]["properties"].items()))}
    assert compile_response_format(json_schema(reordered), tok) is not first
    # One vocabulary per tokenizer object; each keeps MAX_GRAMMARS formats, least recently used dropped.
    other = load_tokenizer()
    assert compile_response_format(json_schema(SCHEMAS["person"]), other) is not first
    assert structured._compiler(other) is not structured._compiler(tok)
    monkeypatch.setattr(structured, "MAX_GRAMMARS", 2)
    formats = [json_schema({"enum": [i]}) for i in range(3)]
    grammars = [compile_response_format(f, other) for f in formats]
    assert compile_response_format(formats[2], other) is grammars[2]
    assert compile_response_format(formats[0], other) is not grammars[0]  # evicted


def test_compile_on_one_thread_match_on_another(tok):
    grammar = compile_response_format(json_schema(SCHEMAS["person"]), tok)
    ids = SentencePieceVocabulary(tok)('{"name": "Bo", "age": 7, "member": false}') + [tok.eos_id]
    errors = []

    def engine_thread():
        try:
            matcher = grammar.matcher()
            for token in ids:
                matcher.mask_(torch.zeros(32000))
                matcher.accept(token)
            assert matcher.finished
        except Exception as e:  # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=engine_thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_tokenizer_json_gives_the_same_masks(tmp_path, tok):
    # A Hugging Face tokenizer.json of the same vocabulary (the layout of mistralai's repos) goes through
    # llguidance's own reader; the masks along a document must be those of the sentencepiece model.
    tu = pytest.importorskip("transformers.tokenization_utils_base")
    tk = pytest.importorskip("tokenizers")
    if not hasattr(tu, "generate_merges"):
        pytest.skip("needs transformers >= 5 (generate_merges) to build a tokenizer.json without protobuf")
    sp = tok.sentencepiece
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = tu.generate_merges(vocab, {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())})
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("\u2581"), tk.normalizers.Replace(" ", "\u2581")])
    hf.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(),
                                       tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    other = load_tokenizer(tmp_path / "tokenizer.json")
    ids = SentencePieceVocabulary(tok)('{"name": "Ada", "age": 36, "member": true}') + [tok.eos_id]
    ours, theirs = (compile_response_format(json_schema(SCHEMAS["person"]), t).matcher() for t in (tok, other))
    for token in ids:
        assert allowed_ids(ours) == allowed_ids(theirs)
        ours.accept(token)
        theirs.accept(token)
    assert ours.finished and theirs.finished


# ---- through the server ----------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["Describe a person as JSON.", "Fill in the form:", "Bonjour"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "server.log"
    process = start_server(["--model", "tiny", "--max-batch", "8", "--max-seq-len", "512", "--max-queue", "64",
                            "--prefill-chunk", "64"], log)
    try:
        yield wait_for_url(process, log)
    finally:
        stop_servers(process)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_document(text: str, finish_reason: str, schema: dict) -> None:
    assert finish_reason == "stop", (finish_reason, text)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", ["person", "nested"])
def test_completions_follow_the_schema(client, name):
    schema = SCHEMAS[name]
    for stream in (False, True):
        for prompt in PROMPTS:
            kwargs = dict(model="tiny", prompt=prompt, max_tokens=400, temperature=1.0, seed=len(prompt), n=2,
                          extra_body={"response_format": json_schema(schema)})
            if stream:
                texts, reasons = ["", ""], [None, None]
                for chunk in client.completions.create(**kwargs, stream=True):
                    for choice in chunk.choices:
                        texts[choice.index] += choice.text
                        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            else:
                out = client.completions.create(**kwargs)
                texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
                reasons = [c.finish_reason for c in sorted(out.choices, key=lambda c: c.index)]
            for text, reason in zip(texts, reasons):
                check_document(text, reason, schema)


@pytest.mark.parametrize("name", ["person", "refs", "choice"])
def test_chat_follows_the_schema(client, name):
    schema = SCHEMAS[name]
    for stream in (False, True):
        for prompt in PROMPTS:
            kwargs = dict(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=400,
                          temperature=0.8, seed=7, response_format=json_schema(schema))
            if stream:
                chunks = list(client.chat.completions.create(**kwargs, stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            else:
                out = client.chat.completions.create(**kwargs)
                text, reason = out.choices[0].message.content, out.choices[0].finish_reason
            check_document(text, reason, schema)


def test_json_object_through_both_endpoints(client):
    # Any object: a random model may not close it within max_tokens, so only what was sent is checked, and the
    # whole document when it ended.
    fmt = {"type": "json_object"}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Reply in JSON"}],
                                          max_tokens=60, temperature=0, response_format=fmt)
    completion = client.completions.create(model="tiny", prompt="{", max_tokens=60, temperature=0,
                                           extra_body={"response_format": fmt})
    for text, reason in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                         (completion.choices[0].text, completion.choices[0].finish_reason)):
        assert text.lstrip().startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length"


def test_logprobs_are_of_the_unmasked_model(client):
    # Every token of a one-value enum is forced: masked logits would give each a log-probability of 0. The
    # tiny random model spreads its probability over the whole vocabulary instead.
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Pick"}], max_tokens=20,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         response_format=json_schema({"enum": ["mixture"]}))
    assert json.loads(out.choices[0].message.content) == "mixture"
    assert out.choices[0].finish_reason == "stop"
    assert all(c.logprob < -1.0 for c in out.choices[0].logprobs.content)


def test_max_tokens_cuts_the_document(client):
    out = client.completions.create(model="tiny", prompt="Cut", max_tokens=3, temperature=0,
                                    extra_body={"response_format": json_schema(SCHEMAS["person"])})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert out.choices[0].text.lstrip().startswith("{")


@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": "x"}), ("chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
def test_invalid_schemas_are_400(url, endpoint, body):
    def post(response_format, **extra):
        return httpx.post(f"{url}/v1/{endpoint}", json={"model": "tiny", "max_tokens": 4, **body,
                                                        "response_format": response_format, **extra})

    response = post(json_schema({"type": "foo"}))
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "response_format.json_schema.schema: Invalid type: foo",
                                        "type": "invalid_request_error", "param": "response_format", "code": None}
    response = post(json_schema({"type": "array", "uniqueItems": True}))
    assert response.status_code == 400 and "uniqueItems" in response.json()["error"]["message"]
    # The request schema: a bad type, a missing name, a schema that is not an object.
    for bad, param in (({"type": "xml"}, "response_format"),
                       ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}},
                        "response_format.json_schema.schema")):
        response = post(bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    response = post({"type": "json_object"}, ignore_eos=True)
    assert response.status_code == 400 and response.json()["error"]["param"] == "ignore_eos"
    # Free text is what it always was.
    assert post({"type": "text"}).status_code == 200

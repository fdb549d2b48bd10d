"""Generation: batch == alone (greedy and seeded sampling), sampling filters, EOS, stop strings, errors."""
from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral.cache import KVCache
from mixtral.config import from_name, with_overrides
from mixtral.errors import ContextLengthError, InputError
from mixtral.generate import TextStream, decode_step, prefill, sample, stop_at, token_logprobs
from mixtral.model import Transformer


@pytest.fixture(scope="module")
def model():
    config = with_overrides(from_name("tiny"), vocab_size=96, context_len=64, sliding_window=6)
    return Transformer(config).init_weights(seed=7, std=0.2).eval()


PROMPTS = [[1, 5, 9], [1, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12], [1]]


def test_batch_equals_each_prompt_alone_greedy(model):
    batched = mixtral.generate(model, PROMPTS, 20, eos_id=None, prefill_chunk=4)
    alone = [mixtral.generate(model, [p], 20, eos_id=None)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(out) == 20 for out in batched)


def test_batch_equals_each_prompt_alone_sampling(model):
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95, eos_id=None)
    batched = mixtral.generate(model, PROMPTS, 16, seed=[3, 4, 5], **kwargs)
    alone = [mixtral.generate(model, [p], 16, seed=s, **kwargs)[0] for p, s in zip(PROMPTS, [3, 4, 5])]
    assert batched == alone
    again = mixtral.generate(model, PROMPTS, 16, seed=[3, 4, 5], **kwargs)
    assert again == batched
    assert mixtral.generate(model, PROMPTS, 16, seed=[9, 9, 9], **kwargs) != batched


def test_greedy_continuation_is_argmax_of_full_forward(model):
    prompt = PROMPTS[1]
    out = mixtral.generate(model, [prompt], 8, eos_id=None)[0]
    seq = list(prompt)
    with torch.no_grad():
        for token in out:
            assert token == int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(token)


def test_eos_ends_a_row_and_is_returned(model):
    free = mixtral.generate(model, [PROMPTS[0]], 12, eos_id=None)[0]
    eos = free[4]
    stopped = mixtral.generate(model, [PROMPTS[0], PROMPTS[1]], 12, eos_id=eos)
    assert stopped[0] == free[: free.index(eos) + 1]


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits) == 1
    assert {sample(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample(logits, 1.0, top_p=0.01, generator=g) for _ in range(20)} == {1}
    assert {sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {1, 2}
    # top_p=0.9: tokens 1 and 2 hold ~99.9% of the mass together, each alone less than 90%.
    assert {sample(logits, 1.0, top_p=0.9, generator=g) for _ in range(200)} == {1, 2}


def test_stop_string_hold_back():
    assert stop_at("hello wor", ["world"]) == ("hello ", False)
    assert stop_at("hello world!", ["world"]) == ("hello ", True)
    assert stop_at("abc", ["x"]) == ("abc", False)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(prompts=[[]]), InputError, "prompt 0 is empty"),
    (dict(prompts=[[1, 96]]), InputError, r"token id 96 outside the vocabulary \[0, 96\)"),
    (dict(prompts=[[1] * 60]), ContextLengthError, "prompt 0 has 60 tokens.*context of 64 tokens"),
    (dict(temperature=-1.0), InputError, "temperature must be >= 0"),
    (dict(top_p=0.0), InputError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), InputError, "top_k must be >= 1"),
])
def test_errors(model, kwargs, error, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=10) | kwargs
    with pytest.raises(error, match=message):
        mixtral.generate(model, **args)


def test_stream_text_pieces_join_to_complete_and_respect_stop():
    tokenizer = mixtral.load_tokenizer()
    model = mixtral.load("tiny")
    prompt = "The experts of a mixture"
    full = mixtral.complete(model, tokenizer, [prompt], 24, eos_id=None)[0]
    pieces = list(mixtral.stream_text(model, tokenizer, prompt, 24, eos_id=None))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    assert "".join(mixtral.stream_text(model, tokenizer, prompt, 24, eos_id=None, stop=[stop])) == cut
    assert mixtral.complete(model, tokenizer, [prompt], 24, eos_id=None, stop=[stop]) == [cut]


def test_sampling_survives_extreme_temperature_and_top_p():
    # Found by fuzzing the server: logits / 1e-300 overflowed to inf (NaN probabilities), and a top_p that rounds to
    # 0 in float32 dropped every token. Both must mean "the most likely token".
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert [sample(logits, 1e-300, generator=g) for _ in range(5)] == [1] * 5
    assert [sample(logits, 1.0, top_p=1e-300, generator=g) for _ in range(5)] == [1] * 5


def test_the_steps_make_the_same_tokens_as_generate(model):
    # prefill over a chunk, then decode_step one token at a time, greedy: what `generate` gives.
    prompts = PROMPTS[:2]
    cache = KVCache(model.config, 2, 32, max_chunk=16)
    ids = torch.zeros(2, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    out: list[list[int]] = [[], []]
    with torch.inference_mode():
        logits = prefill(model, cache, ids, [len(p) for p in prompts])
        for _ in range(6):
            tokens = [sample(row) for row in logits]
            for row, t in zip(out, tokens):
                row.append(t)
            logits = decode_step(model, cache, tokens)
    assert out == mixtral.generate(model, prompts, 6, eos_id=None)
    # An inactive row takes nothing: its length stays.
    with torch.inference_mode():
        decode_step(model, cache, [None, 5], active=[False, True])
    assert cache.row_lengths == [3 + 6, 11 + 7]


def test_token_logprobs():
    logits = torch.tensor([0.0, 2.0, 1.0])
    expected = torch.log_softmax(logits, -1)
    logprob, top = token_logprobs(logits, 2, top=2)
    assert logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in top] == [1, 2] and top[0][1] == pytest.approx(float(expected[1]))
    assert token_logprobs(logits, 0)[1] is None
    assert len(token_logprobs(logits, 0, top=10)[1]) == 3


def test_text_stream_holds_back_and_stops():
    tokenizer = mixtral.load_tokenizer()
    ids = tokenizer.encode("hello world, hello moon", bos=False)
    text = tokenizer.decode(ids)
    plain = TextStream(tokenizer)
    assert "".join(plain.push(t) for t in ids) + plain.finish() == text and not plain.stopped
    # Stop string: pieces never show what it later takes back, and the text ends before it.
    stream = TextStream(tokenizer, stop=["moon", "hello m"])
    shown = ""
    for t in ids:
        shown += stream.push(t)
        assert text.startswith(shown) and "hello m" not in shown
        if stream.stopped:
            break
    assert stream.stopped and shown == "hello world, "
    # Held back at the end, without a stop string: final text, given by finish (here with the last token).
    held = TextStream(tokenizer, stop=["moonlight"])
    pieces = [held.push(t) for t in ids[:-1]]
    assert "".join(pieces) + held.finish(ids[-1]) == text and not held.stopped
    # Context: the text continues it, so its first piece keeps the leading space.
    follow = TextStream(tokenizer, context=tokenizer.encode("Paris", bos=False))
    assert "".join(follow.push(t) for t in tokenizer.encode("Paris is", bos=False)[-1:]) + follow.finish() == " is"

"""Generation: batch == alone (greedy and seeded sampling), sampling filters, EOS, stop strings, errors."""
from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral.config import from_name, with_overrides
from mixtral.errors import ContextLengthError, InputError
from mixtral.generate import _stop_at, sample
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
    assert _stop_at("hello wor", ["world"]) == ("hello ", False)
    assert _stop_at("hello world!", ["world"]) == ("hello ", True)
    assert _stop_at("abc", ["x"]) == ("abc", False)


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
    from mixtral.generate import sample

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert [sample(logits, 1e-300, generator=g) for _ in range(5)] == [1] * 5
    assert [sample(logits, 1.0, top_p=1e-300, generator=g) for _ in range(5)] == [1] * 5

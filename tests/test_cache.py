"""The KV cache: incremental decoding equals the full forward pass, with and without a sliding window."""
from __future__ import annotations

import pytest
import torch

from mixtral.cache import KVCache
from mixtral.config import with_overrides, from_name
from mixtral.errors import ContextLengthError
from mixtral.model import Transformer


def _model(window):
    config = with_overrides(from_name("tiny"), vocab_size=64, sliding_window=window, context_len=128)
    return Transformer(config).init_weights(seed=5, std=0.1).eval()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_incremental_equals_full_forward(window, chunk):
    model = _model(window)
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))  # 4x past the window
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 23, max_chunk=chunk)
        pieces = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, 23, chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_rolling_buffer_is_bounded_by_window_not_sequence():
    config = _model(5).config
    small = KVCache(config, 1, 100, max_chunk=4)
    large = KVCache(config, 1, 10_000, max_chunk=4)
    assert small.rolling and small.capacity == large.capacity == 5 + 4 - 1
    assert KVCache(_model(None).config, 1, 100).capacity == 100


def test_rows_at_different_lengths_match_single_rows():
    model = _model(4)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 64, (1, 9), generator=g), torch.randint(0, 64, (1, 3), generator=g)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 16, max_chunk=9)
        ids = torch.zeros(2, 9, dtype=torch.long)
        ids[0], ids[1, :3] = a[0], b[0]
        batched = model(ids, cache=cache, n_new=torch.tensor([9, 3]))
        step = model(torch.tensor([[7], [8]]), cache=cache, n_new=torch.tensor([1, 1]))
        alone_a = model(torch.cat([a, torch.tensor([[7]])], 1))
        alone_b = model(torch.cat([b, torch.tensor([[8]])], 1))
    torch.testing.assert_close(batched[0], alone_a[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, :3], alone_b[0, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone_a[0, 9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], alone_b[0, 3], atol=1e-5, rtol=1e-5)
    assert cache.row_lengths == [10, 4] and cache.kv_tokens == 14


def test_padding_never_reaches_the_outputs_as_nan():
    model = _model(None)
    cache = KVCache(model.config, 2, 8, max_chunk=4)
    with torch.no_grad():
        out = model(torch.ones(2, 4, dtype=torch.long), cache=cache, n_new=torch.tensor([4, 0]))
    assert torch.isfinite(out).all()
    assert cache.row_lengths == [4, 0]


def test_overflow_is_an_error_naming_the_limit():
    model = _model(None)
    cache = KVCache(model.config, 1, 4, max_chunk=4)
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ContextLengthError, match="5 tokens exceeds the cache's limit of 4"):
            model(torch.ones(1, 1, dtype=torch.long), cache=cache)


# ---- the row operations the serving engine runs on a pool of rows -----------------------------------------------

G = torch.Generator().manual_seed(3)
SEQS = [torch.randint(0, 64, (n,), generator=G).tolist() for n in (5, 7, 3, 9)]


def _assert_alone(model, logits, seqs: list[list[int]]) -> None:
    """Each row of `logits` [rows, vocab] is the last token's of its sequence computed from scratch, without a cache."""
    for got, seq in zip(logits, seqs, strict=True):
        torch.testing.assert_close(got, model(torch.tensor([seq]))[0, -1], atol=1e-5, rtol=1e-5)


def _feed(model, cache, seqs: list[list[int]]) -> torch.Tensor:
    """Feed one whole sequence to each row of `cache` (padded to the longest); the logits of each row's last token."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return model(ids, cache=cache, n_new=torch.tensor([len(s) for s in seqs]), last_only=True)[:, 0]


def _step(model, cache, tokens: list[int | None]) -> torch.Tensor:
    """One token for the rows whose token is not None; the logits [rows, vocab]."""
    ids = torch.tensor([[t or 0] for t in tokens])
    n_new = torch.tensor([int(t is not None) for t in tokens])
    return model(ids, cache=cache, n_new=n_new, last_only=True)[:, 0]


@pytest.fixture(params=[None, 4], ids=["full", "window4"])
def model(request):
    return _model(request.param)


@torch.no_grad()
def test_a_view_of_rows_writes_into_the_pool(model):
    pool = KVCache(model.config, 4, 16, max_chunk=9)
    view = pool.rows(1, 3)
    assert view.batch_size == 2
    _assert_alone(model, _feed(model, view, SEQS[:2]), SEQS[:2])
    assert pool.row_lengths == [0, 5, 7, 0] and view.row_lengths == [5, 7] and pool.kv_tokens == 12
    # The pool itself, and another view, go on from what the view wrote.
    _assert_alone(model, _step(model, pool, [None, 11, 12, None])[1:3], [SEQS[0] + [11], SEQS[1] + [12]])
    _assert_alone(model, _step(model, pool.rows(2, 3), [13]), [SEQS[1] + [12, 13]])
    assert pool.row_lengths == [0, 6, 9, 0]


@torch.no_grad()
def test_moved_rows_carry_their_sequence(model):
    pool = KVCache(model.config, 4, 16, max_chunk=9)
    _feed(model, pool, SEQS)
    pool.move_rows([0, 1], [1, 0])  # a swap
    assert pool.row_lengths == [7, 5, 3, 9]
    pool.move_rows([3], [2])  # a copy over row 2
    assert pool.row_lengths == [7, 5, 9, 9]
    _assert_alone(model, _step(model, pool, [20, 21, 22, 23]),
                  [SEQS[1] + [20], SEQS[0] + [21], SEQS[3] + [22], SEQS[3] + [23]])


@torch.no_grad()
def test_cleared_rows_start_afresh(model):
    pool = KVCache(model.config, 3, 16, max_chunk=9)
    _feed(model, pool, SEQS[:3])
    pool.clear_rows([1])
    assert pool.row_lengths == [5, 0, 3] and pool.kv_tokens == 8
    # Row 1 takes a new sequence; nothing of the old one is attended.
    _assert_alone(model, _feed(model, pool.rows(1, 2), [SEQS[3]]), [SEQS[3]])
    _assert_alone(model, _step(model, pool, [30, 31, 32]), [SEQS[0] + [30], SEQS[3] + [31], SEQS[2] + [32]])
    pool.reset()
    assert pool.row_lengths == [0, 0, 0] and pool.kv_tokens == 0
    _assert_alone(model, _feed(model, pool, SEQS[1:4]), SEQS[1:4])


def test_nbytes_counts_keys_and_values():
    config = _model(None).config
    cache = KVCache(config, 2, 10, dtype=torch.bfloat16)
    per_row = config.n_layers * config.n_kv_heads * (10 + 1) * config.head_dim * 2  # +1: the scratch slot
    assert cache.nbytes == 2 * 2 * per_row

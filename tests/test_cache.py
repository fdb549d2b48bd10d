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
    assert cache.row_lengths == [10, 4]


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


def test_nbytes_counts_keys_and_values():
    config = _model(None).config
    cache = KVCache(config, 2, 10, dtype=torch.bfloat16)
    per_row = config.n_layers * config.n_kv_heads * (10 + 1) * config.head_dim * 2  # +1: the scratch slot
    assert cache.nbytes == 2 * 2 * per_row

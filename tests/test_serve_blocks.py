"""The KV cache in blocks and the prefix cache, alone and inside the engine.

Oracles: the contiguous `mixtral.cache.KVCache` for the logits of a forward (same rows, same chunks), and
`mixtral.generate` on each prompt alone for whatever the engine produces with blocks shared, evicted and taken
back (preemption).
"""
from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral.cache import KVCache
from mixtral.errors import InputError
from mixtral.generate import prefill
from mixtral.serve.blocks import FREE, BlockBatch, BlockPool, BlockTable, OutOfBlocks
from mixtral.serve.engine import Engine, SamplingParams

from test_serve_engine import prompts_of, run, tokens


@pytest.fixture(scope="module")
def tokenizer():
    return mixtral.load_tokenizer()


@pytest.fixture(scope="module", params=["tiny", "tiny-dense"])
def model(request):
    # tiny-dense has a sliding window of 32: rows longer than it give their oldest blocks back.
    torch.set_num_threads(1)
    return mixtral.load(request.param)


# ---- the pool --------------------------------------------------------------------------------------------------

def test_blocks_are_taken_as_a_row_grows_and_given_back_when_it_leaves():
    config = mixtral.load("tiny").config
    pool = BlockPool(config, n_blocks=4, block_size=4)
    table = BlockTable()
    assert pool.needed(table, 5) == 2
    pool.grow(table, 5)
    table.length = 5
    assert len(table.blocks) == 2 and pool.used == 2 and pool.available == 2
    assert pool.needed(table, 3) == 0 and pool.needed(table, 4) == 1
    pool.release(table)
    assert pool.used == 0 and table.blocks == [] and table.length == 0
    for _ in range(4):
        pool.take()
    with pytest.raises(OutOfBlocks, match="all 4 KV blocks"):
        pool.take()


def test_prefix_cache_matches_full_blocks_and_evicts_the_least_recently_used():
    config = mixtral.load("tiny").config
    pool = BlockPool(config, n_blocks=6, block_size=4)
    tokens = list(range(100, 111))  # 11 tokens: two full blocks and a partial one
    a = BlockTable()
    pool.grow(a, 11)
    a.length = 11
    pool.register(a, tokens)
    assert len(a.names) == 2  # the partial block has no name
    # Another sequence with the same first 9 tokens takes the two full blocks by reference ...
    b = BlockTable()
    assert pool.match(b, tokens[:9] + [7, 7]) == 8
    assert b.blocks == a.blocks[:2] and pool.refs[a.blocks[0]] == 2
    # ... but never the last token of its prompt (its logits must be computed), and nothing after a difference.
    assert pool.match(BlockTable(), tokens[:8]) == 4
    assert pool.match(BlockTable(), [0] + tokens[1:]) == 0
    # The chain is by content and place: the second block's tokens at the start match nothing.
    assert pool.match(BlockTable(), tokens[4:8] + [1, 2]) == 0
    # Blocks nobody holds stay cached (idle), and are evicted least recently used first when blocks run out.
    pool.clear()
    pool = BlockPool(config, n_blocks=4, block_size=4)
    first, second = BlockTable(), BlockTable()
    for table, base in ((first, 0), (second, 50)):
        pool.grow(table, 8)
        table.length = 8
        pool.register(table, list(range(base, base + 8)))
    pool.release(first)
    pool.release(second)
    assert pool.available == 4 and len(pool.idle) == 4 and not pool.free
    pool.take()  # evicts the first block of `first`
    assert pool.evictions == 1
    assert pool.match(BlockTable(), list(range(9))) == 0  # its chain starts at the evicted block
    assert pool.match(BlockTable(), list(range(50, 59))) == 8


def test_a_shared_partly_filled_block_is_copied_on_the_first_write():
    config = mixtral.load("tiny").config
    pool = BlockPool(config, n_blocks=4, block_size=4)
    a = BlockTable()
    pool.grow(a, 6)
    a.length = 6
    pool.k[:, a.blocks[1] * 4: a.blocks[1] * 4 + 2] = 1.0
    b = pool.fork(a)
    assert b.blocks == a.blocks and pool.needed(b, 1) == 1
    pool.grow(b, 1)
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert torch.equal(pool.k[:, b.blocks[1] * 4: b.blocks[1] * 4 + 4], pool.k[:, a.blocks[1] * 4: a.blocks[1] * 4 + 4])
    assert pool.refs[a.blocks[1]] == 1 and pool.needed(a, 1) == 0  # the original is a's alone again


def test_a_sliding_window_gives_back_the_blocks_it_left_behind():
    config = mixtral.load("tiny-dense").config  # window 32
    pool = BlockPool(config, n_blocks=8, block_size=8)
    table = BlockTable()
    for _ in range(100):
        pool.grow(table, 1)
        table.length += 1
        live = [b for b in table.blocks if b != FREE]
        # Everything a query at the next position can still see is held; nothing much older is.
        assert table.first_live * 8 <= max(0, table.length - 1 - 32 + 1)
        assert len(live) <= 32 // 8 + 2
    assert pool.used == len([b for b in table.blocks if b != FREE])


# ---- the forward through blocks --------------------------------------------------------------------------------

def test_a_forward_through_blocks_equals_the_contiguous_cache(model):
    lengths, chunk = [1, 9, 40, 23, 70], 16
    prompts = prompts_of(lengths, seed=3)
    rows = len(prompts)
    contiguous = KVCache(model.config, rows, 96, max_chunk=chunk)
    pool = BlockPool(model.config, n_blocks=64, block_size=8)
    tables = [BlockTable() for _ in prompts]
    with torch.inference_mode():
        for start in range(0, max(lengths), chunk):
            n_new = [max(0, min(chunk, n - start)) for n in lengths]
            ids = torch.zeros(rows, chunk, dtype=torch.long)
            for i, (p, n) in enumerate(zip(prompts, n_new)):
                ids[i, :n] = torch.tensor(p[start: start + n])
            want = prefill(model, contiguous, ids, n_new)
            got = prefill(model, BlockBatch(pool, tables, 96), ids, n_new)
            for i, n in enumerate(n_new):
                if n:
                    torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        # Decoding on: every row one token at its own position.
        for _ in range(12):
            ids = torch.randint(3, 32000, (rows, 1))
            want = prefill(model, contiguous, ids)
            got = prefill(model, BlockBatch(pool, tables, 96), ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [t.length for t in tables] == contiguous.row_lengths


# ---- the engine with blocks ------------------------------------------------------------------------------------

LENGTHS = [40, 5, 33, 9, 17, 3, 36, 2, 12, 25]
MAX_TOKENS = [12, 20, 9, 14, 3, 30, 8, 12, 1, 16]


def test_outputs_equal_alone_with_a_shared_prefix_eviction_and_preemption(model, tokenizer):
    # Half the prompts start with the same 24 tokens. The pool holds 24 blocks of 4 tokens (96 tokens), so
    # sequences are preempted when the running ones grow, and cached blocks are evicted to make room.
    system = prompts_of([24], seed=5)[0]
    prompts = [system + p[1:] if i % 2 else p for i, p in enumerate(prompts_of(LENGTHS, seed=6))]
    memory = 24 * BlockPool.bytes_per_block(model.config, 4, torch.float32)
    engine = Engine(model, tokenizer, max_batch=6, max_seq_len=80, prefill_chunk=8, kv_cache_memory=memory,
                    block_size=4)
    jobs = [(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p, n in zip(prompts, MAX_TOKENS)]
    got = [tokens(e) for e in run(engine, jobs)]
    alone = [mixtral.generate(model, [p], n, eos_id=None)[0] for p, n in zip(prompts, MAX_TOKENS)]
    assert got == alone
    assert engine.counts["cached_tokens"] > 0, "the shared system prompt was computed every time"
    assert engine.counts["preemptions"] > 0 and engine.pool.evictions > 0, "the test did not force eviction"
    assert engine.rows == [] and engine.pool.used == 0 and engine.kv_tokens == 0


def test_a_shared_system_prompt_is_computed_once(tokenizer):
    model = mixtral.load("tiny")
    system = prompts_of([37], seed=8)[0]
    prompts = [system + [100 + i, 200 + i] for i in range(4)]
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64, prefill_chunk=64, block_size=8)
    jobs = [(p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)) for p in prompts]
    got = [tokens(e) for e in run(engine, jobs, arrive_every=3)]  # each arrives after the first's prefill
    assert got == [mixtral.generate(model, [p], 5, eos_id=None)[0] for p in prompts]
    # The first computes 39 tokens; the others find its 4 full blocks (32 tokens) and compute 7.
    assert engine.counts["prefill_tokens"] == 39 + 3 * 7
    assert engine.counts["cached_tokens"] == 3 * 32


def test_n_choices_share_one_prefill(tokenizer):
    model = mixtral.load("tiny")
    prompt = prompts_of([29], seed=9)[0]
    settings = dict(temperature=0.9, top_k=40)
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64, prefill_chunk=8, block_size=8,
                    prefix_caching=False)
    events: list[list] = [[] for _ in range(4)]
    engine.submit([(prompt, SamplingParams(max_tokens=10, seed=10 + i, ignore_eos=True, **settings), events[i].append)
                   for i in range(4)])
    with torch.inference_mode():
        while engine.rows or engine.waiting:
            engine.step()
    assert engine.counts["prefill_tokens"] == len(prompt)  # one prefill, counted
    assert engine.counts["cached_tokens"] == 3 * len(prompt)
    for i, e in enumerate(events):
        assert tokens(e) == mixtral.generate(model, [prompt], 10, seed=10 + i, eos_id=None, **settings)[0]
    assert engine.pool.used == 0


def test_a_leader_cancelled_before_its_prefill_hands_over_to_a_follower(tokenizer):
    model = mixtral.load("tiny")
    prompt = prompts_of([30], seed=11)[0]
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64, prefill_chunk=8, block_size=8)
    events: list[list] = [[] for _ in range(3)]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    gens = engine.submit([(prompt, greedy, e.append) for e in events])
    with torch.inference_mode():
        engine.step()  # the leader prefilled its first chunk
        engine.cancel(gens[0])
        while engine.rows or engine.waiting:
            engine.step()
    want = mixtral.generate(model, [prompt], 6, eos_id=None)[0]
    assert events[0][-1].finish_reason == "cancelled"
    assert tokens(events[1]) == want and tokens(events[2]) == want
    assert engine.pool.used == 0


def test_memory_follows_lengths_more_rows_at_equal_memory(tokenizer):
    # Fixed rows of max_seq_len 512 in this memory: 2. Sequences of 32 tokens (prompt and completion) fit 32
    # times as many; the engine must run at least 4 times as many at once (the same ratio as rows of 512 tokens
    # against fixed rows of 8192).
    model = mixtral.load("tiny")
    memory = 2 * 512 // 16 * BlockPool.bytes_per_block(model.config, 16, torch.float32)
    engine = Engine(model, tokenizer, max_batch=64, max_seq_len=512, prefill_chunk=64, kv_cache_memory=memory)
    prompts = prompts_of([24] * 16, seed=12)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.submit([(p, greedy, lambda event: None) for p in prompts])
    with torch.inference_mode():
        while engine.rows or engine.waiting:
            engine.step()
    assert engine.peak_rows >= 4 * 2


def test_a_memory_too_small_for_one_sequence_is_refused(tokenizer):
    model = mixtral.load("tiny")
    with pytest.raises(InputError, match="needs 32"):
        Engine(model, tokenizer, max_seq_len=512, kv_cache_memory=100 * 2 ** 10)

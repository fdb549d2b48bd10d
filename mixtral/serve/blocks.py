"""The server's KV cache in blocks: memory that follows the sequences' actual lengths, and prefixes shared.

The pool is one buffer of `n_blocks` blocks of `block_size` token slots per layer. A sequence owns a block table:
logical block i holds its positions [i * block_size, (i + 1) * block_size). It takes a block from the free list
when it grows into the next one, so a row of 500 tokens holds 500 tokens of memory, not the server's context,
and the engine admits sequences while blocks are left, not up to a fixed number of rows.

Prefix caching. A full block is named by its tokens and the name of the block before it (`BlockPool.register`),
so two sequences whose first k blocks hold the same tokens hold the same keys and values there: a new sequence
`match`es its prompt's longest cached chain of full blocks and takes those blocks by reference (a reference count
each) instead of computing them. A block nobody uses any more keeps its contents and its name, in least-recently
-used order; it is evicted (its name dropped, its memory reused) only when the free list is empty. A sequence
never writes into a block another one holds: `fork` (the `n` choices of one prompt share its prefill) shares
every block, the last one partly filled, and the first write into a shared block copies it first.

Sliding-window models keep their rolling bound: a block whose positions every future query has left behind (all
more than `window` before the next token) goes back to the pool, so a row holds at most about `window + chunk +
block_size` slots.

A forward over some sequences goes through a `BlockBatch`, the cache object the model sees (`advance`, `update`,
like `mixtral.cache.KVCache`): its rows gather their keys and values from the pool in position order, so a row
attends over exactly what the contiguous cache would give it, in the same order.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mixtral.config import ModelConfig
from mixtral.errors import ContextLengthError

FREE = -1  # a block-table entry given back (behind a sliding window)


class OutOfBlocks(Exception):
    """The pool has no block left to give: the engine must make room (preempt a sequence) first."""


@dataclass
class BlockTable:
    """One sequence's blocks: blocks[i] holds positions [i * block_size, (i + 1) * block_size), FREE once left
    behind by a sliding window. `length`: tokens stored. `names`: the cache name of each registered full block."""
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    names: list[int] = field(default_factory=list)

    @property
    def first_live(self) -> int:
        """The first logical block still held (all before it were given back)."""
        for i, b in enumerate(self.blocks):
            if b != FREE:
                return i
        return len(self.blocks)


class BlockPool:
    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs at least one block of at least one slot, got {n_blocks} x {block_size}")
        self.config = config
        self.n_blocks, self.block_size = n_blocks, block_size
        self.window = config.sliding_window
        # [layer, slot, kv_heads, head_dim]; the last slot is scratch, where padding tokens write and nobody reads.
        self.scratch = n_blocks * block_size
        shape = (config.n_layers, self.scratch + 1, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * n_blocks
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # popped from the end: block 0 first
        # The prefix cache: (name of the block before, its tokens) -> (name, block). Names are never reused, so a
        # chain whose first block was evicted can no longer be reached through it.
        self.cached: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key in `cached`
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recently used first
        self._names = itertools.count(1)  # 0 names the empty prefix
        self.evictions = 0  # cached blocks dropped to make room

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Keys and values of one block in every layer."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def available(self) -> int:
        """Blocks a sequence could take now: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.n_blocks - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- taking and giving back ----------------------------------------------------------------------------------

    def take(self) -> int:
        """A block for one sequence to write: a free one, else the least recently used idle cached one."""
        if self.free:
            block = self.free.pop()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
            self.evictions += 1
        else:
            raise OutOfBlocks(f"all {self.n_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more sequence holds `block`."""
        if self.refs[block] == 0:
            self.idle.pop(block, None)
        self.refs[block] += 1

    def give_back(self, block: int) -> None:
        """One sequence lets go of `block`: when nobody holds it, a cached block goes idle, any other one free."""
        self.refs[block] -= 1
        assert self.refs[block] >= 0, block
        if self.refs[block] == 0:
            if block in self.key_of:
                self.idle[block] = None
            else:
                self.free.append(block)

    def release(self, table: BlockTable) -> None:
        """Give back every block of a sequence that leaves (or is preempted); its table ends empty."""
        for block in table.blocks:
            if block != FREE:
                self.give_back(block)
        table.blocks, table.length, table.names = [], 0, []

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table holding the same blocks (the choices of one prompt after its one prefill)."""
        for block in table.blocks:
            if block != FREE:
                self.hold(block)
        return BlockTable(list(table.blocks), table.length, list(table.names))

    # ---- the prefix cache ----------------------------------------------------------------------------------------

    def match(self, table: BlockTable, tokens: Sequence[int]) -> int:
        """Start an empty `table` with the cached blocks of the longest cached prefix of `tokens` made of full
        blocks, leaving at least the last token to compute (its logits are needed). Returns the tokens matched."""
        assert not table.blocks, "match starts a sequence"
        bs = self.block_size
        name = 0
        for i in range((len(tokens) - 1) // bs):
            entry = self.cached.get((name, tuple(tokens[i * bs: (i + 1) * bs])))
            if entry is None:
                break
            name, block = entry
            self.hold(block)
            table.blocks.append(block)
            table.names.append(name)
        table.length = len(table.blocks) * bs
        return table.length

    def register(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Name the full blocks of `table` not named yet; `tokens` are the sequence's tokens so far. A block whose
        name another block already has stays private (both hold the same values), and the chain goes on from it."""
        bs = self.block_size
        while len(table.names) < table.length // bs:
            i = len(table.names)
            key = (table.names[-1] if table.names else 0, tuple(tokens[i * bs: (i + 1) * bs]))
            entry = self.cached.get(key)
            block = table.blocks[i]
            if entry is None and block != FREE and block not in self.key_of:
                entry = (next(self._names), block)
                self.cached[key] = entry
                self.key_of[block] = key
            table.names.append(entry[0] if entry is not None else next(self._names))

    def clear(self) -> None:
        """Forget everything (after a failed step): every block free, the cache empty."""
        self.refs = [0] * self.n_blocks
        self.free = list(range(self.n_blocks - 1, -1, -1))
        self.cached.clear()
        self.key_of.clear()
        self.idle.clear()

    # ---- growing a sequence --------------------------------------------------------------------------------------

    def needed(self, table: BlockTable, n_new: int) -> int:
        """Blocks `grow(table, n_new)` would take: new ones past the end, and a copy of a shared last block."""
        if n_new == 0:
            return 0
        return self.blocks_for(table.length + n_new) - len(table.blocks) + int(self._shared_tail(table))

    def _shared_tail(self, table: BlockTable) -> bool:
        """Whether the next token of `table` goes into a partly filled block that another sequence holds too."""
        return table.length % self.block_size != 0 and self.refs[table.blocks[-1]] > 1

    def grow(self, table: BlockTable, n_new: int) -> None:
        """Make room in `table` for `n_new` more tokens (blocks taken, a shared partly-filled block copied), and
        give back the blocks a sliding window has left behind for good."""
        bs = self.block_size
        if n_new and self._shared_tail(table):
            old, new = table.blocks[-1], self.take()
            self.k[:, new * bs: (new + 1) * bs] = self.k[:, old * bs: (old + 1) * bs]
            self.v[:, new * bs: (new + 1) * bs] = self.v[:, old * bs: (old + 1) * bs]
            self.give_back(old)
            table.blocks[-1] = new
        while len(table.blocks) < self.blocks_for(table.length + n_new):
            table.blocks.append(self.take())
        if self.window is not None and n_new:
            # The first query of this chunk, at position `length`, sees keys after length - window: every block
            # ending at or before that is dead for this and every later query.
            dead = max(0, table.length - self.window + 1) // bs
            for i in range(table.first_live, min(dead, len(table.blocks))):
                self.give_back(table.blocks[i])
                table.blocks[i] = FREE


class BlockBatch:
    """The cache object of one forward over some sequences (`mixtral.cache.KVCache`'s `advance` and `update`):
    row r is `tables[r]`, stored in `pool`."""

    def __init__(self, pool: BlockPool, tables: Sequence[BlockTable], max_len: int):
        self.pool, self.tables, self.max_len = pool, list(tables), max_len
        self._write: torch.Tensor | None = None  # [rows * chunk] slots this chunk's keys go to
        self._read: torch.Tensor | None = None  # [rows, keys] slots each row attends over, in position order

    def advance(self, chunk: int, n_new: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the blocks for a chunk of `chunk` tokens per row, of which the first `n_new[r]` are real.

        Returns (positions [rows, chunk] of the new tokens, attention mask [rows, 1, chunk, keys]). Raises
        ContextLengthError past `max_len`, OutOfBlocks when the pool is short (the engine checks `needed` first).
        """
        pool, bs = self.pool, self.pool.block_size
        rows = len(self.tables)
        counts = [chunk] * rows if n_new is None else [int(n) for n in n_new.tolist()]
        starts = [t.length for t in self.tables]
        longest = max(s + n for s, n in zip(starts, counts))
        if longest > self.max_len:
            raise ContextLengthError(f"sequence of {longest} tokens exceeds the cache's limit of {self.max_len}")
        for table, n in zip(self.tables, counts):
            pool.grow(table, n)
        # Each row's keys start at its first live block, in position order; a row shorter than the longest is
        # padded with the scratch slot (masked).
        firsts = [t.first_live for t in self.tables]
        n_keys = max(len(t.blocks) - f for t, f in zip(self.tables, firsts)) * bs
        read = torch.full((rows, n_keys), pool.scratch, dtype=torch.long)
        key_pos = torch.full((rows, n_keys), -1, dtype=torch.long)
        write = torch.full((rows, chunk), pool.scratch, dtype=torch.long)
        offsets = torch.arange(bs)
        for r, (table, first, start, n) in enumerate(zip(self.tables, firsts, starts, counts)):
            live = torch.tensor(table.blocks[first:], dtype=torch.long)
            slots = (live[:, None] * bs + offsets).flatten()
            read[r, : len(slots)] = slots
            end = start + n
            key_pos[r, : end - first * bs] = torch.arange(first * bs, end)
            positions = torch.arange(start, end)
            write[r, :n] = slots[positions - first * bs]
            table.length = end
        device = pool.k.device
        self._write, self._read = write.flatten().to(device), read.to(device)
        positions = torch.tensor(starts)[:, None] + torch.arange(chunk)  # [rows, chunk]
        key_pos = key_pos[:, None, :]
        mask = (key_pos >= 0) & (key_pos <= positions[:, :, None])
        if pool.window is not None:
            mask &= positions[:, :, None] - key_pos < pool.window
        # A padding query may see no key at all; let it see everything rather than produce NaN (its output is never
        # read, and NaN must not reach the MoE router).
        mask |= ~mask.any(-1, keepdim=True)
        return positions.to(device), mask[:, None].to(device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's keys/values ([rows, kv_heads, chunk, head_dim]) of `layer`; return the keys and values
        each row attends over, [rows, kv_heads, keys, head_dim], matching the mask from `advance`."""
        pool = self.pool
        heads, dim = k.shape[1], k.shape[3]
        pool.k[layer].index_copy_(0, self._write, k.transpose(1, 2).reshape(-1, heads, dim))
        pool.v[layer].index_copy_(0, self._write, v.transpose(1, 2).reshape(-1, heads, dim))
        return pool.k[layer][self._read].transpose(1, 2), pool.v[layer][self._read].transpose(1, 2)

"""Batch-invariant mode: every row's logits independent of what else is in the batch, bitwise, at a cost.

Off by default. `with batch_invariant():` turns it on for the current thread only (a serving engine runs its
forwards inside it on its own thread; `mixtral.generate.generate(..., batch_invariant=True)` on the caller's);
`is_batch_invariant()` is what the model and the CPU backend ask.

What makes a row depend on its batch, measured on an AMD EPYC (AVX512-BF16, no AMX), torch 2.13, 2 threads:
- torch's matrix products choose a kernel by the number of rows. bf16 (oneDNN): a row alone rounds differently
  from the same row among others (4096x4096: 9 of 16 rows, 174 of 256 differ from themselves alone); float32
  (MKL): every row differs from itself alone, and 2 or 3 rows differ from 4 or more. `kernels.matmul` runs
  gemv.c up to 8 rows and oneDNN beyond, so its rows change from 9 rows on. The MoE gives each expert the tokens
  routed to it: an expert's product has as many rows as the batch happens to send it.
- SDPA's output for a query changes with masked keys past its own (a batch pads every row's keys to the longest
  row's), with the other queries of its chunk (58 of 64 queries differ from themselves alone), and in float32
  with the batch size.
- Elementwise kernels run a vectorised body and a scalar remainder, split between threads by the tensor's size:
  float32 silu rounds 4% of elements differently computed alone, so an element's place in the batch counts.
Together, on a Mixtral-8x7B-shaped layer in bf16, none of 16 rows decoded together had the logits it has alone
(`mixtral bench batch-invariant`; docs/performance.md).

What the mode does instead: every row goes through a computation whose shapes and inputs are its own.
- Products: gemv.c's GEMV where it runs (bf16 weights and activations, AVX512-BF16) takes all rows at once, since
  each output is one chain of vdpbf16ps over k in order and one horizontal sum whatever the number of rows;
  anything else (float32, quantized weights, a CPU without that kernel) runs one row at a time (`by_row`), through
  the path of one row. amx.c and (W xᵀ)ᵀ never run: their blocking follows the rows. `CpuPolicy.linear_path` and
  `expert_path` (invariant=True) make that choice.
- RMSNorm, silu(gate) · up and the RoPE tables: one row at a time (`by_row`).
- Attention: one query at a time over the keys it may see, cut after the last of them (`attend_by_query`).
Left as they are, because their result for a row cannot depend on the others: embeddings, residual additions,
casts, RoPE's products (each correctly rounded, in any loop), top-k, the softmax over the chosen experts' logits
(torch computes it row by row in one thread), and the sum of a token's experts (added in expert order).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

_state = threading.local()


def is_batch_invariant() -> bool:
    """Whether this thread runs in the batch-invariant mode (False unless inside `batch_invariant()`)."""
    return getattr(_state, "enabled", False)


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Run the block with the batch-invariant mode `enabled` (or, with False, disabled) in this thread; the
    previous setting comes back after it. Other threads are not affected."""
    previous = is_batch_invariant()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def by_row(fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """fn applied to each row of `xs` on its own: tensors [..., features] with the same leading dimensions, each
    row handed to fn as a fresh [1, features] tensor (so that not even its address in memory depends on the batch);
    fn returns [1, out] and the rows come back as [..., out]."""
    lead = xs[0].shape[:-1]
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    if len(flat[0]) == 0:
        out = fn(*flat)
    else:
        out = torch.cat([fn(*(x[i:i + 1].clone() for x in flat)) for i in range(len(flat[0]))])
    return out.reshape(*lead, out.shape[-1])


def attend_by_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v, one query at a time over the keys up to the last one it may see.

    q: [batch, heads, queries, head_dim]; k, v: [batch, kv_heads, keys, head_dim] (kv_heads divides heads); mask:
    boolean, broadcastable to [batch, 1, queries, keys], or None for causal attention (the queries are the last
    keys). Returns [batch, heads, queries, head_dim]. Neither the other rows (how far their keys reach), nor the
    other queries of the chunk (padding ones included), nor where the cache keeps the row (its strides) change a
    query's result: each row's keys are copied once into a tensor of their own, and each query is one SDPA call of
    its own shape.
    """
    batch, heads, queries, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
    mask = mask.expand(batch, 1, queries, keys)
    numbers = torch.arange(1, keys + 1, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    for b in range(batch):
        # One past the last key each query sees; the row's padding queries see what its last real one does, so
        # the longest of them is the row's own too.
        ends = torch.where(mask[b, 0], numbers, 0).amax(-1).tolist()
        longest = max(ends)
        row_k, row_v = k[b:b + 1, :, :longest].contiguous(), v[b:b + 1, :, :longest].contiguous()
        for i, end in enumerate(ends):
            # The query heads sharing a key/value head go in as that head's queries, [1, kv_heads, group,
            # head_dim]: the same products, 10x faster for one query than SDPA's enable_gqa (1.2 ms against 0.12
            # over 256 keys, 32 heads on 8).
            query = q[b, :, i].reshape(1, kv_heads, heads // kv_heads, head_dim).contiguous()
            y = F.scaled_dot_product_attention(query, row_k[:, :, :end], row_v[:, :, :end],
                                               attn_mask=mask[b:b + 1, :, i:i + 1, :end])
            out[b, :, i] = y.reshape(heads, head_dim)
    return out

"""The Mixtral transformer, in the order data flows through it.

Mistral 7B's architecture (RMSNorm, rotary embeddings, grouped-query attention, optional sliding window) with
every FFN replaced by the sparse mixture of experts in `mixtral.moe`. Rotary embeddings use the
"rotate half" convention of the Hugging Face checkpoints; Mistral-native checkpoints are permuted into it on load
(see `mixtral.io.layouts`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixtral import kernels
from mixtral.batch_invariant import attend_by_query, by_row, is_batch_invariant
from mixtral.cache import KVCache
from mixtral.config import ModelConfig
from mixtral.moe import MoE, Routing


class Linear(nn.Linear):
    """nn.Linear without bias whose product goes through `mixtral.kernels.matmul` (a faster GEMV when decoding)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.matmul(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_batch_invariant():  # one row at a time: torch sums a lone long row in parts, on several threads
            return by_row(self._normalize, x)
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as the reference does: bf16 sums drift.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for absolute `positions` [batch, seq] -> each [batch, 1, seq, head_dim], computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions[..., None].float() * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    if is_batch_invariant():  # one position at a time: a vectorised body and its scalar remainder may round apart
        return by_row(torch.cos, angles).to(dtype)[:, None], by_row(torch.sin, angles).to(dtype)[:, None]
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [batch, heads, seq, head_dim] by their position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v, with k and v shared by groups of query heads (in the batch-invariant
    mode one query at a time over the keys it sees: `attend_by_query`)."""
    if is_batch_invariant():
        return attend_by_query(q, k, v, mask)
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # Training under bf16 autocast: PyTorch's CPU flash attention is faster in float32 (forward + backward
        # 15.6 ms against 21.1 per layer of the 42.7M benchmark model), and q, k are float32 already (rope).
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=mask is None, enable_gqa=gqa)
    if gqa and mask is not None:
        # The query heads that share a key/value head go in as that head's queries, [batch, kv_heads, group *
        # queries, head_dim], each with its query's mask row: the same products as enable_gqa, which on the CPU
        # in bf16 is ~9x slower for a decode step (16 rows x 1024 keys, 32 heads on 8: 56 against 6.4 ms a layer).
        batch, heads, queries, head_dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        group = heads // kv_heads
        folded = q.reshape(batch, kv_heads, group * queries, head_dim)
        mask = mask.expand(batch, 1, queries, keys)[:, :, None].expand(batch, 1, group, queries, keys)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.reshape(batch, 1, group * queries, keys))
        return out.reshape(batch, heads, queries, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [batch, kv_heads, slots, head_dim]
        return self.wo(attend(q, k, v, mask).transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.moe = MoE(config.dim, config.hidden_dim, config.n_experts, config.top_k)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        y, routing = self.moe(self.ffn_norm(x), return_routing=True)
        return x + y, routing


def causal_mask(seq: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[seq, seq] boolean mask for a full forward pass; None when plain causal attention will do."""
    if window is None or window >= seq:
        return None
    pos = torch.arange(seq, device=device)
    offset = pos[:, None] - pos[None, :]
    return (offset >= 0) & (offset < window)


def document_mask(documents: torch.Tensor, window: int | None) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask for rows packed with several documents (`documents` [batch, seq], the
    document of each token, equal for consecutive tokens of one): causal, within the token's own document, and
    within the sliding window if there is one."""
    seq = documents.shape[1]
    pos = torch.arange(seq, device=documents.device)
    offset = pos[:, None] - pos[None, :]
    allowed = offset >= 0 if window is None else (offset >= 0) & (offset < window)
    return (allowed & (documents[:, :, None] == documents[:, None, :]))[:, None]


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[batch, seq]: each token's position within its document (0 at each document's first token)."""
    batch, seq = documents.shape
    index = torch.arange(seq, device=documents.device).expand(batch, seq)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - (index * starts).cummax(dim=1).values


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, n_new: torch.Tensor | None = None,
                last_only: bool = False, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids` [batch, seq].

        Without `cache`: the whole sequences from position 0, logits [batch, seq, vocab]. `documents` [batch,
        seq] (no cache): rows packed with several documents, the document of each token; each then attends only
        within its own and its positions start at 0 (`document_mask`, `document_positions`), as if run alone.
        With `cache`: the next `seq` tokens of each row after what the cache holds; `n_new[b]` of them are real
        (the rest padding, default all). `last_only` returns only the logits of each row's last real token,
        [batch, 1, vocab], skipping the output projection of the others.
        """
        h, _ = self.trunk(input_ids, cache, n_new, documents)
        if last_only:
            batch, seq = input_ids.shape
            last = (n_new - 1) if n_new is not None else torch.full((batch,), seq - 1, device=h.device)
            h = h[torch.arange(batch, device=h.device), last][:, None]
        return self.output(self.norm(h))

    def trunk(self, input_ids: torch.Tensor, cache: KVCache | None = None, n_new: torch.Tensor | None = None,
              documents: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Routing]]:
        """The hidden states after the last block, [batch, seq, dim] before the final norm, and each MoE layer's
        `Routing` (none for a dense model). `forward` adds the norm and output projection; training takes the
        routing for its auxiliary losses and computes the cross-entropy from `norm(h)` in chunks
        (`mixtral.train.losses`). Arguments as for `forward`.
        """
        batch, seq = input_ids.shape
        if documents is not None:
            assert cache is None, "packed documents are for full forward passes (training), not the KV cache"
            positions = document_positions(documents)
            mask = document_mask(documents, self.config.sliding_window)
        elif cache is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            mask = causal_mask(seq, self.config.sliding_window, input_ids.device)
        else:
            positions, mask = cache.advance(seq, n_new)
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        routing = []
        for i, layer in enumerate(self.layers):
            h, r = layer(h, cos, sin, mask, cache, i)
            if r is not None:
                routing.append(r)
        return h, routing

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Random weights in place (`init_weights_`) for presets without a checkpoint; returns self."""
        return init_weights_(self, seed, std)


def init_weights_(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every parameter of `module` in place: norm weights with 1, the rest from N(0, std) drawn from a
    generator seeded with `seed`, each in its own dtype (no float32 staging copy). Returns `module`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            init_parameter_(name, p, generator, std)
    return module


def init_parameter_(name: str, p: torch.Tensor, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """Fill the parameter `name` (or a part of it: the draws of consecutive parts, in order, are the draws of the
    whole) as `init_weights_` does: norm weights with 1, the rest from N(0, std). Returns `p`."""
    return p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std, generator=generator)


def empty_model(config: ModelConfig, dtype: torch.dtype = torch.float32, *,
                on_meta: Callable[[Transformer], None] | None = None) -> Transformer:
    """A Transformer whose parameters are allocated once, in `dtype`, and not initialised (built on the meta
    device, then `to_empty`), with the large ones advised onto 2 MB pages before their first write. What the
    loaders read into and what `random_model` fills.

    on_meta: called with the model while it is still on the meta device, to change its modules before anything
    is allocated (the quantized-checkpoint loader swaps in quantized ones, so no float weight ever exists)."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    if on_meta is not None:
        on_meta(model)
    model = model.to_empty(device="cpu")
    kernels.prefer_huge_pages(model)  # before the first write, which then faults in 2 MB pages
    if config.tie_embeddings and isinstance(model.output, nn.Linear):  # a quantized output has its own buffers
        model.output.weight = model.tok_embeddings.weight
    return model


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 std: float = 0.02) -> Transformer:
    """A randomly initialised Transformer (`init_weights_`) in eval mode, with one copy of its weights in memory."""
    return init_weights_(empty_model(config, dtype), seed, std).eval()

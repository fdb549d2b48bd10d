"""The sparse mixture-of-experts layer of the paper's section 2.1.

    G(x) = Softmax(TopK(x · W_g))          y = Σ_i G(x)_i · SwiGLU_i(x)

All experts of a layer live in two tensors, so dispatch can slice them instead of walking modules:
    w13: [n_experts, 2 * hidden_dim, dim]   gate (w1) rows, then up (w3) rows: one matmul gives both
    w2:  [n_experts, dim, hidden_dim]       down projection
A dense FFN (Mistral 7B) is the same module with one expert and no router.

Two dispatches compute the same thing: `moe_reference` (a loop over experts with boolean masks, the oracle)
and `moe_grouped` (tokens sorted by expert once, one matmul per expert that got tokens on a contiguous slice,
one scatter back). Both are dropless: every token reaches all of its top-k experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral import kernels


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their gate weights.

    router_logits: [tokens, n_experts]. Returns (weights [tokens, top_k] float32, experts [tokens, top_k] int64).
    The softmax runs over the k chosen logits only (TopK before Softmax, as in the paper); this equals
    renormalising the full softmax over the chosen experts, which is how transformers computes it.
    """
    top_logits, experts = torch.topk(router_logits.float(), top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), experts


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x · wᵀ for one expert's weight: a plain tensor [out, in], or a quantized weight (see `mixtral.quant`) that
    brings its own kernel as `w.linear(x)`."""
    if isinstance(w, torch.Tensor):
        return kernels.matmul(x, w)
    return w.linear(x)


def swiglu(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """One expert: w2 · (silu(w1 · x) * (w3 · x)), with w1 and w3 stacked in w13. x: [n, dim]."""
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The obvious dispatch: for each expert, the tokens that chose it. The oracle for faster dispatches.

    x: [tokens, dim]; weights, experts: [tokens, top_k]. Returns [tokens, dim] in x's dtype.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(len(w13)):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        y = swiglu(x[token], w13[e], w2[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Grouped dispatch: sort the (token, expert) assignments by expert once, run each expert on its
    contiguous slice, scale by the gate weights and scatter-add back in one call.

    Same arguments and result as `moe_reference`.
    """
    n_tokens, top_k = experts.shape
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of = order // top_k  # which token each sorted assignment belongs to
    counts = torch.bincount(flat_experts, minlength=len(w13)).tolist()
    xs = x[token_of]  # [tokens * top_k, dim], grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count:
            ys[start:start + count] = swiglu(xs[start:start + count], w13[e], w2[e])
            start += count
    scaled = ys.float() * weights.reshape(-1)[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, scaled)
    return out.to(x.dtype)


DISPATCH = {"reference": moe_reference, "grouped": moe_grouped}


class MoE(nn.Module):
    """Router + experts. `dispatch` picks the implementation ("grouped" by default, "reference" the oracle)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        # A dense FFN has no router: every token goes to expert 0 with weight 1.
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.dispatch = "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.router is None:
            return swiglu(x, self.w13[0], self.w2[0]).reshape(shape)
        weights, experts = route(self.router(x), self.top_k)
        return DISPATCH[self.dispatch](x, self.w13, self.w2, weights, experts).reshape(shape)

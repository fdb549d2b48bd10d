"""The sparse mixture-of-experts layer of the paper's section 2.1.

    G(x) = Softmax(TopK(x · W_g))          y = Σ_i G(x)_i · SwiGLU_i(x)

All experts of a layer live in two tensors, so dispatch can slice them instead of walking modules:
    w13: [n_experts, 2 * hidden_dim, dim]   gate (w1) rows, then up (w3) rows: one matmul gives both
    w2:  [n_experts, dim, hidden_dim]       down projection
A dense FFN (Mistral 7B) is the same module with one expert and no router.

Two dispatches compute the same thing: `moe_reference` (a loop over experts with boolean masks, the oracle)
and `moe_grouped` (tokens sorted by expert once, one matmul per expert that got tokens on a contiguous slice,
one scatter back; in training its backward is written by hand, `GroupedSwiGLU`). Both are dropless by default:
every token reaches all of its top-k experts. At inference each expert's SwiGLU, w2 · (silu(w1 · x) * (w3 · x)),
is handed to the CPU backend one expert's weights at a time (`kernels.swiglu`, `kernels.experts_add`), which
picks the kernel; the weights may be slices of the stacks or quantized (`mixtral.quant.QuantizedExperts`). An
offloading engine (`mixtral.offload`) keeps the experts on disk instead: it sets the layer's `offload`, which then
runs the experts from the engine's memory slots, on the assignments `sort_by_expert` gives, as `moe_grouped` does.
Expert parallelism (`mixtral.parallel`) leaves only a process's own experts in w13/w2 and sets the layer's
`dispatch` to one that sends each token to the process holding its expert, its `keep` to a capacity counted over
every process's tokens, and at inference its `offload` to the experts of the other processes. In the
batch-invariant mode (`mixtral.batch_invariant`) the `Router` and the backend multiply with kernels whose result
for a token does not depend on how many tokens share the product.

Training options of the Switch Transformer (Fedus et al. 2021), set on the module by the trainer and used only in
training mode: `router_jitter` multiplies the router's input by U(1 - eps, 1 + eps) noise (section 2.4), and
`capacity_factor` caps each expert at ceil(capacity_factor * tokens * top_k / n_experts) assignments and drops
the rest (`capacity_mask`; a dropped assignment contributes nothing, the residual carries the token on).
`forward(x, return_routing=True)` also returns the layer's `Routing`, from which `mixtral.train.losses` computes
the load-balancing and z-losses and the routing metrics.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mixtral import kernels
from mixtral.batch_invariant import is_batch_invariant


class Routing(NamedTuple):
    """What one MoE layer decided for its tokens: what the training losses and routing metrics read."""
    logits: torch.Tensor  # [tokens, n_experts] router logits (float32 under autocast), after jitter
    experts: torch.Tensor  # [tokens, top_k] chosen experts, best first
    kept: torch.Tensor | None  # [tokens, top_k] bool, False where the capacity dropped it; None when dropless


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their gate weights.

    router_logits: [tokens, n_experts]. Returns (weights [tokens, top_k] float32, experts [tokens, top_k] int64).
    The softmax runs over the k chosen logits only (TopK before Softmax, as in the paper); this equals
    renormalising the full softmax over the chosen experts, which is how transformers computes it.
    """
    top_logits, experts = torch.topk(router_logits.float(), top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), experts


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * tokens * top_k / n_experts) (Switch, eq. 3)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def capacity_mask(experts: torch.Tensor, n_experts: int, limit: int) -> torch.Tensor:
    """Which assignments fit: each expert keeps its first `limit` assignments and drops the rest.

    experts: [tokens, top_k]. Returns bool [tokens, top_k]. Priority goes to first choices over second choices,
    then to earlier tokens (GShard's and ST-MoE's order), so a token loses its second expert before another token
    loses its first.
    """
    by_priority = experts.t().reshape(-1)  # all first choices (in token order), then all second choices, ...
    one_hot = F.one_hot(by_priority, n_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each assignment in its expert's queue
    return (position < limit).view(experts.shape[1], experts.shape[0]).t()


def keep_within(experts: torch.Tensor, n_experts: int, top_k: int, capacity_factor: float) -> torch.Tensor:
    """`capacity_mask` with the limit of `capacity_factor` over these assignments [tokens, top_k]."""
    return capacity_mask(experts, n_experts, capacity(len(experts), n_experts, top_k, capacity_factor))


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The obvious dispatch: for each expert, the tokens that chose it. The oracle for faster dispatches.

    x: [tokens, dim]; weights, experts: [tokens, top_k]; kept: optional bool [tokens, top_k], False for
    assignments the capacity dropped. Returns [tokens, dim] in x's dtype.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(len(w13)):
        token, slot = torch.where(experts == e if kept is None else (experts == e) & kept)
        if token.numel() == 0:
            continue
        y = kernels.swiglu(x[token], w13[e], w2[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


class GroupedSwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU on its contiguous slice of expert-sorted rows, with a hand-written backward.

    Autograd through `w13[e]` would give each expert's backward a zero-filled gradient of the whole stack
    (SelectBackward) to add up, 2 x n_experts stacks per layer; here each expert writes its slice of one gradient,
    and the backward's elementwise work is three ops per expert (silu_backward is one fused kernel) where
    autograd's graph takes eight. Measured on the 42.7M-parameter benchmark model: the zero fills alone were 10%
    of a training step. Computes in the dtype of its inputs; the caller casts them (autocast).
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
        hidden = w2.shape[2]
        hs = xs.new_empty(len(xs), 2 * hidden)  # gate and up pre-activations
        act = xs.new_empty(len(xs), 2 * hidden)  # silu(gate), then silu(gate) * up
        ys = xs.new_empty(len(xs), w2.shape[1])
        for e, s in _slices(counts):
            torch.mm(xs[s], w13[e].t(), out=hs[s])
            silu, a = act[s, :hidden], act[s, hidden:]
            torch.ops.aten.silu.out(hs[s, :hidden], out=silu)
            torch.mul(silu, hs[s, hidden:], out=a)
            torch.mm(a, w2[e].t(), out=ys[s])
        ctx.save_for_backward(xs, w13, w2, hs, act)
        ctx.counts = counts
        return ys

    @staticmethod
    def backward(ctx, dys: torch.Tensor):
        xs, w13, w2, hs, act = ctx.saved_tensors
        hidden = w2.shape[2]
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        dxs = torch.empty_like(xs) if need_x else None
        # Zeros only matter for experts that got no rows; the others' slices are overwritten. Every expert thus
        # has a gradient every step whatever the routing, as data-parallel training needs: every rank takes part
        # in every gradient's all-reduce, so an expert that got no tokens on one rank must still hand in (zero)
        # gradients there, or the others wait for it forever.
        dw13 = torch.zeros_like(w13) if need_w13 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        dh = torch.empty_like(hs)  # d gate, d up
        for e, s in _slices(ctx.counts):
            gate, up = hs[s, :hidden], hs[s, hidden:]
            silu, a = act[s, :hidden], act[s, hidden:]
            dy = dys[s]
            if need_w2:
                torch.mm(dy.t(), a, out=dw2[e])
            da = dy @ w2[e]  # [rows, hidden]
            torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dh[s, :hidden])
            torch.mul(da, silu, out=dh[s, hidden:])
            if need_w13:
                torch.mm(dh[s].t(), xs[s], out=dw13[e])
            if need_x:
                torch.mm(dh[s], w13[e], out=dxs[s])
        return dxs, dw13, dw2, None


def _slices(counts: list[int]):
    """(expert, slice of its rows) for each expert with rows, in order."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
            start += count


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# Training pads each expert's rows to a multiple of this. oneDNN (PyTorch's CPU matmul for bf16) compiles a
# kernel for every new matrix shape, ~1 ms each, and the rows per expert change every step; with buckets of 64
# the shapes repeat after a few steps. Measured on the 42.7M benchmark model: 1070 -> 900 ms a step (bf16), for
# about 3% more expert rows.
ROW_BUCKET = 64


def pad_by_expert(x: torch.Tensor, sorted_experts: torch.Tensor, token_of: torch.Tensor,
                  counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """x[token_of] (rows sorted by expert, `counts` per expert) in autocast's dtype, each expert's rows padded by
    zero rows to a multiple of ROW_BUCKET: (the padded rows, where each assignment sits among them, padded counts)."""
    dtype = compute_dtype(x)
    device = x.device
    padded = [-(-c // ROW_BUCKET) * ROW_BUCKET for c in counts]
    counts_t = torch.tensor(counts, device=device)
    padded_t = torch.tensor(padded, device=device)
    shift = (padded_t.cumsum(0) - padded_t) - (counts_t.cumsum(0) - counts_t)  # each expert's start moves by
    rows = torch.arange(len(token_of), device=device) + shift[sorted_experts]  # where each assignment goes
    source = torch.full((sum(padded),), len(x), device=device)  # row len(x) of x_ext is zeros
    source[rows] = token_of
    x_ext = torch.cat([x.to(dtype), x.new_zeros(1, x.shape[1], dtype=dtype)])
    return x_ext[source], rows, padded


def grouped_swiglu_padded(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, sorted_experts: torch.Tensor,
                           token_of: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`GroupedSwiGLU` on x[token_of] (rows sorted by expert, `counts` per expert), in autocast's dtype, with each
    expert's rows padded as `pad_by_expert` pads them. Returns [len(token_of), dim]."""
    xs, rows, padded = pad_by_expert(x, sorted_experts, token_of, counts)
    with torch.autocast(x.device.type, enabled=False):
        return GroupedSwiGLU.apply(xs, w13.to(xs.dtype), w2.to(xs.dtype), padded)[rows]


class Assignments(NamedTuple):
    """A layer's (token, expert) assignments sorted by expert, as the grouped dispatch runs them."""
    token_of: torch.Tensor  # [assignments] the token of each
    gates: torch.Tensor  # [assignments] its gate weight
    experts: torch.Tensor  # [assignments] its expert (ascending)
    counts: list[int]  # assignments per expert

    def slices(self):
        """(expert, its slice of the assignments) for each expert with assignments, in order."""
        return _slices(self.counts)


def sort_by_expert(weights: torch.Tensor, experts: torch.Tensor, n_experts: int,
                   kept: torch.Tensor | None = None) -> Assignments:
    """The assignments of `route`'s (weights, experts) [tokens, top_k], sorted by expert (stable: in token order
    within an expert). Dropped assignments (`kept` False) are sorted past the last expert and left out."""
    top_k = experts.shape[1]
    flat_experts = experts.reshape(-1)
    if kept is not None:
        flat_experts = torch.where(kept.reshape(-1), flat_experts, n_experts)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=n_experts + 1)[:n_experts].tolist()
    order = order[:sum(counts)]
    return Assignments(order // top_k, weights.reshape(-1)[order], flat_experts[order], counts)


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped dispatch: sort the (token, expert) assignments by expert once, run each expert on its
    contiguous slice, scale by the gate weights and scatter-add back. In training one autograd function runs
    them all (`GroupedSwiGLU`); at inference `kernels.experts_add` runs each expert where the CPU backend says.

    Same arguments and result as `moe_reference`. Dropped assignments are sorted past the last expert and
    never computed.
    """
    a = sort_by_expert(weights, experts, len(w13), kept)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if torch.is_grad_enabled() and isinstance(w13, torch.Tensor) and (x.requires_grad or w13.requires_grad):
        ys = grouped_swiglu_padded(x, w13, w2, a.experts, a.token_of, a.counts)
        out.index_add_(0, a.token_of, ys.float() * a.gates[:, None])
    else:
        kernels.experts_add(out, x, a.token_of, a.gates, [(w13[e], w2[e], s) for e, s in a.slices()])
    return out.to(x.dtype)


DISPATCH = {"reference": moe_reference, "grouped": moe_grouped}


class Router(nn.Linear):
    """The gate W_g, an nn.Linear without bias. In the batch-invariant mode its product goes where the model's
    linears go (`kernels.matmul`), since F.linear's kernel follows the number of rows; otherwise it stays F.linear."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.matmul(x, self.weight) if is_batch_invariant() else F.linear(x, self.weight)


class MoE(nn.Module):
    """Router + experts. `dispatch` picks the implementation ("grouped" by default, "reference" the oracle).

    `router_jitter` and `capacity_factor` (None: dropless) act in training mode only; inference is always
    dropless and noise-free.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        # A dense FFN has no router: every token goes to expert 0 with weight 1.
        self.router = Router(dim, n_experts) if n_experts > 1 else None
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        # A name in DISPATCH, or a callable with the same arguments: `mixtral.parallel` sets one that sends each
        # token to the process holding its expert (w13 and w2 then hold only that process's experts).
        self.dispatch = "grouped"
        self.router_jitter = 0.0
        self.capacity_factor: float | None = None
        # Which assignments the capacity keeps: keep(experts [tokens, top_k], n_experts, top_k, capacity_factor)
        # -> bool [tokens, top_k]. None counts over this call's tokens (`keep_within`); `mixtral.parallel` sets one
        # that counts over every process's tokens, as one process holding the whole batch would.
        self.keep = None
        # Set by an engine that runs the experts outside w13/w2 (`mixtral.offload` from disk, `mixtral.parallel`
        # on other processes): offload(x [tokens, dim], weights, experts [tokens, top_k]) -> y [tokens, dim],
        # inference only.
        self.offload = None
        # Set by `mixtral.finetune.lora`: a module holding low-rank adapters of every expert, which then runs the
        # experts: lora(x, w13, w2, weights, experts, kept) -> y [tokens, dim].
        self.lora = None

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        """y for x [..., dim]; with `return_routing`, (y, Routing), the Routing None for a dense FFN."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.router is None:
            if self.lora is not None:  # every token to expert 0, weight 1
                ones = torch.ones(len(x), 1, device=x.device)
                y = self.lora(x, self.w13, self.w2, ones, ones.long() * 0, None).reshape(shape)
            else:
                y = kernels.swiglu(x, self.w13[0], self.w2[0]).reshape(shape)
            return (y, None) if return_routing else y
        logits = self.router_logits(x)
        weights, experts = route(logits, self.top_k)
        kept = None
        if self.training and self.capacity_factor is not None:
            kept = (self.keep or keep_within)(experts, logits.shape[-1], self.top_k, self.capacity_factor)
        if self.offload is not None:
            y = self.offload(x, weights, experts).reshape(shape)
        elif self.lora is not None:
            y = self.lora(x, self.w13, self.w2, weights, experts, kept).reshape(shape)
        else:
            dispatch = DISPATCH[self.dispatch] if isinstance(self.dispatch, str) else self.dispatch
            y = dispatch(x, self.w13, self.w2, weights, experts, kept).reshape(shape)
        return (y, Routing(logits, experts, kept)) if return_routing else y

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, n_experts]. Under autocast the router stays in float32 (Switch's selective precision: bf16
        logits flip near-tied choices); in training, jitter multiplies its input."""
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.router(x.to(self.router.weight.dtype))
        return self.router(x)

"""Training losses and routing metrics: next-token cross-entropy, the Switch load-balancing loss, the ST-MoE
router z-loss, and what each MoE layer's routing looked like.

The auxiliary losses take the router logits of every MoE layer (`mixtral.moe.Routing.logits`, [tokens,
n_experts] each, tokens = batch * seq flattened) and an optional attention mask [batch, seq] (1 = real token,
0 = padding) whose padding rows they leave out: padding is not routed text, and counting it skews both f and P
(transformers counted it until its PR #28517).

Load balancing, for the fraction of top-k assignments f_e and the mean router probability P_e of each expert:

    loss = n_experts * sum_e f_e * P_e          (Switch Transformer, eq. 4-6)

f sums to top_k (each token makes top_k assignments) and P to 1, so a perfectly balanced router scores exactly
top_k, and 1 is the minimum for top-1. Two ways to take it over several layers (debated in transformers #31464):
- "per-layer" (the trainer's default, as Switch and ST-MoE add one loss per MoE layer): the mean over layers of
  each layer's loss. Every layer must balance on its own.
- "pooled", what transformers' `load_balancing_loss_func` computes: f and P averaged over the tokens of all layers
  together. One layer routing everything to expert 0 and another everything to expert 1 look balanced. Measured
  on the default model's first 140 steps: the pooled loss sat at 2.00 (perfect) while layers 2-5 had each sent
  less than 1% of their tokens to 3-5 of their 8 experts.
With one layer the two are the same number. `router_metrics` reports each layer's load either way.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mixtral.moe import Routing


def _row_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


LB_MODES = ("per-layer", "pooled")


# A sum over the processes of a distributed run (differentiable), or None for one process. The auxiliary losses
# and metrics sum their token counts and statistics with it before dividing, so each process gets the value a
# single process would compute over the whole batch: products of means (f_e * P_e) do not average.
Reduce = Callable[[torch.Tensor], torch.Tensor] | None


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None, mode: str = "pooled",
                        reduce: Reduce = None) -> torch.Tensor:
    """The Switch load-balancing loss over the top-k assignments (see the module doc for the two modes).

    router_logits: one [tokens, n_experts] tensor per MoE layer; attention_mask: [batch, seq] with batch * seq
    == tokens, 0 for padding. Returns a float32 scalar; "pooled" equals transformers' `load_balancing_loss_func`,
    "per-layer" is the mean of that function over each layer alone. reduce: see `Reduce`.
    Raises ValueError for an empty sequence (a dense model has no router and no such loss) or an unknown mode.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one MoE layer")
    if mode not in LB_MODES:
        raise ValueError(f"unknown load-balancing mode {mode!r}; choose one of {', '.join(LB_MODES)}")
    n_experts = router_logits[0].shape[-1]
    mask = _row_mask(attention_mask, router_logits[0].device)
    groups = [[logits] for logits in router_logits] if mode == "per-layer" else [list(router_logits)]
    stats = torch.stack([_balance_stats(group, top_k, mask) for group in groups])  # [groups, 2 n_experts + 1]
    if reduce is not None:  # one sum over the processes for every layer's statistics
        stats = reduce(stats)
    assignments, probability, rows = stats[:, :n_experts], stats[:, n_experts:-1], stats[:, -1:]
    return (n_experts * ((assignments / rows) * (probability / rows)).sum(-1)).mean()


def _balance_stats(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """[2 n_experts + 1]: the top-k picks per expert, the summed router probability per expert, and the rows,
    over the (real) tokens of these layers' logits together."""
    n_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    assignments = torch.zeros(n_experts, dtype=torch.float32, device=device)  # top-k picks per expert
    probability = torch.zeros(n_experts, dtype=torch.float32, device=device)  # summed router probability
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        weight = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask.repeat_interleave(top_k)
        assignments = assignments + torch.zeros_like(assignments).scatter_add_(0, chosen, weight)
        probability = probability + (probs if mask is None else probs * mask[:, None]).sum(0)
        rows = rows + (len(probs) if mask is None else mask.sum())
    return torch.cat([assignments, probability, rows[None]])


def z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None,
           reduce: Reduce = None) -> torch.Tensor:
    """The ST-MoE router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)², which keeps
    router logits small and the softmax numerically stable. Averaged over layers (all layers see the same
    tokens, so this is also the pooled mean). Padding rows are left out; reduce: see `Reduce`. Returns a float32
    scalar."""
    if not router_logits:
        raise ValueError("z_loss needs the router logits of at least one MoE layer")
    mask = _row_mask(attention_mask, router_logits[0].device)
    sums = []  # per layer: the summed z, the rows
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).square()
        rows = torch.tensor(float(len(z)), device=z.device) if mask is None else mask.sum()
        sums.append(torch.stack([z.sum() if mask is None else (z * mask).sum(), rows]))
    sums = torch.stack(sums)
    if reduce is not None:
        sums = reduce(sums)
    return (sums[:, 0] / sums[:, 1]).mean()


@torch.no_grad()
def router_metrics(routing: Sequence[Routing], attention_mask: torch.Tensor | None = None,
                   reduce: Reduce = None) -> list[dict]:
    """Per MoE layer: `load`, the fraction of top-k assignments each expert received (before any capacity drop;
    sums to 1, 1/n_experts each when balanced); `dropped`, the fraction of assignments the capacity dropped (0 when
    dropless); `entropy`, the mean entropy of the router's softmax in nats (log n_experts = uniform).
    reduce: see `Reduce`."""
    metrics = []
    for r in routing:
        n_experts = r.logits.shape[-1]
        mask = _row_mask(attention_mask, r.logits.device)
        real = torch.ones(len(r.logits), device=r.logits.device) if mask is None else mask
        weight = real[:, None].expand_as(r.experts)
        load = torch.zeros(n_experts, device=r.logits.device).scatter_add_(0, r.experts.reshape(-1),
                                                                          weight.reshape(-1))
        log_p = torch.log_softmax(r.logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        # load per expert, then dropped assignments, all assignments, entropy sum, real tokens
        dropped = weight.sum() * 0 if r.kept is None else ((~r.kept) * weight).sum()
        sums = torch.cat([load, torch.stack([dropped, weight.sum(), (entropy * real).sum(), real.sum()])])
        if reduce is not None:
            sums = reduce(sums)
        load, (dropped, assignments, entropy_sum, tokens) = sums[:n_experts], sums[n_experts:].tolist()
        metrics.append({"load": (load / load.sum()).tolist(), "dropped": dropped / assignments,
                        "entropy": entropy_sum / tokens})
    return metrics


# ---- cross-entropy ---------------------------------------------------------------------------------------------

def cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits h · weightᵀ, computed `chunk` tokens at a time.

    h: [..., dim] final hidden states (after the last norm); weight: [vocab, dim] the output projection;
    targets: [...] token ids, `ignore_index` where no loss is wanted. Equals
    F.cross_entropy(h @ weight.T, targets) without holding the [tokens, vocab] logits (262 MB in float32 for
    2048 tokens of a 32000 vocabulary) and their gradient: with gradients on, each chunk's gradients with respect
    to h and weight are computed in the forward pass (the loss is a scalar, so the backward only scales them),
    which saves the backward's own passes over the logits. The matmuls and the softmax's output are in autocast's
    dtype when it is on (the softmax accumulates in float32), the loss in float32. Measured against
    F.cross_entropy on the logits, forward + backward for 2048 tokens of the 42.7M benchmark model on 2 cores:
    370 ms against 700 in bf16, 670 against 850 in float32. Returns a float32 scalar.
    """
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk, ignore_index)
        return _linear_cross_entropy(h, weight, targets, dtype, chunk, ignore_index, with_grad=False)[0]


# The softmax gradients of up to this many bytes are kept for one weight-gradient matmul: one per chunk would
# write (and add up) a [vocab, dim] result per chunk. 32 MiB: glibc's largest block that `keep_freed_memory`
# can keep off fresh mmaps (mixtral.train.trainer).
GROUP_BYTES = 32 << 20


def _linear_cross_entropy(h, weight, targets, dtype, chunk, ignore_index, with_grad, weight_grad=True):
    """(loss, d loss/d h, d loss/d weight) — the gradients None unless `with_grad`, the weight's also None unless
    `weight_grad` (a frozen output head, as in LoRA fine-tuning, skips its [vocab, dim] product)."""
    n, vocab = len(h), len(weight)
    valid = targets != ignore_index
    scale = valid[:, None].float() / valid.sum().clamp(min=1)  # each row's weight in the mean; 0 if ignored
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if with_grad else None
    dw = None
    group = max(chunk, GROUP_BYTES // (vocab * dtype.itemsize) // chunk * chunk)
    for g in range(0, n, group):
        x = h[g:g + group].to(dtype)
        grads = torch.empty(len(x), vocab, dtype=dtype, device=h.device) if with_grad else None
        for c in range(0, len(x), chunk):
            rows = slice(g + c, g + c + chunk)
            target = targets[rows].clamp(min=0)
            logits = x[c:c + chunk] @ w.t()  # [chunk, vocab], in the matmul dtype
            # The softmax in one fused pass without a float32 copy of the logits, and the log-sum-exp from its
            # largest entry: p_max = exp(z_max - lse) >= 1 / vocab, so lse = z_max - log(p_max) never underflows.
            # In bf16 that rounds lse by at most 2^-9 relative to p_max (0.002 nats), well below the rounding of
            # the bf16 logits themselves.
            p = torch.softmax(logits, dim=-1) if grads is None else \
                torch.ops.aten._softmax.out(logits, -1, False, out=grads[c:c + chunk])
            lse = logits.amax(-1).float() - p.amax(-1).float().log()
            index = torch.arange(len(p), device=p.device)
            log_p_target = logits[index, target].float() - lse
            total -= (log_p_target * scale[rows, 0]).sum()
            if with_grad:
                # d loss / d logits = (softmax - one_hot(target)) * scale. p - 1 at the target is formed in
                # float32 before rounding (bf16(p) - 1 is 0 for a confident p); the row scale is applied to the
                # [chunk, dim] operands and results rather than to the [chunk, vocab] gradient.
                p[index, target] = (log_p_target.exp() - 1).to(dtype)  # (scatter_ copied p twice here)
                dh[rows] = (p @ w) * scale[rows]
        if with_grad and weight_grad:
            # [vocab, dim], added up in float32 across groups (the bf16 product is cast inside the add).
            product = grads.t() @ (x * scale[g:g + group]).to(dtype)
            dw = product.float() if dw is None else dw.add_(product)
    return total, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk, ignore_index):
        loss, dh, dw = _linear_cross_entropy(h, weight, targets, dtype, chunk, ignore_index, with_grad=True,
                                             weight_grad=weight.requires_grad)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        return dh * dloss, None if dw is None else dw * dloss, None, None, None, None

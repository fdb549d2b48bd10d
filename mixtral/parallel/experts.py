"""Experts spread over the `ep` ranks: each holds experts [lo, hi) of every MoE layer.

Training (`AllToAllExperts`, a `MoE.dispatch`): every rank routes its own tokens, then two all-to-alls per layer
move them, as torchtitan and Megatron-Core's token dispatcher do. First the counts (how many rows each rank sends
to each expert), then the rows themselves, with uneven splits; the owner runs its experts on what it received,
grouped by expert (`mixtral.moe.GroupedSwiGLU`), and a third all-to-all sends the outputs back, where the gate
weights scale them (so the router's gradient stays on the rank that routed). The all-to-alls are autograd
functions: backward sends the gradients the opposite way. Dropless: every assignment travels; with a capacity
factor, `global_capacity` counts each expert's assignments over the whole world's batch, in the order a single
process would see them, so the same assignments are dropped. Every rank enters every all-to-all of every layer,
with zero rows to send if routing gives it none: an expert without tokens anywhere, or all tokens on one rank,
cannot leave a peer waiting.

Inference (`RemoteExperts`, a `MoE.offload`, and `follow`): rank 0 runs the model and its programs (generation,
the server) unchanged; at each MoE layer it broadcasts the layer's tokens and routing to the other ranks of the
`ep` group, every rank adds what its experts give into a float32 buffer, and a reduce sums them on rank 0. The
other ranks hold only their experts and wait in `follow`. A token's top-2 contributions are added in float32 as
the single process adds them (a + b, then 0s from ranks without its experts), so the outputs are the same.
"""
from __future__ import annotations

import datetime
from typing import Sequence

import torch
import torch.distributed as dist

from mixtral import kernels, quant
from mixtral.moe import capacity, capacity_mask, compute_dtype, grouped_swiglu_padded, sort_by_expert


def expert_range(n_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """The experts [lo, hi) that rank `ep_rank` of `ep` holds; ValueError unless ep divides n_experts."""
    if n_experts % ep:
        raise ValueError(f"parallel.ep ({ep}) must divide the model's n_experts ({n_experts})")
    per = n_experts // ep
    return ep_rank * per, (ep_rank + 1) * per


def select_experts(stack, lo: int, hi: int):
    """A copy of experts [lo, hi) of a stacked expert weight: a float tensor [n_experts, out, in] or a
    `quant.QuantizedExperts`. A copy, so the whole stack can be freed."""
    if isinstance(stack, torch.Tensor):
        return stack[lo:hi].clone()
    zeros = stack.zeros[lo:hi].clone() if stack.mode != "int8" else None
    part = quant.QuantizedExperts(stack.mode, stack.qweight[lo:hi].clone(), stack.scales[lo:hi].clone(), zeros,
                                  stack.group_size, stack.out_features, stack.in_features)
    if hasattr(stack, "fit"):
        part.fit = stack.fit
    return part


def _all_to_all(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    rows = rows.contiguous()
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    dist.all_to_all_single(out, rows, receive, send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """all_to_all_single whose backward is the same exchange reversed (the gradients go back where the rows
    came from)."""

    @staticmethod
    def forward(ctx, rows, send, receive, group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _all_to_all(rows, send, receive, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """all_to_all_single of `rows` [sum(send), ...] -> [sum(receive), ...], differentiable when grad is on."""
    if torch.is_grad_enabled() and rows.requires_grad:
        return _Exchange.apply(rows, send, receive, group)
    return _all_to_all(rows, send, receive, group)


class AllToAllExperts:
    """`MoE.dispatch` for the experts [lo, hi) of `n_experts` held by this rank of the `group` (the ep group).
    Called as dispatch(x, w13, w2, weights, experts, kept) with w13/w2 the local stacks; returns [tokens, dim]."""

    def __init__(self, n_experts: int, ep: int, ep_rank: int, group):
        self.n_experts, self.ep, self.group = n_experts, ep, group
        self.lo, self.hi = expert_range(n_experts, ep, ep_rank)
        self.per_rank = self.hi - self.lo

    def __call__(self, x: torch.Tensor, w13, w2, weights: torch.Tensor, experts: torch.Tensor,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
        a = sort_by_expert(weights, experts, self.n_experts, kept)  # grouped by expert, so by owning rank
        device = x.device  # NCCL exchanges device tensors only; gloo takes these on the CPU
        counts = torch.tensor(a.counts, dtype=torch.int64, device=device)  # [n_experts] rows sent to each expert
        received = torch.empty_like(counts)  # [ep sources, per_rank local experts] rows each source sends here
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, self.per_rank)
        send = counts.view(self.ep, self.per_rank).sum(1).tolist()
        receive = received.sum(1).tolist()

        # The rows travel in the dtype the experts compute in (bf16 under autocast): half the bytes of the float32
        # residual stream. Cast, then gathered, as the grouped dispatch does, so that the backward adds a token's
        # gradients from its experts in that dtype too and the numbers are the single process's.
        rows = _exchange(x.to(compute_dtype(x))[a.token_of], send, receive, self.group)  # by source, then expert
        # Regroup what arrived by local expert, keeping source order within an expert: the order of the global
        # batch, as a single process would have these rows.
        local_expert = torch.arange(self.per_rank, device=device).repeat(self.ep).repeat_interleave(
            received.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        local_counts = received.sum(0).tolist()
        ys = self._experts(rows, w13, w2, local_expert[order], order, local_counts)  # [received rows, dim]
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order), device=device)
        outputs = _exchange(ys[back], receive, send, self.group)  # this rank's assignments, in a's order
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, a.token_of, outputs.float() * a.gates[:, None])
        return out.to(x.dtype)

    def _experts(self, rows: torch.Tensor, w13, w2, sorted_experts: torch.Tensor, order: torch.Tensor,
                 counts: list[int]) -> torch.Tensor:
        """Each local expert's SwiGLU on rows[order] (sorted by local expert, `counts` each), unweighted."""
        if torch.is_grad_enabled() and isinstance(w13, torch.Tensor) and (rows.requires_grad or w13.requires_grad):
            return grouped_swiglu_padded(rows, w13, w2, sorted_experts, order, counts)
        out = torch.zeros(len(order), rows.shape[1], dtype=torch.float32, device=rows.device)
        slices, start = [], 0
        for e, count in enumerate(counts):
            if count:
                slices.append((w13[e], w2[e], slice(start, start + count)))
            start += count
        if slices:
            # out row i is the output of the row order[i] sorts to position i; gates of 1 leave it unweighted.
            index = torch.arange(len(order), device=rows.device)
            kernels.experts_add(out, rows[order], index, torch.ones(len(order), device=rows.device), slices)
        return out.to(rows.dtype)


def global_capacity(group, world_size: int, rank: int):
    """A `MoE.keep` for capacity over the whole world's batch: every rank's chosen experts are gathered (in rank
    order, which is the order of the global batch), each expert keeps its first `capacity` assignments of them as
    one process would (`mixtral.moe.capacity_mask`), and this rank gets the mask of its own tokens."""
    def keep(experts: torch.Tensor, n_experts: int, top_k: int, capacity_factor: float) -> torch.Tensor:
        # The ranks may hold different numbers of tokens: gather the counts, then the rows padded to the most.
        sizes = [experts.new_zeros(1) for _ in range(world_size)]
        dist.all_gather(sizes, experts.new_tensor([len(experts)]), group=group)
        sizes = [int(s) for s in sizes]
        padded = experts.new_zeros(max(sizes), experts.shape[1])
        padded[:len(experts)] = experts
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded, group=group)
        every = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
        limit = capacity(len(every), n_experts, top_k, capacity_factor)
        mask = capacity_mask(every, n_experts, limit)
        start = sum(sizes[:rank])
        return mask[start:start + len(experts)]
    return keep


# ---- inference: rank 0 leads, the others serve their experts ------------------------------------------------

_STOP, _LAYER = 0, 1

# Followers wait for the leader's next command for as long as it is idle (a server without requests).
PATIENCE = datetime.timedelta(days=365)


def patient_group(ranks: Sequence[int]):
    """A gloo group over `ranks` whose collectives wait `PATIENCE`: for the commands, and for whatever else may
    take some ranks far longer than others (loading a model). A peer that dies still ends the wait at once (its
    connections close)."""
    return dist.new_group(list(ranks), timeout=PATIENCE)


class ExpertChannel:
    """What rank 0 and the followers share: the ep group for the data, and a second group over the same ranks for
    the commands (`patient_group`; pass one made before, or one is made)."""

    def __init__(self, group, ranks: Sequence[int], dim: int, top_k: int, dtype: torch.dtype, commands=None):
        self.group = group
        self.commands = patient_group(ranks) if commands is None else commands
        self.leader = dist.get_global_rank(group, 0)
        self.dim, self.top_k, self.dtype = dim, top_k, dtype

    def send(self, *header: int) -> None:
        dist.broadcast(torch.tensor(header, dtype=torch.int64), self.leader, group=self.commands)

    def receive(self) -> tuple[int, int, int]:
        header = torch.empty(3, dtype=torch.int64)
        dist.broadcast(header, self.leader, group=self.commands)
        return tuple(header.tolist())

    def share(self, x: torch.Tensor | None, weights: torch.Tensor | None, experts: torch.Tensor | None,
              n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's tokens x [n, dim] and routing (weights float32, experts int64, [n, top_k]): broadcast from
        the leader, which passes them, to the followers, which pass None and get them back. One broadcast of their
        bytes (gloo broadcasts neither bfloat16 nor int16; and one message costs one latency, not three)."""
        # Widest elements first, so that each part starts at a multiple of its own size (a view as int64 needs it).
        sizes = [n * self.top_k * 8, n * self.top_k * 4, n * self.dim * self.dtype.itemsize]
        if x is not None:
            assert x.shape == (n, self.dim) and x.dtype == self.dtype, (x.shape, x.dtype, n, self.dim, self.dtype)
            assert weights.dtype == torch.float32 and experts.dtype == torch.int64, (weights.dtype, experts.dtype)
            buffer = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in (experts, weights, x)])
        else:
            buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        dist.broadcast(buffer, self.leader, group=self.group)
        if x is not None:
            return x, weights, experts
        e_bytes, w_bytes, x_bytes = buffer.split(sizes)
        return (x_bytes.view(self.dtype).view(n, self.dim), w_bytes.view(torch.float32).view(n, self.top_k),
                e_bytes.view(torch.int64).view(n, self.top_k))


def local_experts_add(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13, w2, lo: int,
                      n_experts: int) -> torch.Tensor:
    """float32 [tokens, dim]: the gated outputs of experts [lo, lo + len(w13)) for these tokens, 0 elsewhere."""
    a = sort_by_expert(weights, experts, n_experts)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    slices = [(w13[e - lo], w2[e - lo], s) for e, s in a.slices() if lo <= e < lo + len(w13)]
    if slices:
        kernels.experts_add(out, x, a.token_of, a.gates, slices)
    return out


class RemoteExperts:
    """`MoE.offload` on rank 0 for layer `layer`: its tokens go to every rank of the channel, each adds its
    experts' outputs, and the sum comes back. Holds rank 0's own experts [lo, hi)."""

    def __init__(self, channel: ExpertChannel, layer: int, w13, w2, lo: int, n_experts: int):
        self.channel, self.layer, self.w13, self.w2, self.lo, self.n_experts = channel, layer, w13, w2, lo, n_experts

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        weights, experts = weights.float().contiguous(), experts.long().contiguous()
        self.channel.send(_LAYER, self.layer, len(x))
        self.channel.share(x, weights, experts, len(x))
        out = local_experts_add(x, weights, experts, self.w13, self.w2, self.lo, self.n_experts)
        dist.reduce(out, self.channel.leader, group=self.channel.group)
        return out.to(x.dtype)


def follow(channel: ExpertChannel, layers: Sequence[tuple[object, object]], lo: int, n_experts: int) -> int:
    """A follower's loop: serve each command of the leader with the experts [lo, lo + len) of each layer
    (`layers[i]` = (w13, w2)) until it says stop. Returns the number of layer calls served."""
    served = 0
    with torch.inference_mode():
        while True:
            command, layer, n = channel.receive()
            if command == _STOP:
                return served
            x, weights, experts = channel.share(None, None, None, n)
            w13, w2 = layers[layer]
            out = local_experts_add(x, weights, experts, w13, w2, lo, n_experts)
            dist.reduce(out, channel.leader, group=channel.group)
            served += 1


def stop_followers(channel: ExpertChannel) -> None:
    """Tell the followers to leave `follow` (the leader calls it once, when it is done)."""
    channel.send(_STOP, 0, 0)

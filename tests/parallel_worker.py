"""One rank of the distributed dispatch checks that tests/test_parallel.py launches with torchrun.

    python -m torch.distributed.run --nproc-per-node N tests/parallel_worker.py CASE

Every rank builds the same data from one seed, keeps its part, runs the all-to-all dispatch forward and backward,
and compares its outputs and gradients with the single-process grouped dispatch over the whole batch (the oracle);
CASE "inference" compares rank 0's logits with its experts on the other ranks against the whole model's.
Exits non-zero, with the mismatch on stderr, when they differ.
"""
from __future__ import annotations

import sys

import torch

from mixtral import parallel
from mixtral.moe import keep_within, moe_grouped, route
from mixtral.parallel.experts import AllToAllExperts, expert_range, global_capacity

N_EXPERTS, DIM, HIDDEN, TOP_K, TOKENS = 4, 16, 24, 2, 12  # TOKENS per rank (before a case moves them)


def routing(case: str, logits: torch.Tensor, world: int) -> torch.Tensor:
    """The experts [tokens, top_k] each token is sent to in `case`."""
    _, experts = route(logits, TOP_K)
    if case == "zero-expert":  # experts 2 and 3 get nothing on any rank
        experts = torch.tensor([[0, 1]] * len(logits))
    elif case == "one-rank":  # every token to the experts of the last rank
        lo, hi = expert_range(N_EXPERTS, world, world - 1)
        experts = torch.tensor([[lo, hi - 1]] * len(logits))
    return experts


def inference(mesh) -> None:
    """Rank 0's logits with the experts spread over the ranks equal its logits with all of them, bitwise (fp32),
    for a prefill and a decode step through the KV cache."""
    from mixtral.cache import KVCache
    from mixtral.config import from_name, with_overrides
    from mixtral.model import random_model
    from mixtral.parallel.experts import ExpertChannel, RemoteExperts, follow, select_experts, stop_followers

    config = with_overrides(from_name("tiny"), n_experts=2 * mesh.size)
    model = random_model(config, seed=1)
    lo, hi = expert_range(config.n_experts, mesh.ep, mesh.ep_rank)
    layers = [(select_experts(layer.moe.w13, lo, hi), select_experts(layer.moe.w2, lo, hi))
              for layer in model.layers]
    channel = ExpertChannel(mesh.ep_group, range(mesh.size), config.dim, config.top_k, torch.float32)
    if not mesh.is_main:
        follow(channel, layers, lo, config.n_experts)
        return
    ids = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(config, 3, 16, max_chunk=8)
        with torch.inference_mode():
            return model(ids[:, :8], cache=cache), model(ids[:, 8:], cache=cache)

    want = run()
    for i, layer in enumerate(model.layers):
        layer.moe.offload = RemoteExperts(channel, i, *layers[i], lo, config.n_experts)
        layer.moe.w13 = layer.moe.w2 = None
    got = run()
    stop_followers(channel)
    for name, a, b in zip(("prefill", "decode"), got, want):
        if not torch.equal(a, b):
            sys.exit(f"inference: {name} logits differ by {(a - b).abs().max().item()}")


def main(case: str) -> None:
    mesh = parallel.init(ep=int(__import__("os").environ["WORLD_SIZE"]), dp=1, timeout=60)
    if case == "inference":
        inference(mesh)
        parallel.shutdown()
        return
    world, rank = mesh.size, mesh.rank
    torch.manual_seed(0)
    w13 = torch.randn(N_EXPERTS, 2 * HIDDEN, DIM) / DIM ** 0.5
    w2 = torch.randn(N_EXPERTS, DIM, HIDDEN) / HIDDEN ** 0.5
    x = torch.randn(world * TOKENS, DIM)
    logits = torch.randn(world * TOKENS, N_EXPERTS)
    upstream = torch.randn(world * TOKENS, DIM)
    experts = routing(case, logits, world)
    # Each rank's rows; "empty-rank": the last rank has none, rank 0 has two shares.
    counts = [TOKENS] * world
    if case == "empty-rank":
        counts[0], counts[-1] = 2 * TOKENS, 0
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])

    # "bf16": both sides under bf16 autocast, where the rows travel in bf16.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16")

    # The oracle: one process, the whole batch.
    ref = {"x": x.clone().requires_grad_(), "logits": logits.clone().requires_grad_(),
           "w13": w13.clone().requires_grad_(), "w2": w2.clone().requires_grad_()}
    weights = torch.softmax(ref["logits"].gather(1, experts), dim=-1)
    with autocast:
        y_ref = moe_grouped(ref["x"], ref["w13"], ref["w2"], weights, experts)
    (y_ref * upstream).sum().backward()

    lo, hi = expert_range(N_EXPERTS, world, rank)
    local = {"x": x[mine].clone().requires_grad_(), "logits": logits[mine].clone().requires_grad_(),
             "w13": w13[lo:hi].clone().requires_grad_(), "w2": w2[lo:hi].clone().requires_grad_()}
    dispatch = AllToAllExperts(N_EXPERTS, world, rank, mesh.ep_group)
    weights = torch.softmax(local["logits"].gather(1, experts[mine]), dim=-1)
    with autocast:
        y = dispatch(local["x"], local["w13"], local["w2"], weights, experts[mine])
    (y * upstream[mine]).sum().backward()

    failures = []

    def check(name, got, want, atol=1e-5):
        if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=1e-5):
            diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
            failures.append(f"{case} rank {rank}: {name} differs ({diff})")

    check("output", y, y_ref[mine])
    check("x grad", local["x"].grad, ref["x"].grad[mine])
    check("router grad", local["logits"].grad, ref["logits"].grad[mine])
    check("w13 grad", local["w13"].grad, ref["w13"].grad[lo:hi])
    check("w2 grad", local["w2"].grad, ref["w2"].grad[lo:hi])
    with torch.no_grad(), autocast:  # inference: the experts' own kernels instead of the autograd function
        check("output without grad", dispatch(x[mine], w13[lo:hi], w2[lo:hi], weights, experts[mine]), y_ref[mine])
    # Capacity counted over the world's batch drops what one process would drop.
    kept = global_capacity(mesh.world.get_group(), world, rank)(experts[mine], N_EXPERTS, TOP_K, 1.0)
    if not torch.equal(kept, keep_within(experts, N_EXPERTS, TOP_K, 1.0)[mine]):
        failures.append(f"{case} rank {rank}: the capacity mask differs from one process's")
    parallel.shutdown()
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main(sys.argv[1])

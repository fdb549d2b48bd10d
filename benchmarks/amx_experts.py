"""The experts of one MoE layer on AMX: amx.c (`kernels.amx_swiglu_add`) against torch's GEMM, by rows per expert.

Eight Mixtral-8x7B experts (4096 -> 14336, bf16, 2.8 GB, on 2 MB pages as `mixtral.load` gives them), each fed
--rows tokens; one pass runs all eight in turn after reading twice the last-level cache of other memory
(`bench.cache_flusher`), so every expert's weights come from memory, as they do in a layer. The two
implementations alternate pass by pass; each figure is the median of --repeats passes. torch's side is what
`moe.swiglu` runs without amx.c (`moe.transposed_swiglu`: (W xᵀ)ᵀ products on rows padded to 32). The crossover
it measures is `kernels.AMX_EXPERT_ROWS`.

    python benchmarks/amx_experts.py --rows 16,32,64,128,160
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixtral import bench, kernels, moe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,32,64,128,160,256", help="rows per expert, comma-separated")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.amx_available():
        raise SystemExit("this CPU has no AMX, or the kernels were not built for it: nothing to compare")
    layer = bench.random_moe(args.dim, args.hidden, args.experts, 2, seed=0)
    w13, w2 = layer.w13.data, layer.w2.data
    flush = bench.cache_flusher()
    generator = torch.Generator().manual_seed(1)
    print(f"{args.experts} experts {args.dim} -> {args.hidden}, bf16, {args.threads} threads; ms for all experts, "
          f"median of {args.repeats}, each pass after a cache flush")
    print(f"{'rows':>6} {'amx.c':>9} {'torch':>9} {'torch/amx.c':>12}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, args.dim, generator=generator).bfloat16() for _ in range(args.experts)]
        out = torch.zeros(rows, args.dim)
        passes = {
            "amx": lambda e: kernels.amx_swiglu_add(out, xs[e], None, None, w13[e], w2[e]),
            "torch": lambda e: moe.transposed_swiglu(xs[e], w13[e], w2[e]),
        }
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.repeats + 1):  # the first pass of each also builds/warms up; dropped
            for name, run in passes.items():
                flush()
                start = time.perf_counter()
                for e in range(args.experts):
                    run(e)
                times[name].append((time.perf_counter() - start) * 1e3)
        ours, theirs = (statistics.median(t[1:]) for t in times.values())
        print(f"{rows:>6} {ours:>9.1f} {theirs:>9.1f} {theirs / ours:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()

"""The experts of one MoE layer on AMX: amx.c (`kernels.amx_swiglu_add`) against the path they take without it,
by rows per expert.

Eight Mixtral-8x7B experts (4096 -> 14336; bf16 2.8 GB, on 2 MB pages as `mixtral.load` gives them; or
quantized from those with --mode), each fed --rows tokens; one pass runs all eight in turn after reading twice
the last-level cache of other memory (`bench.cache_flusher`), so every expert's weights come from memory, as they
do in a layer. The two implementations alternate pass by pass; each figure is the median of --repeats passes.
The other side is what `moe.swiglu` runs without amx.c: for bf16 `moe.transposed_swiglu` ((W xᵀ)ᵀ products on
rows padded to 32), for int8/int4 the quantized weights' own kernels (`mixtral.quant.QuantizedWeight.linear`:
torch's int8 kernel or our int4 GEMV for few rows, expand-then-GEMM for more). The crossovers it measures are
`kernels.AMX_EXPERT_ROWS`, `AMX_INT8_EXPERT_ROWS` and `AMX_INT4_EXPERT_ROWS`.

    python benchmarks/amx_experts.py --rows 16,32,64,128,160
    python benchmarks/amx_experts.py --mode int4 --rows 4,8,12,16,32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixtral import bench, kernels, moe, quant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,32,64,128,160,256", help="rows per expert, comma-separated")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--mode", choices=("bf16", "int8", "int4"), default="bf16", help="the experts' weights")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.amx_available():
        raise SystemExit("this CPU has no AMX, or the kernels were not built for it: nothing to compare")
    layer = bench.random_moe(args.dim, args.hidden, args.experts, 2, seed=0)
    if args.mode != "bf16":
        quant.quantize(layer, args.mode, group_size=args.group_size)
        kernels.prefer_huge_pages(layer, collapse=True)  # as quantize-on-load does
    w13, w2 = (layer.w13, layer.w2) if args.mode != "bf16" else (layer.w13.data, layer.w2.data)
    other = moe.transposed_swiglu if args.mode == "bf16" else moe.swiglu
    flush = bench.cache_flusher()
    generator = torch.Generator().manual_seed(1)
    print(f"{args.experts} experts {args.dim} -> {args.hidden}, {args.mode}, {args.threads} threads; ms for all "
          f"experts, median of {args.repeats}, each pass after a cache flush")
    print(f"{'rows':>6} {'amx.c':>9} {'other':>9} {'other/amx.c':>12}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, args.dim, generator=generator).bfloat16() for _ in range(args.experts)]
        out = torch.zeros(rows, args.dim)
        passes = {
            "amx": lambda e: kernels.amx_swiglu_add(out, xs[e], None, None, w13[e], w2[e]),
            "other": lambda e: other(xs[e], w13[e], w2[e]),
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

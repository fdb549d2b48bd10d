"""`mixtral bench amx-experts`: the experts of one MoE layer on AMX: amx.c (`kernels.amx_swiglu_add`) against
the path they take without it, by rows per expert.

Eight Mixtral-8x7B experts (4096 -> 14336; bf16 2.8 GB, on 2 MB pages as `mixtral.load` gives them; or
quantized from those with --mode), each fed --rows tokens; one pass runs all eight in turn after reading twice
the last-level cache of other memory (`cache_flusher`), so every expert's weights come from memory, as they
do in a layer. The two implementations alternate pass by pass; each figure is the median of --repeats passes.
The other side is what `kernels.swiglu` runs without amx.c: for bf16 `kernels.transposed_swiglu` ((W xᵀ)ᵀ
products on rows padded to 32), for int8/int4 the quantized weights' own kernels (`kernels.QuantizedWeight.linear`:
torch's int8 kernel or our int4 GEMV for few rows, expand-then-GEMM for more). The crossovers it measures are
`kernels.CpuPolicy`'s `amx_expert_rows`, `amx_int8_expert_rows` and `amx_int4_expert_rows`.

    mixtral bench amx-experts --rows 16,32,64,128,160
    mixtral bench amx-experts --mode int4 --rows 4,8,12,16,32
"""
from __future__ import annotations

import statistics
import time

import torch

from mixtral import kernels, quant
from mixtral.bench.harness import cache_flusher
from mixtral.bench.moe import random_moe
from mixtral.errors import InputError

MODES = ("bf16", "int8", "int4")  # what amx.c takes


def run(*, rows: list[int], dim: int = 4096, hidden: int = 14336, experts: int = 8, mode: str = "bf16",
        group_size: int = 128, repeats: int = 5) -> dict:
    """Time one pass over `experts` experts (weights in `mode`, one of `MODES`) at each of `rows` rows per expert,
    amx.c against the other path; prints the table as it goes. Returns {"benchmark": "amx-experts", "rows":
    [{"rows", "amx_ms", "other_ms"}]}. Raises InputError on a CPU without AMX (nothing to compare)."""
    if not kernels.amx_available():
        raise InputError("this CPU has no AMX, or the kernels were not built for it: nothing to compare")
    assert mode in MODES, mode
    layer = random_moe(dim, hidden, experts, 2, seed=0)
    if mode != "bf16":
        quant.quantize(layer, mode, group_size=group_size)
        kernels.prefer_huge_pages(layer, collapse=True)  # as quantize-on-load does
    w13, w2 = (layer.w13, layer.w2) if mode != "bf16" else (layer.w13.data, layer.w2.data)
    other = kernels.transposed_swiglu if mode == "bf16" else kernels.swiglu
    flush = cache_flusher()
    generator = torch.Generator().manual_seed(1)
    print(f"{experts} experts {dim} -> {hidden}, {mode}, {torch.get_num_threads()} threads; ms for all "
          f"experts, median of {repeats}, each pass after a cache flush")
    print(f"{'rows':>6} {'amx.c':>9} {'other':>9} {'other/amx.c':>12}")
    results = []
    for n_rows in rows:
        xs = [torch.randn(n_rows, dim, generator=generator).bfloat16() for _ in range(experts)]
        out = torch.zeros(n_rows, dim)
        passes = {
            "amx": lambda e: kernels.amx_swiglu_add(out, xs[e], None, None, w13[e], w2[e]),
            "other": lambda e: other(xs[e], w13[e], w2[e]),
        }
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(repeats + 1):  # the first pass of each also builds/warms up; dropped
            for name, fn in passes.items():
                flush()
                start = time.perf_counter()
                for e in range(experts):
                    fn(e)
                times[name].append((time.perf_counter() - start) * 1e3)
        ours, theirs = (statistics.median(t[1:]) for t in times.values())
        print(f"{n_rows:>6} {ours:>9.1f} {theirs:>9.1f} {theirs / ours:>11.2f}x", flush=True)
        results.append({"rows": n_rows, "amx_ms": ours, "other_ms": theirs})
    return {"benchmark": "amx-experts", "rows": results}

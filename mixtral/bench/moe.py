"""`mixtral bench moe`: one MoE layer, ours against transformers' MixtralSparseMoeBlock, measured in one run.

It builds ONE set of random bf16 expert weights and hands the same tensors to both implementations, measures the
memory read bandwidth and a dense GEMM of the same FLOPs first (the two ceilings of the roofline), then times each
implementation on the same input and checks that the outputs agree before reporting a number.

    mixtral bench moe --tokens 1,16 --dtypes bf16
"""
from __future__ import annotations

import copy
import gc
from typing import Callable

import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.bench.harness import (QUANT_MODES, Column, cache_flusher, format_header, format_row, read_bandwidth,
                                   relative_error, timed)
from mixtral.model import init_weights_
from mixtral.moe import MoE, route
from mixtral.quant import quantize

# Largest relative error (‖ours − transformers-eager bf16‖ / ‖transformers‖) accepted before a row is marked FAIL.
# bf16 differs from transformers only in summation order (measured ~3e-3 on random weights); weight-only int8 and
# int4 add their rounding error (a group-wise int4 step is ~0.4σ of the weights, ~10% per weight).
TOLERANCE = {"bf16": 0.03, "int8": 0.08, "int4": 0.35}

EPILOG = """\
Times one MoE layer on x [1, T, dim] for each T: ours (mixtral.moe.MoE, bf16 and the quantized copies) and
transformers' MixtralSparseMoeBlock with its "eager" and "grouped_mm" experts implementations, all on the same
weight tensors and the same input. Columns:
  ms        median wall time of one forward after a warm-up call, each timed call after reading twice the
            last-level cache of other memory (weights come from memory, as in decoding; none for a row that
            failed its check)
  GFLOP/s   active FLOPs (2·T·top_k·3·dim·hidden, plus the router) per second
  GB/s      bytes of the distinct experts this input routes to (at the row's bytes per weight, scales included),
            plus the router and the activations, per second
  %BW       GB/s as a percentage of the memory read bandwidth measured at the start of the run
  %roof     the roofline's lower bound max(bytes / bandwidth, FLOPs / dense-GEMM rate) as a percentage of ms
            (both ceilings measured at the start of the run, the GEMM as the best of --repeats)
  rel err   ‖out − transformers eager‖ / ‖transformers eager‖; a row above the tolerance is marked FAIL
  x eager, x grouped   the transformers row's ms divided by this row's ms (above 1: ours is faster)
Quantized rows (int8, int4: mixtral.quant) compare against transformers in bf16.

examples:
  mixtral bench moe
  mixtral bench moe --tokens 1,16,512 --dtypes bf16,int8 --json moe.json
  mixtral bench moe --dim 1024 --hidden 2048 --experts 8 --top-k 2 --tokens 1,64   # a quick small layer
"""

COLUMNS: list[Column] = [
    ("impl", "impl", 24, ""), ("dtype", "dtype", 5, ""), ("tokens", "tokens", 6, "d"), ("ms", "ms", 9, ".3f"),
    ("gflops", "GFLOP/s", 8, ".1f"), ("gbps", "GB/s", 7, ".1f"), ("bw_pct", "%BW", 5, ".0f"),
    ("roof_pct", "%roof", 5, ".0f"), ("experts", "experts", 7, "d"), ("rel_err", "rel err", 8, ".1e"),
    ("check", "check", 5, ""), ("x_eager", "x eager", 7, ".2f"), ("x_grouped", "x grouped", 9, ".2f"),
]

HF_MOE_IMPLS = ("eager", "grouped_mm")


def random_moe(dim: int, hidden: int, n_experts: int, top_k: int, seed: int, std: float = 0.02) -> MoE:
    """Our MoE layer with N(0, std) bf16 weights, allocated once (meta, then to_empty) and filled in place, on
    2 MB pages where the OS grants them (as `mixtral.load` does; transformers' block shares these tensors)."""
    with torch.device("meta"):
        layer = MoE(dim, hidden, n_experts, top_k).to(torch.bfloat16)
    layer = layer.to_empty(device="cpu").eval()
    kernels.prefer_huge_pages(layer)  # before the first write, which then faults in 2 MB pages
    return init_weights_(layer, seed, std)


def transformers_moe(ours: MoE):
    """transformers' MixtralSparseMoeBlock holding the very tensors of `ours` (no copy of the expert weights).

    Its experts implementation is chosen per call through `block.experts.config._experts_implementation`.
    Returns None (with a printed note) when transformers is not installed.
    """
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        print(f"note: transformers is not available ({e}); no peer rows")
        return None
    n_experts, two_hidden, dim = ours.w13.shape
    config = MixtralConfig(hidden_size=dim, intermediate_size=two_hidden // 2, num_local_experts=n_experts,
                           num_experts_per_tok=ours.top_k)
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    # Layouts match: gate_up_proj [E, 2I, D] with gate rows first = our w13; down_proj [E, D, I] = our w2.
    block.experts.gate_up_proj = ours.w13
    block.experts.down_proj = ours.w2
    block.gate.weight = ours.router.weight
    leftover = [name for name, t in block.state_dict().items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"MixtralSparseMoeBlock has tensors this benchmark does not share: {leftover}")
    return block.eval()


def _storage_bytes(obj, seen: set, depth: int = 0) -> int:
    """Bytes of the distinct tensors reachable from `obj`: a tensor (or tensor subclass), a module, a container, or an
    object holding tensors in its attributes (a quantized weight)."""
    if depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(_storage_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        key = (obj.data_ptr(), obj.nbytes)
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, torch.nn.Module):
        return sum(_storage_bytes(t, seen, depth + 1) for t in obj.state_dict(keep_vars=True).values())
    if isinstance(obj, (list, tuple)):
        return sum(_storage_bytes(item, seen, depth + 1) for item in obj)
    if isinstance(obj, dict):
        return sum(_storage_bytes(item, seen, depth + 1) for item in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_storage_bytes(item, seen, depth + 1) for item in vars(obj).values())
    return 0


def expert_bytes(moe: MoE) -> float:
    """Bytes one expert occupies (w1, w3, w2 and any quantization scales), measured from the weights' storage."""
    seen: set = set()
    return (_storage_bytes(moe.w13, seen) + _storage_bytes(moe.w2, seen)) / len(moe.w13)


def moe_flops(tokens: int, dim: int, hidden: int, n_experts: int, top_k: int) -> int:
    """Active FLOPs of one MoE forward: three dim×hidden products per token and chosen expert, plus the router."""
    return 2 * tokens * top_k * 3 * dim * hidden + 2 * tokens * dim * n_experts


def run(*, dim: int, hidden: int, n_experts: int, top_k: int, tokens: list[int], dtypes: list[str], repeats: int,
        min_seconds: float, group_size: int, bandwidth_gb: float, seed: int) -> dict:
    """Time one MoE layer of this shape at each of `tokens` (rows of x [1, T, dim]): transformers' eager and
    grouped_mm experts (when transformers is installed), ours in each of `dtypes` ("bf16", "int8", "int4"), every
    timed call after a cache flush, after checking its output against transformers eager. Prints the table as it
    goes; returns {"benchmark": "moe", "bandwidth_gbps", "dense_gemm_gflops", "tolerance", "rows", "passed"}
    (passed: no row disagreed beyond `TOLERANCE`)."""
    assert top_k <= n_experts, "the caller checks --top-k against --experts"

    llc = kernels.last_level_cache_bytes()
    bandwidth_gb = max(bandwidth_gb, 4 * llc / 1e9)  # mostly out of the cache, which keeps what it last read
    bandwidth = read_bandwidth(bandwidth_gb)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (sum of a {bandwidth_gb:g} GB float32 tensor, "
          f"best of 5)")
    flush = cache_flusher()
    print(f"each timed call starts after reading {flush.__self__.nbytes / 2**20:.0f} MB of other memory "
          f"(twice the {llc / 2**20:.0f} MB last-level cache): weights come from memory, as in decoding")
    # The compute ceiling: one dense bf16 GEMM with the FLOPs of the MoE at the largest T (its experts' matmuls
    # stacked into one [T·top_k, dim] x [dim, 3·hidden] product).
    t_max = max(tokens)
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(t_max * top_k, dim, generator=generator).to(torch.bfloat16)
    b = (torch.randn(3 * hidden, dim, generator=generator) * 0.02).to(torch.bfloat16)
    gemm_s = timed(lambda: F.linear(a, b), repeats, min_seconds, best=True)
    gemm_gflops = 2 * a.shape[0] * dim * b.shape[0] / gemm_s / 1e9
    print(f"dense bf16 GEMM [{a.shape[0]}, {dim}] x [{dim}, {b.shape[0]}]: {gemm_s * 1e3:.1f} ms, "
          f"{gemm_gflops:.1f} GFLOP/s (best of {repeats})")
    del a, b

    ours = random_moe(dim, hidden, n_experts, top_k, seed)
    peer = transformers_moe(ours)
    inputs = {t: torch.randn(1, t, dim, generator=generator).to(torch.bfloat16) for t in tokens}
    with torch.no_grad():
        distinct = {t: int(route(ours.router(x.reshape(-1, dim)), top_k)[1].unique().numel())
                    for t, x in inputs.items()}
    fixed_bytes = n_experts * dim * 2  # the router's weight, bf16

    rows: list[dict] = []
    peer_ms: dict[tuple[str, int], float] = {}
    reference: dict[int, torch.Tensor] = {}  # transformers eager output per T, the oracle of the checks

    def measure(impl: str, dtype: str, t: int, fn: Callable[[], torch.Tensor], per_expert: float) -> dict:
        flops = moe_flops(t, dim, hidden, n_experts, top_k)
        nbytes = distinct[t] * per_expert + fixed_bytes + 2 * t * dim * 2  # experts, router, x in and out
        row = {"impl": impl, "dtype": dtype, "tokens": t, "experts": distinct[t], "bytes": nbytes, "flops": flops}
        with torch.inference_mode():
            out = fn()
        if impl == "transformers eager":
            reference[t] = out
        elif t in reference:
            row["rel_err"] = relative_error(out, reference[t])
            row["check"] = "ok" if row["rel_err"] <= TOLERANCE[dtype] else "FAIL"
        if row.get("check") == "FAIL":  # a wrong answer gets no time
            rows.append(row)
            print(format_row(COLUMNS, row), flush=True)
            return row
        with torch.inference_mode():
            seconds = timed(fn, repeats, min_seconds, between=flush)
        row.update(ms=seconds * 1e3, gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9)
        row["bw_pct"] = 100 * row["gbps"] / bandwidth
        row["roof_pct"] = 100 * max(nbytes / (bandwidth * 1e9), flops / (gemm_gflops * 1e9)) / seconds
        for name, key in (("eager", "x_eager"), ("grouped_mm", "x_grouped")):
            if impl == "mixtral" and (name, t) in peer_ms:
                row[key] = peer_ms[(name, t)] / row["ms"]
        rows.append(row)
        print(format_row(COLUMNS, row), flush=True)
        return row

    bf16_expert = expert_bytes(ours)
    print(f"\nMoE layer: dim {dim}, hidden {hidden}, {n_experts} experts, top-{top_k}; x [1, T, {dim}] bf16; "
          f"one bf16 expert = {bf16_expert / 1e6:.1f} MB")
    print(format_header(COLUMNS))
    for t in tokens:
        x = inputs[t]
        if peer is not None:
            for impl in HF_MOE_IMPLS:
                peer.experts.config._experts_implementation = impl
                row = measure(f"transformers {impl}", "bf16", t, lambda: peer(x), bf16_expert)
                peer_ms[(impl, t)] = row["ms"]
        if "bf16" in dtypes:
            measure("mixtral", "bf16", t, lambda: ours(x), bf16_expert)

    for mode in (d for d in dtypes if d in QUANT_MODES):
        with torch.no_grad():
            quantized = quantize(copy.deepcopy(ours), mode, group_size=group_size)
            kernels.prefer_huge_pages(quantized, collapse=True)  # as mixtral.load(..., quantize=mode) does
            per_expert = expert_bytes(quantized)
            print(f"# {mode}: one expert = {per_expert / 1e6:.1f} MB ({per_expert / bf16_expert * 2:.3f} bytes "
                  f"per weight, scales included)")
            for t in tokens:
                x = inputs[t]
                measure("mixtral", mode, t, lambda: quantized(x), per_expert)
            del quantized
            gc.collect()

    by_impl = {(r["impl"], r["dtype"]): r for r in rows if r["tokens"] == t_max and "ms" in r}
    if ("mixtral", "bf16") in by_impl:
        ours_max = by_impl[("mixtral", "bf16")]
        print(f"\nours bf16 at {t_max} tokens: {ours_max['gflops']:.1f} GFLOP/s = "
              f"{100 * ours_max['gflops'] / gemm_gflops:.0f}% of the dense GEMM of the same FLOPs")
    failed = [r for r in rows if r.get("check") == "FAIL"]
    checked = [r for r in rows if "check" in r]
    print(f"agreement with transformers eager: {len(checked) - len(failed)}/{len(checked)} rows within tolerance "
          f"({', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())})"
          + ("" if not failed else "; FAILED: " + ", ".join(f"{r['impl']} {r['dtype']} T={r['tokens']}"
                                                            for r in failed)))
    return {"benchmark": "moe", "bandwidth_gbps": bandwidth, "dense_gemm_gflops": gemm_gflops,
            "tolerance": TOLERANCE, "rows": rows, "passed": not failed}

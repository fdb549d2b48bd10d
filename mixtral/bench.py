"""`mixtral bench`: ours against transformers, side by side, measured in one run.

    mixtral bench moe                 # one Mixtral-8x7B MoE layer: ours vs MixtralSparseMoeBlock (eager, grouped_mm)
    mixtral bench e2e                 # load + prefill + decode of a 2-layer synthetic Mixtral-8x7B-shaped model
    python -m mixtral.bench moe --tokens 1,16 --dtypes bf16

Every table starts with the date, the command line, the resolved settings, torch/transformers versions, the
thread count and the CPU, so a number pasted elsewhere carries its provenance. `--json PATH` writes the same rows.

`moe` builds ONE set of random bf16 expert weights and hands the same tensors to both implementations, measures the
memory read bandwidth and a dense GEMM of the same FLOPs first (the two ceilings of the roofline), then times each
implementation on the same input and checks that the outputs agree before reporting a number.

`e2e` writes (or reuses) a synthetic checkpoint in the Hugging Face layout, then loads one model at a time
(24 GiB machines): ours per dtype, then transformers, with the same prompts and the same protocol for both.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.config import PRESETS, from_name, with_overrides
from mixtral.errors import InputError, MixtralError
from mixtral.io.loading import load
from mixtral.moe import MoE, route
from mixtral.quant import quantize

QUANT_MODES = ("int8", "int4")
DTYPE_NAMES = ("bf16",) + QUANT_MODES

# Largest relative error (‖ours − transformers-eager bf16‖ / ‖transformers‖) accepted before a row is marked FAIL.
# bf16 differs from transformers only in summation order (measured ~3e-3 on random weights); weight-only int8 and
# int4 add their rounding error (a group-wise int4 step is ~0.4σ of the weights, ~10% per weight).
TOLERANCE = {"bf16": 0.03, "int8": 0.08, "int4": 0.35}


# ---- measuring -------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], repeats: int, min_seconds: float, warmup: int = 1, best: bool = False,
          between: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn()` over at least `repeats` calls and `min_seconds` in all, after `warmup` calls;
    the fastest call instead with `best` (for a ceiling: what the machine can do, not what it usually does).
    `between` runs untimed before each timed call (`cache_flusher`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        if between is not None:
            between()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def cache_flusher(min_bytes: int = 256 * 2**20) -> Callable[[], object]:
    """A function that reads twice the last-level cache's size (at least `min_bytes`), evicting what a timed call
    left there. Decoding reads each layer's experts once per token, so they come from memory; a layer timed in a
    loop would otherwise be served from a cache as large as its active experts (480 MB of L3 on the Xeon of
    2026-12-01, more than two int4 experts of Mixtral-8x7B)."""
    junk = torch.ones(max(min_bytes, 2 * kernels.last_level_cache_bytes()) // 4)
    return junk.sum


def read_bandwidth(gb: float, repeats: int = 5) -> float:
    """Best memory read bandwidth in GB/s: the sum of a `gb`-gigabyte float32 tensor (too big for any cache)."""
    data = torch.ones(max(1, int(gb * 1e9) // 4))
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass also faults the pages in; best-of drops it
        t = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t)
    return data.nbytes / best / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with the core count, whether it has AVX512-BF16 and AMX-BF16 (the
    kernels' and torch's GEMM's paths differ with them) and its last-level cache."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    features = "".join(f", {f}" for f in ("avx512_bf16", "amx_bf16") if f in flags)
    cache = kernels.last_level_cache_bytes()
    return f"{name} ({os.cpu_count()} cpus{features}{f', {cache >> 20} MB cache' if cache else ''})"


def load_average() -> str:
    """The 1/5/15-minute load averages: other processes on the cores make every timing of the run slower."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores other processes kept busy over the next `seconds` (this one sleeps meanwhile), from
    /proc/stat; None where that file is missing. The load average cannot tell: it trails by a minute and counts the
    run before this one."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # all time (without guest time), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def provenance(args: argparse.Namespace) -> dict:
    """What every table is printed under: when, how (command and resolved settings), with what, on what."""
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command", "bench", "command_line", "verbose")}
    program = Path(sys.argv[0]).name
    program = f"python -m {Path(sys.argv[0]).parent.name}" if program == "__main__.py" else program
    command = getattr(args, "command_line", None) or f"{program} {shlex.join(sys.argv[1:])}"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
            "settings": settings, "torch": torch.__version__, "transformers": _transformers_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "loadavg_start": load_average(),
            "busy_cores_start": busy_cores()}


def print_provenance(info: dict) -> None:
    print(f"# {info['date']}  {info['command']}")
    print("# " + "  ".join(f"{k}={v}" for k, v in info["settings"].items() if v is not None))
    print(f"# torch {info['torch']}  transformers {info['transformers'] or '(not installed)'}  "
          f"threads {info['threads']}  cpu {info['cpu']}")
    busy = info["busy_cores_start"]
    print(f"# other processes at the start: {'unknown' if busy is None else f'{busy:.2f}'} cores busy; "
          f"load average {info['loadavg_start']}")
    if busy is not None and busy >= 0.25 and busy + info["threads"] > (os.cpu_count() or 1):
        print(f"# warning: other processes share these {os.cpu_count()} cores, so the times below are inflated and "
              f"noisier; compare rows within this table only")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` to `path` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


Column = tuple[str, str, int, str]  # row key, title, width, format spec


def format_header(columns: Sequence[Column]) -> str:
    return " ".join(f"{title:>{width}}" if i else f"{title:<{width}}"
                    for i, (_, title, width, _) in enumerate(columns))


def format_row(columns: Sequence[Column], row: dict) -> str:
    cells = []
    for i, (key, _, width, spec) in enumerate(columns):
        value = row.get(key)
        text = "-" if value is None else format(value, spec)
        cells.append(f"{text:>{width}}" if i else f"{text:<{width}}")
    return " ".join(cells)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


def parse_list(text: str, kind: type, name: str, choices: Sequence | None = None) -> list:
    """"1,4,16" -> [1, 4, 16]; InputError naming the option for an empty list, a bad item or an unknown choice."""
    try:
        items = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot parse {text!r} as a comma-separated list of {kind.__name__}") from None
    if not items:
        raise InputError(f"{name}: empty list")
    for item in items:
        if choices is not None and item not in choices:
            raise InputError(f"{name}: unknown value {item!r}; choose from {', '.join(map(str, choices))}")
        if kind is int and item <= 0:
            raise InputError(f"{name}: values must be positive, got {item}")
    return items


# ---- bench moe -------------------------------------------------------------------------------------------------

MOE_EPILOG = """\
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

MOE_COLUMNS: list[Column] = [
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
        moe = MoE(dim, hidden, n_experts, top_k).to(torch.bfloat16)
    moe = moe.to_empty(device="cpu").eval()
    kernels.prefer_huge_pages(moe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, std, generator=generator)
    return moe


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


def bench_moe(args: argparse.Namespace) -> dict:
    tokens_list = parse_list(args.tokens, int, "--tokens")
    dtypes = parse_list(args.dtypes, str, "--dtypes", DTYPE_NAMES)
    if args.top_k > args.experts:
        raise InputError(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    dim, hidden, n_experts, top_k = args.dim, args.hidden, args.experts, args.top_k
    info = provenance(args)
    print_provenance(info)

    llc = kernels.last_level_cache_bytes()
    bandwidth_gb = max(args.bandwidth_gb, 4 * llc / 1e9)  # mostly out of the cache, which keeps what it last read
    bandwidth = read_bandwidth(bandwidth_gb)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (sum of a {bandwidth_gb:g} GB float32 tensor, "
          f"best of 5)")
    flush = cache_flusher()
    print(f"each timed call starts after reading {flush.__self__.nbytes / 2**20:.0f} MB of other memory "
          f"(twice the {llc / 2**20:.0f} MB last-level cache): weights come from memory, as in decoding")
    # The compute ceiling: one dense bf16 GEMM with the FLOPs of the MoE at the largest T (its experts' matmuls
    # stacked into one [T·top_k, dim] x [dim, 3·hidden] product).
    t_max = max(tokens_list)
    generator = torch.Generator().manual_seed(args.seed)
    a = torch.randn(t_max * top_k, dim, generator=generator).to(torch.bfloat16)
    b = (torch.randn(3 * hidden, dim, generator=generator) * 0.02).to(torch.bfloat16)
    gemm_s = timed(lambda: F.linear(a, b), args.repeats, args.min_seconds, best=True)
    gemm_gflops = 2 * a.shape[0] * dim * b.shape[0] / gemm_s / 1e9
    print(f"dense bf16 GEMM [{a.shape[0]}, {dim}] x [{dim}, {b.shape[0]}]: {gemm_s * 1e3:.1f} ms, "
          f"{gemm_gflops:.1f} GFLOP/s (best of {args.repeats})")
    del a, b

    ours = random_moe(dim, hidden, n_experts, top_k, args.seed)
    peer = transformers_moe(ours)
    inputs = {t: torch.randn(1, t, dim, generator=generator).to(torch.bfloat16) for t in tokens_list}
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
            print(format_row(MOE_COLUMNS, row), flush=True)
            return row
        with torch.inference_mode():
            seconds = timed(fn, args.repeats, args.min_seconds, between=flush)
        row.update(ms=seconds * 1e3, gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9)
        row["bw_pct"] = 100 * row["gbps"] / bandwidth
        row["roof_pct"] = 100 * max(nbytes / (bandwidth * 1e9), flops / (gemm_gflops * 1e9)) / seconds
        for name, key in (("eager", "x_eager"), ("grouped_mm", "x_grouped")):
            if impl == "mixtral" and (name, t) in peer_ms:
                row[key] = peer_ms[(name, t)] / row["ms"]
        rows.append(row)
        print(format_row(MOE_COLUMNS, row), flush=True)
        return row

    bf16_expert = expert_bytes(ours)
    print(f"\nMoE layer: dim {dim}, hidden {hidden}, {n_experts} experts, top-{top_k}; x [1, T, {dim}] bf16; "
          f"one bf16 expert = {bf16_expert / 1e6:.1f} MB")
    print(format_header(MOE_COLUMNS))
    for t in tokens_list:
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
            quantized = quantize(copy.deepcopy(ours), mode, group_size=args.group_size)
            kernels.prefer_huge_pages(quantized, collapse=True)  # as mixtral.load(..., quantize=mode) does
            per_expert = expert_bytes(quantized)
            print(f"# {mode}: one expert = {per_expert / 1e6:.1f} MB ({per_expert / bf16_expert * 2:.3f} bytes "
                  f"per weight, scales included)")
            for t in tokens_list:
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
    return {**info, "benchmark": "moe", "bandwidth_gbps": bandwidth, "dense_gemm_gflops": gemm_gflops,
            "tolerance": TOLERANCE, "rows": rows, "passed": not failed}


# ---- bench e2e -------------------------------------------------------------------------------------------------

E2E_EPILOG = """\
Without --model, writes a synthetic checkpoint shaped like Mixtral-8x7B but with --synthetic-layers layers (random
bf16 weights, Hugging Face layout; 2 layers = 6.3 GB) into --workdir and reuses it on later runs there. Then, one
model in memory at a time: ours per --dtypes (mixtral.load), then transformers (from_pretrained, bf16) with each of
--hf-experts. Same prompts, same protocol for both (transformers' times come from a streamer in the same
generate call):
  ttft ms       time to the first token of a --prompt-tokens prompt (prefill + first greedy pick)
  prefill tok/s a --prefill-tokens prompt at batch 1, divided by its time to the first token
  decode tok/s  (new tokens − 1) × batch / (time of the whole generation − time to the first token)
Ratios divide by transformers bf16 with the first of --hf-experts at the same batch (above 1: ours is faster).
Checks: prompt logits of ours vs transformers (relative error; bf16 must be within tolerance, quantized rows are
shown for information) and greedy tokens (match/mismatch, informative: random weights make near-ties).

examples:
  mixtral bench e2e                                   # 2 synthetic layers in a temporary directory
  mixtral bench e2e --workdir /data/bench             # written there once, reused by later runs
  mixtral bench e2e --keep                            # keep the temporary directory (its path is printed)
  mixtral bench e2e --model ./Mixtral-8x7B-v0.1 --dtypes bf16 --batches 1
"""

E2E_COLUMNS: list[Column] = [
    ("impl", "impl", 24, ""), ("dtype", "dtype", 5, ""), ("batch", "batch", 5, "d"), ("ttft_ms", "ttft ms", 8, ".1f"),
    ("prefill_tps", "prefill tok/s", 13, ".1f"), ("decode_tps", "decode tok/s", 12, ".2f"),
    ("x_prefill", "x prefill", 9, ".2f"), ("x_decode", "x decode", 8, ".2f"),
]


def synthetic_checkpoint(directory: Path, preset: str, n_layers: int, seed: int) -> Path:
    """A checkpoint shaped like `preset` with `n_layers` layers of random bf16 weights in `directory`, in the HF
    layout; an existing one with the same config is reused. Returns its path."""
    from mixtral.io.checkpoint import find_checkpoint, save_hf
    from mixtral.model import Transformer

    config = with_overrides(from_name(preset), n_layers=n_layers)
    path = directory / f"synthetic-{preset}-{n_layers}layers-seed{seed}"
    if (path / "config.json").exists():
        try:
            if find_checkpoint(path).config == config:
                print(f"reusing synthetic checkpoint {path}")
                return path
        except MixtralError:
            pass
        shutil.rmtree(path)
    total, _ = config.param_counts()
    print(f"writing synthetic checkpoint {path} ({total * 2 / 1e9:.2f} GB) ...", flush=True)
    # Meta, then to_empty, then normal_ in place: one copy of the weights, never a float32 staging copy.
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=generator)
    # Written under a temporary name and renamed: a killed run never leaves a half checkpoint to be reused.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_hf(model, tmp)
    del model
    gc.collect()
    os.replace(tmp, path)
    return path


def time_ours(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float, list[int]]:
    """(median seconds to the first token, median seconds of the rest, the first row's tokens), greedy."""
    from mixtral.generate import stream

    firsts, rests, tokens = [], [], []
    for _ in range(repeats):
        out = []
        start = time.perf_counter()
        steps = stream(model, prompts, new_tokens, eos_id=None)
        out.append(next(steps))
        first = time.perf_counter()
        out.extend(steps)
        end = time.perf_counter()
        firsts.append(first - start)
        rests.append(end - first)
        tokens = [step[0] for step in out]
    return statistics.median(firsts), statistics.median(rests), tokens


def time_transformers(model, prompts: list[list[int]], new_tokens: int,
                      repeats: int) -> tuple[float, float, list[int]]:
    """The same as `time_ours` for a transformers model and its generate(), clocked by a streamer: generate() hands
    the streamer the prompt, then each step's new tokens, so its second call marks the first token of that very run.
    (Timing generate(max_new_tokens=1) and generate(N) separately and subtracting their medians came out negative
    on the shared 2-core machines, where one stalled run moves a median by more than a whole decode.)"""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    ids = torch.tensor(prompts)
    firsts, rests, tokens = [], [], []
    for _ in range(repeats):
        clock = FirstTokenClock()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        firsts.append(clock.first - start)
        rests.append(end - clock.first)
        tokens = out[0, ids.shape[1]:].tolist()
    return statistics.median(firsts), statistics.median(rests), tokens


def load_ours(path: Path, mode: str):
    """Our model from `path` in bf16, quantized on load to `mode` unless it is bf16."""
    return load(path, dtype=torch.bfloat16, quantize=None if mode == "bf16" else mode, progress=False)


def bench_e2e(args: argparse.Namespace) -> dict:
    dtypes = parse_list(args.dtypes, str, "--dtypes", DTYPE_NAMES)
    batches = parse_list(args.batches, int, "--batches")
    hf_impls = parse_list(args.hf_experts, str, "--hf-experts")
    if args.new_tokens < 2:
        raise InputError(f"--new-tokens must be at least 2 (decode speed needs a token after the first), "
                         f"got {args.new_tokens}")
    info = provenance(args)
    print_provenance(info)
    temp_dir = None
    if args.model is not None:
        path = Path(args.model)
    else:
        if args.synthetic_config not in PRESETS:
            raise InputError(f"--synthetic-config: unknown preset {args.synthetic_config!r}; "
                             f"known presets: {', '.join(PRESETS)}")
        if args.workdir is None:
            temp_dir = Path(tempfile.mkdtemp(prefix="mixtral-bench-"))
        workdir = Path(args.workdir) if args.workdir is not None else temp_dir
        workdir.mkdir(parents=True, exist_ok=True)
        path = synthetic_checkpoint(workdir, args.synthetic_config, args.synthetic_layers, args.seed)
    try:
        return _bench_e2e(args, info, path, dtypes, batches, hf_impls)
    finally:
        if temp_dir is not None:
            if args.keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _bench_e2e(args: argparse.Namespace, info: dict, path: Path, dtypes: list[str], batches: list[int],
               hf_impls: list[str]) -> dict:
    from mixtral.io.checkpoint import find_checkpoint

    config = find_checkpoint(path).config
    generator = torch.Generator().manual_seed(args.seed)
    short = torch.randint(3, config.vocab_size, (max(batches), args.prompt_tokens), generator=generator).tolist()
    long = torch.randint(3, config.vocab_size, (1, args.prefill_tokens), generator=generator).tolist()
    n = args.new_tokens
    print(f"\nmodel {path} ({config.n_layers} layers, dim {config.dim}, {config.n_experts} experts); "
          f"prompts of {args.prompt_tokens} tokens, {n} new tokens, greedy; prefill prompt {args.prefill_tokens} "
          f"tokens; median of {args.repeats}")
    print(format_header(E2E_COLUMNS), flush=True)

    rows: list[dict] = []
    checks: list[dict] = []
    ours_tokens: dict[str, list[int]] = {}
    ours_logits: dict[str, torch.Tensor] = {}

    def add_row(row: dict) -> None:
        rows.append(row)
        print(format_row(E2E_COLUMNS, row), flush=True)

    def measure(model, timer, impl: str, dtype: str) -> list[int]:
        timer(model, short[:1], 2, 1)  # warm-up: first-call allocations, kernel builds
        prefill_s, _, _ = timer(model, long, 1, args.repeats)
        first_tokens: list[int] = []
        for batch in batches:
            ttft, rest, tokens = timer(model, short[:batch], n, args.repeats)
            if batch == batches[0]:
                first_tokens = tokens
            add_row({"impl": impl, "dtype": dtype, "batch": batch, "ttft_ms": ttft * 1e3,
                     "prefill_tps": args.prefill_tokens / prefill_s if batch == 1 else None,
                     "decode_tps": (n - 1) * batch / rest, "prefill_s": prefill_s if batch == 1 else None,
                     "decode_s": rest})
        return first_tokens

    for dtype in dtypes:
        model = load_ours(path, dtype)
        with torch.inference_mode():
            ours_logits[dtype] = model(torch.tensor(short[:1]))[0].float()
        ours_tokens[dtype] = measure(model, time_ours, "mixtral", dtype)
        del model
        gc.collect()

    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"note: transformers is not available ({e}); no peer rows")
    else:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        print(f"# transformers' default experts implementation here: {model.config._experts_implementation}")
        with torch.inference_mode():
            hf_logits = model(input_ids=torch.tensor(short[:1])).logits[0].float()
        for impl in hf_impls:
            model.set_experts_implementation(impl)
            tokens = measure(model, time_transformers, f"transformers {impl}", "bf16")
            if impl == hf_impls[0]:
                hf_tokens = tokens
        del model
        gc.collect()
        for dtype, logits in ours_logits.items():
            err = relative_error(logits, hf_logits)
            # Only bf16 is a gate: same weights, same math. A quantized model's logits move further from bf16 than
            # any one layer's output does (`bench moe` gates those): random weights make attention's softmax amplify
            # a 1% weight error into ~20% of the logits over two layers (measured int8), so a fixed bound would
            # test the synthetic model, not the code.
            gate = dtype == "bf16"
            checks.append({"check": "prompt logits vs transformers", "dtype": dtype, "rel_err": err,
                           "tolerance": TOLERANCE[dtype] if gate else None,
                           "passed": err <= TOLERANCE[dtype] if gate else None})
        for dtype, tokens in ours_tokens.items():
            k = min(args.check_tokens, len(tokens))
            same = sum(a == b for a, b in zip(tokens[:k], hf_tokens[:k]))
            # Greedy tokens of random weights sit on near-ties, so rounding may flip one: informative, not a gate.
            checks.append({"check": f"greedy first {k} tokens vs transformers", "dtype": dtype, "matches": same,
                           "of": k, "ours": tokens[:k], "transformers": hf_tokens[:k], "passed": None})

        reference = {r["batch"]: r for r in rows if r["impl"] == f"transformers {hf_impls[0]}"}
        print(f"\nratios against transformers {hf_impls[0]} bf16 at the same batch:")
        print(format_header(E2E_COLUMNS))
        for row in rows:
            ref = reference.get(row["batch"])
            if ref is not None:
                row["x_decode"] = row["decode_tps"] / ref["decode_tps"]
                if row["prefill_tps"] is not None and ref["prefill_tps"] is not None:
                    row["x_prefill"] = row["prefill_tps"] / ref["prefill_tps"]
            print(format_row(E2E_COLUMNS, row))

    for c in checks:
        if "rel_err" in c and c["passed"] is None:
            print(f"{c['check']} ({c['dtype']}): relative error {c['rel_err']:.2e} (informative: quantization "
                  f"error of this model)")
        elif "rel_err" in c:
            print(f"{c['check']} ({c['dtype']}): relative error {c['rel_err']:.2e} "
                  f"{'ok' if c['passed'] else 'FAIL'} (tolerance {c['tolerance']:g})")
        else:
            verdict = "match" if c["matches"] == c["of"] else "MISMATCH"
            print(f"{c['check']} ({c['dtype']}): {c['matches']}/{c['of']} {verdict}  ours {c['ours']}  "
                  f"transformers {c['transformers']}")
    passed = all(c["passed"] is not False for c in checks)
    return {**info, "benchmark": "e2e", "model": str(path), "rows": rows, "checks": checks, "passed": passed}


# ---- the parser and main ---------------------------------------------------------------------------------------

def _add_bench_commands(parser: argparse.ArgumentParser) -> None:
    """The `moe` and `e2e` subcommands, under `mixtral bench` or `python -m mixtral.bench`."""
    commands = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    raw = argparse.RawDescriptionHelpFormatter
    threads = max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def common(p: argparse.ArgumentParser, repeats: int) -> None:
        p.add_argument("--dtypes", default="bf16,int8,int4",
                       help="comma-separated weight dtypes of ours: bf16, int8, int4 (default: bf16,int8,int4)")
        p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
        p.add_argument("--repeats", type=int, default=repeats,
                       help=f"timed calls per measurement at least; the median is reported (default: {repeats})")
        p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
        p.add_argument("--json", metavar="PATH", help="also write all rows to this JSON file (atomically)")

    p = commands.add_parser("moe", formatter_class=raw, epilog=MOE_EPILOG,
                            help="one MoE layer: ours vs transformers' MixtralSparseMoeBlock",
                            description="Time one MoE layer of the given shape, ours against transformers, on "
                                        "shared weights, with the memory-bandwidth and GEMM ceilings.")
    p.add_argument("--dim", type=int, default=4096, help="model dimension (default: 4096, Mixtral-8x7B)")
    p.add_argument("--hidden", type=int, default=14336, help="expert hidden dimension (default: 14336)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (default: 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--tokens", default="1,4,16,64,512", help="comma-separated T of x [1, T, dim] (default: "
                                                              "1,4,16,64,512)")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="keep timing a measurement for at least this long (default: 0.5)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (default: 128)")
    p.add_argument("--bandwidth-gb", type=float, default=1.0,
                   help="size of the tensor whose sum measures memory bandwidth (default: 1.0)")
    common(p, repeats=5)
    p.set_defaults(run=run_moe)

    p = commands.add_parser("e2e", formatter_class=raw, epilog=E2E_EPILOG,
                            help="load, prefill and decode a model: ours vs transformers",
                            description="Prefill and decode speed of a whole model, ours against transformers, with "
                                        "the same prompts and protocol.")
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: a synthetic checkpoint)")
    p.add_argument("--synthetic-layers", type=int, default=2,
                   help="layers of the synthetic Mixtral-8x7B-shaped checkpoint (default: 2, 6.3 GB)")
    p.add_argument("--synthetic-config", default="mixtral-8x7b", help=argparse.SUPPRESS)  # tests: a tiny preset
    p.add_argument("--workdir", metavar="DIR",
                   help="where the synthetic checkpoint is written and reused (default: a temporary directory, "
                        "deleted afterwards unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory of the synthetic checkpoint")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes of decoding (default: 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each decode prompt (default: 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default: 32)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="tokens of the prefill prompt (default: 512)")
    p.add_argument("--hf-experts", default="grouped_mm,eager",
                   help="transformers experts implementations to time; the first is the ratios' reference "
                        "(default: grouped_mm,eager)")
    p.add_argument("--check-tokens", type=int, default=8, help="greedy tokens compared with transformers (default: 8)")
    common(p, repeats=5)
    p.set_defaults(run=run_e2e)

    from mixtral.serve.bench import add_serve_benchmark  # the server sits above the benchmarks: imported late
    add_serve_benchmark(commands)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` (with `moe` and `e2e` under it) on the subparsers of the `mixtral` command."""
    p = subparsers.add_parser("bench", help="benchmark ours against transformers, side by side",
                              description="Benchmarks that print ours against transformers from one run.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="examples:\n  mixtral bench moe --tokens 1,16,512\n  mixtral bench e2e\n"
                                     "  mixtral bench serve\n"
                                     "Run 'mixtral bench BENCHMARK --help' for the options of each.")
    _add_bench_commands(p)
    return p


def _run(args: argparse.Namespace, bench: Callable[[argparse.Namespace], dict]) -> int:
    if _transformers_version() is None:
        raise InputError("mixtral bench times ours against transformers, which is not installed; install the test "
                         "extra: pip install -e '.[test]' (or pip install transformers)")
    if args.threads < 1 or args.repeats < 1:
        raise InputError(f"--threads and --repeats must be at least 1, got {args.threads} and {args.repeats}")
    torch.set_num_threads(args.threads)
    return report(args, bench(args))


def report(args: argparse.Namespace, result: dict) -> int:
    """Close a benchmark's output (load average, --json) and return its exit code: 1 when a check failed."""
    result["loadavg_end"] = load_average()
    print(f"# load average at the end: {result['loadavg_end']}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


def run_moe(args: argparse.Namespace) -> int:
    """`bench moe`: returns 0, or 1 when a row's output disagrees with transformers."""
    return _run(args, bench_moe)


def run_e2e(args: argparse.Namespace) -> int:
    """`bench e2e`: returns 0, or 1 when our prompt logits disagree with transformers'."""
    return _run(args, bench_e2e)


def main(argv: list[str] | None = None) -> int:
    """`python -m mixtral.bench moe|e2e ...`; returns the exit code (1 with one `error:` line for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m mixtral.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_bench_commands(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    args.command_line = shlex.join(["python", "-m", "mixtral.bench", *argv])
    try:
        return args.run(args)
    except MixtralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: as `mixtral.cli` does, quiet the interpreter's final flush
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())

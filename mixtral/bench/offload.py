"""`mixtral bench offload`: decoding with the experts offloaded, from one run: memory budgets × policies ×
models (one per expert precision), each configuration in a fresh process.

For each model (a quantized checkpoint, `mixtral quantize`; or "default" / a preset, whose expert files are then
written once into a cache directory), the disk's direct-read bandwidth is measured first: of a quantized
checkpoint, by reading random expert records of its own files with two readers, as the engine reads them (model
thread + loader); otherwise of a new file in the offload directory, with one. Then,
per budget and policy, a child process loads the model with `mixtral.load(..., offload=budget,
offload_policy=policy)` ("all": fully resident, no engine), prefills a prompt of random tokens and decodes greedily,
and reports: decode tokens/s, the engine's counters over the decode steps (hit rate, demand loads and MB read per
token, the share of the time stalled on reads), peak RSS (VmHWM) and how much the page cache grew; and the
roofline, the tokens/s the disk allows for the bytes read per token (disk bandwidth / bytes per token).

    mixtral bench offload --model ./mixtral-8x7b-int4 --budgets 4GB,8GB,12GB,16GB
    mixtral bench offload --model default --budgets 8MB,12MB,all --policies lru,lru+predict,lru+predict-after

Random-weight models route nearly at random: the worst case for a cache (with k of 8 experts per layer kept, an
LRU hits about k/8 of the time); trained routing is local and predictable (docs/routing.md).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from mixtral.bench.harness import CHILD_STATUS_KB
from mixtral.config import parse_size
from mixtral.io.experts import read_speed
from mixtral.io.loading import OFFLOAD_POLICIES, inspect_model, read_quantization_config, resolve_model
from mixtral.io.quantized import open_expert_files
from mixtral.offload import plan

CHILD = CHILD_STATUS_KB + r"""
import json, sys, time
import torch
import mixtral
from mixtral.cache import KVCache
from mixtral.generate import decode_step, prefill

def cached_kb():
    for line in open("/proc/meminfo"):
        if line.startswith("Cached:"):
            return int(line.split()[1])

model_path, budget, policy, prompt_len, tokens, threads, offload_dir = sys.argv[1:8]
torch.set_num_threads(int(threads))
cached_before = cached_kb()
start = time.perf_counter()
model = mixtral.load(model_path, progress=False, offload=None if budget == "all" else budget, offload_policy=policy,
                     offload_dir=offload_dir or None)
load_seconds = time.perf_counter() - start
engine = getattr(model, "offload_engine", None)
ids = torch.randint(1, model.config.vocab_size, (1, int(prompt_len)), generator=torch.Generator().manual_seed(0))
cache = KVCache(model.config, 1, int(prompt_len) + int(tokens) + 1, max_chunk=int(prompt_len),
                dtype=model.tok_embeddings.weight.dtype)
with torch.no_grad():
    logits = prefill(model, cache, ids)
    if engine is not None:
        engine.drain()
        engine.reset_stats()
    start = time.perf_counter()
    for _ in range(int(tokens)):
        logits = decode_step(model, cache, [int(logits[0].argmax())])
    seconds = time.perf_counter() - start
stats = engine.stats() if engine is not None else {}
if engine is not None:
    engine.close()
print(json.dumps({"seconds": seconds, "tokens": int(tokens), "load_seconds": load_seconds, "stats": stats,
                  "peak_rss_kb": status_kb("VmHWM"), "page_cache_growth_kb": cached_kb() - cached_before}))
"""


def measure(model: str, budget: str, policy: str, *, prompt: int, tokens: int, threads: int,
            offload_dir: str | None) -> dict:
    """One configuration in a fresh process: {"seconds", "tokens", "load_seconds", "stats", "peak_rss_kb",
    "page_cache_growth_kb"}."""
    args = [sys.executable, "-c", CHILD, str(model), budget, policy, str(prompt), str(tokens), str(threads),
            offload_dir or ""]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{model} {budget} {policy}: {result.stderr.strip()[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


COLUMNS = ("model", "budget", "policy", "tok/s", "hit %", "demand/tok", "MB read/tok", "stall %", "roofline tok/s",
           "% of roofline", "peak RSS GB", "page cache +GB")


def run(*, models: Sequence[str], budgets: Sequence[str], policies: Sequence[str], prompt: int = 16,
        tokens: int = 8, threads: int = 2, offload_dir: str | None = None) -> dict:
    """Every model × budget × policy (a budget "all": resident, once per model); prints the table as it goes.
    Returns {"benchmark": "offload", "rows": [...]} with the disk bandwidth measured per model."""
    rows = []
    print("  ".join(f"{c:>14}" for c in COLUMNS), flush=True)
    for model in models:
        path = Path(str(resolve_model(model)))
        if read_quantization_config(path) is not None:
            # The roofline from the engine's own reads: random records of this model's expert files, two readers
            files = open_expert_files(path, inspect_model(str(path))[0])
            try:
                disk = read_speed(files, reads=max(16, 4 * len(files)), threads=2)
            finally:
                for file in files:
                    file.close()
            where = f"random records of {path}, 2 readers"
        else:
            disk_dir = Path(offload_dir or plan.Path.home())
            disk = plan.measure_disk(disk_dir)
            where = f"a new file in {disk_dir}, 1 reader"
        print(f"# {model}: direct reads at {disk / 1e9:.2f} GB/s ({where})", flush=True)
        for budget in budgets:
            for policy in (["-"] if budget == "all" else policies):
                r = measure(model, budget, "lru" if policy == "-" else policy, prompt=prompt, tokens=tokens,
                            threads=threads, offload_dir=offload_dir)
                s = r["stats"]
                per_token = s.get("bytes_read", 0) / r["tokens"]
                row = {"model": model, "budget": budget, "policy": policy, "disk_bytes_per_s": disk,
                       "tokens_per_s": r["tokens"] / r["seconds"], "hit_rate": s.get("hit_rate", 1.0),
                       "demand_loads_per_token": s.get("demand_loads", 0) / r["tokens"],
                       "bytes_read_per_token": per_token,
                       "stall_share": s.get("stall_seconds", 0.0) / r["seconds"],
                       "roofline_tokens_per_s": disk / per_token if per_token else None,
                       "peak_rss_bytes": r["peak_rss_kb"] * 1024,
                       "page_cache_growth_bytes": r["page_cache_growth_kb"] * 1024, "stats": s,
                       "load_seconds": r["load_seconds"]}
                share = (row["tokens_per_s"] / row["roofline_tokens_per_s"] if row["roofline_tokens_per_s"]
                         else None)
                cells = [Path(model).name[:14], budget, policy, f"{row['tokens_per_s']:.3f}",
                         f"{100 * row['hit_rate']:.1f}", f"{row['demand_loads_per_token']:.2f}",
                         f"{per_token / 1e6:.1f}", f"{100 * row['stall_share']:.0f}",
                         "-" if share is None else f"{row['roofline_tokens_per_s']:.3f}",
                         "-" if share is None else f"{100 * share:.0f}",
                         f"{row['peak_rss_bytes'] / 1e9:.2f}", f"{row['page_cache_growth_bytes'] / 1e9:.2f}"]
                print("  ".join(f"{c:>14}" for c in cells), flush=True)
                rows.append(row)
    return {"benchmark": "offload", "rows": rows}


def check_budgets(budgets: Sequence[str]) -> None:
    for budget in budgets:
        if budget != "all":
            parse_size(budget, "--budgets")


def check_policies(policies: Sequence[str]) -> None:
    from mixtral.errors import InputError
    for policy in policies:
        if policy not in OFFLOAD_POLICIES:
            raise InputError(f"--policies: unknown policy {policy!r}; choose among {', '.join(OFFLOAD_POLICIES)}")

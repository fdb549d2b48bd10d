"""`mixtral bench cold-gemv`: reading weights from a cold cache: what software prefetch and 2 MB pages give the
decoding GEMV kernels.

One row of x through Mixtral-8x7B's fused w1+w3 (28672 x 4096), bf16 (`kernels.gemv_bf16`) and int4 g128
(`kernels.gemv_int4`), each call after reading twice the last-level cache of other memory (`cache_flusher`),
best of --repeats. Four settings, each in a fresh process: the kernels built with or without their software
prefetch (MIXTRAL_KERNEL_CFLAGS=-DPREFETCH_ROWS=0), the weights on 4 KB or 2 MB pages (MIXTRAL_HUGE_PAGES).

    mixtral bench cold-gemv --threads 2
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import torch

from mixtral import kernels, quant
from mixtral.bench.harness import cache_flusher, command_line, timed
from mixtral.model import init_weights_

SETTINGS = [("prefetch off, 4 KB pages", {"MIXTRAL_KERNEL_CFLAGS": "-DPREFETCH_ROWS=0", "MIXTRAL_HUGE_PAGES": "0"}),
            ("prefetch off, 2 MB pages", {"MIXTRAL_KERNEL_CFLAGS": "-DPREFETCH_ROWS=0", "MIXTRAL_HUGE_PAGES": "1"}),
            ("prefetch on,  4 KB pages", {"MIXTRAL_KERNEL_CFLAGS": "", "MIXTRAL_HUGE_PAGES": "0"}),
            ("prefetch on,  2 MB pages", {"MIXTRAL_KERNEL_CFLAGS": "", "MIXTRAL_HUGE_PAGES": "1"})]

# The child: the environment of its setting is read when it builds the kernels and advises the pages.
CHILD = ("import json, sys; from mixtral.bench.cold_gemv import measure; "
         "print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))")


def measure(threads: int, repeats: int, n: int = 28672, k: int = 4096) -> dict:
    """{"bf16"|"int4": {"ms", "gbps"}}: the best of `repeats` cold calls of each kernel on one row through an
    n x k weight (int4 with groups of 128), in this process and its environment, on `threads` threads."""
    torch.set_num_threads(threads)
    with torch.device("meta"):
        linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    linear = linear.to_empty(device="cpu")
    kernels.prefer_huge_pages(linear)  # before the first write, as the loaders do
    init_weights_(linear, seed=0)
    int4 = quant.quantize_linear(linear, "int4", group_size=128)
    kernels.prefer_huge_pages(int4, collapse=True)  # as quantize-on-load does
    w4 = int4._weight()
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    flush = cache_flusher()
    out = {}
    for name, fn, nbytes in [("bf16", lambda: kernels.gemv_bf16(x, linear.weight), n * k * 2),
                             ("int4", lambda: kernels.gemv_int4(x, w4.qweight, w4.scales, w4.bias), n * k // 2)]:
        best = timed(fn, repeats, 0.0, warmup=1, best=True, between=flush)
        out[name] = {"ms": best * 1e3, "gbps": nbytes / best / 1e9}
    return out


def run(*, threads: int, repeats: int, n: int = 28672, k: int = 4096) -> dict:
    """`measure` in a fresh process per setting of `SETTINGS`; prints the table as it goes. Returns
    {"benchmark": "cold-gemv", "rows": [{"setting", "bf16": {"ms", "gbps"}, "int4": {...}}]}."""
    print(f"# {datetime.date.today()}  {command_line()}  (1 row, {n}x{k}, best of {repeats}, cold cache)")
    print(f"{'setting':<28}{'bf16 ms':>9}{'GB/s':>7}{'int4 ms':>9}{'GB/s':>7}")
    rows = []
    for name, env in SETTINGS:
        done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(repeats), str(n), str(k)],
                              env={**os.environ, **env}, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<28}{r['bf16']['ms']:>9.2f}{r['bf16']['gbps']:>7.1f}{r['int4']['ms']:>9.2f}"
              f"{r['int4']['gbps']:>7.1f}", flush=True)
        rows.append({"setting": name, **r})
    return {"benchmark": "cold-gemv", "rows": rows}

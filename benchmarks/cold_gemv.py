"""Reading weights from a cold cache: what software prefetch and 2 MB pages give the decoding GEMV kernels.

One row of x through Mixtral-8x7B's fused w1+w3 (28672 x 4096), bf16 (`kernels.gemv_bf16`) and int4 g128
(`kernels.gemv_int4`), each call after reading twice the last-level cache of other memory (`bench.cache_flusher`),
best of --repeats. Four settings, each in a fresh process: the kernels built with or without their software
prefetch (MIXTRAL_KERNEL_CFLAGS=-DPREFETCH_ROWS=0), the weights on 4 KB or 2 MB pages (MIXTRAL_HUGE_PAGES).

    python benchmarks/cold_gemv.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

SETTINGS = [("prefetch off, 4 KB pages", {"MIXTRAL_KERNEL_CFLAGS": "-DPREFETCH_ROWS=0", "MIXTRAL_HUGE_PAGES": "0"}),
            ("prefetch off, 2 MB pages", {"MIXTRAL_KERNEL_CFLAGS": "-DPREFETCH_ROWS=0", "MIXTRAL_HUGE_PAGES": "1"}),
            ("prefetch on,  4 KB pages", {"MIXTRAL_KERNEL_CFLAGS": "", "MIXTRAL_HUGE_PAGES": "0"}),
            ("prefetch on,  2 MB pages", {"MIXTRAL_KERNEL_CFLAGS": "", "MIXTRAL_HUGE_PAGES": "1"})]


def child(threads: int, repeats: int) -> dict:
    import torch

    from mixtral import kernels, quant
    from mixtral.bench import cache_flusher

    torch.set_num_threads(threads)
    n, k = 28672, 4096
    with torch.device("meta"):
        linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    linear = linear.to_empty(device="cpu")
    kernels.prefer_huge_pages(linear)  # before the first write, as the loaders do
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    int4 = quant.quantize_linear(linear, "int4", group_size=128)
    kernels.prefer_huge_pages(int4, collapse=True)  # as quantize-on-load does
    w4 = int4._weight()
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    flush = cache_flusher()
    out = {}
    for name, fn, nbytes in [("bf16", lambda: kernels.gemv_bf16(x, linear.weight), n * k * 2),
                             ("int4", lambda: kernels.gemv_int4(x, w4.qweight, w4.scales, w4.bias), n * k // 2)]:
        fn()
        best = float("inf")
        for _ in range(repeats):
            flush()
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = {"ms": best * 1e3, "gbps": nbytes / best / 1e9}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.repeats)))
        return
    print(f"# {datetime.date.today()}  python benchmarks/cold_gemv.py {' '.join(sys.argv[1:])}  (1 row, "
          f"28672x4096, best of {args.repeats}, cold cache)")
    print(f"{'setting':<28}{'bf16 ms':>9}{'GB/s':>7}{'int4 ms':>9}{'GB/s':>7}")
    for name, env in SETTINGS:
        done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads), "--repeats",
                               str(args.repeats)], env={**os.environ, **env}, capture_output=True, text=True,
                              check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<28}{r['bf16']['ms']:>9.2f}{r['bf16']['gbps']:>7.1f}{r['int4']['ms']:>9.2f}"
              f"{r['int4']['gbps']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Why decoding stores weights in bf16 and runs its own GEMV: one linear layer of Mixtral-8x7B's experts at 1-16
rows, every candidate side by side in one run.

Candidates: torch F.linear in bf16 and in fp16 (a different storage dtype), torch.compile of a bf16 reduction
(x · wᵀ written as a fused multiply-sum, float32 accumulation), and mixtral.kernels.gemv_bf16. GB/s counts the
weight bytes read once per call.

    python benchmarks/gemv.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import torch.nn.functional as F

from mixtral import kernels


def timed(fn, min_seconds: float = 0.5) -> float:
    """Median milliseconds of `fn()` over repeats filling about `min_seconds`, after two warm-up calls."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


@torch.compile(dynamic=True)
def _compiled_reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[None].float() * x[:, None].float()).sum(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16", help="rows of x (tokens through one expert)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()}  python benchmarks/gemv.py {' '.join(sys.argv[1:])}  torch {torch.__version__}"
          f"  threads {args.threads}  kernel available: {kernels.available()}")
    print(f"{'weight':<12}{'rows':>5}{'bf16 torch':>12}{'fp16 torch':>12}{'compiled':>12}{'ours':>10}"
          f"{'ours GB/s':>11}{'vs bf16 torch':>15}")
    for n, k in [(28672, 4096), (4096, 14336)]:  # w1+w3 fused, w2
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        w16 = w.half()
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            x16 = x.half()
            t_bf16 = timed(lambda: F.linear(x, w))
            t_fp16 = timed(lambda: F.linear(x16, w16))
            t_comp = float("nan") if args.no_compile else timed(lambda: _compiled_reduction(x, w))
            t_ours = timed(lambda: kernels.gemv_bf16(x, w)) if kernels.available() else float("nan")
            print(f"{n}x{k:<6}{m:>5}{t_bf16:>10.2f}ms{t_fp16:>10.2f}ms{t_comp:>10.2f}ms{t_ours:>8.2f}ms"
                  f"{n * k * 2 / t_ours / 1e6:>11.1f}{t_bf16 / t_ours:>14.2f}x")


if __name__ == "__main__":
    main()

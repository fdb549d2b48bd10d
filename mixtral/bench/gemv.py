"""`mixtral bench gemv`: why decoding stores weights in bf16 and runs its own GEMV: one linear layer of
Mixtral-8x7B's experts at 1-16 rows, every candidate side by side in one run.

Candidates: torch F.linear in bf16 and in fp16 (a different storage dtype), torch.compile of a bf16 reduction
(x · wᵀ written as a fused multiply-sum, float32 accumulation), and mixtral.kernels.gemv_bf16. Each figure is the
median time of a call (after two warm-up calls, repeated for about half a second). GB/s counts the weight bytes
read once per call.

    mixtral bench gemv --threads 2
"""
from __future__ import annotations

import datetime
from typing import Sequence

import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.bench.harness import command_line, timed

SHAPES = [(28672, 4096), (4096, 14336)]  # Mixtral-8x7B's w1+w3 fused, w2


def _reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[None].float() * x[:, None].float()).sum(-1)


def _ms(fn) -> float:
    return timed(fn, repeats=3, min_seconds=0.5, warmup=2) * 1000


def run(*, rows: Sequence[int], compile: bool = True, shapes: Sequence[tuple[int, int]] = SHAPES) -> dict:
    """Time each candidate on x [m, k] for m in `rows`, for each weight [n, k] of `shapes` (the torch.compile one
    only with `compile`); prints the table as it goes. Returns {"benchmark": "gemv", "rows": [{"weight", "rows", "ms":
    {candidate: ms}}]}, NaN for a candidate not run."""
    print(f"# {datetime.date.today()}  {command_line()}  torch {torch.__version__}"
          f"  threads {torch.get_num_threads()}  kernel available: {kernels.available()}")
    print(f"{'weight':<12}{'rows':>5}{'bf16 torch':>12}{'fp16 torch':>12}{'compiled':>12}{'ours':>10}"
          f"{'ours GB/s':>11}{'vs bf16 torch':>15}")
    # Compiled here, not where it is defined: importing torch.compile's machinery takes seconds.
    compiled = torch.compile(_reduction, dynamic=True) if compile else None
    results = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        w16 = w.half()
        for m in rows:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            x16 = x.half()
            t_bf16 = _ms(lambda: F.linear(x, w))
            t_fp16 = _ms(lambda: F.linear(x16, w16))
            t_comp = _ms(lambda: compiled(x, w)) if compiled is not None else float("nan")
            t_ours = _ms(lambda: kernels.gemv_bf16(x, w)) if kernels.available() else float("nan")
            print(f"{n}x{k:<6}{m:>5}{t_bf16:>10.2f}ms{t_fp16:>10.2f}ms{t_comp:>10.2f}ms{t_ours:>8.2f}ms"
                  f"{n * k * 2 / t_ours / 1e6:>11.1f}{t_bf16 / t_ours:>14.2f}x", flush=True)
            results.append({"weight": f"{n}x{k}", "rows": m, "ms": {"bf16 torch": t_bf16, "fp16 torch": t_fp16,
                                                                   "compiled": t_comp, "ours": t_ours}})
    return {"benchmark": "gemv", "rows": results}

"""The cost of the batch-invariant schemes for a bf16 product, against the default path, by rows of x.

    python docs/results/2026-12-04/batch_invariant_schemes.py

Mixtral-8x7B's matrices: an expert's w13 (28672x4096) and w2 (4096x14336), and wq (4096x4096). Schemes:
"default" (`kernels.matmul`: gemv.c up to 8 rows, oneDNN beyond; not invariant), "gemv.c" (every row count:
invariant by construction, the one chosen), "one row at a time" (F.linear on [1, K]: invariant by construction),
"tiles of 16" (rows padded to a multiple of 16, F.linear per tile: invariant on this CPU only by measurement).
ms, the best of 3 rounds, the schemes alternating within each round. Then attention for a decode step, the
default `attend` against the mode's (`attend_by_query`), and float32 one row at a time against F.linear.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.batch_invariant import batch_invariant, by_row
from mixtral.model import attend


def tiles(x: torch.Tensor, w: torch.Tensor, size: int = 16) -> torch.Tensor:
    padded = torch.cat([x, x.new_zeros(-len(x) % size, x.shape[1])])
    return torch.cat([F.linear(padded[i:i + size], w) for i in range(0, len(padded), size)])[:len(x)]


def best_ms(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def invariant_attend(*args) -> torch.Tensor:
    with batch_invariant():
        return attend(*args)


def decode_attention() -> None:
    """One layer's decode attention (32 heads on 8, head_dim 128, bf16), rows of different lengths read from a
    cache with 64 slots more than the longest row."""
    for rows, keys in ((1, 1024), (16, 1024), (16, 4096)):
        k, v = (torch.randn(rows, 8, keys + 64, 128).bfloat16()[:, :, :keys] for _ in range(2))
        q = torch.randn(rows, 32, 1, 128).bfloat16()
        mask = torch.zeros(rows, 1, 1, keys, dtype=torch.bool)
        for r in range(rows):
            mask[r, :, :, :keys - 3 * r] = True
        print(f"decode attention, {rows} rows x {keys} keys: default {best_ms(lambda: attend(q, k, v, mask)):.1f} "
              f"ms, batch-invariant {best_ms(lambda: invariant_attend(q, k, v, mask)):.1f} ms", flush=True)


SCHEMES = {
    "default": kernels.matmul,
    "gemv.c": lambda x, w: kernels.gemv_bf16(x, w).to(x.dtype),
    "one row at a time": lambda x, w: torch.cat([F.linear(x[i:i + 1], w) for i in range(len(x))]),
    "tiles of 16": tiles,
}

if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, best of 3")
    print(f"{'matrix':<12} {'rows':>5} " + " ".join(f"{name:>18}" for name in SCHEMES))
    with torch.inference_mode():
        for n, k in ((28672, 4096), (4096, 14336), (4096, 4096)):
            w = (torch.randn(n, k) * 0.02).bfloat16()
            for rows in (1, 4, 16, 64, 256):
                x = torch.randn(rows, k).bfloat16()
                best = {name: float("inf") for name in SCHEMES}
                for _ in range(4):  # the first round warms up (oneDNN builds a kernel per shape)
                    for name, fn in SCHEMES.items():
                        if name == "one row at a time" and rows > 64:
                            continue
                        start = time.perf_counter()
                        fn(x, w)
                        best[name] = min(best[name], time.perf_counter() - start)
                cells = " ".join(f"{t * 1e3:>18.1f}" if t < float("inf") else f"{'-':>18}" for t in best.values())
                print(f"{n}x{k:<6} {rows:>5} {cells}", flush=True)
        decode_attention()
        w, x = torch.randn(4096, 14336) * 0.02, torch.randn(16, 14336)
        print(f"float32 4096x14336, 16 rows: F.linear {best_ms(lambda: F.linear(x, w)):.1f} ms, one row at a time "
              f"{best_ms(lambda: by_row(lambda row: F.linear(row, w), x)):.1f} ms")

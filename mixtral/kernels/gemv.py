"""Dense products x · wᵀ: `matmul` (what the model's bf16 linears call), gemv.c's GEMVs, and the (W xᵀ)ᵀ form.

For a few rows of x and bf16 weights on a CPU with AVX512-BF16, `matmul` runs `gemv.c`, which reads each weight
once for all rows (PyTorch's bf16 GEMM reaches about half the memory bandwidth at one token a step on these
machines; see docs/performance.md). Where torch's GEMM runs on AMX, more rows go through it as (W xᵀ)ᵀ
(`transposed_mm`). Everything else, and every machine where the kernel cannot be built, goes to `F.linear`:
`CpuPolicy.linear_path` decides, and a missing kernel is logged once, never silently wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral.batch_invariant import by_row, is_batch_invariant
from mixtral.kernels import build
from mixtral.kernels.cpu_policy import policy


def bf16_activations(x: torch.Tensor) -> bool:
    """Whether x is bf16 on the CPU and needs no gradient: what the kernels here take (they have no backward)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def bf16_inference(x: torch.Tensor, w) -> bool:
    """Whether x · wᵀ is a bf16 product on the CPU without autograd: what gemv.c and the (W xᵀ)ᵀ form on AMX take
    (`matmul`, `mixtral.kernels.swiglu`)."""
    return (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and bf16_activations(x) and not (torch.is_grad_enabled() and w.requires_grad))


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 · w [N, K] bf16 ᵀ -> [M, N] float32, through gemv.c. Contiguous CPU tensors, K % 32 == 0."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    build.library().gemv_bf16(x.data_ptr(), m, w.data_ptr(), n, k, y.data_ptr(), torch.get_num_threads())
    return y


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, K] · wᵀ for the int4 weight (packed uint8 [N, K/2], scale bfloat16 [N, K/G], bias = `int4_bias(...)`)
    -> [M, N] float32. Contiguous CPU tensors; K and G multiples of 32.

    The kernel returns sum_g scale * sum (128 + q) x; the offsets and the 128 come back as one small product of
    the per-group sums of x with `bias` (see gemv.c)."""
    m, k = x.shape
    n, groups = scale.shape
    assert scale.dtype == torch.bfloat16 and packed.dtype == torch.uint8
    x = x.to(torch.bfloat16).contiguous()
    pairs = (k // groups) % 64 == 0
    # The two-block kernel reads each 64 values of x as [0-15, 32-47, 16-31, 48-63] (see gemv.c).
    xk = x.view(m, k // 64, 2, 2, 16).transpose(2, 3).contiguous() if pairs else x
    y = torch.empty(m, n, dtype=torch.float32)
    build.library().gemv_int4(xk.data_ptr(), m, packed.data_ptr(), scale.data_ptr(), n, k, k // groups,
                              y.data_ptr(), torch.get_num_threads(), int(pairs))
    group_sums = x.float().view(m, groups, k // groups).sum(-1)  # [M, groups]
    return y.addmm_(group_sums, bias)


def transposed_mm(w: torch.Tensor, xt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """w [N, K] · xt [K, rows] -> [N, rows]: the product x · wᵀ computed transposed, (W xᵀ)ᵀ, through torch's
    GEMM. On AMX, oneDNN repacks the B operand of every product into its tile layout; written this way that
    operand is xᵀ (a few rows) instead of the weight (say 28672x4096), which is what makes it faster there up to
    the row counts `CpuPolicy` gives (`matmul`, `QuantizedWeight`'s expansion tiles, `transposed_swiglu`)."""
    return torch.mm(w, xt, out=out)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ for x [..., K] and w [N, K], in x's dtype: F.linear, or gemv.c or (W xᵀ)ᵀ where they are faster. In
    the batch-invariant mode, gemv.c or F.linear one row at a time (`CpuPolicy.linear_path`)."""
    bf16, invariant = bf16_inference(x, w), is_batch_invariant()
    if not (bf16 or invariant):
        return F.linear(x, w)
    rows = x.numel() // w.shape[1]
    path = policy().linear_path("bf16" if w.dtype == torch.bfloat16 else "other", rows, inference=bf16,
                                fits=w.shape[1] % 32 == 0 and w.is_contiguous(), invariant=invariant)
    if path == "by_row":
        return by_row(lambda row: F.linear(row, w), x)
    if path == "gemv":
        flat = x.reshape(-1, w.shape[1]).contiguous()
        return gemv_bf16(flat, w).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    if path == "transposed":
        flat = x.reshape(-1, w.shape[1])
        return transposed_mm(w, flat.t()).t().contiguous().reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)

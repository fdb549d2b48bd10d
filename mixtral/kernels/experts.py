"""SwiGLU experts, one at a time (`swiglu`) or all of a MoE layer's inference step (`experts_add`), on whatever
runs each fastest here: amx.c, bf16 products as (W xᵀ)ᵀ on AMX, gemv.c, the quantized kernels, or torch.

An expert is its two weights, w13 [2·hidden, dim] (gate rows, then up rows) and w2 [dim, hidden], each a tensor or
a `QuantizedWeight`, given per expert: where they live (a stack's slice, a quantized module, a cache slot) is the
caller's business; how the product runs is `CpuPolicy.expert_path`'s.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mixtral.batch_invariant import by_row, is_batch_invariant
from mixtral.kernels import amx
from mixtral.kernels.gemv import bf16_activations, bf16_inference, matmul, transposed_mm
from mixtral.kernels.cpu_policy import policy
from mixtral.kernels.quantized import QuantizedWeight


def weight_kind(w) -> str:
    """"bf16", "int8", "int4", "int3" or "int2" (what `CpuPolicy` chooses kernels for), else the tensor's dtype
    ("float32")."""
    if isinstance(w, QuantizedWeight):
        return w.mode
    return "bf16" if w.dtype == torch.bfloat16 else str(w.dtype).removeprefix("torch.")


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x · wᵀ for one expert's weight: a tensor [out, in] (`matmul`) or a `QuantizedWeight` (its own kernels)."""
    if isinstance(w, QuantizedWeight):
        return w.linear(x)
    return matmul(x, w)


def _path(x: torch.Tensor, w13, w2, rows: int, quantized_on_amx: bool) -> str:
    """`CpuPolicy.expert_path` for this expert on `rows` rows of x (the shapes checked only where amx.c runs)."""
    current, tensor = policy(), isinstance(w13, torch.Tensor)
    fits = current.amx_experts and (tensor or quantized_on_amx) and amx.amx_fits(x, w13, w2)
    inference = bf16_inference(x, w13) if tensor else bf16_activations(x)
    return current.expert_path(weight_kind(w13), rows, inference=inference, fits=fits,
                               invariant=is_batch_invariant())


def swiglu(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """One expert: w2 · (silu(w1 · x) * (w3 · x)), with w1 and w3 stacked in w13. x: [n, dim].

    Quantized weights keep to their own kernels here (the reference dispatch and dense layers; `mixtral bench
    amx-experts` times amx.c against them through this function); `experts_add` sends them to amx.c."""
    path = _path(x, w13, w2, len(x), quantized_on_amx=False)
    if path == "amx":
        return amx.amx_swiglu(x, w13, w2)  # the weights stream while the tiles compute: see amx.c
    if path == "transposed":
        return transposed_swiglu(x, w13, w2)
    gate, up = linear(x, w13).chunk(2, dim=-1)
    if is_batch_invariant():  # one row at a time: silu's vectorised body and scalar remainder round differently
        return linear(by_row(lambda g, u: F.silu(g) * u, gate, up), w2)
    return linear(F.silu(gate) * up, w2)


def transposed_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`swiglu` through torch's GEMM as (W xᵀ)ᵀ (`transposed_mm`), for bf16 on AMX: 128 rows through w13: 17.9
    against 23.7 ms, w2 9.0 against 10.7 (Xeon of 2026-12-01, cold cache). The hidden activations stay
    [2·hidden, n]. Rows are padded with zeros to a multiple of 32, the AMX kernels' blocking: 113 rows took 17.5
    and 8.9 ms, 128 rows 16.2 and 6.2."""
    n = len(x)
    if n % 32:
        x = torch.cat([x, x.new_zeros(32 - n % 32, x.shape[1])])
    gate, up = transposed_mm(w13, x.t()).chunk(2, dim=0)
    return transposed_mm(w2, F.silu(gate) * up)[:, :n].t()


def experts_add(out: torch.Tensor, x: torch.Tensor, token_of: torch.Tensor, gates: torch.Tensor,
                experts: Sequence[tuple[object, object, slice]]) -> None:
    """out[token_of[s]] += gates[s, None] * expert(x[token_of[s]]) for each (w13, w2, s) of `experts`: the
    inference step of a MoE layer's experts. token_of [assignments] (which token each is) and gates [assignments]
    are sorted by expert, s is each expert's contiguous slice of them; out float32 [tokens, dim].

    Experts that amx.c takes (`CpuPolicy.expert_path`) gather their tokens from x and add their gated outputs into
    out inside the kernel (quantized weights: expanded a block of rows at a time as it goes). The others share one
    gather of their tokens' rows, run one after the other (`swiglu`) and go back in one index_add."""
    rest = []  # (w13, w2, slice) for torch's GEMM or a quantized weight's own kernel
    x_rows = x.contiguous()  # amx.c reads x's rows in place
    for w13, w2, s in experts:
        if _path(x, w13, w2, s.stop - s.start, quantized_on_amx=True) == "amx":
            amx.amx_swiglu_add(out, x_rows, token_of[s], gates[s], w13, w2)
        else:
            rest.append((w13, w2, s))
    if not rest:
        return
    if sum(s.stop - s.start for _, _, s in rest) < len(token_of):  # amx.c took some: gather only the others
        picked = torch.cat([torch.arange(s.start, s.stop, device=x.device) for _, _, s in rest])
        token_of, gates = token_of[picked], gates[picked]
    xs = x[token_of]  # [assignments, dim], grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for w13, w2, s in rest:
        end = start + s.stop - s.start
        ys[start:end] = swiglu(xs[start:end], w13, w2)
        start = end
    out.index_add_(0, token_of, ys.float() * gates[:, None])

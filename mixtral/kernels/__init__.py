"""The CPU backend: how each product of the model runs on this machine.

Small C kernels, built at first use with the machine's compiler and called through ctypes, and the choice
between them and torch:

    build.py      compile and load gemv.c + amx.c + lowbit.c (`library`); probe the CPU's flags and caches
    cpu_policy.py `CpuPolicy`: the CPU's features and every crossover threshold, each with its measurement;
                  `linear_path` / `expert_path` pick the kernel for (weight kind, rows). `policy()` is the one in
                  force (probed at first use), `use_policy(p)` injects another (tests, benchmarks)
    gemv.py       `matmul` (the model's bf16 linears: gemv.c's GEMV for few rows on AVX512-BF16, (W xᵀ)ᵀ on AMX,
                  else F.linear), `gemv_bf16`, `gemv_int4`, `transposed_mm`
    packing.py    int4/int3/int2 packing (`pack_int4`, `int4_bias`, `pack_lowbit`) and the expansions to floating
                  point (torch references; the C ones of gemv.c and lowbit.c)
    quantized.py  `QuantizedWeight`, the quantized matrix type, and its products (`linear`; `gemv_lowbit`, the
                  int3/int2 GEMV of lowbit.c, and `round_activations`, its int8 way's rounding in torch)
    amx.py        `amx_swiglu_add`: a whole SwiGLU expert on AMX tiles (amx.c), bf16, int8 or int4 weights
    experts.py    `swiglu` (one expert) and `experts_add` (a MoE layer's experts at inference), on whichever of
                  the above the policy picks
    memory.py     2 MB pages for the weights (`prefer_huge_pages`), per-thread scratch buffers

Every machine gets correct results: where a kernel cannot be built or the CPU lacks its instructions, the product
goes to torch, logged once. This package imports nothing of mixtral's above `mixtral.errors`/`mixtral.config`/
`mixtral.batch_invariant` (whose mode `CpuPolicy` obeys: no kernel chosen by the number of rows).
"""
from __future__ import annotations

from mixtral.kernels.amx import amx_fits, amx_quantized_fits, amx_swiglu, amx_swiglu_add, amx_swiglu_fits
from mixtral.kernels.build import cache_sizes, cpu_has, last_level_cache_bytes
from mixtral.kernels.experts import experts_add, linear, swiglu, transposed_swiglu, weight_kind
from mixtral.kernels.gemv import bf16_activations, bf16_inference, gemv_bf16, gemv_int4, matmul, transposed_mm
from mixtral.kernels.memory import prefer_huge_pages
from mixtral.kernels.packing import (dequant_int4, dequant_int8, dequant_lowbit, dequantize_int4, dequantize_int8,
                                     dequantize_lowbit, int4_bias, pack_int4, pack_lowbit, unpack_int4, unpack_lowbit)
from mixtral.kernels.cpu_policy import CpuPolicy, policy, use_policy
from mixtral.kernels.quantized import KERNEL_DTYPE, QuantizedWeight, gemv_lowbit, round_activations


def available() -> bool:
    """Whether gemv.c's GEMVs (AVX512-BF16) run here, under the policy in force."""
    return policy().gemv


def dequant_available() -> bool:
    """Whether the C dequantizers (any CPU with a C compiler) run here, under the policy in force."""
    return policy().dequant


def amx_available() -> bool:
    """Whether amx.c runs here (a CPU with AMX and kernels built for it), under the policy in force."""
    return policy().amx_experts


__all__ = [
    "CpuPolicy", "KERNEL_DTYPE", "QuantizedWeight", "amx_available", "amx_fits", "amx_quantized_fits", "amx_swiglu",
    "amx_swiglu_add", "amx_swiglu_fits", "available", "bf16_activations", "bf16_inference", "cache_sizes",
    "cpu_has", "dequant_available", "dequant_int4", "dequant_int8", "dequant_lowbit", "dequantize_int4",
    "dequantize_int8", "dequantize_lowbit", "experts_add", "gemv_bf16", "gemv_int4", "gemv_lowbit", "int4_bias",
    "last_level_cache_bytes", "linear", "matmul", "pack_int4", "pack_lowbit", "policy", "prefer_huge_pages",
    "round_activations", "swiglu", "transposed_mm", "transposed_swiglu", "unpack_int4", "unpack_lowbit", "use_policy", "weight_kind",
]

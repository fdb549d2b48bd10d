"""The layouts of quantized weights, and their expansion back to floating point.

    int8: w[n, k] = q[n, k] · scale[n]                                 q in -127..127, a scale per output row
    int4: w[n, k] = (q[n, k] - 8) · scale[n, g] + zero[n, g]           q in 0..15, g = k // group_size

scales and zeros are bfloat16 numbers (the convention of mixtral.quant's files). int4 integers are packed two to
a byte in gemv.c's layout (`pack_int4`), which is also the file's.

Two expansions: `dequantize_int8` / `dequantize_int4` in torch (any device, any dtype; float32 arithmetic, the
reference), and `dequant_int8` / `dequant_int4` in C (gemv.c; CPU, bf16 out, any CPU with a C compiler), which
the products use.
"""
from __future__ import annotations

import torch

from mixtral.kernels import build
from mixtral.kernels.memory import scratch_buffer


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] integers in [0, 15] -> uint8 [..., K/2] in gemv.c's layout: for each block of 32 weights, byte i
    holds weight i (low nibble) and weight 16 + i (high nibble). K must be a multiple of 32."""
    *lead, k = q.shape
    blocks = q.to(torch.uint8).reshape(*lead, k // 32, 2, 16)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*lead, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., K/2] -> uint8 [..., K] in [0, 15]."""
    *lead, half = packed.shape
    blocks = packed.reshape(*lead, half // 16, 1, 16)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=-2).reshape(*lead, half * 2)


def int4_bias(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What `gemv_int4` adds back per group, [..., groups, N] float32: zero - 8·scale (the value of q = 0) minus the
    128·scale of the kernel's bias. Computed once when a weight is quantized or loaded."""
    return (zero.float() - 136 * scale.float()).transpose(-1, -2).contiguous()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in], scales [..., out] -> w [..., out, in] in `dtype` (computed in float32, as the kernel)."""
    return (q.float() * scales.float()[..., None]).to(dtype)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in] uint8 0..15 (unpacked), scales/zeros [..., out, groups] -> w [..., out, in]."""
    *lead, in_features = q.shape
    groups = scales.shape[-1]
    q = q.view(*lead, groups, in_features // groups).float()
    w = (q - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(*lead, in_features).to(dtype)


def _output(n: int, k: int, scratch: bool) -> torch.Tensor:
    """A bf16 [n, k] tensor for a dequantizer to fill: fresh, or with `scratch` a view of this thread's reused
    buffer (see `mixtral.kernels.memory`: a fresh one costs ten times the dequantization itself)."""
    if not scratch:
        return torch.empty(n, k, dtype=torch.bfloat16)
    return scratch_buffer("dequant", n * k, torch.bfloat16).view(n, k)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of an int4 weight in `pack_int4`'s layout (scale, zero bfloat16 [N, K/G]); contiguous
    inputs. scratch: write into this thread's reused buffer (valid until the next scratch call; not for autograd)."""
    n, half = packed.shape
    groups = scale.shape[1]
    assert scale.dtype == zero.dtype == torch.bfloat16 and packed.dtype == torch.uint8
    assert packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    out = _output(n, half * 2, scratch)
    build.library().dequant_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, half * 2,
                                 half * 2 // groups, out.data_ptr(), torch.get_num_threads())
    return out


def dequant_int8(q: torch.Tensor, scale: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of an int8 weight q [N, K] with a bfloat16 scale per row [N]; contiguous inputs;
    scratch as in `dequant_int4`."""
    n, k = q.shape
    assert scale.dtype == torch.bfloat16 and q.dtype == torch.int8 and q.is_contiguous() and scale.is_contiguous()
    out = _output(n, k, scratch)
    build.library().dequant_int8(q.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out

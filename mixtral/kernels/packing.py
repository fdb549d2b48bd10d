"""The layouts of quantized weights, and their expansion back to floating point.

    int8: w[n, k] = q[n, k] · scale[n]                                 q in -127..127, a scale per output row
    int4: w[n, k] = (q[n, k] - 8) · scale[n, g] + zero[n, g]           q in 0..15, g = k // group_size
    int3: w[n, k] = (q[n, k] - 4) · scale[n, g] + zero[n, g]           q in 0..7
    int2: w[n, k] = (q[n, k] - 2) · scale[n, g] + zero[n, g]           q in 0..3

scales and zeros are bfloat16 numbers (the convention of mixtral.quant's files). The integers are packed as the
files store them:
    int4 (`pack_int4`): two to a byte in gemv.c's layout: for each block of 32 weights 16 bytes, byte i holding
          weight i in its low nibble and weight 16 + i in its high nibble.
    int3, int2 (`pack_lowbit`): each row a little-endian bit stream, weight k in bits [bits·k, bits·k + bits) of
          the row's bytes, counting bit 0 as the least significant bit of byte 0. A row of K weights is
          K·bits/8 bytes (K a multiple of 32, so a block of 32 weights is 4·bits whole bytes): int2 holds weights
          4j..4j+3 in byte j, LSB first (bits 0-1, 2-3, 4-5, 6-7); int3 holds weights 8j..8j+7 in bytes 3j..3j+2
          read as one 24-bit little-endian number, weight 8j + i in its bits 3i..3i+2.
    Rows are stored whole, one after the other ([out, K·bits/8] uint8).

Two expansions: `dequantize_int8` / `dequantize_int4` / `dequantize_lowbit` in torch (any device, any dtype;
float32 arithmetic, the reference), and `dequant_int8` / `dequant_int4` (gemv.c) / `dequant_lowbit` (lowbit.c) in
C (CPU, bf16 out, any CPU with a C compiler), which the products use.
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
    return dequantize_lowbit(q, scales, zeros, 4, dtype)


def dequantize_lowbit(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in] uint8 0..2^bits - 1 (unpacked), scales/zeros [..., out, groups] -> w [..., out, in]:
    (q - 2^(bits-1)) · scale + zero per group, in float32, then `dtype`."""
    *lead, in_features = q.shape
    groups = scales.shape[-1]
    q = q.reshape(*lead, groups, in_features // groups).float()
    w = (q - (1 << (bits - 1))) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(*lead, in_features).to(dtype)


def pack_lowbit(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [..., K] integers in [0, 2^bits) -> uint8 [..., K·bits/8], each row a little-endian bit stream (the module
    docstring). bits 2 or 3; K a multiple of 32."""
    *lead, k = q.shape
    assert bits in (2, 3) and k % 32 == 0, (bits, k)
    # 8 weights fill `bits` whole bytes: gather them into one integer, then cut it into bytes.
    eights = q.to(torch.int32).reshape(*lead, k // 8, 8) << (bits * torch.arange(8, dtype=torch.int32))
    word = eights.sum(dim=-1, dtype=torch.int32)  # the fields do not overlap: the sum is their OR
    cut = (word[..., None] >> (8 * torch.arange(bits, dtype=torch.int32))) & 0xFF
    return cut.to(torch.uint8).reshape(*lead, k * bits // 8)


def unpack_lowbit(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_lowbit`: uint8 [..., K·bits/8] -> uint8 [..., K] in [0, 2^bits)."""
    *lead, nbytes = packed.shape
    assert bits in (2, 3) and nbytes % bits == 0, (bits, nbytes)
    cut = packed.to(torch.int32).reshape(*lead, nbytes // bits, bits) << (8 * torch.arange(bits, dtype=torch.int32))
    word = cut.sum(dim=-1, dtype=torch.int32)
    q = (word[..., None] >> (bits * torch.arange(8, dtype=torch.int32))) & ((1 << bits) - 1)
    return q.to(torch.uint8).reshape(*lead, nbytes * 8 // bits)


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


def dequant_lowbit(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   scratch: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of an int3/int2 weight in `pack_lowbit`'s layout (scale, zero bfloat16 [N, K/G], G
    16..128); contiguous inputs; scratch as in `dequant_int4`. Equal bit for bit to `dequantize_lowbit`'s bf16."""
    n, nbytes = packed.shape
    k = nbytes * 8 // bits
    groups = scale.shape[1]
    assert scale.dtype == zero.dtype == torch.bfloat16 and packed.dtype == torch.uint8 and bits in (2, 3)
    assert packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    assert k % 32 == 0 and k % groups == 0 and k // groups in (16, 32, 64, 128), (k, groups)
    out = _output(n, k, scratch)
    build.library().dequant_lowbit(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k, k // groups, bits,
                                   out.data_ptr(), torch.get_num_threads())
    return out

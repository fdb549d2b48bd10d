"""One whole SwiGLU expert on AMX tiles (amx.c): the MoE layer's path for batches and prefill on Intel Xeons since
Sapphire Rapids, with bf16, int8 or int4 weights.

amx.c is built where the compiler targets AMX (-march=native on such a CPU) and runs where Linux grants the tile
state (`CpuPolicy.amx_experts`). Its arguments go through one C struct, `amx_call`, mirrored here by `_Call`;
`amx_call_layout` (compiled on every CPU) reports the C layout so that tests check the mirror on any machine.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from mixtral.kernels import build
from mixtral.kernels.gemv import bf16_activations, bf16_inference
from mixtral.kernels.memory import scratch_buffer
from mixtral.kernels.cpu_policy import policy
from mixtral.kernels.quantized import QuantizedWeight

_p, _i = ctypes.c_void_p, ctypes.c_int


class _Weight(ctypes.Structure):
    """amx.c's `weight`: bf16 alone, or int8 (q, scale), or int4 (q, scale, zero, group)."""
    _fields_ = [("bf16", _p), ("q", _p), ("scale", _p), ("zero", _p), ("group", _i)]


class _Call(ctypes.Structure):
    """amx.c's `amx_call`: the arguments of one `amx_swiglu`."""
    _fields_ = [("x", _p), ("rows", _p), ("scale", _p), ("n", _i), ("N", _i), ("dim", _i), ("H", _i),
                ("out", _p), ("partial1", _p), ("partial2", _p), ("bp1", _p), ("bp2", _p),
                ("kc1", _i), ("kc2", _i), ("threads", _i), ("w13", _Weight), ("w2", _Weight)]


def ctypes_layout() -> list[int]:
    """sizeof and field offsets of `_Weight` then `_Call`, in amx_call_layout's order."""
    return [value for struct in (_Weight, _Call)
            for value in (ctypes.sizeof(struct), *(getattr(struct, name).offset for name, _ in struct._fields_))]


def c_layout() -> list[int]:
    """The same numbers as the C compiler laid the structs out (`amx_call_layout`); needs the library."""
    library = build.library()
    out = (ctypes.c_int64 * 64)()
    count = library.amx_call_layout(out, len(out))
    assert 0 < count <= len(out)
    return list(out[:count])


@lru_cache(maxsize=1)
def _layout_checked() -> bool:
    assert c_layout() == ctypes_layout(), "amx.c's amx_call and mixtral.kernels.amx._Call differ"
    return True


def amx_swiglu_fits(x: torch.Tensor, w13, w2) -> bool:
    """Whether amx.c can take this bf16 expert: bf16 inference, contiguous weights, dim and hidden multiples of
    32. (Whether amx.c runs on this machine at all is `CpuPolicy.amx_experts`.)"""
    if not (bf16_inference(x, w13) and isinstance(w2, torch.Tensor) and w2.dtype == torch.bfloat16):
        return False
    dim, hidden = w2.shape
    return (w13.shape == (2 * hidden, dim) and dim % 32 == 0 and hidden % 32 == 0
            and w13.is_contiguous() and w2.is_contiguous() and len(x) > 0)


def amx_quantized_fits(x: torch.Tensor, w13, w2) -> bool:
    """Whether amx.c can take this expert as quantized weights: int8 (per-row scales) or int4 (group-wise, no
    padding columns) `QuantizedWeight`s, both of one mode, bf16 activations without autograd, dim and hidden
    multiples of 32."""
    if not (isinstance(w13, QuantizedWeight) and isinstance(w2, QuantizedWeight) and w13.mode == w2.mode):
        return False
    dim, hidden = w2.out_features, w2.in_features
    return (bf16_activations(x) and w13.out_features == 2 * hidden and w13.in_features == dim
            and dim % 32 == 0 and hidden % 32 == 0 and w13.padding == 0 and w2.padding == 0
            and w13.qweight.is_contiguous() and w2.qweight.is_contiguous() and len(x) > 0)


def amx_fits(x: torch.Tensor, w13, w2) -> bool:
    """`amx_swiglu_fits` for tensors, `amx_quantized_fits` for quantized weights."""
    return amx_swiglu_fits(x, w13, w2) if isinstance(w13, torch.Tensor) else amx_quantized_fits(x, w13, w2)


def _k_chunk(k: int, columns: int, multiple: int = 1) -> int:
    """Tiles of 32 along K per chunk, for `columns` columns of B (see `CpuPolicy.amx_chunk_bytes`); a multiple of
    `multiple` (whole int4 groups, which divide 64 tiles). Chunks are whole 4 KB of each weight row where they can
    be (64 tiles), so the hardware prefetcher, which stops at page boundaries, sees whole pages."""
    most = max(1, policy().amx_chunk_bytes // ((columns // 16 + 2) * 1024))  # B: 1 KB a tile per 16 columns; A: 2 KB
    if most >= 64:
        most = most // 64 * 64
    return min(k // 32, max(multiple, most // multiple * multiple))


def _group_tiles(w) -> int:
    """Tiles of 32 along K that a chunk must be a multiple of: whole groups of an int4 weight, else 1."""
    return w.group_size // 32 if isinstance(w, QuantizedWeight) and w.mode == "int4" else 1


def _address(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def amx_swiglu_add(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, scale: torch.Tensor | None,
                   w13, w2) -> None:
    """out[rows] += scale[:, None] * expert(x[rows]) for one SwiGLU expert, w2 · (silu(w1 · x) * (w3 · x)), on AMX
    tiles (amx.c), gathering the rows and scattering the result inside the kernel. out float32 [*, dim]; x bf16
    [*, dim]; rows int64 [n], each row once (None: x's rows in order); scale float32 [n] (None: 1). w13 [2H, dim]
    and w2 [dim, H]: bf16 tensors, or int8/int4 `QuantizedWeight`s (see `amx_quantized_fits`), which amx.c
    expands a block of rows at a time between reading them and multiplying them. The products accumulate in
    float32 and silu(gate) * up is rounded to bf16 once (torch's path rounds the gate, the up projection and
    silu(gate) each, and the expert's output). Only where `CpuPolicy.amx_experts` and `amx_fits` say so."""
    assert _layout_checked()
    n = len(rows) if rows is not None else len(x)
    quantized = isinstance(w13, QuantizedWeight)
    dim, hidden = (w2.out_features, w2.in_features) if quantized else w2.shape
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape[1] == dim and x.is_contiguous()
    columns = -(-n // 16) * 16
    kc1, kc2 = _k_chunk(dim, columns, _group_tiles(w13)), _k_chunk(hidden, columns, _group_tiles(w2))
    partial1 = scratch_buffer("partial1", 2 * hidden * columns, torch.float32) if kc1 < dim // 32 else None
    partial2 = scratch_buffer("partial2", dim * columns, torch.float32) if kc2 < hidden // 32 else None
    packed_x = scratch_buffer("packed_x", dim * columns, torch.bfloat16)
    packed_h = scratch_buffer("packed_h", hidden * columns, torch.bfloat16)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    keep: list[torch.Tensor] = []  # converted scales live until the call returns

    def weight(w) -> _Weight:
        if isinstance(w, torch.Tensor):
            return _Weight(bf16=w.data_ptr())
        parts = [w.qweight, w.scales.to(torch.bfloat16), w.zeros]  # .to: int8 scales follow the model's dtype
        parts = [t.contiguous() if t is not None else None for t in parts]
        keep.extend(parts)
        q, s, z = (_address(t) for t in parts)
        return _Weight(q=q, scale=s, zero=z, group=w.group_size or 0)

    call = _Call(x=x.data_ptr(), rows=_address(rows), scale=_address(scale), n=n, N=columns, dim=dim, H=hidden,
                 out=out.data_ptr(), partial1=_address(partial1), partial2=_address(partial2),
                 bp1=packed_x.data_ptr(), bp2=packed_h.data_ptr(), kc1=kc1, kc2=kc2,
                 threads=torch.get_num_threads(), w13=weight(w13), w2=weight(w2))
    build.library().amx_swiglu(ctypes.addressof(call))


def amx_swiglu(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """One SwiGLU expert on AMX tiles: x [n, dim] bf16 -> [n, dim] bf16 (see `amx_swiglu_add`)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    amx_swiglu_add(out, x.contiguous(), None, None, w13, w2)
    return out.to(torch.bfloat16)

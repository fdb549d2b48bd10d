"""Weight-only int8 and int4 quantization: swap a model's matrices for quantized ones, in place (gpt-fast style).

What is quantized (`targets`): "experts" (each MoE's w13/w2), "attention" (wq, wk, wv, wo), "output" (the LM head).
Never the router (PITFALLS 7: a quantized gate changes which experts run), the embeddings or the norms.

    int8: symmetric, a scale per output channel       w[o, k] = q[o, k] · scale[o]                       q in -127..127
    int4: asymmetric (min-max), a scale and a zero    w[o, k] = (q[o, k] - 8) · scale[o, g] + zero[o, g]  q in 0..15
          per group of `group_size` inputs, g = k // group_size (the convention of torch's int4 kernels too)

Kernels (CPU), chosen by the rows of x (the crossovers measured on Mixtral-8x7B's expert matrices, 2 threads;
`benchmarks/quant_accuracy.py --kernels`, table in docs/performance.md):
    int8: torch's `_weight_int8pack_mm` below INT8_GEMM_ROWS rows (its time grows with every row: at 16 rows it
          is already slower than bf16); from there the weight is expanded to bf16 (`kernels.dequant_int8`) and
          multiplied by torch's bf16 GEMM, a cache-sized tile of output rows at a time (`EXPANDED_TILE_BYTES`).
    int4: mixtral's own `kernels.gemv_int4` (AVX512-BF16; faster than torch's `_weight_int4pack_mm_for_cpu`, whose
          packed layout is also opaque and differs between CPUs) below INT4_GEMV_ROWS rows; from there
          `kernels.dequant_int4` + the bf16 GEMM in tiles, as int8 (torch's int4 kernel costs 2.5x the bf16 GEMM
          at 128+ rows).
Both run in bfloat16 whatever the model's dtype (the float32 paths of torch's kernels are scalar loops, 10-50x
slower): x is cast to bf16 for the product and the result cast back to x's dtype. Scales and zeros are bf16
numbers, rounded *before* the integers are computed, so every kernel multiplies by exactly the stored values.
Anything the kernels do not take (another device, a CPU without AVX512-BF16 or a C compiler, int8 with
in_features % 16 != 0, where torch's kernel crashes) dequantizes and calls F.linear, logged once per reason.
In a MoE layer on a CPU with AMX, an expert with enough rows skips these: amx.c takes its quantized weights and
expands them into its tiles as it multiplies (`kernels.amx_swiglu_add`, from `kernels.AMX_INT8_EXPERT_ROWS` /
`AMX_INT4_EXPERT_ROWS` rows; `mixtral.moe.moe_grouped`).

In memory the int4 integers are already in the file's layout below, so loading is a straight read.

Quantized checkpoint (`save_quantized`, read back by `mixtral.load`): a directory with
- config.json: the Hugging Face config (`mixtral.config.to_hf_dict`) plus
  "quantization_config": {"quant_method": "mixtral", "mode", "group_size", "targets", "format_version": 1}.
  transformers reads the config and, not knowing quant_method "mixtral", says so instead of guessing.
- model.safetensors: unquantized tensors under the model's own state-dict names (`tok_embeddings.weight`,
  `layers.0.moe.router.weight`, ...) in the model's dtype, and for each quantized matrix at module path P
  (`layers.0.attention.wq`, `output`, `layers.0.moe.w13` with a leading [n_experts] dimension, ...):
    int8: P.qweight int8 [..., out, in], P.scales bf16 [..., out]
    int4: P.qweight uint8 [..., out, in' / 2]: for each block of 32 columns 16 bytes, byte i holding column i
          (low nibble) and column 16 + i (high nibble) of the block (`mixtral.kernels.pack_int4`);
          P.scales and P.zeros bf16 [..., out, in' / group_size]
  where in' is in rounded up to a multiple of the group size (`int4_layout`): a matrix whose inputs do not fill
  whole groups (the default model's w2 has 688 = 21.5 x 32) gets copies of its last column as padding, so the
  last group's range stays the real columns' range, and the kernels multiply the padding by zero inputs.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mixtral import kernels
from mixtral.config import from_hf_dict, read_json, to_hf_dict
from mixtral.errors import CheckpointError, InputError
from mixtral.io.checkpoint import SafetensorsReader
from mixtral.model import Transformer
from mixtral.moe import MoE

log = logging.getLogger("mixtral")

MODES = ("int8", "int4")
TARGETS = ("experts", "attention", "output")
GROUP_SIZES = (32, 64, 128, 256)  # multiples of gemv_int4's 32-weight blocks
FORMAT_VERSION = 1
KERNEL_DTYPE = torch.bfloat16
# From these many rows of x, the quantized weight is expanded to bf16 and multiplied by torch's bf16 GEMM: the
# integer kernels' time grows with the rows, the expansion is paid once (see the module docstring; measured with
# `benchmarks/quant_accuracy.py --kernels --rows 8,16,32,64,128`).
# Where torch's GEMM runs on AMX, the expansion + GEMM wins earlier: from 12 rows for both (Xeon of 2026-12-01,
# 28672x4096 and 4096x14336; benchmarks/quant_accuracy.py --kernels and docs/performance.md).
INT8_GEMM_ROWS = 12 if kernels.AMX else 16
INT4_GEMV_ROWS = 12 if kernels.AMX else 32
# Bytes of a quantized weight expanded to bf16 at a time for the GEMM path: a tile of output rows that stays in
# the last-level cache between its expansion and its product, yet big enough for the product to run at speed
# (Xeon of 2026-12-01, 480 MB L3: 16-32 MB tiles measured best, 2-4 MB ones slower than no tiling). A quarter of
# the cache, within those bounds.
EXPANDED_TILE_BYTES = min(24 << 20, max(4 << 20, kernels.last_level_cache_bytes() // 4))

_BF16_TINY = torch.finfo(torch.bfloat16).tiny  # the scale of an all-zero row or group: any nonzero value works
_ATTENTION = ("wq", "wk", "wv", "wo")


def _fallback(reason: str) -> None:
    """Log once per reason that a product goes through the dequantized reference instead of a kernel."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("quantized linear: %s; dequantizing and using F.linear (correct, slower)", reason)


_reported: set[str] = set()


# ---- one matrix: quantize, dequantize (the portable form) -----------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scales bfloat16 [out]) with w ≈ q · scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=_BF16_TINY).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in], scales [..., out] -> w [..., out, in] in `dtype` (computed in float32, as the kernel)."""
    return (q.float() * scales.float()[..., None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q uint8 [out, in] in 0..15, scales, zeros bfloat16 [out, in / group_size]).

    Min-max per group: q = 0 is the group's minimum and q = 15 its maximum, w ≈ (q - 8) · scale + zero.
    """
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=_BF16_TINY).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    minimum = zeros.float() - 8 * scales.float()  # what q = 0 means after rounding scale and zero to bf16
    q = torch.round((groups - minimum[..., None]) / scales.float()[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).view(out_features, in_features), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in] uint8 0..15, scales/zeros [..., out, groups] -> w [..., out, in]."""
    *lead, in_features = q.shape
    groups = scales.shape[-1]
    q = q.view(*lead, groups, in_features // groups).float()
    w = (q - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(*lead, in_features).to(dtype)


# ---- one matrix's product --------------------------------------------------------------------------------------

class QuantizedWeight:
    """One quantized matrix [out, in] and its kernels: what `QuantizedLinear` runs and what `QuantizedExperts[e]`
    hands to `mixtral.moe.linear`. Views into the module's buffers; never stored.

    int8: qweight int8 [out, in], scales [out]. int4: qweight uint8 [out, in / 2] (`kernels.pack_int4`), scales
    and zeros bf16 [out, groups], bias float32 [groups, out] (`kernels.int4_bias`, for gemv_int4).
    """
    __slots__ = ("mode", "qweight", "scales", "zeros", "bias", "group_size", "out_features", "in_features")

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int | None, out_features: int, in_features: int):
        self.mode, self.qweight, self.scales, self.zeros, self.bias = mode, qweight, scales, zeros, bias
        self.group_size, self.out_features, self.in_features = group_size, out_features, in_features

    @property
    def padding(self) -> int:
        """Stored columns past in_features (int4 padding to whole groups)."""
        return self.qweight.shape[1] * (2 if self.mode == "int4" else 1) - self.in_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] these integers stand for, in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        w = dequantize_int4(kernels.unpack_int4(self.qweight), self.scales, self.zeros, dtype)
        return w[:, :self.in_features] if self.padding else w

    def _bf16_weight(self, rows: slice = slice(None), scratch: bool = True) -> torch.Tensor:
        """Output rows `rows` of the weight expanded to bf16 by the C dequantizers (in the stored layout, padding
        included), into this thread's reused buffer with `scratch`."""
        if self.mode == "int8":
            return kernels.dequant_int8(self.qweight[rows], self.scales[rows].to(KERNEL_DTYPE), scratch)
        return kernels.dequant_int4(self.qweight[rows], self.scales[rows], self.zeros[rows], scratch)

    def _expanded_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x · wᵀ through torch's bf16 GEMM on the expanded weight. Without autograd, in tiles of output rows that
        stay in the last-level cache (`EXPANDED_TILE_BYTES`): the whole expanded weight would go out to memory
        and be read back, which cost 37 ms against 27 for 128 rows through 28672x4096 (bf16 itself: 24.5) on the
        Xeon of 2026-12-01. Autograd keeps the whole weight for its backward pass instead."""
        x = self._stored_layout(x).to(KERNEL_DTYPE).contiguous()
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self._bf16_weight(scratch=False))
        n, k = self.out_features, x.shape[1]
        tile = max(64, EXPANDED_TILE_BYTES // (2 * k) // 64 * 64)
        if tile >= n:
            return F.linear(x, self._bf16_weight())
        if kernels.AMX and 4 * len(x) <= tile:
            # (W xᵀ)ᵀ, as `moe.swiglu` does for bf16: oneDNN repacks xᵀ for the AMX tiles instead of each weight
            # tile. 64 rows through 28672x4096: 13.7 against 20.7 ms; with more rows than a quarter of the tile,
            # repacking xᵀ for every tile costs more (512 rows through 4096x14336: 51 against 30 ms).
            yt = torch.empty(n, len(x), dtype=KERNEL_DTYPE)
            for n0 in range(0, n, tile):
                torch.mm(self._bf16_weight(slice(n0, n0 + tile)), x.t(), out=yt[n0:n0 + tile])
            return yt.t()
        y = torch.empty(x.shape[0], n, dtype=KERNEL_DTYPE)
        for n0 in range(0, n, tile):
            y[:, n0:n0 + tile] = F.linear(x, self._bf16_weight(slice(n0, n0 + tile)))
        return y

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> x · wᵀ [n, out] in x's dtype."""
        rows = x.shape[0]
        few = not (torch.is_grad_enabled() and x.requires_grad)  # the integer kernels have no backward
        if x.device.type != "cpu":
            _fallback(f"no {self.mode} kernel for device {x.device.type}")
        elif self.mode == "int4" and few and rows < INT4_GEMV_ROWS and kernels.available():
            return kernels.gemv_int4(self._stored_layout(x), self.qweight, self.scales, self.bias).to(x.dtype)
        elif self.mode == "int8" and few and rows < INT8_GEMM_ROWS and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), self.qweight, self.scales.to(KERNEL_DTYPE))
            return y.to(x.dtype)
        elif kernels.dequant_available():
            return self._expanded_linear(x).to(x.dtype)
        else:
            _fallback(f"no {self.mode} kernel on this CPU (no AVX512-BF16 or no C compiler)")
        return F.linear(x, self.dequantize(x.dtype))  # dequantize() drops the padding columns

    def _stored_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x with zero inputs for the stored padding columns (they add nothing), for the kernels that read the
        stored layout."""
        return F.pad(x, (0, self.padding)) if self.padding else x


# ---- the modules that replace the model's ----------------------------------------------------------------------

class _Quantized(nn.Module):
    """Buffers of one matrix ([out, in]) or a stack of them ([n_experts, out, in]), quantized.

    int8: qweight int8 [..., out, in] and scales [..., out] in the model's dtype (so `.to(dtype)` keeps them with
    the activations; their values are bf16 numbers whatever the dtype).
    int4: qweight uint8 [..., out, in / 2], scales and zeros bfloat16 [..., out, groups] (kept bf16 through
    `.to(dtype)`: the kernels read them as such, and the values are bf16 numbers anyway), and the derived,
    unsaved bias float32 [..., groups, out], recomputed by `refresh()` after every move or load.
    """

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int | None, out_features: int, in_features: int):
        super().__init__()
        self.mode, self.group_size, self.out_features, self.in_features = mode, group_size, out_features, in_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if mode == "int4":
            self.register_buffer("zeros", zeros)
            self.register_buffer("bias", None, persistent=False)
            self.refresh()

    def refresh(self) -> None:
        """Recompute what derives from the stored buffers (int4: bf16 scales and zeros, the kernel's bias)."""
        if self.mode == "int4" and self.scales.device.type != "meta":
            self.scales, self.zeros = self.scales.to(torch.bfloat16), self.zeros.to(torch.bfloat16)
            self.bias = kernels.int4_bias(self.scales, self.zeros)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self

    @property
    def stored_in_features(self) -> int:
        """Columns as stored: in_features, rounded up to whole groups for int4 (see `int4_layout`)."""
        return self.qweight.shape[-1] * (2 if self.mode == "int4" else 1)

    def _weight(self, *index: int) -> QuantizedWeight:
        if self.mode == "int8":
            return QuantizedWeight("int8", self.qweight[index], self.scales[index], None, None, None,
                                   self.out_features, self.in_features)
        return QuantizedWeight("int4", self.qweight[index], self.scales[index], self.zeros[index], self.bias[index],
                               self.group_size, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.mode}, in_features={self.in_features}, out_features={self.out_features}{group}"


class QuantizedLinear(_Quantized):
    """Replaces a bias-free nn.Linear (attention projections, output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._weight().linear(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, computed afresh on each access (a full pass over it), for inspection: int8 in the
        model's dtype, int4 in bfloat16 (the dtype of its scales)."""
        return self._weight().dequantize()


class QuantizedExperts(_Quantized):
    """Replaces an MoE's stacked expert weight (w13 or w2): `len()` experts, `[e]` one `QuantizedWeight`."""

    def __len__(self) -> int:
        return self.qweight.shape[0]

    def __getitem__(self, e: int) -> QuantizedWeight:
        return self._weight(e)


def _quantize_stack(w: torch.Tensor, mode: str, group_size: int | None, padded: int) -> list[torch.Tensor]:
    """The in-memory buffers for w [out, in] or [n, out, in], one matrix at a time (the float32 temporaries are
    one matrix, not the stack): int8 [qweight, scales in w's dtype]; int4 [qweight packed, scales, zeros], its
    columns padded to `padded` with copies of the last one."""
    stack = w if w.dim() == 3 else w[None]
    buffers: list[torch.Tensor] | None = None
    for i, matrix in enumerate(stack):
        if mode == "int8":
            q, scales = quantize_int8(matrix)
            parts = [q, scales.to(w.dtype)]
        else:
            if padded > matrix.shape[-1]:
                matrix = F.pad(matrix.float()[None], (0, padded - matrix.shape[-1]), mode="replicate")[0]
            q, scales, zeros = quantize_int4(matrix, group_size)
            parts = [kernels.pack_int4(q), scales, zeros]
        if buffers is None:
            buffers = [p.new_empty(len(stack), *p.shape) for p in parts]
        for buffer, part in zip(buffers, parts):
            buffer[i] = part
    return buffers if w.dim() == 3 else [b[0] for b in buffers]


def int4_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(group size, stored columns) of an int4 matrix with `in_features` inputs: `group_size`, or for a shorter row
    the smallest allowed group that holds it; the columns rounded up to whole groups."""
    group = group_size if in_features >= group_size else min(g for g in GROUP_SIZES if g >= in_features)
    return group, -(-in_features // group) * group


def _quantized(w: torch.Tensor, mode: str, group_size: int, cls: type[_Quantized]) -> _Quantized:
    group, padded = int4_layout(w.shape[-1], group_size) if mode == "int4" else (None, w.shape[-1])
    with torch.no_grad():
        qweight, scales, *zeros = (b.to(w.device) for b in _quantize_stack(w.detach().cpu(), mode, group, padded))
    return cls(mode, qweight, scales, zeros[0] if zeros else None, group, w.shape[-2], w.shape[-1])


def quantize_linear(linear: nn.Linear, mode: str, *, group_size: int = 128) -> QuantizedLinear:
    """A QuantizedLinear with `linear`'s (bias-free) weight; the activations' dtype stays `linear.weight`'s."""
    _check(mode, (), group_size)
    if linear.bias is not None:
        raise InputError("quantize_linear takes a linear layer without bias")
    return _quantized(linear.weight, mode, group_size, QuantizedLinear)


# ---- the model -------------------------------------------------------------------------------------------------

def _check(mode: str, targets: Iterable[str], group_size: int) -> tuple[str, ...]:
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise InputError(f"unknown quantization target {t!r}; choose among {', '.join(TARGETS)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return targets


def _quantize_moe(moe: MoE, mode: str, group_size: int) -> None:
    for attr in ("w13", "w2"):
        quantized = _quantized(getattr(moe, attr), mode, group_size, QuantizedExperts)
        delattr(moe, attr)  # frees the float weight before the next one is quantized
        setattr(moe, attr, quantized)


def _plan(module: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, parent, attribute) of every matrix `targets` selects in a Transformer or a single MoE."""
    if isinstance(module, MoE):
        return [("", module, "moe")] if "experts" in targets else []
    if not isinstance(module, Transformer):
        raise InputError(f"quantize takes a mixtral Transformer or MoE, not {type(module).__name__}")
    plan = []
    for i, layer in enumerate(module.layers):
        if "attention" in targets:
            plan += [(f"layers.{i}.attention.{a}", layer.attention, a) for a in _ATTENTION]
        if "experts" in targets:
            plan.append((f"layers.{i}.moe", layer.moe, "moe"))
    if "output" in targets:
        plan.append(("output", module, "output"))
    return plan


def quantize(module: nn.Module, mode: str, *, group_size: int = 128,
             targets: Iterable[str] = TARGETS) -> nn.Module:
    """Quantize a `Transformer` (or a single `MoE`) in place and return it.

    mode: "int8" (per-channel) or "int4" (groups of `group_size` inputs: 32, 64, 128 or 256; a matrix with fewer
    inputs uses one group per row). targets: any of "experts", "attention", "output". The router, embeddings and
    norms stay as they are. Each float weight is freed as soon as its replacement exists, so the peak is the model
    plus one quantized matrix stack (and one float32 matrix of temporaries).
    Raises InputError for an unknown mode, target or group size, or a module already quantized.
    """
    targets = _check(mode, targets, group_size)
    if any(isinstance(m, _Quantized) for m in module.modules()):
        raise InputError("this model is already quantized; load the unquantized weights to quantize again")
    for name, parent, attr in _plan(module, targets):
        if attr == "moe":
            _quantize_moe(parent, mode, group_size)
            continue
        linear = getattr(parent, attr)
        setattr(parent, attr, _quantized(linear.weight, mode, group_size, QuantizedLinear))
    module.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                           "targets": list(targets)}
    return module


def quantization_of(model: nn.Module) -> dict | None:
    """{"mode", "group_size", "targets"} of a model `quantize` changed, else None."""
    return getattr(model, "quantization", None)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def _portable(module: _Quantized) -> dict[str, torch.Tensor]:
    """The file form of one quantized module's buffers (see the module docstring): the buffers themselves."""
    if module.mode == "int8":
        return {"qweight": module.qweight, "scales": module.scales.to(torch.bfloat16)}
    return {"qweight": module.qweight, "scales": module.scales, "zeros": module.zeros}


def _file_shapes(module: _Quantized) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the file tensors of a quantized module."""
    lead = (len(module),) if isinstance(module, QuantizedExperts) else ()
    n, k = module.out_features, module.stored_in_features
    if module.mode == "int8":
        return {"qweight": (lead + (n, k), torch.int8), "scales": (lead + (n,), torch.bfloat16)}
    groups = (lead + (n, k // module.group_size), torch.bfloat16)
    return {"qweight": (lead + (n, k // 2), torch.uint8), "scales": groups, "zeros": groups}


def _quantized_modules(model: nn.Module) -> dict[str, _Quantized]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _Quantized)}


def _plain_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The unquantized state: parameters and buffers outside the quantized modules (a tied output once)."""
    quantized = _quantized_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # the same tensor as tok_embeddings.weight; the model ties them again on load
        state[name] = tensor
    return state


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def _write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype, object]]) -> None:
    """Write a .safetensors file tensor by tensor: entries are (name, shape, dtype, make) with make() giving the
    tensor. Only one made tensor is in memory at a time. Written to a temporary name, then renamed into place."""
    header, offset = {"__metadata__": {"format": "pt", "quantization": "mixtral"}}, 0
    for name, shape, dtype, _ in entries:
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype, make in entries:
            tensor = make().detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"{name}: made shape {list(tensor.shape)}, planned {list(shape)}")
            if tensor.numel():
                f.write(memoryview(tensor.view(torch.uint8).numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_quantized(model: Transformer, path: str | os.PathLike) -> Path:
    """Write a quantized model as config.json + model.safetensors in the format of this module's docstring.

    Each file goes to a temporary name and is renamed into place. Memory: the model plus one tensor in its file
    form. Raises InputError for a model that `quantize` has not changed.
    """
    settings = quantization_of(model)
    if settings is None or not isinstance(model, Transformer):
        raise InputError("save_quantized takes a Transformer that mixtral.quant.quantize has quantized")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(name, tuple(t.shape), t.dtype, (lambda t=t: t)) for name, t in _plain_tensors(model).items()]
    for name, module in _quantized_modules(model).items():
        for key, (shape, dtype) in _file_shapes(module).items():
            entries.append((f"{name}.{key}", shape, dtype, (lambda key=key, module=module: _portable(module)[key])))
    _write_safetensors_streaming(directory / "model.safetensors", entries)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config = to_hf_dict(model.config, dtype)
    config["quantization_config"] = {"quant_method": "mixtral", "format_version": FORMAT_VERSION, **settings}
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, directory / "config.json")
    return directory


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The "quantization_config" of a checkpoint directory written by `save_quantized`, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    settings = read_json(config).get("quantization_config")
    if not isinstance(settings, dict) or settings.get("quant_method") != "mixtral":
        return None
    return settings


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> Transformer:
    """Read a directory written by `save_quantized` into a quantized Transformer in eval mode.

    dtype: of the unquantized tensors and the activations (default: the file's). Memory: the quantized model
    plus the small unquantized tensors being converted to `dtype`.
    Raises CheckpointError naming the file and tensor for a missing, unexpected or misshapen tensor.
    """
    directory = Path(path)
    settings = read_quantization_config(directory)
    if settings is None:
        raise CheckpointError(f"{directory}: no mixtral quantization_config in config.json")
    if settings.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'config.json'}: quantization format_version "
                              f"{settings.get('format_version')!r} is not {FORMAT_VERSION}; upgrade mixtral")
    try:
        targets = _check(settings["mode"], settings["targets"], settings["group_size"] or 128)
    except (KeyError, InputError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: bad quantization_config ({e})") from None
    config = from_hf_dict(read_json(directory / "config.json"), str(directory / "config.json"))
    file = directory / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{directory}: no model.safetensors")
    reader = SafetensorsReader(file)
    try:
        if dtype is None:
            dtype = reader.dtype("tok_embeddings.weight") if "tok_embeddings.weight" in reader.entries else None
        model = _empty_quantized(config, settings["mode"], settings["group_size"] or 128, targets, dtype)
        _read_into(model, reader)
    finally:
        reader.close()
    model.quantization = {"mode": settings["mode"], "group_size": settings["group_size"], "targets": list(targets)}
    return model.to(device).eval()


def _empty_quantized(config, mode: str, group_size: int, targets: tuple[str, ...],
                     dtype: torch.dtype | None) -> Transformer:
    """A Transformer with uninitialised memory whose `targets` are quantized modules of the right shapes."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype or torch.float32)
    for name, parent, attr in _plan(model, targets):
        if attr == "moe":
            for w in ("w13", "w2"):
                module = _empty_module(getattr(parent, w), mode, group_size, QuantizedExperts)
                delattr(parent, w)
                setattr(parent, w, module)
        else:
            setattr(parent, attr, _empty_module(getattr(parent, attr).weight, mode, group_size, QuantizedLinear))
    model = model.to_empty(device="cpu")
    kernels.prefer_huge_pages(model)  # before the first write, which then faults in 2 MB pages
    if config.tie_embeddings and "output" not in targets:
        model.output.weight = model.tok_embeddings.weight
    return model


def _empty_module(w: torch.Tensor, mode: str, group_size: int, cls: type[_Quantized]) -> _Quantized:
    """A quantized module for a weight of w's shape, on the meta device."""
    *lead, n, in_features = w.shape
    group, k = int4_layout(in_features, group_size) if mode == "int4" else (None, in_features)
    if mode == "int8":
        qweight = torch.empty(*lead, n, k, dtype=torch.int8, device="meta")
        scales = torch.empty(*lead, n, dtype=w.dtype, device="meta")
        zeros = None
    else:
        qweight = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device="meta")
        scales = torch.empty(*lead, n, k // group, dtype=torch.bfloat16, device="meta")
        zeros = torch.empty_like(scales)
    return cls(mode, qweight, scales, zeros, group, n, in_features)


def _read_into(model: Transformer, reader) -> None:
    quantized = _quantized_modules(model)
    plain = _plain_tensors(model)
    expected = {name: (tuple(t.shape), None) for name, t in plain.items()}
    for name, module in quantized.items():
        expected.update({f"{name}.{key}": spec for key, spec in _file_shapes(module).items()})
    unexpected = [k for k in reader.keys() if k not in expected]
    if unexpected:
        raise CheckpointError(f"{reader.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    missing = [k for k in expected if k not in reader.entries]
    if missing:
        raise CheckpointError(f"{reader.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, (shape, dtype) in expected.items():
        if tuple(reader.shape(name)) != shape or (dtype is not None and reader.dtype(name) != dtype):
            raise CheckpointError(f"{reader.path}: tensor {name!r} is {reader.dtype(name)} {list(reader.shape(name))},"
                                  f" expected {dtype or 'float'} {list(shape)}")
    # Tensors are read straight into place where the bytes already have their final size, so the peak is the
    # model plus one small tensor, not the model plus its biggest stack.
    with torch.no_grad():
        for name, tensor in plain.items():
            if reader.dtype(name) == tensor.dtype and tensor.is_contiguous():
                reader.read(name, out=tensor)
            else:
                tensor.copy_(reader.read(name))
        for name, module in quantized.items():
            reader.read(f"{name}.qweight", out=module.qweight)  # the file's layout is the kernels' layout
            module.scales.copy_(reader.read(f"{name}.scales"))
            if module.mode == "int4":
                module.zeros.copy_(reader.read(f"{name}.zeros"))
                module.refresh()

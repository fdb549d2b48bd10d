"""The quantized weight type the backend takes, and its products x · wᵀ on the CPU.

`QuantizedWeight` is one int8 or int4 matrix (mixtral.quant makes them; the layouts are `mixtral.kernels.packing`'s).
Its `linear` runs the kernel `CpuPolicy.linear_path` picks by the rows of x (the crossovers measured on
Mixtral-8x7B's expert matrices, 2 threads, `mixtral bench quant-accuracy --kernels`; docs/performance.md):
    int8: torch's `_weight_int8pack_mm` for few rows (its time grows with every row: at 16 rows it is already
          slower than bf16); from there the weight is expanded to bf16 (`dequant_int8`) and multiplied by torch's
          bf16 GEMM, a cache-sized tile of output rows at a time (`CpuPolicy.expansion_tiles`).
    int4: gemv.c's `gemv_int4` (AVX512-BF16; faster than torch's `_weight_int4pack_mm_for_cpu`, whose packed
          layout is also opaque and differs between CPUs) for few rows; from there `dequant_int4` + the bf16 GEMM
          in tiles, as int8 (torch's int4 kernel costs 2.5x the bf16 GEMM at 128+ rows).
Both run in bfloat16 whatever the model's dtype (the float32 paths of torch's kernels are scalar loops, 10-50x
slower): x is cast to bf16 for the product and the result cast back to x's dtype. Anything the kernels do not
take (another device, a CPU without AVX512-BF16 or a C compiler, int8 with in_features % 16 != 0, where torch's
kernel crashes) dequantizes and calls F.linear, logged once per reason.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from mixtral.kernels import gemv, packing
from mixtral.kernels.cpu_policy import policy

log = logging.getLogger("mixtral")

KERNEL_DTYPE = torch.bfloat16  # what the quantized kernels compute in


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One quantized matrix [out, in]: views into a quantized module's buffers (`mixtral.quant`), made on each use.

    int8: qweight int8 [out, in], scales [out] (bf16 numbers in the model's dtype). int4: qweight uint8
    [out, stored / 2] (`pack_int4`), scales and zeros bf16 [out, groups], bias float32 [groups, out] (`int4_bias`,
    for gemv_int4); stored = in_features rounded up to whole groups (`padding` columns, copies of the last one).
    """
    mode: str  # "int8" or "int4"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None
    group_size: int | None
    out_features: int
    in_features: int

    @property
    def padding(self) -> int:
        """Stored columns past in_features (int4 padding to whole groups)."""
        return self.qweight.shape[1] * (2 if self.mode == "int4" else 1) - self.in_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] these integers stand for, in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if self.mode == "int8":
            return packing.dequantize_int8(self.qweight, self.scales, dtype)
        w = packing.dequantize_int4(packing.unpack_int4(self.qweight), self.scales, self.zeros, dtype)
        return w[:, :self.in_features] if self.padding else w

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> x · wᵀ [n, out] in x's dtype."""
        inference = not (torch.is_grad_enabled() and x.requires_grad)  # the integer kernels have no backward
        path = "reference"
        if x.device.type != "cpu":
            _fallback(f"no {self.mode} kernel for device {x.device.type}")
        else:
            path = policy().linear_path(self.mode, x.shape[0], inference=inference, fits=self.in_features % 16 == 0)
        if path == "int4_gemv":
            return gemv.gemv_int4(self._stored_layout(x), self.qweight, self.scales, self.bias).to(x.dtype)
        if path == "int8_torch":
            y = torch._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), self.qweight, self.scales.to(KERNEL_DTYPE))
            return y.to(x.dtype)
        if path == "expand":
            return self._expanded_linear(x).to(x.dtype)
        if x.device.type == "cpu":
            _fallback(f"no {self.mode} kernel on this CPU (no AVX512-BF16 or no C compiler)")
        return F.linear(x, self.dequantize(x.dtype))  # dequantize() drops the padding columns

    def _bf16_weight(self, rows: slice = slice(None), scratch: bool = True) -> torch.Tensor:
        """Output rows `rows` of the weight expanded to bf16 by the C dequantizers (in the stored layout, padding
        included), into this thread's reused buffer with `scratch`."""
        if self.mode == "int8":
            return packing.dequant_int8(self.qweight[rows], self.scales[rows].to(KERNEL_DTYPE), scratch)
        return packing.dequant_int4(self.qweight[rows], self.scales[rows], self.zeros[rows], scratch)

    def _expanded_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x · wᵀ through torch's bf16 GEMM on the expanded weight. Without autograd, in tiles of output rows that
        stay in the last-level cache (`CpuPolicy.expansion_tiles`): the whole expanded weight would go out to
        memory and be read back, which cost 37 ms against 27 for 128 rows through 28672x4096 (bf16 itself: 24.5)
        on the Xeon of 2026-12-01. Autograd keeps the whole weight for its backward pass instead."""
        x = self._stored_layout(x).to(KERNEL_DTYPE).contiguous()
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self._bf16_weight(scratch=False))
        n, k = self.out_features, x.shape[1]
        tile, transposed = policy().expansion_tiles(len(x), n, k)
        if tile >= n:
            return F.linear(x, self._bf16_weight())
        if transposed:
            yt = torch.empty(n, len(x), dtype=KERNEL_DTYPE)
            for n0 in range(0, n, tile):
                gemv.transposed_mm(self._bf16_weight(slice(n0, n0 + tile)), x.t(), out=yt[n0:n0 + tile])
            return yt.t()
        y = torch.empty(x.shape[0], n, dtype=KERNEL_DTYPE)
        for n0 in range(0, n, tile):
            y[:, n0:n0 + tile] = F.linear(x, self._bf16_weight(slice(n0, n0 + tile)))
        return y

    def _stored_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x with zero inputs for the stored padding columns (they add nothing), for the kernels that read the
        stored layout."""
        return F.pad(x, (0, self.padding)) if self.padding else x


def _fallback(reason: str) -> None:
    """Log once per reason that a product goes through the dequantized reference instead of a kernel."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("quantized linear: %s; dequantizing and using F.linear (correct, slower)", reason)


_reported: set[str] = set()

"""The quantized weight type the backend takes, and its products x · wᵀ on the CPU.

`QuantizedWeight` is one int8, int4, int3 or int2 matrix (mixtral.quant makes them; the layouts are
`mixtral.kernels.packing`'s).
Its `linear` runs the kernel `CpuPolicy.linear_path` picks by the rows of x (the crossovers measured on
Mixtral-8x7B's expert matrices, 2 threads, `mixtral bench quant-accuracy --kernels`; docs/performance.md):
    int8: torch's `_weight_int8pack_mm` for few rows (its time grows with every row: at 16 rows it is already
          slower than bf16); from there the weight is expanded to bf16 (`dequant_int8`) and multiplied by torch's
          bf16 GEMM, a cache-sized tile of output rows at a time (`CpuPolicy.expansion_tiles`).
    int4: gemv.c's `gemv_int4` (AVX512-BF16; faster than torch's `_weight_int4pack_mm_for_cpu`, whose packed
          layout is also opaque and differs between CPUs) for few rows; from there `dequant_int4` + the bf16 GEMM
          in tiles, as int8 (torch's int4 kernel costs 2.5x the bf16 GEMM at 128+ rows).
    int3, int2: lowbit.c's `gemv_lowbit` (AVX512-BF16; `gemv_lowbit` below; with x rounded to int8 per group
          where the CPU has AVX512-VNNI and VBMI, `CpuPolicy.lowbit_int8`) for few rows, from there
          `dequant_lowbit` + the bf16 GEMM in tiles, as int4.
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

from mixtral.batch_invariant import by_row, is_batch_invariant
from mixtral.kernels import build, gemv, packing
from mixtral.kernels.cpu_policy import policy

log = logging.getLogger("mixtral")

KERNEL_DTYPE = torch.bfloat16  # what the quantized kernels compute in
LOWBIT = ("int3", "int2")  # the modes of lowbit.c


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One quantized matrix [out, in]: views into a quantized module's buffers (`mixtral.quant`), made on each use.

    int8: qweight int8 [out, in], scales [out] (bf16 numbers in the model's dtype). int4: qweight uint8
    [out, stored / 2] (`pack_int4`), scales and zeros bf16 [out, groups], bias float32 [groups, out] (`int4_bias`,
    for gemv_int4); stored = in_features rounded up to whole groups (`padding` columns, copies of the last one).
    int3, int2: qweight uint8 [out, stored · bits / 8] (`pack_lowbit`; stored also a multiple of 32), scales and
    zeros bf16 [out, groups], no bias (gemv_lowbit reads the zeros itself).
    """
    mode: str  # "int8", "int4", "int3" or "int2"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None
    group_size: int | None
    out_features: int
    in_features: int

    @property
    def bits(self) -> int:
        """Bits per weight: 8, 4, 3 or 2."""
        return int(self.mode.removeprefix("int"))

    @property
    def padding(self) -> int:
        """Stored columns past in_features (int4/int3/int2 padding to whole groups)."""
        return self.qweight.shape[1] * 8 // self.bits - self.in_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] these integers stand for, in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if self.mode == "int8":
            return packing.dequantize_int8(self.qweight, self.scales, dtype)
        if self.mode in LOWBIT:
            w = packing.dequantize_lowbit(packing.unpack_lowbit(self.qweight, self.bits), self.scales, self.zeros,
                                          self.bits, dtype)
        else:
            w = packing.dequantize_int4(packing.unpack_int4(self.qweight), self.scales, self.zeros, dtype)
        return w[:, :self.in_features] if self.padding else w

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> x · wᵀ [n, out] in x's dtype. In the batch-invariant mode one row at a time, each through
        the path of one row."""
        inference = not (torch.is_grad_enabled() and x.requires_grad)  # the integer kernels have no backward
        path = "reference"
        if x.device.type != "cpu":
            _fallback(f"no {self.mode} kernel for device {x.device.type}")
        else:
            fits = self.in_features % 16 == 0
            path = policy().linear_path(self.mode, x.shape[0], inference=inference, fits=fits,
                                        invariant=is_batch_invariant())
            if path == "by_row":
                one = policy().linear_path(self.mode, 1, inference=inference, fits=fits)
                return by_row(lambda row: self._product(row, one), x)
        return self._product(x, path)

    def _product(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """x · wᵀ through `path` (`CpuPolicy.linear_path`'s name for it)."""
        if path == "int4_gemv":
            return gemv.gemv_int4(self._stored_layout(x), self.qweight, self.scales, self.bias).to(x.dtype)
        if path == "lowbit_gemv":
            return gemv_lowbit(self._stored_layout(x), self.qweight, self.scales, self.zeros, self.bits).to(x.dtype)
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
        if self.mode in LOWBIT:
            return packing.dequant_lowbit(self.qweight[rows], self.scales[rows], self.zeros[rows], self.bits, scratch)
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


def gemv_lowbit(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, *,
                int8_activations: bool | None = None) -> torch.Tensor:
    """x [M, K] · wᵀ for an int3/int2 weight (packed uint8 [N, K·bits/8] in `pack_lowbit`'s layout, scale and zero
    bfloat16 [N, K/G], G 16..128) -> [M, N] float32, through lowbit.c. Contiguous CPU tensors; K a multiple of 32
    and of G.

    int8_activations: round x to int8 per group for the product with the weights' varying part (lowbit.c says
    how; `round_activations` is the same rounding in torch), 1.1-1.4x faster at one row; ignored (exact) for
    G = 16, for an odd number of groups per row, or where the kernel was not built for it. None: as the policy in
    force says (`CpuPolicy.lowbit_int8`).
    """
    m, k = x.shape
    n, groups = scale.shape
    assert scale.dtype == zero.dtype == torch.bfloat16 and packed.dtype == torch.uint8 and bits in (2, 3)
    assert packed.shape[1] * 8 == k * bits and k % 32 == 0 and k // groups in (16, 32, 64, 128), (k, groups)
    assert packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    if int8_activations is None:
        int8_activations = policy().lowbit_int8
    x = x.to(KERNEL_DTYPE).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    done = build.library().gemv_lowbit(x.data_ptr(), m, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k,
                                       k // groups, bits, y.data_ptr(), torch.get_num_threads(), int(int8_activations))
    if done < 0:
        raise MemoryError(f"gemv_lowbit: no memory for the sums of x ({m}x{k})")
    return y


def round_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16 values) rounded to int8 per group of `group_size` as lowbit.c's int8 way does it: (xq int8
    [M, K], d float32 [M, K/G]) with x ≈ d·xq, d = max|x| / 127 over the group, xq = round-half-even(x · (127 /
    max|x|)), all in float32 (zeros where the group is all zero). The reference for that kernel."""
    m, k = x.shape
    groups = x.float().view(m, k // group_size, group_size)
    top = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros(()))
    xq = torch.round(groups * inverse).to(torch.int8).view(m, k)
    return xq, (top / torch.tensor(127.0)).squeeze(-1)


def _fallback(reason: str) -> None:
    """Log once per reason that a product goes through the dequantized reference instead of a kernel."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("quantized linear: %s; dequantizing and using F.linear (correct, slower)", reason)


_reported: set[str] = set()

"""Which kernel runs a product on this CPU, and every crossover threshold behind that choice.

A `CpuPolicy` holds what the backend knows of the machine (whether the C kernels built, AVX512-BF16, AMX, amx.c)
and the row counts where one kernel overtakes another, each with the measurement that set it. `policy()` is the
one in force: the machine's, probed at first use rather than at import, or one a test or benchmark put in place
with `use_policy`. `linear_path` and `expert_path` are the one place that maps (weight kind, rows) to a kernel:
`kernels.matmul`, `QuantizedWeight.linear` and the MoE experts ask them.

Weight kinds: "bf16" (a bfloat16 tensor), "int8", "int4", "int3", "int2" (`QuantizedWeight.mode`); anything else
(float32, float16 tensors) goes to torch. amx.c takes bf16, int8 and int4 experts only: int3/int2 ones always go
through their own kernels (`expert_path`: "linear").

The figures below were measured on two machines: an AMD EPYC (AVX512-BF16, no AMX; 2026-11-23) and a 2-core
Intel Xeon with AMX (2026-12-01), with Mixtral-8x7B's matrices (docs/performance.md has the tables).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from mixtral.kernels import build


@dataclasses.dataclass(frozen=True)
class CpuPolicy:
    """What runs where on one CPU. Build one with `CpuPolicy.for_cpu` (thresholds from the features) and adjust
    single thresholds with `dataclasses.replace`."""

    library: bool  # the C kernels are built and loaded (a C compiler; MIXTRAL_KERNELS is not 0): the dequantizers
    avx512_bf16: bool  # the CPU has AVX512-BF16: gemv.c's GEMVs run (with the library)
    amx: bool  # the CPU has AMX tiles (Intel Xeon since Sapphire Rapids): torch's bf16 GEMM runs on them
    amx_kernel: bool  # amx.c was built for AMX and Linux granted the tile state (with the library and AMX)
    int8_dot: bool  # lowbit.c was built with its int8-activation way (AVX512-VNNI and VBMI)
    l2_bytes: int  # the CPU's L2 cache (per core)
    llc_bytes: int  # its last-level cache (0: unknown)

    max_gemv_rows: int  # bf16: gemv.c up to this many rows of x, torch's GEMM beyond
    amx_transposed_rows: int  # bf16 on AMX: (W xᵀ)ᵀ up to this many rows (`matmul`)
    amx_expert_rows: int  # a bf16 expert runs in amx.c from this many rows
    amx_int8_expert_rows: int  # ... an int8 one
    amx_int4_expert_rows: int  # ... an int4 one
    int8_gemm_rows: int  # int8: torch's int8 kernel below this many rows, expand + bf16 GEMM from there
    int4_gemv_rows: int  # int4: gemv.c's int4 GEMV below this many rows, expand + bf16 GEMM from there
    lowbit_gemv_rows: int  # int3, int2: lowbit.c's GEMV below this many rows, expand + bf16 GEMM from there
    expanded_tile_bytes: int  # bytes of a quantized weight expanded to bf16 at a time (the "expand" path)
    amx_chunk_bytes: int  # bytes of L2 one chunk of K may fill in amx.c

    @classmethod
    def for_cpu(cls, *, library: bool = False, avx512_bf16: bool = False, amx: bool = False,
                amx_kernel: bool = False, int8_dot: bool = False, l2_bytes: int = 2**21,
                llc_bytes: int = 0) -> CpuPolicy:
        """The policy of a CPU with these features and cache sizes. With no arguments: a CPU without the C kernels,
        AVX512-BF16 or AMX, where every product goes through torch (the fallbacks)."""
        return cls(
            library=library, avx512_bf16=avx512_bf16, amx=amx, amx_kernel=amx_kernel, int8_dot=int8_dot,
            l2_bytes=l2_bytes,
            llc_bytes=llc_bytes,
            # Where torch's bf16 GEMM runs on AMX tiles it multiplies 8 rows by a 28672x4096 matrix in 9.7 ms
            # against 12.8 for gemv.c (AVX512 registers run out of rows to share each weight load with); on the
            # EPYC the two were even at 8 rows.
            max_gemv_rows=5 if amx else 8,
            # (W xᵀ)ᵀ with the copy back to [rows, N]: 16 rows through 28672x4096 take 8.0 ms against 9.7, 128
            # rows 20.1 against 23.7, and 256 rows 36.3 against 30.0 (Xeon), hence the bound.
            amx_transposed_rows=128,
            # The eight experts of a Mixtral-8x7B layer, weights from memory, Xeon (`mixtral bench amx-experts`):
            # bf16 in amx.c against torch's GEMM, 6 rows 124 ms against 136, 16 rows 124 against 131, 24-32 rows
            # even (both stream the weights at about 22 GB/s), 48 rows 137 against 240, 128 rows 178 against
            # 254. In a layer amx.c also saves the gather of the expert's tokens and the scatter of its output.
            amx_expert_rows=6,
            # Quantized experts, expanded inside amx.c a block of rows at a time, against their own kernels
            # (torch's int8 kernel, the int4 GEMV, expand-then-GEMM): int8 5 rows 94 ms against 158 (4 rows: 95
            # against 84), int4 3 rows 60 against 67 (2 rows: 65 against 55), 16 rows 55 against 164.
            amx_int8_expert_rows=5,
            amx_int4_expert_rows=3,
            # The integer kernels' time grows with the rows, the expansion to bf16 is paid once (`mixtral bench
            # quant-accuracy --kernels --rows 8,16,32,64,128`): torch's int8 kernel is already slower than bf16 at
            # 16 rows, the int4 GEMV at 32 on the EPYC. Where torch's GEMM runs on AMX the expansion + GEMM wins
            # earlier: from 12 rows for both (Xeon, 28672x4096 and 4096x14336).
            int8_gemm_rows=12 if amx else 16,
            int4_gemv_rows=12 if amx else 32,
            # lowbit.c's GEMV is bound by unpacking, not memory, so the expansion overtakes it sooner than int4's
            # (EPYC, ms, GEMV against expand + GEMM, 14336x4096 and 4096x14336 alike): int3 g64 8 rows 6.9
            # against 10.0, 16 rows 12.1 against 9.4; int2 g16 8 rows 9.6 against 10.2, 16 rows 18.5 against
            # 12.9. Not measured on AMX, where torch's GEMM overtook the int4 GEMV at 12 rows instead of 32: 8.
            lowbit_gemv_rows=8 if amx else 12,
            # A tile of output rows that stays in the last-level cache between its expansion and its product, yet
            # big enough for the product to run at speed (Xeon, 480 MB L3: 16-32 MB tiles measured best, 2-4 MB
            # ones slower than no tiling). A quarter of the cache, within those bounds.
            expanded_tile_bytes=min(24 << 20, max(4 << 20, llc_bytes // 4)),
            # The B tiles of one chunk of K (the activations, all columns) and the 32 weight rows in flight must
            # both stay in L2 while all the weight rows stream past: three quarters of L2. Eight experts at 128
            # rows, weights from memory, Xeon: the down projections (K = 14336) in chunks of 128 tiles 176 ms all
            # told, 64 tiles 185, 90-150 tiles (not whole pages) 187-189, 224 tiles (B no longer in L2) 198; at
            # 160 rows, K = 4096 in one chunk 142 ms, in two 161.
            amx_chunk_bytes=l2_bytes * 3 // 4,
        )

    def with_features(self, **features) -> CpuPolicy:
        """The policy of this CPU with some of its features (the arguments of `for_cpu`) changed, its thresholds
        derived anew: `policy().with_features(amx=False)` is this machine as if it had no AMX."""
        facts = {name: getattr(self, name) for name in ("library", "avx512_bf16", "amx", "amx_kernel", "int8_dot",
                                                         "l2_bytes", "llc_bytes")}
        return CpuPolicy.for_cpu(**{**facts, **features})

    @property
    def gemv(self) -> bool:
        """Whether gemv.c's bf16 and int4 GEMVs and lowbit.c's GEMV run (AVX512-BF16)."""
        return self.library and self.avx512_bf16

    @property
    def lowbit_int8(self) -> bool:
        """Whether lowbit.c's GEMV rounds x to int8 (its faster way; see lowbit.c): where it was built for it. A
        policy with int8_dot=False keeps the exact way."""
        return self.gemv and self.int8_dot

    @property
    def dequant(self) -> bool:
        """Whether the C dequantizers (int8/int4 -> bf16, any CPU) run."""
        return self.library

    @property
    def amx_experts(self) -> bool:
        """Whether amx.c runs."""
        return self.library and self.amx and self.amx_kernel

    def linear_path(self, kind: str, rows: int, *, inference: bool = True, fits: bool = True,
                    invariant: bool = False) -> str:
        """How x · wᵀ runs on the CPU for `rows` rows of x and a weight of `kind`:

            "bf16": "gemv" (gemv.c), "transposed" ((W xᵀ)ᵀ through torch's GEMM on AMX), "torch" (F.linear)
            "int8": "int8_torch" (torch's _weight_int8pack_mm), "expand" (the C dequantizer + torch's bf16 GEMM,
                    in tiles: `expansion_tiles`), "reference" (dequantized in torch, F.linear)
            "int4": "int4_gemv" (gemv.c), "expand", "reference"
            "int3", "int2": "lowbit_gemv" (lowbit.c), "expand", "reference"
            other:  "torch"

        inference: no autograd through the product (the C kernels and the transposed form have no backward); for
        bf16 also activations in bf16. fits: the weight's shape suits the GEMV or int8 kernel (bf16: K % 32 == 0,
        contiguous; int8: in_features % 16 == 0, where torch's int8 kernel crashes otherwise).

        invariant: the batch-invariant mode (`mixtral.batch_invariant`), where no row's result may depend on the
        number of rows: "gemv" for bf16 where it runs (each output one chain of vdpbf16ps over k and one horizontal
        sum, whatever the rows), else "by_row" (each row alone, through the path `rows=1` gives).
        """
        if invariant:
            return "gemv" if kind == "bf16" and inference and fits and self.gemv else "by_row"
        if kind == "bf16":
            if inference and fits and self.gemv and rows <= self.max_gemv_rows:
                return "gemv"
            if inference and self.amx and rows <= self.amx_transposed_rows:
                return "transposed"
            return "torch"
        if kind == "int8":
            if inference and fits and rows < self.int8_gemm_rows:
                return "int8_torch"
        elif kind == "int4":
            if inference and self.gemv and rows < self.int4_gemv_rows:
                return "int4_gemv"
        elif kind in ("int3", "int2"):
            if inference and self.gemv and rows < self.lowbit_gemv_rows:
                return "lowbit_gemv"
        else:
            return "torch"
        return "expand" if self.dequant else "reference"

    def expert_path(self, kind: str, rows: int, *, inference: bool = True, fits: bool = True,
                    invariant: bool = False) -> str:
        """How one SwiGLU expert runs on `rows` rows of x: "amx" (the whole expert in amx.c), "transposed" (bf16
        products as (W xᵀ)ᵀ through torch's GEMM on AMX), or "linear" (each product as `linear_path` says).

        inference: bf16 activations on the CPU without autograd. fits: amx.c takes these weights (kind, shapes,
        layout: `kernels.amx_fits`). invariant: the batch-invariant mode, always "linear" (amx.c cuts K into chunks
        by the number of rows, and torch's GEMM blocks by it).
        """
        if invariant:
            return "linear"
        least = {"bf16": self.amx_expert_rows, "int8": self.amx_int8_expert_rows,
                 "int4": self.amx_int4_expert_rows}.get(kind)
        if inference and fits and self.amx_experts and least is not None and rows >= least:
            return "amx"
        if kind == "bf16" and inference and self.amx and rows > self.max_gemv_rows:
            return "transposed"
        return "linear"

    def expansion_tiles(self, rows: int, out_features: int, in_features: int) -> tuple[int, bool]:
        """(output rows expanded at a time, whether each tile's product is (W xᵀ)ᵀ) for the "expand" path without
        autograd: tiles of `expanded_tile_bytes` in bf16, whole multiples of 64 rows (the whole weight where it
        fits in one tile).

        The transposed form where torch's GEMM runs on AMX and the rows are at most a quarter of the tile: 64 rows
        through 28672x4096 13.7 against 20.7 ms; with more rows, repacking xᵀ for every tile costs more (512 rows
        through 4096x14336: 51 against 30 ms). Xeon.
        """
        tile = max(64, self.expanded_tile_bytes // (2 * in_features) // 64 * 64)
        return tile, self.amx and tile < out_features and 4 * rows <= tile


@lru_cache(maxsize=1)
def detected() -> CpuPolicy:
    """The policy of this machine: its CPU flags and caches, and what of the C kernels built (compiles them)."""
    library = build.library()
    sizes = build.cache_sizes()
    return CpuPolicy.for_cpu(library=library is not None, avx512_bf16=build.cpu_has("avx512_bf16"),
                             amx=build.cpu_has("amx_bf16"), amx_kernel=library is not None and library.has_amx,
                             # MIXTRAL_INT8_ACTIVATIONS=0: the int3/int2 GEMV stays exact (slower)
                             int8_dot=(library is not None and getattr(library, "has_lowbit_int8", False)
                                       and os.environ.get("MIXTRAL_INT8_ACTIVATIONS", "1") != "0"),
                             l2_bytes=sizes.get(2, 2**21), llc_bytes=max(sizes.values(), default=0))


_lock = threading.Lock()
_injected: list[CpuPolicy] = []


def policy() -> CpuPolicy:
    """The policy in force: the innermost `use_policy`'s, else this machine's (`detected`)."""
    return _injected[-1] if _injected else detected()


@contextmanager
def use_policy(injected: CpuPolicy) -> Iterator[CpuPolicy]:
    """Run the block under `injected` (in every thread): for tests and benchmarks of another CPU's choices.

    It may take kernels away (a policy saying no library, no AVX512-BF16 or no AMX runs the fallbacks anywhere),
    claim AMX for torch's sake (the transposed forms and AMX thresholds are plain torch), and move thresholds; it
    may not claim a kernel this machine cannot run. Raises ValueError for that.
    """
    machine = detected()
    for feature in ("gemv", "dequant", "amx_experts", "lowbit_int8"):
        if getattr(injected, feature) and not getattr(machine, feature):
            raise ValueError(f"this machine cannot run the kernels a policy with {feature}=True would call")
    with _lock:
        _injected.append(injected)
    try:
        yield injected
    finally:
        with _lock:
            del _injected[max(i for i, p in enumerate(_injected) if p is injected)]

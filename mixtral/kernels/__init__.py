"""Small CPU kernels, built at first use with the machine's C compiler and called through ctypes.

`matmul(x, w)` computes x · wᵀ like `F.linear`. For a few rows of x and bf16 weights on a CPU with AVX512-BF16 it
runs `gemv.c`, which reads each weight once for all rows (PyTorch's bf16 GEMM reaches about half the memory
bandwidth at one token a step on these machines; see docs/performance.md). Everything else, and every machine
where the kernel cannot be built, goes to `F.linear` — logged once, never silently wrong.

`gemv_int4` is the same idea for group-wise int4 weights (`mixtral.quant`); `dequant_int4`/`dequant_int8` expand
quantized weights to bf16 for products with many rows, and are built on every CPU (plain C).

`amx_swiglu_add` runs one whole SwiGLU expert on AMX tiles (`amx.c`, built where the compiler targets AMX): the
MoE layer's path for batches and prefill, bf16, int8 or int4 weights (`amx_available`, `amx_swiglu_fits`,
`amx_quantized_fits`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("mixtral")

_SOURCES = [Path(__file__).with_name("gemv.c"), Path(__file__).with_name("amx.c")]


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _cache_sizes() -> dict[int, int]:
    """{level: bytes} of cpu0's data and unified caches, from sysfs (empty when unknown)."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip()
            size = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes[int((index / "level").read_text())] = size
        except (OSError, ValueError):
            continue
    return sizes


def last_level_cache_bytes() -> int:
    """The largest CPU cache, from sysfs (0 when unknown)."""
    return max(_cache_sizes().values(), default=0)


# Whether torch's bf16 GEMM runs on AMX tiles here (Intel Xeon since Sapphire Rapids). It then multiplies 8 rows by
# a 28672x4096 matrix in 9.7 ms against 12.8 for our kernel (AVX512 registers run out of rows to share each weight
# load with), while on the AMD EPYC of 2026-11-23 the two were even at 8 rows (docs/performance.md).
AMX = _cpu_has("amx_bf16")
MAX_ROWS = 5 if AMX else 8  # beyond this many rows of x, torch's GEMM is as fast or faster
AMX_TRANSPOSED_ROWS = 128  # up to this many rows, `matmul` computes (W xᵀ)ᵀ on AMX (see there)
# From this many rows an expert runs in amx.c (`amx_swiglu_add`); below, `moe.swiglu`'s GEMV (up to MAX_ROWS) and
# torch's GEMM. The eight experts of a Mixtral-8x7B layer, weights from memory, Xeon of 2026-12-01
# (benchmarks/amx_experts.py): bf16 6 rows 124 ms against torch's 136, 16 rows 124 against 131, 24-32 rows even
# (both stream the weights at about 22 GB/s), 48 rows 137 against 240, 128 rows 178 against 254. In a layer amx.c
# also saves the gather of the expert's tokens and the scatter of its output.
AMX_EXPERT_ROWS = 6
# Quantized experts, expanded inside amx.c a block of rows at a time, against their own kernels (torch's int8
# kernel, our int4 GEMV, expand-then-GEMM): int8 5 rows 94 ms against 158 (4 rows: 95 against 84), int4 3 rows 60
# against 67 (2 rows: 65 against 55), 16 rows 55 against 164.
AMX_INT8_EXPERT_ROWS = 5
AMX_INT4_EXPERT_ROWS = 3


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged) when they cannot be used here."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        log.info("mixtral kernels disabled by MIXTRAL_KERNELS=0; using torch's linear")
        return None
    source = b"".join(path.read_bytes() for path in _SOURCES)
    extra = os.environ.get("MIXTRAL_KERNEL_CFLAGS", "").split()  # for benchmarks (gemv.c's PREFETCH_ROWS)
    tag = hashlib.sha256(source + " ".join(extra).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MIXTRAL_CACHE", Path.home() / ".cache" / "mixtral")) / "kernels"
    lib = cache / f"gemv-{tag}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            cmd = [os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                   *extra, *map(str, _SOURCES), "-o", str(out)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                log.warning("could not build mixtral's CPU kernels (%s); using torch's linear", detail.strip()[:300])
                return None
            os.replace(out, lib)  # atomic: a concurrent process sees the whole library or none
    library = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    library.dequant_int4.argtypes = [p, p, p, i, i, i, p, i]
    library.dequant_int8.argtypes = [p, p, i, i, p, i]
    library.dequant_int4.restype = library.dequant_int8.restype = None
    library.has_amx = AMX and library.amx_request() == 0
    if library.has_amx:
        library.amx_swiglu.argtypes = [p, p, p, i, i, i, i, p, p, p, p, p, i, i, i, p, p, p, p, i, p, p, p, p, i]
        library.amx_swiglu.restype = None
    elif AMX:
        log.info("the CPU has AMX but the kernels were not built for it; experts use torch's GEMM")
    if not _cpu_has("avx512_bf16"):
        log.info("this CPU has no AVX512-BF16; decoding uses torch's linear")
        library.has_gemv = False
        return library
    library.has_gemv = True
    library.gemv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_int]
    library.gemv_bf16.restype = None
    library.gemv_int4.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.gemv_int4.restype = None
    return library


def available() -> bool:
    """Whether the GEMV kernels (AVX512-BF16) run here."""
    library = _library()
    return library is not None and library.has_gemv


def dequant_available() -> bool:
    """Whether the dequantizers (any CPU with a C compiler) run here."""
    return _library() is not None


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 · w [N, K] bf16 ᵀ -> [M, N] float32, through gemv.c. Contiguous CPU tensors, K % 32 == 0."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _library().gemv_bf16(x.data_ptr(), m, w.data_ptr(), n, k, y.data_ptr(), torch.get_num_threads())
    return y


def bf16_activations(x: torch.Tensor) -> bool:
    """Whether x is bf16 on the CPU and needs no gradient: what the kernels here take (they have no backward)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def bf16_inference(x: torch.Tensor, w) -> bool:
    """Whether x · wᵀ is a bf16 product on the CPU without autograd: what gemv.c and the (W xᵀ)ᵀ form on AMX take
    (`matmul`, `mixtral.moe.swiglu`)."""
    return (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and bf16_activations(x) and not (torch.is_grad_enabled() and w.requires_grad))


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ for x [..., K] and w [N, K], in x's dtype: F.linear, or gemv.c where it is faster."""
    rows = x.numel() // w.shape[1]
    if (bf16_inference(x, w) and w.shape[1] % 32 == 0 and w.is_contiguous() and rows <= MAX_ROWS
            and available()):
        flat = x.reshape(-1, w.shape[1]).contiguous()
        return gemv_bf16(flat, w).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    if AMX and bf16_inference(x, w) and rows <= AMX_TRANSPOSED_ROWS:
        # (W xᵀ)ᵀ: oneDNN then repacks xᵀ for the AMX tiles instead of the weight (see `moe.swiglu`); with the copy
        # back to [rows, N], 16 rows through 28672x4096 take 8.0 ms against 9.7, 128 rows 20.1 against 23.7, and
        # 256 rows 36.3 against 30.0 (Xeon of 2026-12-01), hence the bound.
        flat = x.reshape(-1, w.shape[1])
        return torch.mm(w, flat.t()).t().contiguous().reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)



def amx_available() -> bool:
    """Whether amx.c runs here: a CPU with AMX and kernels built for it."""
    library = _library() if AMX else None
    return library is not None and library.has_amx


def amx_swiglu_fits(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether `amx_swiglu_add` takes this expert: bf16 inference where amx.c runs, contiguous weights, dim and
    hidden multiples of 32."""
    if not (AMX and bf16_inference(x, w13) and isinstance(w2, torch.Tensor) and w2.dtype == torch.bfloat16):
        return False
    dim, hidden = w2.shape
    return (amx_available() and w13.shape == (2 * hidden, dim) and dim % 32 == 0 and hidden % 32 == 0
            and w13.is_contiguous() and w2.is_contiguous() and len(x) > 0)


# Bytes of L2 that one chunk of K may fill with its B tiles (the activations, all columns) and the 32 weight rows
# in flight, so that both stay there while all the weight rows stream past: three quarters of L2. Chunks are
# whole 4 KB of each weight row where they can be (64 tiles), so the hardware prefetcher, which stops at page
# boundaries, sees whole pages. Eight experts at 128 rows, weights from memory, Xeon of 2026-12-01: the
# down projections (K = 14336) in chunks of 128 tiles 176 ms all told, 64 tiles 185, 90-150 tiles (not whole
# pages) 187-189, 224 tiles (B no longer in L2) 198; at 160 rows, K = 4096 in one chunk 142 ms, in two 161.
_CHUNK_BYTES = _cache_sizes().get(2, 2**21) * 3 // 4


def _k_chunk(k: int, columns: int, multiple: int = 1) -> int:
    """Tiles of 32 along K per chunk, for `columns` columns of B (see `_CHUNK_BYTES`); a multiple of `multiple`
    (whole int4 groups, which divide 64 tiles)."""
    most = max(1, _CHUNK_BYTES // ((columns // 16 + 2) * 1024))  # B: 1 KB a tile per 16 columns; A: 2 KB a tile
    if most >= 64:
        most = most // 64 * 64
    return min(k // 32, max(multiple, most // multiple * multiple))


def amx_swiglu_add(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, scale: torch.Tensor | None,
                   w13, w2) -> None:
    """out[rows] += scale[:, None] * expert(x[rows]) for one SwiGLU expert, w2 · (silu(w1 · x) * (w3 · x)), on AMX
    tiles (amx.c), gathering the rows and scattering the result inside the kernel. out float32 [*, dim]; x bf16
    [*, dim]; rows int64 [n], each row once (None: x's rows in order); scale float32 [n] (None: 1). w13 [2H, dim]
    and w2 [dim, H]: bf16 tensors, or int8/int4 weights (`mixtral.quant.QuantizedWeight`, see
    `amx_quantized_fits`), which amx.c expands a block of rows at a time between reading them and multiplying
    them. The products accumulate in float32 and silu(gate) * up is rounded to bf16 once (torch's path rounds the
    gate, the up projection and silu(gate) each, and the expert's output)."""
    n = len(rows) if rows is not None else len(x)
    quantized = not isinstance(w13, torch.Tensor)
    dim, hidden = (w2.out_features, w2.in_features) if quantized else w2.shape
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape[1] == dim and x.is_contiguous()
    columns = -(-n // 16) * 16
    kc1, kc2 = _k_chunk(dim, columns, _group_tiles(w13)), _k_chunk(hidden, columns, _group_tiles(w2))
    partial1 = _scratch_buffer("partial1", 2 * hidden * columns, torch.float32) if kc1 < dim // 32 else None
    partial2 = _scratch_buffer("partial2", dim * columns, torch.float32) if kc2 < hidden // 32 else None
    packed_x = _scratch_buffer("packed_x", dim * columns, torch.bfloat16)
    packed_h = _scratch_buffer("packed_h", hidden * columns, torch.bfloat16)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()

    def address(t: torch.Tensor | None):
        return t.data_ptr() if t is not None else None

    def weight(w) -> tuple:  # amx.c's (bf16, q, scale, zero, group)
        if isinstance(w, torch.Tensor):
            return w.data_ptr(), None, None, None, 0
        parts = [w.qweight, w.scales.to(torch.bfloat16), w.zeros]  # .to: int8 scales follow the model's dtype
        keep.extend(parts)
        q, s, z = (address(t.contiguous() if t is not None else None) for t in parts)
        return None, q, s, z, w.group_size or 0

    keep: list[torch.Tensor] = []  # the converted scales live until the call returns
    _library().amx_swiglu(x.data_ptr(), address(rows), address(scale), n, columns, dim, hidden, out.data_ptr(),
                          address(partial1), address(partial2), packed_x.data_ptr(), packed_h.data_ptr(), kc1, kc2,
                          torch.get_num_threads(), *weight(w13), *weight(w2))


def _group_tiles(w) -> int:
    """Tiles of 32 along K that a chunk must be a multiple of: whole groups of an int4 weight, else 1."""
    return (w.group_size // 32) if getattr(w, "mode", None) == "int4" else 1


def amx_quantized_fits(x: torch.Tensor, w13, w2) -> bool:
    """Whether `amx_swiglu_add` takes this expert as quantized weights: `mixtral.quant` int8 (per-row scales) or
    int4 (group-wise, no padding columns) weights, both of one mode, bf16 inference where amx.c runs, dim and
    hidden multiples of 32."""
    mode = getattr(w13, "mode", None)
    if not (mode in ("int8", "int4") and getattr(w2, "mode", None) == mode and amx_available()):
        return False
    dim, hidden = w2.out_features, w2.in_features
    return (bf16_activations(x) and w13.out_features == 2 * hidden and w13.in_features == dim
            and dim % 32 == 0 and hidden % 32 == 0 and w13.padding == 0 and w2.padding == 0
            and w13.qweight.is_contiguous() and w2.qweight.is_contiguous() and len(x) > 0)


def amx_takes(x: torch.Tensor, w13, w2, rows: int) -> bool:
    """Whether an expert fed `rows` of x runs in amx.c: bf16 weights from AMX_EXPERT_ROWS rows, int8 and int4 from
    AMX_INT8_EXPERT_ROWS and AMX_INT4_EXPERT_ROWS, where `amx_swiglu_fits` / `amx_quantized_fits` say it can."""
    if isinstance(w13, torch.Tensor):
        return rows >= AMX_EXPERT_ROWS and amx_swiglu_fits(x, w13, w2)
    least = {"int8": AMX_INT8_EXPERT_ROWS, "int4": AMX_INT4_EXPERT_ROWS}.get(getattr(w13, "mode", None))
    return least is not None and rows >= least and amx_quantized_fits(x, w13, w2)


def amx_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on AMX tiles: x [n, dim] bf16 -> [n, dim] bf16 (see `amx_swiglu_add`)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    amx_swiglu_add(out, x.contiguous(), None, None, w13, w2)
    return out.to(torch.bfloat16)


# ---- int4, group-wise ------------------------------------------------------------------------------------------
# w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g] for the group g = k // group_size, q in [0, 15]; scale and
# zero bfloat16 (the convention of mixtral.quant's files).

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
    _library().gemv_int4(xk.data_ptr(), m, packed.data_ptr(), scale.data_ptr(), n, k, k // groups, y.data_ptr(),
                         torch.get_num_threads(), int(pairs))
    group_sums = x.float().view(m, groups, k // groups).sum(-1)  # [M, groups]
    return y.addmm_(group_sums, bias)


# ---- huge pages ------------------------------------------------------------------------------------------------
# Decoding streams every active weight from memory once per token. With 4 KB pages that is a TLB miss every 4 KB,
# and on a cold cache the page walks themselves miss: on the 2-core Xeon of 2026-12-01 one row through the int4
# 28672x4096 matrix read at 15.6 GB/s from 4 KB pages and 18.0 from 2 MB ones (benchmarks/cold_gemv.py; bf16 moved
# within noise there, 28.0 -> 32.5 GB/s in a C harness of the same kernel; docs/performance.md). Linux backs
# anonymous memory with 2 MB pages only where asked when THP is in "madvise" mode, the common default, so the
# weights ask.

_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # <sys/mman.h>; MADV_COLLAPSE needs Linux 6.1
_HUGE_PAGE = 2 << 20


def prefer_huge_pages(module: torch.nn.Module, *, collapse: bool = False, min_bytes: int = 4 * _HUGE_PAGE) -> int:
    """Ask Linux to back the CPU weights of `module` (parameters and buffers of at least `min_bytes`) with 2 MB
    pages. Call it on freshly allocated, untouched weights (`to_empty`) and their first write faults in 2 MB pages
    at no cost; `collapse` also rewrites memory already written (MADV_COLLAPSE, Linux 6.1+: about 0.4 GB/s here,
    so only for weights made in memory, such as quantize-on-load). Returns the bytes advised. A hint only: nothing
    changes where the kernel refuses (other OS, THP "never"), and MIXTRAL_HUGE_PAGES=0 turns it off."""
    if os.environ.get("MIXTRAL_HUGE_PAGES", "1") == "0" or not Path("/proc/self/maps").exists():
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    seen, advised = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.nbytes() < min_bytes or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        start = -(-storage.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the whole 2 MB pages inside the storage
        end = (storage.data_ptr() + storage.nbytes()) // _HUGE_PAGE * _HUGE_PAGE
        if end - start >= _HUGE_PAGE and libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0:
            if collapse:
                libc.madvise(start, end - start, _MADV_COLLAPSE)  # best effort: the hint above stays either way
            advised += end - start
    if seen and not advised:
        log.info("the OS declined 2 MB pages for the weights; decoding reads them from 4 KB pages")
    return advised


_scratch = threading.local()


def _output(n: int, k: int, scratch: bool) -> torch.Tensor:
    """A bf16 [n, k] tensor for a dequantizer to fill. With `scratch`, a view of one buffer per thread that the
    next scratch call overwrites: a fresh 100+ MB tensor costs ten times the dequantization itself here (the
    allocator maps new pages for it, and each first touch faults: 39 ms against 3.4 ms for 14336 x 4096)."""
    if not scratch:
        return torch.empty(n, k, dtype=torch.bfloat16)
    return _scratch_buffer("dequant", n * k, torch.bfloat16).view(n, k)


def _scratch_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A view of `numel` elements of this thread's reused buffer `name` (see `_output`: fresh multi-MB tensors
    fault in their pages on every call; at 128 rows an expert's 20 MB of scratch for amx.c cost several ms each
    time)."""
    buffers = _scratch.__dict__.setdefault("named", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of an int4 weight in `pack_int4`'s layout (scale, zero bfloat16 [N, K/G]); contiguous
    inputs. scratch: write into this thread's reused buffer (valid until the next scratch call; not for autograd)."""
    n, half = packed.shape
    groups = scale.shape[1]
    assert scale.dtype == zero.dtype == torch.bfloat16 and packed.dtype == torch.uint8
    assert packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    out = _output(n, half * 2, scratch)
    _library().dequant_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, half * 2,
                            half * 2 // groups, out.data_ptr(), torch.get_num_threads())
    return out


def dequant_int8(q: torch.Tensor, scale: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of an int8 weight q [N, K] with a bfloat16 scale per row [N]; contiguous inputs;
    scratch as in `dequant_int4`."""
    n, k = q.shape
    assert scale.dtype == torch.bfloat16 and q.dtype == torch.int8 and q.is_contiguous() and scale.is_contiguous()
    out = _output(n, k, scratch)
    _library().dequant_int8(q.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out

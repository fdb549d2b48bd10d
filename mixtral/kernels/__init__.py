"""Small CPU kernels for decoding, built at first use with the machine's C compiler and called through ctypes.

`matmul(x, w)` computes x · wᵀ like `F.linear`. For a few rows of x and bf16 weights on a CPU with AVX512-BF16 it
runs `gemv.c`, which reads each weight once for all rows (PyTorch's bf16 GEMM reaches about half the memory
bandwidth at one token a step on these machines; see docs/performance.md). Everything else, and every machine
where the kernel cannot be built, goes to `F.linear` — logged once, never silently wrong.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("mixtral")

MAX_ROWS = 8  # beyond this many rows of x, torch's GEMM is as fast or faster (docs/performance.md)
_SOURCE = Path(__file__).with_name("gemv.c")


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged) when they cannot be used here."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        log.info("mixtral kernels disabled by MIXTRAL_KERNELS=0; using torch's linear")
        return None
    if not _cpu_has("avx512_bf16"):
        log.info("this CPU has no AVX512-BF16; decoding uses torch's linear")
        return None
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(os.environ.get("MIXTRAL_CACHE", Path.home() / ".cache" / "mixtral")) / "kernels"
    lib = cache / f"gemv-{tag}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            cmd = [os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                   str(_SOURCE), "-o", str(out)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                log.warning("could not build mixtral's CPU kernels (%s); using torch's linear", detail.strip()[:300])
                return None
            os.replace(out, lib)  # atomic: a concurrent process sees the whole library or none
    library = ctypes.CDLL(str(lib))
    library.gemv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_int]
    library.gemv_bf16.restype = None
    library.gemv_int4.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    library.gemv_int4.restype = None
    return library


def available() -> bool:
    return _library() is not None


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 · w [N, K] bf16 ᵀ -> [M, N] float32, through gemv.c. Contiguous CPU tensors, K % 32 == 0."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _library().gemv_bf16(x.data_ptr(), m, w.data_ptr(), n, k, y.data_ptr(), torch.get_num_threads())
    return y


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ for x [..., K] and w [N, K], in x's dtype: F.linear, or gemv.c where it is faster."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if (w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and not needs_grad and w.device.type == "cpu" and w.shape[1] % 32 == 0 and w.is_contiguous()
            and x.numel() // w.shape[1] <= MAX_ROWS and _library() is not None):
        flat = x.reshape(-1, w.shape[1]).contiguous()
        return gemv_bf16(flat, w).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)



# ---- int4, group-wise ------------------------------------------------------------------------------------------
# w[n, k] = q[n, k] * scale[n, g] + offset[n, g] for the group g = k // group_size, q in [0, 15].

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 15] -> uint8 [N, K/2] in gemv.c's layout: for each block of 32 weights, byte i holds
    weight i (low nibble) and weight 16 + i (high nibble). K must be a multiple of 32."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [N, K/2] -> uint8 [N, K] in [0, 15]."""
    n, half = packed.shape
    blocks = packed.view(n, half // 16, 16)
    return torch.stack([blocks & 0xF, blocks >> 4], dim=2).reshape(n, half * 2)


def int4_bias(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """What `gemv_int4` adds back per group, [groups, N] float32: the offsets minus the 128 of the kernel's bias.
    Computed once when a weight is quantized."""
    return (offset - 128 * scale).t().contiguous().float()


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, K] · wᵀ for the int4 weight (packed uint8 [N, K/2], scale float32 [N, K/G], bias = `int4_bias(...)`)
    -> [M, N] float32.

    The kernel returns sum_g scale * sum (128 + q) x; the offsets and the 128 come back as one small product of
    the per-group sums of x with `bias` (see gemv.c)."""
    m, k = x.shape
    n, groups = scale.shape
    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    _library().gemv_int4(x.data_ptr(), m, packed.data_ptr(), scale.data_ptr(), n, k, k // groups, y.data_ptr(),
                         torch.get_num_threads())
    group_sums = x.float().view(m, groups, k // groups).sum(-1)  # [M, groups]
    return y.addmm_(group_sums, bias)


def int4_applies(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    """Whether `gemv_int4` serves this product: a few rows, on a CPU where the kernels are built."""
    k = packed.shape[1] * 2
    return (packed.device.type == "cpu" and k % 32 == 0 and group_size % 32 == 0 and k % group_size == 0
            and x.numel() // k <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
            and _library() is not None)

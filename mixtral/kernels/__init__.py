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


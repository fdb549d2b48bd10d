"""Build and load the C kernels (gemv.c, amx.c, lowbit.c) with the machine's compiler, and probe the CPU they run on.

`library()` compiles the sources at first use with -march=native into a cache directory keyed by their hash
(MIXTRAL_CACHE, default ~/.cache/mixtral) and loads the result through ctypes; it returns None, logged once,
where the kernels are disabled (MIXTRAL_KERNELS=0) or cannot be built (no C compiler). The loaded library says
what it holds: `has_gemv` (gemv.c's AVX512-BF16 kernels were compiled: the CPU has AVX512-BF16) and `has_amx`
(amx.c was compiled for AMX and Linux granted this process the tile state). The dequantizers are plain C and are
in every build. Which of these the products use is `mixtral.kernels.policy`'s decision, not this module's.
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

log = logging.getLogger("mixtral")

SOURCES = [Path(__file__).with_name(name) for name in ("gemv.c", "amx.c", "lowbit.c")]
HEADERS = [Path(__file__).with_name("bf16.h")]  # included by the sources: part of the build's hash


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (False where there is no /proc: other OSes)."""
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def cache_sizes() -> dict[int, int]:
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
    return max(cache_sizes().values(), default=0)


def _compile(lib: Path, extra: list[str]) -> bool:
    """Compile SOURCES into `lib`; False (logged) where the compiler is missing or fails.

    The compiler writes a temporary file that is renamed into place (atomic: a concurrent process sees the whole
    library or none). Not through mixtral.io.files, which the backend may not import (it sits below mixtral.io).
    """
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
               *extra, *map(str, SOURCES), "-o", str(out)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("could not build mixtral's CPU kernels (%s); using torch's linear", detail.strip()[:300])
            return False
        os.replace(out, lib)
    return True


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their argument types set, or None (logged) when they cannot be used here."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        log.info("mixtral kernels disabled by MIXTRAL_KERNELS=0; using torch's linear")
        return None
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    extra = os.environ.get("MIXTRAL_KERNEL_CFLAGS", "").split()  # for benchmarks (gemv.c's PREFETCH_ROWS)
    tag = hashlib.sha256(source + " ".join(extra).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MIXTRAL_CACHE", Path.home() / ".cache" / "mixtral")) / "kernels"
    lib = cache / f"gemv-{tag}.so"
    if not lib.exists() and not _compile(lib, extra):
        return None
    library = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    library.dequant_int4.argtypes = [p, p, p, i, i, i, p, i]
    library.dequant_int8.argtypes = [p, p, i, i, p, i]
    library.dequant_lowbit.argtypes = [p, p, p, i, i, i, i, p, i]
    library.dequant_int4.restype = library.dequant_int8.restype = library.dequant_lowbit.restype = None
    library.amx_call_layout.argtypes = [p, i]
    library.amx_call_layout.restype = i
    # amx_request is called once per process: it asks Linux for the tile state (arch_prctl), and returns -1 where
    # amx.c was not compiled for AMX.
    library.has_amx = cpu_has("amx_bf16") and library.amx_request() == 0
    if library.has_amx:
        library.amx_swiglu.argtypes = [p]  # an amx_call (mixtral.kernels.amx._Call)
        library.amx_swiglu.restype = None
    elif cpu_has("amx_bf16"):
        log.info("the CPU has AMX but the kernels were not built for it; experts use torch's GEMM")
    library.has_gemv = cpu_has("avx512_bf16")  # gemv.c compiles its kernels only where -march=native has it
    if not library.has_gemv:
        log.info("this CPU has no AVX512-BF16; decoding uses torch's linear")
        return library
    library.gemv_bf16.argtypes = [p, i, p, i, i, p, i]
    library.gemv_bf16.restype = None
    library.gemv_int4.argtypes = [p, i, p, p, i, i, i, p, i, i]
    library.gemv_int4.restype = None
    library.gemv_lowbit.argtypes = [p, i, p, p, p, i, i, i, i, p, i, i]
    library.gemv_lowbit.restype = i
    library.lowbit_int8_built.restype = i
    library.has_lowbit_int8 = bool(library.lowbit_int8_built())
    return library

"""Memory for the kernels: 2 MB pages for the weights, and per-thread scratch buffers reused from call to call.

Huge pages: decoding streams every active weight from memory once per token. With 4 KB pages that is a TLB miss
every 4 KB, and on a cold cache the page walks themselves miss: on the 2-core Xeon of 2026-12-01 one row through
the int4 28672x4096 matrix read at 15.6 GB/s from 4 KB pages and 18.0 from 2 MB ones (`mixtral bench cold-gemv`;
bf16 moved within noise there, 28.0 -> 32.5 GB/s in a C harness of the same kernel; docs/performance.md). Linux
backs anonymous memory with 2 MB pages only where asked when THP is in "madvise" mode, the common default, so the
weights ask.

Scratch: a fresh 100+ MB tensor costs ten times the work that fills it here (the allocator maps new pages for it,
and each first touch faults: 39 ms against 3.4 ms to expand a 14336 x 4096 weight to bf16), and at 128 rows an
expert's 20 MB of scratch for amx.c cost several ms each time. So the kernels write into one buffer per name and
thread, grown as needed and never freed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("mixtral")

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


def scratch_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A view of `numel` elements of this thread's reused buffer `name`, valid until the next call for that name
    in this thread (never hand one to autograd)."""
    buffers = _scratch.__dict__.setdefault("named", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]

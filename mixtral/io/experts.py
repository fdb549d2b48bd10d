"""Expert files: one file per MoE layer holding its experts, laid out so that one read brings one expert.

    [header: 8-byte little-endian length n, then n bytes of JSON, zero-padded to a multiple of 4096]
    [record of expert 0][record of expert 1]...            each `record_bytes` long, a multiple of 4096

A record holds every buffer of the expert's w13 ([2·hidden, dim]) and w2 ([dim, hidden]) back to back, each at a
64-byte aligned offset: for a quantized stack (`mixtral.quant.QuantizedExperts`) the module's buffers as they are
in memory, the derived int4 bias included, so a record read into memory is ready for the kernels with no compute;
for an unquantized stack the one tensor ("weight"). The header says what the records hold:

    {"format": "mixtral-experts", "format_version": 1, "layer": 3, "n_experts": 8, "record_bytes": 1052672,
     "matrices": {"w13": {"mode": "int4", "group_size": 128, "out_features": 256, "in_features": 64,
                          "buffers": {"qweight": {"dtype": "uint8", "shape": [256, 64], "offset": 0}, ...}},
                  "w2": {...}}}
    (mode null: unquantized, one buffer "weight")

Records start at 4096-byte offsets and are whole pages long so they can be read with O_DIRECT (bypassing the page
cache, which would otherwise fill up with experts the engine already holds in its own slots, and evict the rest
of the machine's working set) into page-aligned buffers (`aligned_buffer`).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import random
import struct
import threading
import time
from pathlib import Path

import torch

from mixtral import quant
from mixtral.errors import CheckpointError, InputError
from mixtral.io.files import atomic_open
from mixtral.kernels import QuantizedWeight

FORMAT = "mixtral-experts"
FORMAT_VERSION = 1
PAGE = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the logical block size (<= 4096)
_ALIGN = 64  # each buffer's offset in a record: a cache line, what the vector kernels' loads like
_LENGTH = struct.Struct("<Q")
_QUANTIZED_BUFFERS = tuple(f.name for f in dataclasses.fields(QuantizedWeight)
                           if f.name in ("qweight", "scales", "zeros", "bias"))


def file_name(layer: int) -> str:
    """The name of layer `layer`'s expert file in a directory of them."""
    return f"layer-{layer:03d}.experts"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of `nbytes` whose memory starts on a page (anonymous mmap), as O_DIRECT reads need.
    Private, not mmap's default shared mapping: shared anonymous memory is shmem, which Linux counts as page cache
    ("Cached") and does not back with transparent huge pages."""
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE") and nbytes >= 2 << 20:
        buffer.madvise(mmap.MADV_HUGEPAGE)  # large records: fewer TLB misses for the kernels that read them
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)


# ---- the layout of a record --------------------------------------------------------------------------------------

def _stack_buffers(stack) -> dict[str, torch.Tensor]:
    """name -> [n_experts, ...] tensor of every buffer of one stack: a QuantizedExperts' buffers that exist (any
    mode), or an unquantized stack itself as "weight"."""
    if isinstance(stack, quant.QuantizedExperts):
        return {name: b for name, b in stack.named_buffers(recurse=False) if b is not None}
    if isinstance(stack, torch.Tensor) and stack.dim() == 3:
        return {"weight": stack}
    raise InputError(f"expert weights are a QuantizedExperts or a float tensor [n_experts, out, in], "
                     f"not {type(stack).__name__}")


def _matrix_header(stack, offset: int) -> tuple[dict, int]:
    """The header entry of one stack (each buffer at its offset in the record, from `offset`), and the offset
    after it."""
    stack_buffers = _stack_buffers(stack)
    if isinstance(stack, quant.QuantizedExperts):
        entry = {"mode": stack.mode, "group_size": stack.group_size, "out_features": stack.out_features,
                 "in_features": stack.in_features}
    else:
        entry = {"mode": None, "group_size": None, "out_features": stack.shape[1], "in_features": stack.shape[2]}
    buffers = {}
    for name, b in stack_buffers.items():
        offset = _round_up(offset, _ALIGN)
        buffers[name] = {"dtype": str(b.dtype).removeprefix("torch."), "shape": list(b.shape[1:]), "offset": offset}
        offset += b[0].numel() * b.element_size()
    entry["buffers"] = buffers
    return entry, offset


def _layout(w13, w2, layer: int) -> dict:
    n_experts = len(w13)
    if len(w2) != n_experts:
        raise InputError(f"layer {layer}: w13 has {n_experts} experts, w2 {len(w2)}")
    matrices, offset = {}, 0
    for name, stack in (("w13", w13), ("w2", w2)):
        matrices[name], offset = _matrix_header(stack, offset)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": layer, "n_experts": n_experts,
            "record_bytes": _round_up(max(offset, 1), PAGE), "matrices": matrices}


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return (_LENGTH.pack(len(text)) + text).ljust(_round_up(_LENGTH.size + len(text), PAGE), b"\0")


def write_layer_experts(path: str | os.PathLike, w13, w2, *, layer: int) -> Path:
    """Write one layer's experts to `path` atomically, one record at a time (memory: one record, never a copy of
    the stacks). w13 [n_experts, 2·hidden, dim] and w2 [n_experts, dim, hidden]: both `quant.QuantizedExperts`
    (any mode) or both float tensors. Returns the path. Raises InputError for stacks that do not go together."""
    path = Path(path)
    header = _layout(w13, w2, layer)
    stacks = [(header["matrices"][name], _stack_buffers(stack)) for name, stack in (("w13", w13), ("w2", w2))]
    record = torch.zeros(header["record_bytes"], dtype=torch.uint8)
    with atomic_open(path, "wb") as f:
        f.write(_header_bytes(header))
        for e in range(header["n_experts"]):
            for entry, buffers in stacks:
                for name, spec in entry["buffers"].items():
                    data = buffers[name][e].detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                    record[spec["offset"]:spec["offset"] + len(data)].copy_(data)
            f.write(memoryview(record.numpy()))
    return path


# ---- reading -----------------------------------------------------------------------------------------------------

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                         torch.float32, torch.float16, torch.bfloat16)}


class ExpertFile:
    """One layer's expert file, opened and checked. Reads one expert's record at a time (`read_into`) into a
    page-aligned buffer, through O_DIRECT where the filesystem takes it (else buffered, with the pages dropped
    from the cache after each read; `direct=False` asks for that too); `views` turns a read record into the
    weights the kernels take.
    Thread-safe: reads are positional. A context manager; `close()` closes the file.

    Raises CheckpointError naming the file for a missing file, a header that is not one, a format version this
    code does not read, or a file shorter or longer than its header says."""

    def __init__(self, path: str | os.PathLike, *, direct: bool = True):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                header = self._read_header(f)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: expert file not found") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, not an expert file") from None
        self.header = header
        self.layer: int = header["layer"]
        self.n_experts: int = header["n_experts"]
        self.record_bytes: int = header["record_bytes"]
        self.matrices: dict = header["matrices"]
        self.data_offset = self._header_size
        expected = self.data_offset + self.n_experts * self.record_bytes
        if size != expected:
            raise CheckpointError(f"{self.path}: {size} bytes, but its header says {self.n_experts} records of "
                                  f"{self.record_bytes} bytes after a {self.data_offset}-byte header ({expected} "
                                  f"bytes): the file is {'truncated' if size < expected else 'too long'}")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._direct_fd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT: buffered reads then
                self._direct_fd = None

    def _read_header(self, f) -> dict:
        start = f.read(_LENGTH.size)
        if len(start) < _LENGTH.size:
            raise CheckpointError(f"{self.path}: too short to be an expert file ({len(start)} bytes)")
        (length,) = _LENGTH.unpack(start)
        if length > 1 << 24:
            raise CheckpointError(f"{self.path}: not an expert file (header length {length})")
        text = f.read(length)
        try:
            header = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise CheckpointError(f"{self.path}: not an expert file (format {found!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: expert file format_version {header.get('format_version')!r}; this "
                                  f"version of mixtral reads {FORMAT_VERSION}")
        try:
            self._check_header(header)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: bad header ({type(e).__name__}: {e})") from None
        self._header_size = _round_up(_LENGTH.size + length, PAGE)
        return header

    def _check_header(self, header: dict) -> None:
        for key in ("layer", "n_experts", "record_bytes"):
            if not isinstance(header[key], int) or header[key] < 0:
                raise ValueError(f"{key} is {header[key]!r}")
        if header["record_bytes"] % PAGE:
            raise ValueError(f"record_bytes {header['record_bytes']} is not a multiple of {PAGE}")
        for name in ("w13", "w2"):
            entry = header["matrices"][name]
            if entry["mode"] is not None and entry["mode"] not in quant.MODES:
                raise ValueError(f"{name}: unknown mode {entry['mode']!r}")
            for buffer, spec in entry["buffers"].items():
                if spec["dtype"] not in _DTYPES:
                    raise ValueError(f"{name}.{buffer}: unknown dtype {spec['dtype']!r}")
                end = spec["offset"] + _DTYPES[spec["dtype"]].itemsize * _numel(spec["shape"])
                if spec["offset"] % _ALIGN or end > header["record_bytes"]:
                    raise ValueError(f"{name}.{buffer} does not lie aligned inside the record")

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (O_DIRECT)."""
        return self._direct_fd is not None

    def __enter__(self) -> "ExpertFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None

    def read_into(self, e: int, buffer: torch.Tensor) -> None:
        """Read expert `e`'s record into `buffer` (uint8, contiguous, at least `record_bytes`; page-aligned for
        O_DIRECT, see `aligned_buffer`). Releases the GIL while reading. Raises CheckpointError naming the file and
        expert on a short read (the file changed since it was opened), IndexError for an expert out of range."""
        if not 0 <= e < self.n_experts:
            raise IndexError(f"{self.path}: expert {e} out of range (the file holds {self.n_experts})")
        assert buffer.dtype == torch.uint8 and buffer.is_contiguous() and len(buffer) >= self.record_bytes, \
            (buffer.dtype, buffer.shape, self.record_bytes)
        target = memoryview(buffer[:self.record_bytes].numpy())
        offset = self.data_offset + e * self.record_bytes
        direct = self._direct_fd is not None and buffer.data_ptr() % PAGE == 0
        if direct:
            try:
                done = self._read_fully(self._direct_fd, target, offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                # Some filesystems open with O_DIRECT but refuse the reads: buffered from now on.
                os.close(self._direct_fd)
                self._direct_fd, direct = None, False
        if not direct:
            done = self._read_fully(self._fd, target, offset)
            # Keep the page cache for the rest of the machine: the engine holds what it read in its own slots.
            if hasattr(os, "posix_fadvise"):  # not on macOS
                os.posix_fadvise(self._fd, offset, self.record_bytes, os.POSIX_FADV_DONTNEED)
        if done < self.record_bytes:
            raise CheckpointError(f"{self.path}: short read of expert {e}: {done} of {self.record_bytes} bytes "
                                  f"(the file was truncated after it was opened)")

    @staticmethod
    def _read_fully(fd: int, target: memoryview, offset: int) -> int:
        done = 0
        while done < len(target):
            n = os.preadv(fd, [target[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def views(self, buffer: torch.Tensor, dtype: torch.dtype | None = None) -> tuple:
        """(w13, w2) of the record in `buffer`: `kernels.QuantizedWeight`s or float tensors viewing its memory
        (no copy). dtype: the model's float dtype; float buffers stored in another (an unquantized weight, int8
        scales) are converted, which copies them."""
        return tuple(self._matrix(self.matrices[name], buffer, dtype) for name in ("w13", "w2"))

    def _matrix(self, entry: dict, buffer: torch.Tensor, dtype: torch.dtype | None):
        tensors = {}
        for name, spec in entry["buffers"].items():
            stored = _DTYPES[spec["dtype"]]
            nbytes = stored.itemsize * _numel(spec["shape"])
            t = buffer[spec["offset"]:spec["offset"] + nbytes].view(stored).view(spec["shape"])
            if dtype is not None and stored != dtype and name in _MODEL_DTYPE_BUFFERS.get(entry["mode"], ()):
                t = t.to(dtype)
            tensors[name] = t
        if entry["mode"] is None:
            return tensors["weight"]
        return QuantizedWeight(entry["mode"], tensors["qweight"], tensors["scales"], tensors.get("zeros"),
                               tensors.get("bias"), entry["group_size"], entry["out_features"], entry["in_features"])

    def read_stack_into(self, w13, w2, experts: range | None = None) -> None:
        """Fill a resident pair of stacks (QuantizedExperts, or float tensors [n_experts, out, in]) with every
        expert of this file, or (`experts`) with those of a range, into slots 0, 1, ...: a process's share. One
        record at a time (memory: one record). Float buffers are converted to the stacks' dtypes. Raises
        CheckpointError naming the file when the stacks do not match the file's layout, IndexError for a range
        beyond the file's experts."""
        experts = range(self.n_experts) if experts is None else experts
        targets = {"w13": _stack_buffers(w13), "w2": _stack_buffers(w2)}
        for name, stack in (("w13", w13), ("w2", w2)):
            entry = self.matrices[name]
            mode = stack.mode if isinstance(stack, quant.QuantizedExperts) else None
            group = stack.group_size if mode is not None else None
            have = {k: list(b.shape) for k, b in targets[name].items()}
            want = {k: [len(experts)] + spec["shape"] for k, spec in entry["buffers"].items()}
            if (entry["mode"], entry["group_size"]) != (mode, group) or have != want:
                raise CheckpointError(f"{self.path}: {name} is {entry['mode'] or 'unquantized'} (group "
                                      f"{entry['group_size']}) with buffers {want}, but the model has "
                                      f"{mode or 'unquantized'} (group {group}) with buffers {have}")
        record = aligned_buffer(self.record_bytes)
        with torch.no_grad():
            for slot, e in enumerate(experts):
                self.read_into(e, record)
                for name, matrix in zip(("w13", "w2"), self.views(record)):
                    parts = {"weight": matrix} if isinstance(matrix, torch.Tensor) else \
                        {k: getattr(matrix, k) for k in _QUANTIZED_BUFFERS if getattr(matrix, k) is not None}
                    for k, t in parts.items():
                        targets[name][k][slot].copy_(t)

    def __repr__(self) -> str:
        w13 = self.matrices["w13"]
        return (f"ExpertFile({str(self.path)!r}, layer={self.layer}, n_experts={self.n_experts}, "
                f"mode={w13['mode']}, record_bytes={self.record_bytes})")


# The float buffers kept in the model's dtype (`mixtral.quant.Quantized`): the others have a dtype of their own.
_MODEL_DTYPE_BUFFERS = {None: ("weight",), "int8": ("scales",)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def open_expert_files(paths) -> list[ExpertFile]:
    """The ExpertFile of each path (all closed again if one fails to open). Raises CheckpointError."""
    files = []
    try:
        for path in paths:
            files.append(ExpertFile(path))
    except BaseException:
        for file in files:
            file.close()
        raise
    return files


def read_speed(files: list[ExpertFile], reads: int = 32, threads: int = 2, seed: int = 0) -> float:
    """Bytes/s of reading `reads` records chosen at random from `files` (as the offloading engine reads them:
    `read_into` a page-aligned buffer, O_DIRECT where the filesystem takes it) by `threads` readers at once, the
    engine's model thread and loader. The disk roofline of the engine's reads, measured on its own files."""
    picks = random.Random(seed).choices([(f, e) for f in files for e in range(f.n_experts)], k=reads)
    record = max(f.record_bytes for f in files)
    buffers = [aligned_buffer(record) for _ in range(threads)]

    def reader(i: int) -> None:
        for file, e in picks[i::threads]:
            file.read_into(e, buffers[i])
    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(f.record_bytes for f, _ in picks) / (time.perf_counter() - start)

"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Everything mixtral writes for a user (checkpoints, quantized models, shards, reports, plots, benchmark results)
goes through these, so an interruption (Ctrl-C, a full disk, a killed job) never leaves a truncated file where a
good one was, and a reader never sees half a file. The content is written under a temporary name in the same
directory (so the rename stays on one filesystem), flushed to disk, then renamed over the destination.

    with atomic_path(out / "curves.png") as tmp:     # for libraries that write to a path they are given
        fig.savefig(tmp)
    with atomic_open(path, "wb") as f:               # for writing a stream
        f.write(header)
    write_json(path, data)                           # the common cases
    with atomic_directory(out / "step_000100") as tmp:  # a directory, renamed into place as a whole
        save_hf(model, tmp)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _temporary_name(path: Path) -> Path:
    # Hidden, unique per process, and ending in the destination's own suffix: tools that pick a format by the
    # extension (matplotlib's savefig, numpy's savez) then write what the final name says.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 is for a private temporary, not for what it becomes
    return Path(name)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file to; on a normal exit it is synced and renamed to
    `path`, on an exception removed (an existing `path` is then left as it was). The parent directory must
    exist."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` that writes to a temporary file renamed into place when the block ends normally."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """`data` as JSON (UTF-8, a final newline), atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directory entries, to disk."""
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path` to fill; on a normal exit its files are synced and it takes
    the name `path` (an existing `path` is removed first when `replace`, else FileExistsError), on an exception
    it is removed. Readers see the old directory or the new one, never a mix; between the removal of the old one
    and the rename, for a moment, neither."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for a private temporary, not for what it becomes
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists")
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)  # `old` is an empty directory: replace() moves `path` onto it
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

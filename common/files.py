"""File writes that never leave half a file, and content digests of input files."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import DiskFull


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for None): what a stage key holds for an input file, so that a file
    replaced at the same path is a different input."""
    if path is None:
        return None
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) then rename tmp -> path: a reader sees the old file or the new one, never half of one.
    A failed write leaves no temp file; a full disk is a DiskFull error naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {path}", "free some space and rerun; finished stages are "
                           "kept") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))



def replace_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """fill(tmp_dir), then swap it in for `path`: the directory holds this run's files only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {path}", "free some space and rerun") from e
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path

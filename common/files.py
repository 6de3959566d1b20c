"""File writes that never leave half a file, content digests of input files, and YAML files read with one-line
errors."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from common.errors import ConfigError, DiskFull, RunError


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


def _write_failed(path: Path, exc: BaseException) -> RunError | None:
    """The one-line error of a failed write: an OSError ENOSPC, or the RuntimeError that torch.save's C++
    writer raises instead of one ('[enforce fail at inline_container.cc] unexpected pos', 'failed writing');
    None for any other error."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        nospace = True
    elif isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "failed writing" in str(exc)):
        try:                                          # the partial temp file is still there: the disk is full now
            nospace = shutil.disk_usage(path.parent).free < (64 << 20)
        except OSError:
            nospace = False
        if not nospace:
            return RunError(f"writing {path} failed ({str(exc).splitlines()[0][:120]})",
                            "check the disk holding it; finished stages are kept")
    else:
        return None
    return DiskFull(f"disk full while writing {path}", "free some space and rerun; finished stages are kept")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) then rename tmp -> path: a reader sees the old file or the new one, never half of one.
    tmp has path's own name, inside a private folder beside it (torch.save records the file's name in its
    archive, so the same contents give the same bytes). A failed write leaves no temp file; a full disk is a
    DiskFull error naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    tmp = folder / path.name
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = _write_failed(path, e)
        if full is not None:
            raise full from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def read_yaml(path: str | Path, what: str, hint: str) -> Any:
    """The parsed YAML file; a missing file, a directory, bytes that are not UTF-8 or a YAML syntax error is one
    ConfigError line naming `what` and the file, with `hint`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a directory' if path.is_dir() else 'not found'}; {hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a UTF-8 text file", hint) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {problem}", hint) from None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def replace_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """fill(tmp_dir), then swap it in for `path`: the directory holds this run's files only. A failed fill
    leaves `path` as it was and no temp directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _write_failed(path, e) if isinstance(e, (OSError, RuntimeError)) else None
        if full is not None:
            raise full from e
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _json_scalar(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers for json."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | Path, record: Mapping[str, Any] | list) -> Path:
    """`record` as indented JSON at `path`, written atomically (numpy / torch scalars and paths as numbers and
    strings)."""
    text = json.dumps(record, indent=2, default=_json_scalar) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))

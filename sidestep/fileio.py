"""Atomic file writing: every file we produce appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from sidestep.errors import SidestepError

__all__ = ["sha256_file", "atomic_path", "write_json_atomic", "write_bytes_atomic", "backup_existing", "atomic_dir"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        if err.errno == errno.ENOSPC:
            raise SidestepError(f"The disk is full while writing {path}; nothing was changed there.") from err
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write UTF-8 JSON with a 2-space indent, atomically."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def backup_existing(path: Path) -> Path | None:
    """Copy an existing file to `<name>.bak` before it is replaced, so it is never lost."""
    path = Path(path)
    if not path.exists():
        return None
    bak = path.with_name(path.name + ".bak")
    with atomic_path(bak) as tmp:
        shutil.copy2(path, tmp)
    return bak


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (the old one is removed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (streamed, never read whole)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()

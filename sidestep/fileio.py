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

from sidestep.errors import ConfigError, SidestepError
from sidestep.interrupts import deferred

__all__ = ["sha256_file", "atomic_path", "write_json_atomic", "write_bytes_atomic", "backup_existing", "atomic_dir",
           "write_error_reason", "check_output_dir"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        _fsync(tmp)
        _publish(tmp)
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
        _publish(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    with deferred():  # a Ctrl-C between the two renames would leave neither the old folder nor the new one
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_error_reason(err: BaseException) -> str:
    """Why a write failed, in a few words; torch.save and safetensors report a full disk as RuntimeError."""
    if isinstance(err, SidestepError) and isinstance(err.__cause__, OSError):  # atomic_path's own sentence
        err = err.__cause__
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space left" in text or "StorageFull" in text or "code: 28" in text:
        return "the disk is full"
    if code in (errno.EACCES, errno.EPERM) or "PermissionDenied" in text:
        return "permission denied"
    if code == errno.EROFS:
        return "the file system is read-only"
    if any(m in text for m in ("file write failed", "PytorchStreamWriter failed", "inline_container", "unexpected pos")):
        return "the file could not be written; is the disk full?"
    if isinstance(err, SidestepError):
        return text.rstrip(".")
    lines = text.strip().splitlines()
    return (lines[0][:160] if lines else type(err).__name__).rstrip(".")


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose a folder.")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, so no folder can be made under it; choose another path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {probe} is not writable; choose a folder you can write to.")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask alone would, for all threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give what we wrote the modes of a normal file (0644 / 0755 under umask 022): safetensors and mkstemp create
    0600, which other programs (ComfyUI under another user, a web server) cannot read."""
    mask = _umask()
    if path.is_dir():
        for folder, dirs, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~mask)


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

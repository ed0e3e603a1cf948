"""One sentence for the failures that come from outside sidestep's own error family but that a user can cause.

A full disk, a folder without permission, memory running out, a JSON file nested a thousand deep: these reach
the CLI as OSError, torch allocator errors, RecursionError and the like. `describe` turns each into what
happened, where, and what to do next; anything it does not know stays a traceback (a bug to report).
"""

from __future__ import annotations

import errno
import json
import os

from sidestep.errors import is_out_of_memory

__all__ = ["describe", "DEBUG_HINT"]

DEBUG_HINT = "set SIDESTEP_DEBUG=1 for the full traceback"
_MEMORY_ADVICE = ("turn on --gradient-checkpointing or use --precision bf16, and shorten what one step sees "
                  "(train: --max-latent-length, --batch-size; preprocess: --max-duration)")


def describe(err: BaseException) -> str | None:
    """The one-line message for a foreign failure a user can cause, or None for one that is a bug."""
    if isinstance(err, OSError):
        return _os_error(err)
    if is_out_of_memory(err):
        return f"Ran out of memory ({_first_line(err)}); {_MEMORY_ADVICE}."
    if _is_linalg(err):
        return (f"A matrix decomposition failed ({_first_line(err)}): the data or weights hold degenerate or "
                "non-finite values; check the dataset with `sidestep analyze --skip-bad` or try another --seed.")
    if isinstance(err, json.JSONDecodeError):
        return f"A JSON file is not valid JSON ({err.msg} at line {err.lineno}); fix or remove it."
    if isinstance(err, RecursionError):
        return "An input file is nested too deeply to read (a JSON file with hundreds of levels?); fix or remove it."
    if isinstance(err, OverflowError):
        return f"A number is too large to use ({_first_line(err)}); check the flags and the JSON files given."
    if isinstance(err, UnicodeError):
        return f"A file or name is not valid UTF-8 ({_first_line(err)}); rename or re-save it as UTF-8."
    if _is_write_failure(err):
        return f"A file could not be written ({_first_line(err)}); check that the disk has space and the folder is writable."
    return None


def _os_error(err: OSError) -> str:
    where = _filename(err)
    code = err.errno
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", -1):
        return f"The disk is full (or over quota) while writing {where}; free some space and rerun."
    if code in (errno.EACCES, errno.EPERM):
        return f"Permission denied for {where}; choose a folder you can write to, or fix its permissions."
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; choose another folder."
    if code == errno.ENOTDIR:
        return f"{where}: part of this path is a file, not a folder; choose another path."
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected; choose another path."
    if code == errno.EEXIST:
        return f"{where} already exists; remove it or choose another path."
    if code == errno.ENOENT:
        return f"{where} does not exist; check the path."
    if code == errno.ENAMETOOLONG:
        return f"{where}: the name is too long for this file system; choose a shorter path."
    return f"{where}: {err.strerror or type(err).__name__}."


def _filename(err: OSError) -> str:
    name = err.filename if err.filename is not None else err.filename2
    if name is None:
        return "a file"
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return ascii(str(name))[1:-1] if not str(name).isprintable() else str(name)


def _is_linalg(err: BaseException) -> bool:
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__}
    return "numpy.linalg.LinAlgError" in names or any(n.endswith("_LinAlgError") or n.endswith("linalg.LinAlgError")
                                                      for n in names)


def _is_write_failure(err: BaseException) -> bool:
    # torch.save and safetensors report a failed write as RuntimeError / SafetensorError, not OSError
    text = str(err)
    markers = ("file write failed", "PytorchStreamWriter failed", "inline_container", "StorageFull", "No space left")
    return any(m in text for m in markers)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line[:160]

"""The one exception family the CLI catches; str() of each is one sentence saying what and where."""

from __future__ import annotations

import sys

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "DefaultCPUAllocator")


class SidestepError(Exception):
    """A user-facing error: bad input, missing file, incompatible map. Never a bug."""


class ConfigError(SidestepError):
    """A flag or setting has a value that cannot work."""


class DatasetError(SidestepError):
    """A missing, corrupt or malformed dataset file."""


class CheckpointError(SidestepError):
    """A model folder that cannot be found, read or matched to the architecture."""


class MapError(SidestepError):
    """An unreadable, stale or incompatible fisher_map.json."""


class SettingsError(SidestepError):
    """An unreadable or invalid settings file."""


class AudioError(SidestepError):
    """An audio file that cannot be decoded."""


class Interrupted(SidestepError):
    """The user pressed Ctrl-C; what was running stopped cleanly."""


class TrainingDiverged(SidestepError):
    """The loss became NaN/Inf or blew up; the last good checkpoint was kept."""


def is_out_of_memory(err: BaseException) -> bool:
    """A torch allocator failure (CUDA, MPS or CPU) or Python's MemoryError: the one foreign error every layer
    must recognise, to say which input asked for the memory."""
    if isinstance(err, MemoryError):
        return True
    oom_type = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # torch is not imported for --help
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MARKERS)

"""The one exception family the CLI catches; str() of each is one sentence saying what and where."""

from __future__ import annotations


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

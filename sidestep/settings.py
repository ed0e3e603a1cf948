"""Persistent user settings and the one precedence rule: flag > environment > settings file > default.

This is the only module that reads environment variables for settings. The file lives at
`settings_path()` (`<user config dir>/sidestep/settings.json`, or `$SIDESTEP_CONFIG_DIR/settings.json`).
A corrupt file is reported, never silently replaced: only `reset_settings()` moves it aside.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import platformdirs

from sidestep.errors import ConfigError, SettingsError
from sidestep.fileio import write_json_atomic

__all__ = [
    "ENV_VARS", "SETTING_KEYS", "Resolved", "Settings", "config_dir", "load_settings", "require_checkpoint_dir",
    "reset_settings", "resolve", "save_settings", "set_value", "settings_path",
]

FILE_VERSION = 1
CONFIG_DIR_ENV = "SIDESTEP_CONFIG_DIR"
ENV_VARS: dict[str, str] = {
    "checkpoint_dir": "SIDESTEP_CHECKPOINT_DIR",
    "model": "SIDESTEP_MODEL",
    "device": "SIDESTEP_DEVICE",
    "precision": "SIDESTEP_PRECISION",
}
_FIX = "run `sidestep settings reset` or edit it"


@dataclass(frozen=True)
class Settings:
    """What `sidestep settings set` stores; every command falls back to these when a flag is not given."""

    checkpoint_dir: Path | None = field(
        default=None, metadata={"help": "Folder holding the ACE-Step 1.5 checkpoints (one sub-folder per model)."}
    )
    model: str = field(
        default="base", metadata={"help": "Default model variant or folder name: turbo, base, sft, xl-base, ..."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Compute device: auto, cpu, cuda, cuda:N or mps (empty = auto)."}
    )
    precision: str | None = field(
        default=None, metadata={"help": "Weight/compute precision: auto, bf16, fp16 or fp32 (empty = auto)."}
    )
    first_run_done: bool = field(
        default=False, metadata={"help": "Whether the first-run setup wizard has finished."}
    )

    def __post_init__(self) -> None:
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, Path):
            raise ConfigError(f"Settings.checkpoint_dir must be a Path, got {self.checkpoint_dir!r}.")
        if not isinstance(self.first_run_done, bool):
            raise ConfigError(f"Settings.first_run_done must be True or False, got {self.first_run_done!r}.")
        for key in ("model", "device", "precision"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                ok = isinstance(value, str) and _PARSERS[key](value) == value
            except ValueError as err:
                raise ConfigError(f"Settings.{key} = {value!r}: expected {err}.") from None
            if not ok:
                raise ConfigError(f"Settings.{key} = {value!r} is not in its normal form; build it with set_value.")


SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Settings))


@dataclass(frozen=True)
class Resolved:
    """A setting's effective value and where it came from ("--model", "env SIDESTEP_MODEL", ...)."""

    value: Any
    source: str


def config_dir() -> Path:
    """The folder for settings.json and presets: $SIDESTEP_CONFIG_DIR, else the platform's user config dir."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("sidestep"))


def settings_path() -> Path:
    return config_dir() / "settings.json"


def load_settings() -> Settings:
    """Read the settings file; a missing file gives defaults, a corrupt one raises `SettingsError`."""
    return Settings(**_read_file(settings_path()))


def save_settings(settings: Settings) -> Path:
    """Write `settings` atomically; refuses to overwrite a corrupt file (use `reset_settings` for that)."""
    path = settings_path()
    if path.exists():
        _read_file(path)  # raises SettingsError on a corrupt file, which must not vanish silently
    _write(path, settings)
    return path


def set_value(key: str, raw_value: str, check: Callable[[str, Any], None] | None = None) -> Settings:
    """Convert `raw_value` for `key`, store it in the settings file and return the new settings.

    `"none"` or an empty string clears an optional setting (checkpoint_dir, device, precision). `check(key, value)`
    may refuse the converted value (raising a SidestepError) before anything is written. A checkpoint folder
    set here also marks the first-run setup done: the wizard has nothing left to ask.
    """
    _check_key(key)
    if raw_value.strip().lower() in _CLEAR and _default_of(key) is not None:
        raise ConfigError(f"Cannot clear {key}: it always needs a value; use `sidestep settings reset` for defaults.")
    value = _convert(key, raw_value, lambda exp: f"Cannot set {key} to {raw_value!r}: expected {exp}.")
    if check is not None and value is not None:
        check(key, value)
    current = load_settings()
    changes: dict[str, Any] = {key: value}
    if key == "checkpoint_dir" and value is not None:
        changes["first_run_done"] = True
    updated = Settings(**{**_as_kwargs(current), **changes})
    save_settings(updated)
    return updated


def reset_settings() -> Path | None:
    """Move the current file (even a corrupt one) to settings.json.bak, then write defaults; returns the backup."""
    path = settings_path()
    backup = None
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        try:
            os.replace(path, backup)
        except OSError as err:
            raise SettingsError(
                f"Cannot move {path} to {backup.name}: {err.strerror}; check the folder's permissions."
            ) from None
    _write(path, Settings())
    return backup


def resolve(key: str, flag_value: Any = None) -> Resolved:
    """Apply flag > env > settings file > default for `key` and say which one won.

    Args:
        key (`str`): one of `SETTING_KEYS`.
        flag_value: the command-line value, or `None` when the flag was not given.
    """
    _check_key(key)
    flag = "--" + key.replace("_", "-")
    if flag_value is not None:
        if isinstance(flag_value, bool):
            return Resolved(flag_value, flag)
        raw = str(flag_value)
        value = _convert(key, raw, lambda exp: f"{flag} {raw!r} is not valid: expected {exp}.")
        return Resolved(value, flag)
    env_name = ENV_VARS.get(key)
    raw_env = os.environ.get(env_name, "") if env_name else ""
    if env_name and raw_env.strip():
        message = lambda exp: f"env {env_name}={raw_env!r} is not valid: expected {exp}; fix or unset it."  # noqa: E731
        value = _convert(key, raw_env, message)
        if value is not None:
            return Resolved(value, f"env {env_name}")
    stored = _read_file(settings_path())
    if stored.get(key) is not None:
        return Resolved(stored[key], "settings file")
    return Resolved(_default_of(key), "default")


def require_checkpoint_dir(flag: Path | None) -> Resolved:
    """Resolve the checkpoint folder; raise `ConfigError` when none is given or it is not a folder."""
    found = resolve("checkpoint_dir", flag)
    if found.value is None:
        raise ConfigError(
            "No checkpoint folder given: pass --checkpoint-dir or run `sidestep settings set checkpoint_dir PATH`."
        )
    if not found.value.is_dir():
        raise ConfigError(f"Checkpoint folder {found.value} (from {found.source}) does not exist or is not a folder.")
    return found


# ---- parsing -------------------------------------------------------------------------------------------------

_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_CLEAR = ("", "none")


def _parse_path(raw: str) -> Path:
    return Path(os.path.abspath(Path(raw.strip()).expanduser()))


def _parse_model(raw: str) -> str:
    name = raw.strip()
    if not _MODEL_RE.fullmatch(name):
        raise ValueError("a variant or folder name like turbo, base, sft or xl-base (letters, digits, '.', '_', '-')")
    return name


def _parse_device(raw: str) -> str:
    name = raw.strip().lower()
    if not _DEVICE_RE.fullmatch(name):
        raise ValueError("auto, cpu, cuda, cuda:N or mps")
    return name


def _parse_precision(raw: str) -> str:
    name = raw.strip().lower()
    if name not in _PRECISIONS:
        raise ValueError(", ".join(_PRECISIONS[:-1]) + " or " + _PRECISIONS[-1])
    return name


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("true/false, yes/no or 1/0")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "checkpoint_dir": _parse_path,
    "model": _parse_model,
    "device": _parse_device,
    "precision": _parse_precision,
    "first_run_done": _parse_bool,
}


def _convert(key: str, raw: str, message: Callable[[str], str], error: type[Exception] = ConfigError) -> Any:
    """Parse a raw string for `key`: `None` for a cleared optional value, `error(message(expected))` if bad."""
    if raw.strip().lower() in _CLEAR and _default_of(key) is None:
        return None
    try:
        return _PARSERS[key](raw)
    except ValueError as err:
        raise error(message(str(err))) from None


def _check_key(key: str) -> None:
    if key not in SETTING_KEYS:
        raise ConfigError(f"Unknown setting {key!r}; valid keys are {', '.join(SETTING_KEYS)}.")


def _default_of(key: str) -> Any:
    return next(f.default for f in fields(Settings) if f.name == key)


def _as_kwargs(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(Settings)}


# ---- the file ------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    """Return the validated values present in the file ({} when it is missing); SettingsError if corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise SettingsError(f"Settings file {path} is not UTF-8 text; {_FIX}.") from None
    except OSError as err:
        raise SettingsError(f"Cannot read settings file {path}: {err.strerror}; check permissions or {_FIX}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(f"Settings file {path} is not valid JSON (line {err.lineno}); {_FIX}.") from None
    except (ValueError, RecursionError):  # nested a thousand deep, or a number of thousands of digits
        raise SettingsError(f"Settings file {path} is not usable JSON (too deeply nested or too large a number); {_FIX}.") from None
    if not isinstance(data, dict):
        raise SettingsError(f"Settings file {path} must hold a JSON object, not {type(data).__name__}; {_FIX}.")
    version = data.pop("version", FILE_VERSION)
    if version != FILE_VERSION:
        raise SettingsError(
            f"Settings file {path} has version {version!r}, this sidestep reads version {FILE_VERSION}; "
            f"upgrade sidestep or {_FIX}."
        )
    unknown = sorted(set(data) - set(SETTING_KEYS))
    if unknown:
        raise SettingsError(
            f"Settings file {path} has unknown key {unknown[0]!r} (valid: {', '.join(SETTING_KEYS)}); {_FIX}."
        )
    return {key: _read_value(path, key, value) for key, value in data.items()}


def _read_value(path: Path, key: str, value: Any) -> Any:
    is_bool = isinstance(_default_of(key), bool)
    if value is None and _default_of(key) is None:
        return None
    if is_bool:
        if not isinstance(value, bool):
            raise SettingsError(f"Settings file {path} has {key} = {value!r}, expected true or false; {_FIX}.")
        return value
    if not isinstance(value, str):
        raise SettingsError(f"Settings file {path} has {key} = {value!r}, expected a string; {_FIX}.")
    message = lambda exp: f"Settings file {path} has {key} = {value!r}, expected {exp}; {_FIX}."  # noqa: E731
    return _convert(key, value, message, SettingsError)


def _write(path: Path, settings: Settings) -> None:
    payload = {"version": FILE_VERSION, **asdict(settings)}
    if settings.checkpoint_dir is not None:
        payload["checkpoint_dir"] = str(settings.checkpoint_dir)
    try:
        write_json_atomic(path, payload)
    except OSError as err:
        raise SettingsError(
            f"Cannot write settings file {path}: {err.strerror}; check folder permissions or set {CONFIG_DIR_ENV}."
        ) from None

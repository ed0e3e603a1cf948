"""Named sets of defaults: built-in ones shipped as package data, and the user's own in the config folder.

A preset is a flat mapping of config field names to values. A flow applies only the fields it asks about
(`overlapping`), so one preset serves Preprocessing++ (the rank budget) and Train (everything).
File: `{"version": 1, "description": "...", "values": {...}}`, named `<name>.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from sidestep import settings
from sidestep.errors import ConfigError
from sidestep.fileio import write_json_atomic

__all__ = [
    "PRESET_FIELDS", "Preset", "builtin_presets", "delete_preset", "list_presets", "load_preset", "overlapping",
    "save_preset", "user_presets_dir", "validate_name",
]

FILE_VERSION = 1
# Every field a preset may hold, with its type; keys are config field names shared by the flows.
PRESET_FIELDS: dict[str, type] = {
    "rank": int,
    "rank_min": int,
    "rank_max": int,
    "alpha": float,
    "dropout": float,
    "lr": float,
    "batch_size": int,
    "grad_accum": int,
    "gradient_checkpointing": bool,
    "max_latent_length": int,
    "epochs": int,
    "max_steps": int,
    "warmup_steps": int,
    "max_grad_norm": float,
    "cfg_dropout": float,
    "save_every": int,
}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    values: Mapping[str, Any] = field(default_factory=dict)
    builtin: bool = False
    path: Path | None = None


def validate_name(name: str) -> str:
    """A preset name: lower-case letters, digits, '-' and '_', at most 40 characters; ConfigError otherwise."""
    clean = name.strip().lower()
    if not _NAME_RE.fullmatch(clean):
        raise ConfigError(
            f"Preset name {name!r} is not valid: use up to 40 lower-case letters, digits, '-' or '_' "
            "(starting with a letter or digit)."
        )
    return clean


def user_presets_dir() -> Path:
    return settings.config_dir() / "presets"


def builtin_presets() -> list[Preset]:
    folder = resources.files("sidestep.wizard") / "presets"
    found = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            name = item.name[: -len(".json")]
            found.append(_parse(name, item.read_text(encoding="utf-8"), f"built-in preset {item.name}", True))
    return found


def list_presets() -> list[Preset]:
    """Built-in presets first (in a fixed order), then the user's, sorted by name."""
    builtins = sorted(builtin_presets(), key=lambda p: (_BUILTIN_ORDER.get(p.name, 99), p.name))
    folder = user_presets_dir()
    users = []
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            if _NAME_RE.fullmatch(path.stem) and path.stem not in {b.name for b in builtins}:
                users.append(_read_user(path))
    return builtins + users


def load_preset(name: str) -> Preset:
    wanted = validate_name(name)
    for preset in list_presets():
        if preset.name == wanted:
            return preset
    raise ConfigError(f"No preset named {wanted!r}; presets: {', '.join(p.name for p in list_presets())}.")


def save_preset(name: str, values: Mapping[str, Any], description: str = "") -> Preset:
    """Write a user preset atomically (only the known preset fields are kept); built-ins cannot be replaced."""
    clean = validate_name(name)
    if clean in {p.name for p in builtin_presets()}:
        raise ConfigError(f"{clean!r} is a built-in preset and cannot be overwritten; choose another name.")
    kept = _check_values({k: v for k, v in values.items() if k in PRESET_FIELDS and v is not None}, clean)
    if not kept:
        raise ConfigError(f"Preset {clean!r} would be empty: none of the values is a preset field.")
    path = user_presets_dir() / f"{clean}.json"
    payload = {"version": FILE_VERSION, "description": description, "values": kept}
    try:
        write_json_atomic(path, payload)
    except OSError as err:
        raise ConfigError(f"Cannot write preset {path}: {err.strerror}.") from None
    return Preset(clean, description, kept, False, path)


def delete_preset(name: str) -> Path:
    clean = validate_name(name)
    if clean in {p.name for p in builtin_presets()}:
        raise ConfigError(f"{clean!r} is a built-in preset and cannot be deleted.")
    path = user_presets_dir() / f"{clean}.json"
    if not path.is_file():
        raise ConfigError(f"No user preset named {clean!r} in {path.parent}.")
    path.unlink()
    return path


def overlapping(preset: Preset, names: Iterable[str]) -> dict[str, Any]:
    """The preset's values for exactly those fields in `names`; every other field is left alone."""
    wanted = set(names)
    return {key: value for key, value in preset.values.items() if key in wanted}


# ---- files ---------------------------------------------------------------------------------------------------

_BUILTIN_ORDER = {name: i for i, name in enumerate(
    ("recommended", "quick-test", "high-quality", "low-vram-8gb", "low-vram-12gb", "low-vram-16gb", "low-vram-24gb")
)}


def _read_user(path: Path) -> Preset:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read preset {path}: {err}; delete or fix it.") from None
    preset = _parse(path.stem, text, f"preset file {path}", False)
    return Preset(preset.name, preset.description, preset.values, False, path)


def _parse(name: str, text: str, where: str, builtin: bool) -> Preset:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"The {where} is not valid JSON (line {err.lineno}); delete or fix it.") from None
    except (ValueError, RecursionError):  # nested a thousand deep, or a number of thousands of digits
        raise ConfigError(f"The {where} is not usable JSON (too deeply nested or too large a number); delete or fix it.") from None
    if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
        raise ConfigError(f"The {where} must be a JSON object with a \"values\" object; delete or fix it.")
    if data.get("version", FILE_VERSION) != FILE_VERSION:
        raise ConfigError(f"The {where} has version {data.get('version')!r}; this sidestep reads {FILE_VERSION}.")
    values = _check_values(data["values"], where)
    return Preset(name, str(data.get("description", "")), values, builtin)


def _check_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = PRESET_FIELDS.get(key)
        if kind is None:
            raise ConfigError(f"The {where} has unknown field {key!r}; known: {', '.join(PRESET_FIELDS)}.")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"The {where} has {key} = {value!r}; expected {kind.__name__}.")
        out[key] = value
    return out

"""What to render: one `SamplePrompt` per clip, from flags or from a TOML/JSON prompts file, checked up front.

A prompts file is a JSON list of objects (or of plain strings), a JSON object with a `prompts` list, or a
TOML file of `[[prompts]]` tables. Each entry: `prompt` (required), and optionally `name`, `lyrics`,
`duration` (seconds), `seed`, `bpm`, `keyscale`, `timesignature`, `language`. Missing values take the
command's defaults; a missing seed is the default seed plus the entry's position, so every entry differs
but each keeps its seed from run to run.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidestep.errors import ConfigError

__all__ = ["SamplePrompt", "PromptDefaults", "MAX_DURATION_S", "DEFAULT_LYRICS", "read_prompts", "make_prompt",
           "safe_name"]

# ACE-Step 1.5 renders up to ten minutes in one pass.
MAX_DURATION_S = 600.0
DEFAULT_LYRICS = "[Instrumental]"
_FIELDS = ("name", "prompt", "lyrics", "duration", "seed", "bpm", "keyscale", "timesignature", "language")


@dataclass(frozen=True)
class SamplePrompt:
    """One clip to render; `name` is the file stem (already safe for a file name)."""

    name: str
    prompt: str
    lyrics: str = DEFAULT_LYRICS
    duration: float = 30.0
    seed: int = 0
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    language: str = "en"

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}


@dataclass(frozen=True)
class PromptDefaults:
    duration: float = 30.0
    seed: int = 0
    lyrics: str = DEFAULT_LYRICS


def safe_name(text: str, fallback: str = "sample") -> str:
    """A short file stem from free text: letters, digits, `-`, `_` and `.` only."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:48].rstrip("-._")
    return name or fallback


def make_prompt(where: str, raw: dict[str, Any], defaults: PromptDefaults, index: int = 0) -> SamplePrompt:
    """Check one entry (from flags or a file; `where` names it in errors) and fill in the defaults."""
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; use {', '.join(_FIELDS)}.")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: needs a non-empty \"prompt\" text.")
    duration = _number(raw.get("duration", defaults.duration), where, "duration")
    if not math.isfinite(duration) or duration <= 0:
        raise ConfigError(f"{where}: duration {duration:g} s must be more than 0 seconds.")
    if duration > MAX_DURATION_S:
        raise ConfigError(f"{where}: duration {duration:g} s is beyond the model's limit of {MAX_DURATION_S:g} s.")
    seed = raw.get("seed", defaults.seed + index)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: seed {seed!r} must be a whole number >= 0.")
    bpm = raw.get("bpm")
    if bpm is not None and (isinstance(bpm, bool) or not isinstance(bpm, int) or not 30 <= bpm <= 300):
        raise ConfigError(f"{where}: bpm {bpm!r} must be a whole number from 30 to 300.")
    texts = {}
    for key in ("lyrics", "keyscale", "timesignature", "language", "name"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise ConfigError(f"{where}: {key} must be text, got {value!r}.")
        texts[key] = None if value is None else str(value)
    name = safe_name(texts["name"] or prompt, fallback=f"sample-{index + 1:02d}")
    return SamplePrompt(name, prompt.strip(), texts["lyrics"] if texts["lyrics"] is not None else defaults.lyrics,
                        duration, seed, bpm, texts["keyscale"], texts["timesignature"], texts["language"] or "en")


def read_prompts(path: Path, defaults: PromptDefaults = PromptDefaults()) -> tuple[SamplePrompt, ...]:
    """Every entry of a `.toml` or `.json` prompts file, checked; a ConfigError names the file and entry."""
    path = Path(path)
    entries = _parse(path)
    if not entries:
        raise ConfigError(f"{path}: the prompt list is empty; add at least one entry with a \"prompt\".")
    prompts = []
    for index, raw in enumerate(entries):
        where = f"{path} entry {index + 1}"
        if isinstance(raw, str):
            raw = {"prompt": raw}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table/object with a \"prompt\", got {type(raw).__name__}.")
        named = dict(raw)
        if "name" not in named:  # numbered, so two prompts that start alike still get their own file
            named["name"] = f"{index + 1:02d}-{safe_name(str(raw.get('prompt', '')))}"
        prompts.append(make_prompt(where, named, defaults, index))
    seen: dict[str, int] = {}
    for index, item in enumerate(prompts):
        if item.name in seen:
            raise ConfigError(f"{path}: entries {seen[item.name] + 1} and {index + 1} share the name {item.name!r}; "
                              "give each a different \"name\".")
        seen[item.name] = index
    return tuple(prompts)


def _parse(path: Path) -> list[Any]:
    if not path.is_file():
        raise ConfigError(f"Prompts file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"Prompts file {path} must end in .toml or .json.")
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Prompts file {path} cannot be read ({err}).") from err
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Prompts file {path} does not parse as {suffix[1:].upper()} ({err}).") from err
    if isinstance(data, dict):
        data = data.get("prompts", data.get("sample"))
        if data is None:
            raise ConfigError(f"Prompts file {path} has no \"prompts\" list (TOML: [[prompts]] tables).")
    if not isinstance(data, list):
        raise ConfigError(f"Prompts file {path}: \"prompts\" must be a list.")
    return data


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number of seconds, got {value!r}.")
    return float(value)

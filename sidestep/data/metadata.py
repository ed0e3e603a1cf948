"""Per-track captions, lyrics and musical facts, and the text prompt built from them.

Precedence, per field: the dataset JSON (`--dataset-json`) > sidecar files next to the audio > defaults.
Sidecars follow ACE-Step 1.5's own dataset convention:
- `<stem>.json`: any of caption, lyrics, bpm, keyscale, timesignature, language, is_instrumental, genre, tags;
- `<stem>.caption.txt`: the caption;
- `<stem>.lyrics.txt`, or else a plain `<stem>.txt`: the lyrics (ACE-Step reads a plain .txt as lyrics too).
A track with no metadata at all is instrumental with the generic caption `DEFAULT_CAPTION`.

The dataset JSON may be `{"samples": [...]}` (ACE-Step's exported dataset), a list of entries, or an
object mapping file names to entries; entries name their audio by `audio_path`, `filename`, `file` or `path`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from diffusers.pipelines.ace_step.pipeline_ace_step import (
    DEFAULT_DIT_INSTRUCTION,
    SFT_GEN_PROMPT,
    AceStepPipeline,
)

from sidestep.errors import ConfigError

__all__ = ["MetadataSource", "TrackMeta", "DatasetJson", "read_dataset_json", "resolve_metadata", "format_prompt",
           "DEFAULT_CAPTION", "INSTRUMENTAL_LYRICS"]

DEFAULT_CAPTION = "instrumental music"
INSTRUMENTAL_LYRICS = "[Instrumental]"
_NAME_KEYS = ("audio_path", "filename", "file", "path")
_ALIASES = {"key": "keyscale", "key_scale": "keyscale", "time_signature": "timesignature",
            "instrumental": "is_instrumental", "vocal_language": "language", "prompt": "caption"}
_UNKNOWN = ("n/a", "na", "none", "unknown", "null", "")
_MAX_BPM = 1000


class MetadataSource(str, Enum):
    DATASET_JSON = "dataset json"
    SIDECAR = "sidecar"
    DEFAULT = "default"


@dataclass(frozen=True)
class TrackMeta:
    """What is known about one track; None = not given."""

    caption: str | None = None
    lyrics: str | None = None
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    language: str | None = None
    is_instrumental: bool | None = None
    genre: str | None = None
    tags: str | None = None

    def merged_over(self, lower: TrackMeta) -> TrackMeta:
        """Fields of `self` where given, otherwise those of `lower`."""
        return TrackMeta(**{k: v if v is not None else getattr(lower, k) for k, v in self.as_dict().items()})

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.as_dict().values())


@dataclass(frozen=True)
class DatasetJson:
    path: Path
    entries: Mapping[str, TrackMeta]  # by the name the entry gave (relative path or file name)


@dataclass(frozen=True)
class Resolved:
    """The fields used for one track, and where they came from."""

    caption: str
    lyrics: str
    is_instrumental: bool
    meta: TrackMeta
    source: MetadataSource
    json_entry: str | None = None  # the dataset JSON entry used, if any


def read_dataset_json(path: Path) -> DatasetJson:
    """Parse a dataset JSON; any structural problem is a ConfigError naming the file and the entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8, a 5000-digit number
        raise ConfigError(f"--dataset-json {path}: cannot read it as JSON ({str(err)[:120] or 'nested too deeply'}).") from None
    items: list[tuple[str, Any]]
    if isinstance(raw, dict) and isinstance(raw.get("samples"), list):
        raw = raw["samples"]
    if isinstance(raw, list):
        items = [(_entry_name(path, i, e), e) for i, e in enumerate(raw)]
    elif isinstance(raw, dict):
        items = list(raw.items())
    else:
        raise ConfigError(f"--dataset-json {path}: expected a list of entries or an object, found {type(raw).__name__}.")
    entries: dict[str, TrackMeta] = {}
    for name, entry in items:
        if not isinstance(entry, dict):
            raise ConfigError(f"--dataset-json {path}: the entry for {name!r} is not an object.")
        entries[str(name).replace("\\", "/")] = _parse_fields(entry, f"--dataset-json {path}, entry {name!r}")
    return DatasetJson(path, entries)


def resolve_metadata(audio: Path, relative: str, dataset: DatasetJson | None) -> Resolved:
    """Merge dataset JSON > sidecars > defaults for the track at `audio` (`relative` to the audio folder)."""
    entry = _lookup(dataset, relative) if dataset else None
    from_json = dataset.entries[entry] if dataset and entry is not None else None
    sidecar = _read_sidecars(audio)
    meta = (from_json or TrackMeta()).merged_over(sidecar)
    if from_json is not None and not from_json.empty:
        source = MetadataSource.DATASET_JSON
    elif not sidecar.empty:
        source = MetadataSource.SIDECAR
    else:
        source = MetadataSource.DEFAULT
    caption = ", ".join(t.strip() for t in (meta.caption, meta.genre, meta.tags) if t and t.strip())
    lyrics = (meta.lyrics or "").strip()
    instrumental = meta.is_instrumental if meta.is_instrumental is not None else not lyrics
    if instrumental or not lyrics:
        lyrics = INSTRUMENTAL_LYRICS
    return Resolved(caption or DEFAULT_CAPTION, lyrics, bool(instrumental), meta, source, entry)


def format_prompt(caption: str, meta: TrackMeta, duration: float) -> str:
    """The SFT text prompt (`# Instruction` / `# Caption` / `# Metas`), formatted by the diffusers pipeline's helpers."""
    metas = AceStepPipeline._build_metadata_string(bpm=meta.bpm, keyscale=meta.keyscale,
                                                   timesignature=meta.timesignature, audio_duration=duration)
    return SFT_GEN_PROMPT.format(DEFAULT_DIT_INSTRUCTION, caption, metas)


def _entry_name(path: Path, index: int, entry: Any) -> str:
    if isinstance(entry, dict):
        for key in _NAME_KEYS:
            if isinstance(entry.get(key), str) and entry[key].strip():
                return entry[key].strip()
    raise ConfigError(f"--dataset-json {path}: entry {index} has none of {', '.join(_NAME_KEYS)} to name its audio file.")


def _lookup(dataset: DatasetJson, relative: str) -> str | None:
    """The entry for `relative`: by relative path, then file name, then stem (entries may carry foreign paths)."""
    rel = Path(relative)
    tests = (lambda n: n == relative or n.endswith("/" + relative), lambda n: Path(n).name == rel.name,
             lambda n: Path(n).stem == rel.stem or n == rel.stem)
    for matches in tests:
        for name in dataset.entries:
            if matches(name):
                return name
    return None


def _read_sidecars(audio: Path) -> TrackMeta:
    stem = audio.with_suffix("")
    meta = TrackMeta()
    json_path = stem.with_name(stem.name + ".json")
    if json_path.is_file():
        try:
            raw = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise ConfigError(f"{json_path}: cannot read this sidecar as JSON ({str(err)[:120] or 'nested too deeply'}).") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{json_path}: a sidecar must be a JSON object.")
        meta = _parse_fields(raw, str(json_path))
    texts = TrackMeta(caption=_read_text(stem, ".caption.txt"),
                      lyrics=_read_text(stem, ".lyrics.txt") or _read_text(stem, ".txt"))
    return meta.merged_over(texts)


def _read_text(stem: Path, suffix: str) -> str | None:
    path = stem.with_name(stem.name + suffix)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read this sidecar as UTF-8 text ({err}).") from err
    return text or None


def _parse_fields(raw: Mapping[str, Any], where: str) -> TrackMeta:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = _ALIASES.get(key, key)
        if field not in TrackMeta.__dataclass_fields__ or value is None or value == "":
            continue
        values[field] = _convert(field, value, where)
    return replace(TrackMeta(), **values)


def _convert(field: str, value: Any, where: str) -> Any:
    if field == "bpm":
        if isinstance(value, str) and value.strip().lower() in _UNKNOWN:
            return None
        try:
            bpm = round(float(value))
        except (TypeError, ValueError, OverflowError):  # NaN and Inf cannot be rounded
            raise ConfigError(f"{where}: bpm {str(value)[:40]!r} is not a number (a finite tempo such as 120).") from None
        if bpm > _MAX_BPM:
            raise ConfigError(f"{where}: bpm {bpm} is not a tempo (at most {_MAX_BPM}).")
        return bpm if bpm > 0 else None
    if field == "is_instrumental":
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "yes", "1"):
            return True
        if str(value).strip().lower() in ("false", "no", "0"):
            return False
        raise ConfigError(f"{where}: is_instrumental {value!r} is not true or false.")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)

"""`preprocess_audio`: a folder of songs -> one training `.pt` per song (or per chunk), incrementally and safely.

Each output holds exactly the keys of docs/checkpoints.md ("The preprocessed dataset"), `metadata` included.
An output is up to date when its `metadata["preprocess_key"]` matches the hash of the audio bytes, the
track's metadata and the settings that shape the tensors; such files are skipped unless `force`.
Every `.pt` is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a partial file. A file that cannot be decoded is reported and skipped; the rest continue.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from sidestep import __version__
from sidestep.data.audio import Audio, find_audio_files, load_audio, split_audio
from sidestep.data.encoders import (
    LYRIC_MAX_LENGTH,
    TEXT_MAX_LENGTH,
    Encoders,
    context_latents,
    encode_audio,
    encode_condition,
    load_encoders,
    vae_geometry,
)
from sidestep.data.metadata import (
    DatasetJson,
    MetadataSource,
    Resolved,
    format_prompt,
    read_dataset_json,
    resolve_metadata,
)
from sidestep.distributed import all_gather_objects, current
from sidestep.errors import AudioError, ConfigError, Interrupted, SidestepError, is_out_of_memory
from sidestep.fileio import atomic_path, check_output_dir, sha256_file, write_error_reason
from sidestep.models.device import Runtime, on_this_process, resolve_runtime
from sidestep.models.discovery import ModelEntry, find_model

__all__ = ["PreprocessConfig", "PreprocessEvent", "PreprocessSummary", "FileOutcome", "Status", "Stage",
           "preprocess_audio", "FORMAT_VERSION"]

FORMAT_VERSION = 1  # bump when the tensors for the same inputs change; every output is then redone


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class PreprocessConfig:
    audio_dir: Path = field(metadata=_help("Folder of audio files (searched recursively)."))
    output_dir: Path = field(metadata=_help("Folder the .pt files are written to."))
    checkpoint_dir: Path = field(metadata=_help("ACE-Step checkpoint root (vae/, Qwen3-Embedding-0.6B/, the model)."))
    model: str = field(default="base", metadata=_help("Model whose condition encoder conditions the samples."))
    dataset_json: Path | None = field(default=None, metadata=_help("Per-file captions/lyrics/bpm/key; beats sidecars."))
    max_duration: float | None = field(
        default=None, metadata=_help("Split longer songs into equal chunks of at most this many seconds."))
    force: bool = field(default=False, metadata=_help("Redo files whose output is up to date."))
    seed: int = field(default=0, metadata=_help("Seeds the VAE posterior samples (per file, order-independent)."))
    runtime: Runtime | None = field(default=None, metadata=_help("Device and precision; None = auto."))
    tile_seconds: float = field(default=30.0, metadata=_help("VAE tile length for long audio, in seconds."))
    overlap_seconds: float = field(default=2.0, metadata=_help("Audio encoded and discarded at each inner tile edge."))

    def __post_init__(self) -> None:
        if not Path(self.audio_dir).is_dir():
            raise ConfigError(f"--audio-dir {self.audio_dir} does not exist or is not a folder.")
        if self.dataset_json is not None and not Path(self.dataset_json).is_file():
            raise ConfigError(f"--dataset-json {self.dataset_json} does not exist.")
        if self.max_duration is not None and not math.isfinite(self.max_duration):
            raise ConfigError(f"--max-duration {self.max_duration} is not a number of seconds; give e.g. 240.")
        if self.max_duration is not None and self.max_duration < 1.0:
            raise ConfigError(f"--max-duration {self.max_duration} is too short; use at least 1 second.")
        check_output_dir(Path(self.output_dir), "--output")
        if self.tile_seconds <= 2 * self.overlap_seconds or self.overlap_seconds < 0:
            raise ConfigError(f"VAE tile {self.tile_seconds} s must exceed twice its overlap {self.overlap_seconds} s.")


class Status(str, Enum):
    DONE = "done"
    SKIPPED = "skipped"  # output already up to date
    FAILED = "failed"


class Stage(str, Enum):
    LOAD_MODELS = "load models"
    START = "start"
    DECODE = "decode"
    ENCODE = "encode"
    WRITE = "write"  # a chunk's .pt is written to its temporary path, about to be renamed into place
    FINISH = "finish"


@dataclass(frozen=True)
class FileOutcome:
    source: str  # path relative to the audio folder
    status: Status
    outputs: tuple[str, ...] = ()
    duration: float = 0.0  # seconds of audio in the outputs
    metadata_source: MetadataSource | None = None
    reason: str = ""  # why it failed


@dataclass(frozen=True)
class PreprocessEvent:
    """Progress: file `index` of `total` is at `stage`; `step`/`steps` count work inside the file."""

    stage: Stage
    index: int
    total: int
    source: str = ""
    step: int = 0
    steps: int = 1
    outcome: FileOutcome | None = None


@dataclass(frozen=True)
class PreprocessSummary:
    output_dir: Path
    model: str
    outcomes: tuple[FileOutcome, ...]
    runtime_reason: str = ""  # empty when no model had to be loaded
    unmatched_json: tuple[str, ...] = ()  # dataset JSON entries that named no audio file

    def _with(self, status: Status) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status is status]

    @property
    def done(self) -> list[FileOutcome]:
        return self._with(Status.DONE)

    @property
    def skipped(self) -> list[FileOutcome]:
        return self._with(Status.SKIPPED)

    @property
    def failed(self) -> list[FileOutcome]:
        return self._with(Status.FAILED)

    @property
    def defaulted(self) -> list[FileOutcome]:
        """Usable tracks that had no metadata: treated as instrumental with the generic caption."""
        return [o for o in self.outcomes if o.status is not Status.FAILED and o.metadata_source is MetadataSource.DEFAULT]

    @property
    def total_duration(self) -> float:
        return sum(o.duration for o in self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir), "model": self.model, "runtime": self.runtime_reason,
            "done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
            "total_duration_s": round(self.total_duration, 3), "default_metadata": [o.source for o in self.defaulted],
            "unmatched_dataset_json_entries": list(self.unmatched_json),
            "files": [{"source": o.source, "status": o.status.value, "outputs": list(o.outputs),
                       "duration_s": round(o.duration, 3), "reason": o.reason,
                       "metadata": o.metadata_source.value if o.metadata_source else None} for o in self.outcomes],
        }


def _noop(event: PreprocessEvent) -> None:
    return None


def preprocess_audio(config: PreprocessConfig, on_event: Callable[[PreprocessEvent], None] = _noop) -> PreprocessSummary:
    """Encode every audio file of `config.audio_dir` into `config.output_dir`; see the module docstring."""
    audio_dir = Path(config.audio_dir)
    files = find_audio_files(audio_dir)
    if not files:
        raise ConfigError(f"--audio-dir {audio_dir} holds no audio files (wav, flac, mp3, ogg, opus, m4a, aiff).")
    dataset = read_dataset_json(config.dataset_json) if config.dataset_json else None
    # Preprocessing reads only the condition encoder, so a fine-tune's parent variant does not matter here.
    entry = find_model(config.checkpoint_dir, config.model, base_variant="base")
    dist = current()
    runtime = on_this_process(config.runtime or resolve_runtime(None, None, False))
    on_event = on_event if dist.is_main else _noop
    job = _Job(config, entry, runtime, dataset, on_event, _output_names(files, audio_dir))
    total, outcomes = len(files), []
    try:
        # Round-robin over the processes (torchrun): in each round of W files process r encodes file first + r,
        # then the outcomes are gathered to all, so a dead or stalled peer is noticed within one file's time,
        # process 0's bar counts every file and all end with the summary in file order. Each output is written
        # atomically by the one process that owns its file. For one process the gathers return [mine].
        for first in range(0, total, dist.world_size):
            index, mine = first + dist.rank, None
            if index < total:
                source = files[index].relative_to(audio_dir).as_posix()
                on_event(PreprocessEvent(Stage.START, index, total, source))
                mine = job.process(index, total, files[index], source)
            for outcome in all_gather_objects(mine):
                if outcome is not None:
                    outcomes.append(outcome)
                    on_event(PreprocessEvent(Stage.FINISH, len(outcomes) - 1, total, outcome.source, 1, 1, outcome))
        shared = all_gather_objects((job.json_entries_used, job.encoders is not None))
    except KeyboardInterrupt:
        raise Interrupted(f"Preprocessing interrupted after {len(outcomes)} of {total} files; no partial .pt "
                          "was left and a rerun continues where it stopped.") from None
    used = {name for names, _ in shared for name in names}
    encoded = any(loaded for _, loaded in shared)
    unmatched = tuple(sorted(set(dataset.entries) - used)) if dataset else ()
    return PreprocessSummary(Path(config.output_dir), entry.name, tuple(outcomes),
                             runtime.reason if encoded else "", unmatched)


class _Job:
    """State shared by the files of one run: lazily loaded models, the settings fingerprint, names."""

    def __init__(self, config: PreprocessConfig, entry: ModelEntry, runtime: Runtime, dataset: DatasetJson | None,
                 on_event: Callable[[PreprocessEvent], None], names: dict[Path, str]) -> None:
        self.config, self.entry, self.runtime, self.dataset = config, entry, runtime, dataset
        self.on_event, self.names = on_event, names
        self.out_dir = Path(config.output_dir)
        self.encoders: Encoders | None = None
        self.geometry: tuple[int, int] | None = None  # VAE (sample rate, hop), read from its config.json
        self.json_entries_used: list[str] = []
        self.fingerprint = _settings_fingerprint(config, entry, runtime)

    def models(self, index: int, total: int, source: str) -> Encoders:
        if self.encoders is None:  # only when some file needs work: a rerun with nothing to do loads nothing
            self.on_event(PreprocessEvent(Stage.LOAD_MODELS, index, total, source))
            self.encoders = load_encoders(self.entry, Path(self.config.checkpoint_dir), self.runtime)
        return self.encoders

    def process(self, index: int, total: int, path: Path, source: str) -> FileOutcome:
        try:
            meta = resolve_metadata(path, source, self.dataset)
            audio_sha = sha256_file(path)
        except (ConfigError, OSError) as err:
            return FileOutcome(source, Status.FAILED, reason=str(err))
        if meta.json_entry is not None:
            self.json_entries_used.append(meta.json_entry)
        key = _sample_key(self.fingerprint, audio_sha, meta)
        name = self.names[path]
        if not self.config.force:
            current = _up_to_date(self.out_dir, name, source, key)
            if current is not None:
                return FileOutcome(source, Status.SKIPPED, current[0], current[1], meta.source)
        self.on_event(PreprocessEvent(Stage.DECODE, index, total, source, 0, 1))
        if self.geometry is None:
            self.geometry = vae_geometry(self.entry, Path(self.config.checkpoint_dir))
        rate, hop = self.geometry
        try:  # decoded before any model loads: a run of only bad or up-to-date files never loads the encoders
            audio = load_audio(path, rate, min_samples=hop)
        except AudioError as err:
            return FileOutcome(source, Status.FAILED, metadata_source=meta.source, reason=str(err))
        encoders = self.models(index, total, source)
        chunks = split_audio(audio, self.config.max_duration, align=hop)
        steps = 1 + 2 * len(chunks)
        outputs: list[str] = []
        for c, chunk in enumerate(chunks):
            self.on_event(PreprocessEvent(Stage.ENCODE, index, total, source, 1 + 2 * c, steps))
            try:
                sample = self._sample(encoders, chunk, meta, source, audio_sha, key, c, len(chunks))
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                seconds = chunk.samples.shape[-1] / chunk.sample_rate
                raise SidestepError(f"Ran out of memory encoding {source} ({seconds:.0f} s of audio); pass "
                                    "--max-duration (e.g. 120) to encode long songs in shorter chunks.") from err
            target = self.out_dir / _chunk_name(name, c, len(chunks))
            try:
                with atomic_path(target) as tmp:
                    torch.save(sample, tmp)
                    self.on_event(PreprocessEvent(Stage.WRITE, index, total, source, 2 + 2 * c, steps))
            except (OSError, RuntimeError, SidestepError) as err:  # torch.save: RuntimeError on a full disk
                raise SidestepError(f"Cannot write {target} ({write_error_reason(err)}); the files written before "
                                    "are complete: free some space and rerun to continue.") from err
            outputs.append(target.name)
        _remove_stale(self.out_dir, name, source, set(outputs))
        return FileOutcome(source, Status.DONE, tuple(outputs), audio.duration, meta.source)

    def _sample(self, encoders: Encoders, chunk: Audio, meta: Resolved, source: str, audio_sha: str, key: str,
                index: int, count: int) -> dict[str, Any]:
        seed = int(hashlib.sha256(f"{self.config.seed}:{audio_sha}:{index}".encode()).hexdigest()[:15], 16)
        latents = encode_audio(encoders, chunk.samples, torch.Generator().manual_seed(seed),
                               self.config.tile_seconds, self.config.overlap_seconds)
        prompt = format_prompt(meta.caption, meta.meta, chunk.duration)
        states, mask = encode_condition(encoders, prompt, meta.lyrics)
        dtype, frames = self.runtime.dtype, latents.shape[0]
        return {
            "target_latents": latents.to(dtype),
            "attention_mask": torch.ones(frames, dtype=dtype),
            "encoder_hidden_states": states.to(dtype),
            "encoder_attention_mask": mask,
            "context_latents": context_latents(encoders, frames).to(dtype),
            "metadata": _metadata(chunk, meta, source, audio_sha, key, index, count, self.entry.name, prompt),
        }


def _metadata(chunk: Audio, meta: Resolved, source: str, audio_sha: str, key: str, index: int, count: int,
              model: str, prompt: str) -> dict[str, Any]:
    facts = meta.meta
    return {
        "source": source, "filename": Path(source).name, "duration": round(chunk.duration, 3),
        "caption": meta.caption, "lyrics": meta.lyrics, "bpm": facts.bpm, "keyscale": facts.keyscale,
        "timesignature": facts.timesignature, "language": facts.language or "unknown",
        "is_instrumental": meta.is_instrumental, "genre": facts.genre, "metadata_source": meta.source.value,
        "sha": audio_sha, "chunk_index": index, "chunk_count": count, "chunk_start": round(chunk.offset, 3),
        "model": model, "prompt": prompt, "preprocess_key": key, "sidestep_version": __version__,
    }


def _settings_fingerprint(config: PreprocessConfig, entry: ModelEntry, runtime: Runtime) -> str:
    """What, besides the audio and its metadata, shapes the tensors (the device does not, beyond rounding)."""
    settings = {
        "format": FORMAT_VERSION, "model": entry.name, "layout": entry.layout.value,
        "model_config": hashlib.sha256(json.dumps(entry.config, sort_keys=True, default=str).encode()).hexdigest(),
        "seed": config.seed, "max_duration": config.max_duration, "tile": config.tile_seconds,
        "overlap": config.overlap_seconds, "dtype": str(runtime.dtype),
        "text_tokens": TEXT_MAX_LENGTH, "lyric_tokens": LYRIC_MAX_LENGTH,
    }
    return json.dumps(settings, sort_keys=True)


def _sample_key(fingerprint: str, audio_sha: str, meta: Resolved) -> str:
    text = json.dumps([fingerprint, audio_sha, meta.caption, meta.lyrics, meta.meta.as_dict()], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]



def _output_names(files: list[Path], audio_dir: Path) -> dict[Path, str]:
    """Output stem per file: the relative path without suffix, `/` -> `__`; the suffix is kept on clashes."""
    stems = {p: p.relative_to(audio_dir).with_suffix("").as_posix().replace("/", "__") for p in files}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {p: s if counts[s] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}" for p, s in stems.items()}


def _chunk_name(name: str, index: int, count: int) -> str:
    return f"{name}.pt" if count == 1 else f"{name}.part{index + 1:02d}.pt"


def _candidates(out_dir: Path, name: str) -> list[Path]:
    parts = sorted(Path(p) for p in glob.glob(str(out_dir / f"{glob.escape(name)}.part[0-9][0-9].pt")))
    return [p for p in [out_dir / f"{name}.pt", *parts] if p.is_file()]


def _read_metadata(path: Path) -> dict[str, Any]:
    try:  # mmap: only the pickled dict is read, the tensors stay on disk
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable output is simply not up to date
        return {}
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    return meta if isinstance(meta, dict) else {}


def _up_to_date(out_dir: Path, name: str, source: str, key: str) -> tuple[tuple[str, ...], float] | None:
    """(outputs, seconds) when every chunk of this source exists with the same key, else None."""
    found = _candidates(out_dir, name)
    if not found:
        return None
    first = _read_metadata(found[0])
    count = first.get("chunk_count")
    if first.get("preprocess_key") != key or first.get("source") != source or not isinstance(count, int):
        return None
    expected = [out_dir / _chunk_name(name, i, count) for i in range(count)]
    metas = [first if p == found[0] else _read_metadata(p) for p in expected if p.is_file()]
    if len(metas) != count or any(m.get("preprocess_key") != key for m in metas):
        return None
    return tuple(p.name for p in expected), float(sum(m.get("duration", 0.0) for m in metas))


def _remove_stale(out_dir: Path, name: str, source: str, keep: set[str]) -> None:
    """Drop this source's outputs from an earlier run that this run did not write (e.g. fewer chunks)."""
    for path in _candidates(out_dir, name):
        if path.name not in keep and _read_metadata(path).get("source") == source:
            path.unlink(missing_ok=True)
